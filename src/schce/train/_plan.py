"""The Lightning training plan: loss, optimiser recipe and hierarchy-corrected validation metrics."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from schce._constants import LOSSES
from schce.data._augmentation import augment
from schce.losses import (
    BatchMixingLoss,
    DomainAdversarialLoss,
    elastic_cell_similarity_loss,
    hierarchical_cross_entropy,
    hierarchical_log_probs,
    log_mask_probability,
)
from schce.metrics import code_scores, paper_report
from schce.nn._batch import Densifier, is_sparse
from schce.nn._module import normalize_counts


def adamw(params, lr: float, weight_decay: float, mixed_precision: bool = False) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel when every parameter is on the CPU and precision is not mixed.

    The default CPU AdamW updates tensor by tensor in several elementwise passes; the fused kernel makes one (on the
    default MLP's 5 M parameters about 2x faster on 2 shared cores; the same update to float32 rounding, see
    ``tests/test_training_pieces.py``). Elsewhere torch's default (``foreach`` on CUDA) stays: a fused optimizer
    unscales gradients itself, which Lightning's mixed-precision gradient clipping refuses (on the CPU too, e.g.
    ``precision="bf16-mixed"``), so mixed precision keeps the default.
    """
    params = list(params)
    fused = (
        not mixed_precision
        and bool(params)
        and all(p.device.type == "cpu" and p.dtype.is_floating_point for p in params)
    )
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)


# Terms that can be added to the task loss, computed on the penultimate embedding.
AUXILIARY = ("adversarial", "batch_mixing", "ecs")
#: Optimisers: AdamW on mini-batches (any backbone, any data size) and full-batch L-BFGS (the linear backbone on
#: in-memory data: each step sees every training cell, so the convex problem is solved to convergence).
OPTIMIZERS = ("adamw", "lbfgs")
#: The validation metric of the published recipe: the paper's macro F1 of the corrected predictions over the labels
#: that are true or predicted (:func:`schce.metrics.paper_report` with ``"union"``).
PAPER_MONITOR = "validation_paper_macro_f1"
# L-BFGS iterations per epoch (torch's default); validation, early stopping and best weights act between epochs.
LBFGS_ITERATIONS = 20


#: Checkpoint entry holding the ``target_masks`` of ``loss="hce-aware"``.
TARGET_MASKS_KEY = "schce_target_masks"


