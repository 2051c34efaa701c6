"""The demo run behind ``schce demo`` / ``make demo``: the situation schce is for, on bundled data."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

LOSS_NAMES = {"ce": "cross-entropy (CE)", "hce": "published HCE", "hce-aware": "schce default (hce-aware)"}


def run_demo(out_dir: str | Path, max_epochs: int = 60, seed: int = 0) -> dict:
    """Train MLPs with CE, the published HCE and schce's default on a reference that mixes label depths.

    The bundled PBMCs are split into reference (70%) and held-out cells (30%, fine labels). Half of the reference is
    "study B", whose annotators called every T cell only "T cell"; "study A" kept the T-cell subtypes. Each model
    is scored on the held-out cells with the exact and the hierarchy-corrected macro F1. The default loss writes
    the ``schce`` keys; the others write ``schce_<loss>`` keys beside them.

    Returns
    -------
    Scores per loss, the number of held-out cells and of coarsened reference cells, and the written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    from schce._benchmarking import PBMC68K_T_CELLS, T_CELL, mix_granularity
    from schce._constants import DEFAULT_LOSS
    from schce.data._loader import stratified_split
    from schce.datasets import pbmc68k
    from schce.metrics import classification_scores
    from schce.model import HCEClassifier
    from schce.train import LOSSES

    out_dir = Path(out_dir)
    adata = pbmc68k()
    labels = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    train_idx, test_idx = stratified_split(labels, 0.3, seed)
    train = mix_granularity(adata[train_idx], PBMC68K_T_CELLS, T_CELL, seed=seed)
    test = adata[test_idx].copy()
    n_coarse = int((train.obs["annotation"] == T_CELL).sum())
    scores = {}
    default = DEFAULT_LOSS  # the loss HCEClassifier trains with when none is given
    for loss in LOSSES:
        HCEClassifier.setup_anndata(train, labels_key="annotation", batch_key="study")
        # "hce" in its published form, log(q + 1e-6), so the line says what the paper trained
        model = HCEClassifier(train, loss=loss, **({"hce_form": "reference"} if loss == "hce" else {}))
        model.train(max_epochs=max_epochs, seed=seed, enable_progress_bar=False)
        key = "schce" if loss == default else f"schce_{loss.replace('-', '_')}"
        model.predict(test, key_added=key)
        pred = test.obs[f"{key}_prediction_ontology_term_id"].astype(str).to_numpy()
        scores[loss] = classification_scores(labels[test_idx], pred, model.hierarchy)

    sc.pp.neighbors(test, use_rep="X_schce", random_state=seed)
    sc.tl.umap(test, random_state=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    h5ad, umap = out_dir / "pbmc68k_schce.h5ad", out_dir / "umap_predictions.png"
    fig = sc.pl.umap(test, color=["cell_type", "schce_prediction"], show=False, return_fig=True, wspace=0.6)
    fig.savefig(umap, dpi=100, bbox_inches="tight")
    test.write_h5ad(h5ad)
    return {
        "scores": scores,
        "n_test": len(test_idx),
        "n_train": len(train_idx),
        "n_coarse": n_coarse,
        "default": default,
        "h5ad": h5ad,
        "umap": umap,
    }
