"""The standard figures of a prediction (``schce predict --figures``): UMAP of the calls, counts, confidence."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from anndata import AnnData

logger = logging.getLogger(__name__)


def save_prediction_figures(adata: AnnData, out_dir: str | os.PathLike, key_added: str = "schce") -> list[Path]:
    """Write ``umap.png``, ``prediction_counts.png`` and ``confidence.png`` for a predicted ``adata`` to ``out_dir``.

    The UMAP is computed on ``obsm["X_{key_added}"]`` of a private copy (``adata`` does not change) and coloured by
    every schce call column present, with the colours ``predict`` wrote. Returns the files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = f"{key_added}_prediction"
    if pred not in adata.obs:
        raise KeyError(f"adata.obs has no {pred!r}: run predict first.")
    calls = [c for c in (pred, f"{key_added}_prediction_coarse", f"{key_added}_majority_voting") if c in adata.obs]
    view = AnnData(obs=adata.obs[[*calls, f"{key_added}_confidence"]].copy(), uns=_colours(adata, calls))
    view.obsm["X_emb"] = np.asarray(adata.obsm[f"X_{key_added}"], dtype=np.float32)
    sc.pp.neighbors(view, use_rep="X_emb", n_neighbors=min(15, max(adata.n_obs - 1, 2)), random_state=0)
    sc.tl.umap(view, random_state=0)
    written = []
    fig = sc.pl.umap(view, color=[*calls, f"{key_added}_confidence"], ncols=2, wspace=0.9, show=False, return_fig=True)
    written.append(_save(fig, out / "umap.png"))
    counts = adata.obs[pred].value_counts(sort=False)
    colours = dict(zip(adata.obs[pred].cat.categories, adata.uns.get(f"{pred}_colors", []), strict=False))
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(counts) + 1))
    ax.barh(
        list(counts.index)[::-1], counts.to_numpy()[::-1], color=[colours.get(c, "grey") for c in counts.index][::-1]
    )
    ax.set_xlabel("cells")
    ax.set_title("Predicted cell types")
    written.append(_save(fig, out / "prediction_counts.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(adata.obs[f"{key_added}_confidence"].to_numpy(), bins=20, range=(0, 1), color="#1f77b4")
    ax.set_xlabel("confidence (calibrated probability of the call)")
    ax.set_ylabel("cells")
    written.append(_save(fig, out / "confidence.png"))
    logger.info("Wrote %s.", ", ".join(str(p) for p in written))
    return written


def _colours(adata: AnnData, columns: list[str]) -> dict:
    return {f"{c}_colors": adata.uns[f"{c}_colors"] for c in columns if f"{c}_colors" in adata.uns}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