def _weighted_mean(values: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``Σ w_y · value / Σ w_y`` over the cells, with ``w`` the per-label ``weight`` (the plain mean without it)."""
    if weight is None:
        return values.mean()
    w = weight[y]
    return (w * values).sum() / w.sum()


class HCETrainingPlan(pl.LightningModule):
    """Trains an :class:`~schce.nn.HCEModule` with HCE (or plain cross-entropy).

    Parameters
    ----------
    module
        The classifier module.
    reachability
        ``(n_labels, n_labels)`` reachability matrix.
    loss
        ``"hce-aware"`` (``-log`` of the probability mass on each cell's acceptable labels, ``target_masks``),
        ``"hce"`` (hierarchical cross-entropy) or ``"ce"`` (flat cross-entropy).
    class_weights
        ``(n_labels,)`` weights of the training loss; the validation loss is logged unweighted
        (``validation_loss``) and with them (``validation_weighted_loss``).
    normalize
        Whether inputs are raw counts to normalise in the module.
    lr, weight_decay
        AdamW settings (``optimizer="adamw"``). With ``optimizer="lbfgs"``, ``weight_decay`` is the strength λ of
        an L2 penalty ``λ / 2 · ‖W‖²`` on the weight matrices (not the biases), added to the mean training loss, and
        ``lr`` is unused (a strong-Wolfe line search sets each step).
    lr_gamma
        StepLR factor applied after every epoch (AdamW only).
    optimizer
        ``"adamw"`` or ``"lbfgs"`` (:data:`OPTIMIZERS`); L-BFGS expects every training cell in one batch and no
        randomness in the loss (no dropout, augmentation or auxiliary terms).
    hce_form
        ``"log"`` (exact, default) or ``"reference"`` (the published form with ``log(q + 1e-6)``).
    auxiliary
        Weights of auxiliary terms added to the training loss: ``"adversarial"`` (a batch classifier behind gradient
        reversal, :class:`~schce.losses.DomainAdversarialLoss`), ``"batch_mixing"``
        (:class:`~schce.losses.BatchMixingLoss`) and ``"ecs"`` (:func:`~schce.losses.elastic_cell_similarity_loss`).
        Batch terms need ``batch`` codes in every training batch.
    n_batches
        Number of batches, for the batch terms.
    ecs_threshold
        Threshold of the elastic cell similarity term.
    target_masks
        ``(n_masks, n_labels)`` acceptable-label sets for ``"hce-aware"``
        (:meth:`~schce.hierarchy.Hierarchy.annotation_targets`); batches carry each cell's row as ``"target"``.
        Batches without ``"target"`` (or a plan without masks) read each label as its whole subtree, as ``"hce"``.
    augmentations
        ``(n_rows, n_genes)`` matrix of scTab's augmentation (:func:`schce.data.augmentation_matrix`): every
        training input, once normalised, gets a random row added with a random sign and is clamped to ``[0, 9]``.
        Validation and prediction see the inputs unchanged.
    paper_validation
        Validate as the published code does (``recipe="sctab"``): the validation loss is computed on the corrected
        targets (a cell whose prediction is its label or a descendant of it counts that prediction as its target;
        TabNet's includes ``- λ_sparse · M_loss``, as the HCE paper's code has it), and :data:`PAPER_MONITOR` is
        logged after every validation epoch.
    label_smoothing
        ε of label smoothing in the training loss (validation is unsmoothed): each cell's loss becomes
        ``(1 − ε) · loss + ε · mean_i(−log P_i)`` over every label ``i``, where ``P_i`` is the probability the loss
        gives a cell annotated ``i``: its subtree mass with ``"hce"`` / ``"hce-aware"`` (the hierarchy rule), its own
        probability with ``"ce"``. Weighted by the cell's class weight, as the loss is.
    validation_weights
        ``(n_labels,)`` weights of the validation cells for ``validation_macro_loss``: ``1 / n_c`` for a label with
        ``n_c`` validation cells, so every label counts alike.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        reachability: np.ndarray,
        loss: str = "hce",
        class_weights: np.ndarray | None = None,
        normalize: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        lr_gamma: float = 0.9,
        hce_form: str = "log",
        auxiliary: dict[str, float] | None = None,
        n_batches: int = 1,
        ecs_threshold: float = 0.8,
        target_masks: np.ndarray | None = None,
        augmentations: np.ndarray | None = None,
        optimizer: str = "adamw",
        paper_validation: bool = False,
        label_smoothing: float = 0.0,
        validation_weights: np.ndarray | None = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
        self.optimizer_name, self.paper_validation = optimizer, paper_validation
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}.")
        self.label_smoothing = float(label_smoothing)
        self.auxiliary = {k: float(w) for k, w in (auxiliary or {}).items() if w}
        unknown = sorted(set(self.auxiliary) - set(AUXILIARY))
        if unknown:
            raise ValueError(f"Unknown auxiliary loss(es) {unknown}; choose from {list(AUXILIARY)}.")
        if any(w < 0 for w in self.auxiliary.values()):
            raise ValueError(f"Auxiliary loss weights must be non-negative, got {self.auxiliary}.")
        if "adversarial" in self.auxiliary:
            self.adversary = DomainAdversarialLoss(module.n_latent, n_batches)
        if "batch_mixing" in self.auxiliary:
            self.batch_mixing = BatchMixingLoss(n_batches)
        self.ecs_threshold = ecs_threshold
        lambda_sparse = getattr(module.classifier, "lambda_sparse", 0.0)
        if lambda_sparse:
            # TabNet's published recipe: task − λ · M_loss, where M_loss is the masks' negative entropy.
            self.auxiliary["sparsity"] = -float(lambda_sparse)
        if optimizer == "lbfgs" and weight_decay:
            # AdamW decays weights itself; for L-BFGS the penalty is part of the objective.
            self.auxiliary["l2"] = float(weight_decay)
        self.module = module
        self.loss_name, self.normalize, self.hce_form = loss, normalize, hce_form
        self.lr, self.weight_decay, self.lr_gamma = lr, weight_decay, lr_gamma
        self._R_np = np.asarray(reachability, dtype=bool)
        self.register_buffer("reachability", torch.as_tensor(self._R_np, dtype=torch.float32), persistent=False)
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        weights = None if validation_weights is None else torch.as_tensor(validation_weights, dtype=torch.float32)
        self.register_buffer("validation_weights", weights, persistent=False)
        masks = None if target_masks is None else torch.as_tensor(np.asarray(target_masks, dtype=bool))
        self.register_buffer("target_masks", masks, persistent=False)
        augs = None if augmentations is None or not len(augmentations) else torch.as_tensor(augmentations).float()
        self.register_buffer("augmentations", augs, persistent=False)
        # Sparse batches are densified on the device into one reused buffer (preprocessed there in place).
        self._densify = Densifier()
        self._val_true: list[torch.Tensor] = []
        self._val_pred: list[torch.Tensor] = []

    def _loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], weight: torch.Tensor | None) -> torch.Tensor:
        y = batch["y"]
        if self.loss_name == "ce":
            return F.cross_entropy(logits, y, weight=weight)
        if self.loss_name == "hce" or self.target_masks is None or "target" not in batch:
            return hierarchical_cross_entropy(logits, y, self.reachability, weight=weight, form=self.hce_form)
        return _weighted_mean(self._cell_losses(logits, batch), y, weight)

    def _cell_losses(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every cell's loss, unweighted: the validation losses weigh it themselves.

        :meth:`_loss` averages the same values but keeps the library calls' weighted forms for training (the
        published HCE's ``nll_loss(..., weight)`` as the paper computes it).
        """
        y = batch["y"]
        if self.loss_name == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        if self.loss_name == "hce" or self.target_masks is None or "target" not in batch:
            return hierarchical_cross_entropy(logits, y, self.reachability, form=self.hce_form, reduction="none")
        return -log_mask_probability(logits, self.target_masks[batch["target"]])

    def _smoothing_term(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """``mean_i(−log P_i)`` over the labels, averaged over the cells as the loss is (class-weighted)."""
        if self.loss_name == "ce":
            log_p = torch.log_softmax(logits, dim=1)
        else:  # every label read as its subtree, as the hierarchical losses read an annotation
            log_p = hierarchical_log_probs(logits, self.reachability)
        return _weighted_mean(-log_p.mean(dim=1), y, weight)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimisation step on the weighted training loss."""
        x, normalize, own = self._densify(batch, self.device), self.normalize, is_sparse(batch)
        if self.augmentations is not None:
            x, normalize = augment(normalize_counts(x) if normalize else x, self.augmentations), False
        logits, h = self.module(x, normalize=normalize, inplace=own)
        task = self._loss(logits, batch, self.class_weights)
        if self.label_smoothing:
            eps = self.label_smoothing
            task = (1.0 - eps) * task + eps * self._smoothing_term(logits, batch["y"], self.class_weights)
        n = len(batch["y"])
        terms: dict[str, torch.Tensor] = {}
        if "adversarial" in self.auxiliary:
            terms["adversarial"] = self.adversary(h, batch["batch"])
        if "batch_mixing" in self.auxiliary:
            terms["batch_mixing"] = self.batch_mixing(h, batch["batch"])
        if "ecs" in self.auxiliary:
            terms["ecs"] = elastic_cell_similarity_loss(h, self.ecs_threshold)
        if "sparsity" in self.auxiliary:
            terms["sparsity"] = self.module.classifier.sparsity_loss
        if "l2" in self.auxiliary:
            # Weight matrices only: logistic regression penalises coefficients, not intercepts.
            terms["l2"] = 0.5 * sum(p.square().sum() for p in self.module.parameters() if p.ndim > 1)
        loss = task
        for name, value in terms.items():
            loss = loss + self.auxiliary[name] * value
            self.log(f"train_{name}_loss", value, on_step=False, on_epoch=True, batch_size=n, sync_dist=self._sync)
        if terms:
            self.log("train_task_loss", task, on_step=False, on_epoch=True, batch_size=n, sync_dist=self._sync)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=self._sync)
        return loss

    @property
    def _sync(self) -> bool:
        # Under DDP each rank trains on its own shard: average the training losses over ranks. Validation metrics
        # need no syncing, since every rank evaluates all validation cells.
        return self._trainer is not None and self.trainer.world_size > 1

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Validation loss; predictions are gathered for the epoch metrics."""
        x = self._densify(batch, self.device)
        logits, _ = self.module(x, normalize=self.normalize, inplace=is_sparse(batch))
        y, pred = batch["y"], logits.argmax(dim=1)
        targets = batch
        if self.paper_validation:
            targets = {**batch, "y": torch.where(self.reachability[y, pred] > 0, pred, y)}
        # Every cell's loss once, against the paper's corrected labels if so; the three logged losses weigh it.
        per_cell, target_y = self._cell_losses(logits, targets), targets["y"]
        loss = per_cell.mean()
        if self.paper_validation and "sparsity" in self.auxiliary:  # the HCE paper's TabNet: task - λ · M_loss
            loss = loss + self.auxiliary["sparsity"] * self.module.classifier.sparsity_loss
        self.log("validation_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        for name, weights in (("weighted", self.class_weights), ("macro", self.validation_weights)):
            total = None if weights is None else float(weights[target_y].sum())
            if total:  # a batch whose labels all weigh 0 adds nothing to the mean
                # Each batch's weighted mean, averaged over the batches by their weight sums, is the weighted mean
                # over all validation cells: with the training loss's class weights ("weighted"), or with 1 / the
                # label's validation cells ("macro": the mean over labels of each label's mean loss).
                value = _weighted_mean(per_cell, target_y, weights)
                self.log(f"validation_{name}_loss", value, on_step=False, on_epoch=True, batch_size=total)
        self._val_true.append(y.detach().cpu())
        self._val_pred.append(pred.detach().cpu())

    def on_validation_epoch_end(self) -> None:
        """Exact and hierarchy-corrected accuracy and macro F1 over the whole validation set."""
        if not self._val_true:
            return
        true = torch.cat(self._val_true).numpy()
        pred = torch.cat(self._val_pred).numpy()
        self._val_true.clear()
        self._val_pred.clear()
        for name, value in code_scores(true, pred, self._R_np).items():
            self.log(f"validation_{name}", value, prog_bar=name == "corrected_macro_f1")
        if self.paper_validation:
            self.log(PAPER_MONITOR, paper_report(true, pred, self._R_np, "union")[0]["macro_f1"], prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the acceptable-label masks with the run, so a resumed run can check it trains on the same ones."""
        if self.target_masks is not None:
            checkpoint[TARGET_MASKS_KEY] = self.target_masks.detach().cpu().clone()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to resume with acceptable-label masks other than the interrupted run's (the data changed)."""
        saved = checkpoint.get(TARGET_MASKS_KEY)
        if saved is None or self.target_masks is None:
            return
        mine = self.target_masks.detach().cpu()
        if saved.shape != mine.shape or not bool((saved == mine).all()):
            raise ValueError(
                f"The checkpoint was trained with {len(saved)} acceptable-label sets that differ from the "
                f"{len(mine)} read from this data module: its training and validation labels or annotation "
                "sources changed since the run started. Resume on the same data (and source_column), or start anew."
            )

    def configure_optimizers(self):
        """AdamW with a StepLR decay after every epoch, or full-batch L-BFGS."""
        if self.optimizer_name == "lbfgs":
            return torch.optim.LBFGS(
                self.parameters(),
                lr=1.0,
                max_iter=LBFGS_ITERATIONS,
                history_size=20,
                line_search_fn="strong_wolfe",
                tolerance_grad=1e-6,
                tolerance_change=1e-9,
            )
        # self.parameters(): the classifier and, when on, the batch discriminator.
        trainer = getattr(self, "_trainer", None)  # None when called outside a Trainer (tests, benchmarks)
        mixed = trainer is not None and "mixed" in str(trainer.precision)
        optimizer = adamw(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, mixed_precision=mixed)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
