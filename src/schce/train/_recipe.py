"""Named training recipes: backbone hyperparameters and optimiser settings that belong together."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from schce.train._plan import OPTIMIZERS, PAPER_MONITOR


@dataclass(frozen=True)
class Recipe:
    """One backbone's settings in a recipe.

    Attributes
    ----------
    backbone_kwargs
        Backbone hyperparameters (``{}``: the defaults of the :mod:`schce.nn` class, which are scTab's).
    lr, weight_decay
        AdamW settings.
    lr_gamma
        StepLR factor applied after every epoch.
    max_batch_size
        Batch size on large data; small data get ``min(max_batch_size, max(32, n_train // 16))``.
    gradient_clip_val
        Gradient norm clipping.
    max_epochs
        Epochs unless ``train(max_epochs=...)`` says otherwise.
    augment
        Whether training adds scTab's augmentation by default (the store's ``augmentations.npy``, or the published
        construction on the training cells of an AnnData).
    """

    backbone_kwargs: dict = field(default_factory=dict)
    lr: float = 5e-4
    weight_decay: float = 0.01
    lr_gamma: float = 0.9
    max_batch_size: int = 2048
    gradient_clip_val: float = 1.0
    max_epochs: int = 50
    augment: bool = False


__all__ = ["PAPER_MONITOR", "RECIPES", "Recipe", "get_recipe", "recipe_loss"]

# The published scTab / HCE-paper recipe (Fischer et al. 2024): the exact architectures, AdamW, StepLR(γ = 0.9) each
# epoch, batch 2048, clipping at 1.0, 50 epochs, augmentation for the MLP and TabNet. The MLP and TabNet classes'
# defaults are already scTab's architectures (TabNet's λ_sparse 1e-5 included).
RECIPES: dict[str, dict[str, Recipe]] = {
    "sctab": {
        "linear": Recipe(lr=5e-4, weight_decay=0.01),
        "mlp": Recipe(
            backbone_kwargs={"n_hidden": 128, "n_layers": 8, "dropout": 0.1}, lr=2e-3, weight_decay=0.05, augment=True
        ),
        "tabnet": Recipe(lr=5e-3, weight_decay=0.05, augment=True),
    },
}


#: Losses a recipe trains: the first is its default. The paper trains HCE in its published form, or cross-entropy.
RECIPE_LOSSES = {"sctab": ("hce", "ce")}


def recipe_loss(recipe: str | None, loss: str | None, hce_form: str | None, default_loss: str) -> tuple[str, str]:
    """The ``(loss, hce_form)`` a model trains with: the arguments given, else the recipe's, else the package's.

    Under ``recipe="sctab"`` the default is the published HCE (``"hce"`` in the ``"reference"`` form,
    ``log(q + 1e-6)``); ``loss="ce"`` is the paper's other loss; ``"hce-aware"`` is not a published loss and raises.
    Without a recipe the default is ``default_loss`` with the exact ``"log"`` form.
    """
    if recipe is None:
        return loss or default_loss, hce_form or "log"
    allowed = RECIPE_LOSSES.get(recipe)
    if allowed is None:
        raise ValueError(
            f"Unknown recipe {recipe!r}; choose one of {sorted(RECIPES)} or None for the package defaults."
        )
    if loss is not None and loss not in allowed:
        raise ValueError(
            f"recipe={recipe!r} trains the published losses {allowed}, not loss={loss!r}. Leave loss unset (or "
            f"loss='ce') for the published training, or drop the recipe (recipe=None) and pass the architecture "
            f"by hand, e.g. n_hidden=128, n_layers=8, dropout=0.1, input_dropout=0.0 for scTab's MLP."
        )
    return loss or allowed[0], hce_form or "reference"


def get_recipe(name: str, backbone: str) -> Recipe:
    """The settings of ``backbone`` in recipe ``name``, with a clear error for unknown names."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)} or None for the package defaults.")
    if backbone not in RECIPES[name]:
        raise ValueError(
            f"Recipe {name!r} has no settings for backbone {backbone!r}; it covers {sorted(RECIPES[name])}."
        )
    return RECIPES[name][backbone]


def default_batch_size(n_train: int, max_batch_size: int = 2048) -> int:
    """``min(max_batch_size, max(32, n_train // 16))``: small data still get about 16 steps per epoch."""
    return int(min(max_batch_size, max(32, n_train // 16)))


@contextlib.contextmanager
def matmul_precision(precision: str = "high"):
    """Set :func:`torch.set_float32_matmul_precision` for a block (TF32 on GPUs that have it) and restore it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# Full-batch L-BFGS holds the whole dense training matrix on the device: by default only up to this many values
# (1 GiB of float32); larger data train with AdamW on mini-batches.
LBFGS_MAX_VALUES = 2**28


def resolve_optimizer(
    requested: str | None,
    *,
    backbone: str,
    recipe: str | None,
    n_values: int | None,
    devices,
    batch_size: int | None,
    stochastic: list[str],
    gradient_clip_val: float | None,
    averaging: bool = False,
) -> str:
    """Pick the optimiser of a :meth:`~schce.HCEClassifier.train` call, or explain why the requested one cannot run.

    ``None`` gives full-batch L-BFGS for the package-default linear model on in-memory data that fits
    (``n_values = n_train × n_genes ≤`` :data:`LBFGS_MAX_VALUES`, one device, a deterministic loss) and AdamW
    otherwise. ``n_values`` is ``None`` for a datamodule; ``stochastic`` names the random training terms asked for;
    ``averaging`` is whether an average of the weights along the trajectory was asked for (``ema_decay``).
    """
    if requested is not None and requested not in OPTIMIZERS:
        choices = ", ".join(repr(name) for name in OPTIMIZERS)
        raise ValueError(f"optimizer must be {choices} or None (automatic), got {requested!r}.")
    if requested == "adamw":
        return "adamw"
    problems = []
    if backbone != "linear":
        problems.append(f"the {backbone} backbone has dropout or batch statistics (use backbone='linear')")
    if n_values is None:
        problems.append("it needs the training cells in memory, not a datamodule")
    if devices not in (1, "1", "auto"):
        problems.append(f"it runs on one device (got devices={devices!r})")
    if stochastic:
        problems.append(f"its line search needs a deterministic loss (turn off {', '.join(stochastic)})")
    if averaging:
        problems.append("it converges to one optimum, with no stochastic steps to average (leave ema_decay=None)")
    if batch_size is not None:
        problems.append("every step uses all training cells (leave batch_size=None)")
    if gradient_clip_val:
        problems.append("clipping gradients would break its line search (leave gradient_clip_val unset)")
    if requested is None:
        fits = n_values is not None and n_values <= LBFGS_MAX_VALUES
        return "lbfgs" if recipe is None and fits and not problems else "adamw"
    if problems:
        raise ValueError("optimizer='lbfgs' cannot train this model: " + "; ".join(problems) + ".")
    return "lbfgs"
