"""TabNet classifier whose state dict loads scTab's published TabNet weights key for key.

The architecture follows Arik & Pfister, "TabNet: Attentive Interpretable Tabular Learning" (AAAI 2021) as
implemented by pytorch-tabnet (dreamquark-ai) and vendored by scTab (``cellnet/tabnet``). Module attribute names
are chosen so that :meth:`torch.nn.Module.state_dict` produces exactly the keys of scTab's checkpoints
(``encoder.initial_bn.*``, ``encoder.initial_splitter.*``, ``encoder.feat_transformers.*``,
``encoder.att_transformers.*``, ``final_mapping.weight``). pytorch-tabnet is *not* a dependency; everything
here is a fresh implementation.

Data flow of one forward pass (``x`` is ``(B, n_input)``)::

    x  = initial_bn(x)                                   # plain BatchNorm1d, momentum 0.01
    a  = initial_splitter(x)[:, n_d:]                    # attention features of width n_a
    prior = 1
    for step in range(n_steps):
        M     = selector(ghost_bn(fc(a)) * prior)        # entmax15 / sparsemax over the genes
        prior = (gamma - M) * prior
        out   = feat_transformers[step](M * x)           # width n_d + n_a
        d_step, a = relu(out[:, :n_d]), out[:, n_d:]
    embedding = sum of d_step over steps                 # (B, n_d)
    logits    = final_mapping(embedding)                 # Linear(n_d, n_labels, bias=False)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from schce.nn._sparse_mappings import _Selector, entmax15, sparsemax

__all__ = ["GhostBatchNorm", "TabNet", "entmax15", "sparsemax"]


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def _init_glu(linear: nn.Linear) -> None:
    """Xavier-normal with gain ``sqrt((fan_in + fan_out) / sqrt(fan_in))``: std ``sqrt(2 / sqrt(fan_in))``."""
    fan_out, fan_in = linear.weight.shape
    nn.init.xavier_normal_(linear.weight, gain=math.sqrt((fan_in + fan_out) / math.sqrt(fan_in)))


def _init_non_glu(linear: nn.Linear) -> None:
    """Xavier-normal with gain ``sqrt((fan_in + fan_out) / sqrt(4 fan_in))``: std ``sqrt(1 / sqrt(fan_in))``."""
    fan_out, fan_in = linear.weight.shape
    nn.init.xavier_normal_(linear.weight, gain=math.sqrt((fan_in + fan_out) / math.sqrt(4 * fan_in)))


class GhostBatchNorm(nn.Module):
    """Ghost batch normalisation (Hoffer et al., 2017): batch norm over small "virtual" batches.

    In training mode the batch is cut with :meth:`torch.Tensor.chunk` into ``max(B // virtual_batch_size, 1)``
    pieces (so each piece holds at least ``virtual_batch_size`` rows, or the whole batch when it is smaller) and
    one shared :class:`~torch.nn.BatchNorm1d` normalises every piece with its own statistics, updating the running
    statistics once per piece. This chunk count is scTab's; pytorch-tabnet uses ``ceil(B / virtual_batch_size)``
    pieces instead. The two agree whenever ``B`` is a multiple of ``virtual_batch_size``. In eval mode the
    running statistics are used, which is the same for any chunking, so the batch is normalised in one go.

    Parameters
    ----------
    n_features
        Number of features.
    virtual_batch_size
        Target size of the virtual batches.
    momentum
        Momentum of the running statistics.
    """

    def __init__(self, n_features: int, virtual_batch_size: int = 256, momentum: float = 0.02):
        super().__init__()
        self.virtual_batch_size = virtual_batch_size
        self.bn = nn.BatchNorm1d(n_features, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.bn(x)
        n_chunks = max(x.shape[0] // self.virtual_batch_size, 1)
        if n_chunks == 1:
            return self.bn(x)
        return torch.cat([self.bn(chunk) for chunk in x.chunk(n_chunks, dim=0)], dim=0)


class _GLULayer(nn.Module):
    """``fc`` (no bias) → ghost BN → gated linear unit: ``h[:, :out] * sigmoid(h[:, out:])``.

    ``fc`` is either a fresh ``Linear(n_in, 2 n_out)`` or one of the encoder's shared linears, in which case
    the same parameter appears under several state-dict keys (as in scTab's checkpoints).
    """

    def __init__(self, n_in: int, n_out: int, fc: nn.Linear | None, virtual_batch_size: int, momentum: float) -> None:
        super().__init__()
        self.n_out = n_out
        if fc is None:
            fc = nn.Linear(n_in, 2 * n_out, bias=False)
            _init_glu(fc)
        self.fc = fc
        self.bn = GhostBatchNorm(2 * n_out, virtual_batch_size=virtual_batch_size, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc(x))
        return h[:, : self.n_out] * torch.sigmoid(h[:, self.n_out :])


class _GLUBlock(nn.Module):
    """A chain of GLU layers with scaled residual sums ``x ← (x + glu(x)) · sqrt(0.5)``.

    When ``first`` is true the first layer changes the width and has no residual connection. When
    ``shared_layers`` is given, the layers reuse those linears (and the ModuleList is registered here too,
    producing the ``shared.shared_layers.*`` keys).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_glu: int,
        first: bool,
        shared_layers: nn.ModuleList | None,
        virtual_batch_size: int,
        momentum: float,
    ) -> None:
        super().__init__()
        self.first = first
        self.shared_layers = shared_layers
        self.glu_layers = nn.ModuleList(
            _GLULayer(
                n_in if i == 0 else n_out,
                n_out,
                fc=None if shared_layers is None else shared_layers[i],
                virtual_batch_size=virtual_batch_size,
                momentum=momentum,
            )
            for i in range(n_glu)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = math.sqrt(0.5)
        layers = list(self.glu_layers)
        if self.first:
            x = layers[0](x)
            layers = layers[1:]
        for layer in layers:
            x = (x + layer(x)) * scale
        return x


class _FeatureTransformer(nn.Module):
    """Shared GLU block (common to all steps) followed by a step-specific GLU block; output width ``n_d + n_a``."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        shared_layers: nn.ModuleList | None,
        n_independent: int,
        virtual_batch_size: int,
        momentum: float,
    ) -> None:
        super().__init__()
        kw = {"virtual_batch_size": virtual_batch_size, "momentum": momentum}
        if shared_layers is None:
            self.shared: nn.Module = nn.Identity()
            specifics_first = True
        else:
            self.shared = _GLUBlock(n_in, n_out, len(shared_layers), first=True, shared_layers=shared_layers, **kw)
            specifics_first = False
        if n_independent == 0:
            self.specifics: nn.Module = nn.Identity()
        else:
            n_spec_in = n_in if specifics_first else n_out
            self.specifics = _GLUBlock(n_spec_in, n_out, n_independent, first=specifics_first, shared_layers=None, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.specifics(self.shared(x))


class _AttentiveTransformer(nn.Module):
    """``Linear(n_a, n_input, bias=False)`` → ghost BN → multiply by the prior → entmax15 / sparsemax."""

    def __init__(self, n_a: int, n_input: int, virtual_batch_size: int, momentum: float, mask_type: str) -> None:
        super().__init__()
        self.fc = nn.Linear(n_a, n_input, bias=False)
        _init_non_glu(self.fc)
        self.bn = GhostBatchNorm(n_input, virtual_batch_size=virtual_batch_size, momentum=momentum)
        self.selector = _Selector(mask_type)

    def forward(self, prior: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return self.selector(self.bn(self.fc(att)) * prior)


class _TabNetEncoder(nn.Module):
    """Initial BN, the initial splitter and ``n_steps`` (attentive transformer, feature transformer) pairs."""

    def __init__(
        self,
        n_input: int,
        n_d: int,
        n_a: int,
        n_steps: int,
        gamma: float,
        n_independent: int,
        n_shared: int,
        virtual_batch_size: int,
        momentum: float,
        mask_type: str,
        epsilon: float,
        initial_bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.n_d, self.n_steps, self.gamma, self.epsilon = n_d, n_steps, gamma, epsilon
        width = n_d + n_a
        self.initial_bn = nn.BatchNorm1d(n_input, eps=initial_bn_eps, momentum=0.01)
        # The shared linears are deliberately not an attribute of the encoder: they are registered inside every
        # feature transformer's ``shared`` block, which is where scTab's state dict names them.
        shared: nn.ModuleList | None = None
        if n_shared > 0:
            shared = nn.ModuleList(
                nn.Linear(n_input if i == 0 else width, 2 * width, bias=False) for i in range(n_shared)
            )
            for linear in shared:
                _init_glu(linear)
        kw = {"virtual_batch_size": virtual_batch_size, "momentum": momentum}
        self.initial_splitter = _FeatureTransformer(n_input, width, shared, n_independent, **kw)
        self.feat_transformers = nn.ModuleList(
            _FeatureTransformer(n_input, width, shared, n_independent, **kw) for _ in range(n_steps)
        )
        self.att_transformers = nn.ModuleList(
            _AttentiveTransformer(n_a, n_input, mask_type=mask_type, **kw) for _ in range(n_steps)
        )

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Decision outputs per step ``(B, n_d)``, masks per step ``(B, n_input)``, and TabNet's ``M_loss``."""
        x = self.initial_bn(x)
        prior = torch.ones_like(x)
        att = self.initial_splitter(x)[:, self.n_d :]
        decisions, masks = [], []
        m_loss = x.new_zeros(())
        for feat_transformer, att_transformer in zip(self.feat_transformers, self.att_transformers, strict=True):
            mask = att_transformer(prior, att)
            m_loss = m_loss + torch.mean(torch.sum(mask * torch.log(mask + self.epsilon), dim=1))
            prior = (self.gamma - mask) * prior
            out = feat_transformer(mask * x)
            decisions.append(torch.relu(out[:, : self.n_d]))
            masks.append(mask)
            att = out[:, self.n_d :]
        return decisions, masks, m_loss / self.n_steps


# --------------------------------------------------------------------------------------------------------------
# Public backbone
# --------------------------------------------------------------------------------------------------------------


class TabNet(nn.Module):
    """TabNet classifier with scTab's state-dict layout (``encoder.*`` and ``final_mapping.weight``).

    scTab's published model is ``TabNet(19331, 164)`` with the defaults below: 9,655,628 parameters and 114
    state-dict entries (the shared linears of the feature transformers are one set of parameters listed under
    several keys, so ``len(state_dict())`` counts them repeatedly but ``parameters()`` once).

    Sparsity regulariser. Every call of :meth:`embed` (and hence :meth:`forward`) stores ``self.sparsity_loss``,
    TabNet's ``M_loss``: the mean over steps of ``mean_batch(sum_genes(M * log(M + epsilon)))``. Note the sign:
    this is the *negative* entropy of the attention masks (it is ≤ 0, and 0 for one-hot masks). pytorch-tabnet
    and scTab train with ``loss = task_loss - lambda_sparse * M_loss``, i.e. they add ``lambda_sparse`` times
    the mask entropy, which pushes the masks towards sparsity. Use the same expression with
    ``self.sparsity_loss`` and ``self.lambda_sparse`` (``1e-5`` in scTab). In eval mode the stored value is
    detached. scTab's validation loss has no sparsity term; the HCE paper's (and ``recipe="sctab"``'s) has.

    Initialisation follows pytorch-tabnet: bias-free linears drawn with :func:`torch.nn.init.xavier_normal_`,
    gain ``sqrt((fan_in + fan_out) / sqrt(fan_in))`` for layers feeding a GLU and
    ``sqrt((fan_in + fan_out) / sqrt(4 fan_in))`` for the attentive transformers' and the final mapping's;
    batch norms start at weight 1, bias 0.

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of labels.
    n_d
        Width of the decision output of each step (the embedding width).
    n_a
        Width of the attention features passed to the next step's attentive transformer.
    n_steps
        Number of decision steps.
    gamma
        Relaxation of the prior: after a step with mask ``M`` the prior is multiplied by ``gamma - M``, so a gene
        can be reused more freely the larger ``gamma`` is.
    n_independent
        Number of step-specific GLU layers in each feature transformer.
    n_shared
        Number of GLU layers whose linears are shared by all feature transformers.
    virtual_batch_size
        Virtual batch size of the ghost batch norms (see :class:`GhostBatchNorm`).
    momentum
        Momentum of the ghost batch norms (the initial batch norm uses 0.01).
    mask_type
        ``"entmax"`` (1.5-entmax, scTab's choice) or ``"sparsemax"``.
    epsilon
        Added inside the logarithm of the sparsity term.
    lambda_sparse
        Weight of the sparsity term, stored for the training plan; the module itself does not use it.
    initial_bn_eps
        ``eps`` of the initial batch norm (PyTorch's ``1e-5`` in scTab): a floor on each gene's variance. With a
        tiny ``eps``, genes that are (almost) silent in the training cells get huge standardised values in eval
        mode (in held-out batches up to hundreds of standard deviations), far beyond the ``sqrt(B - 1)`` that a
        training batch of ``B`` cells can produce. On log-normalised input, ``1.0`` keeps such genes near their
        log scale while still centring every gene. The package default for new models is ``1.0``.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_d: int = 128,
        n_a: int = 64,
        n_steps: int = 1,
        gamma: float = 1.3,
        n_independent: int = 5,
        n_shared: int = 3,
        virtual_batch_size: int = 256,
        momentum: float = 0.02,
        mask_type: str = "entmax",
        epsilon: float = 1e-15,
        lambda_sparse: float = 1e-5,
        initial_bn_eps: float = 1e-5,
    ):
        super().__init__()
        if n_steps < 1:
            raise ValueError(f"n_steps must be ≥ 1, got {n_steps}.")
        if n_independent < 0 or n_shared < 0 or n_independent + n_shared == 0:
            raise ValueError("n_independent and n_shared must be ≥ 0 and not both zero.")
        if mask_type not in ("entmax", "sparsemax"):
            raise ValueError(f"mask_type must be 'entmax' or 'sparsemax', got {mask_type!r}.")
        if not initial_bn_eps > 0:
            raise ValueError(f"initial_bn_eps must be positive, got {initial_bn_eps}.")
        self.n_input, self.n_labels = n_input, n_labels
        self.n_d, self.n_a, self.n_steps = n_d, n_a, n_steps
        self.mask_type = mask_type
        self.lambda_sparse = lambda_sparse
        self.encoder = _TabNetEncoder(
            n_input,
            n_d=n_d,
            n_a=n_a,
            n_steps=n_steps,
            gamma=gamma,
            n_independent=n_independent,
            n_shared=n_shared,
            virtual_batch_size=virtual_batch_size,
            momentum=momentum,
            mask_type=mask_type,
            epsilon=epsilon,
            initial_bn_eps=initial_bn_eps,
        )
        self.final_mapping = nn.Linear(n_d, n_labels, bias=False)
        _init_non_glu(self.final_mapping)
        self.sparsity_loss: torch.Tensor | None = None

    @property
    def n_latent(self) -> int:
        """Width of :meth:`embed`'s output (``n_d``)."""
        return self.n_d

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_input) -> (B, n_d)``: sum over steps of the ReLU'd decision outputs; sets ``sparsity_loss``."""
        decisions, _, m_loss = self.encoder(x)
        self.sparsity_loss = m_loss if self.training else m_loss.detach()
        return torch.stack(decisions, dim=0).sum(dim=0)

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, n_d) -> (B, n_labels)`` logits (``final_mapping``)."""
        return self.final_mapping(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_input) -> (B, n_labels)`` logits; sets ``sparsity_loss``."""
        return self.classify(self.embed(x))

    @torch.no_grad()
    def explain(self, x: torch.Tensor, weighted: bool = False) -> torch.Tensor:
        """Attention masks summed over steps, ``(B, n_input)``.

        Call it in eval mode: in training mode the batch norms would update their running statistics.

        Parameters
        ----------
        x
            ``(B, n_input)`` input.
        weighted
            Weight each step's mask by that step's ``sum(relu(decision output))`` per cell, as TabNet's
            ``forward_masks`` does for its feature importances (with one step this only rescales each row).

        Returns
        -------
        ``(B, n_input)`` tensor; each unweighted row sums to ``n_steps``.
        """
        decisions, masks, _ = self.encoder(x)
        if weighted:
            return sum(m * d.sum(dim=1, keepdim=True) for m, d in zip(masks, decisions, strict=True))
        return torch.stack(masks, dim=0).sum(dim=0)
