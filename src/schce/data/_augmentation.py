"""scTab's training-data augmentation: batch-effect-like shifts learnt from differences between groups."""

from __future__ import annotations

import numpy as np
import torch

from schce.data._expression import get_matrix, read_rows
from schce.nn._module import normalize_counts

_CHUNK = 4096
CLAMP = (0.0, 9.0)  # range of log1p(1e4-normalised) values scTab clamps augmented inputs to


def augmentation_matrix(
    X,
    labels,
    groups,
    normalize: bool = True,
    max_per_label: int = 300,
    threshold: float = 0.25,
    clip: float = 1.5,
    min_cells: int = 1,
    seed: int = 0,
    layer: str | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Build an augmentation matrix from training data, the idea of scTab's ``augmentations.npy``.

    For every label, the mean normalised expression of its cells is taken per group (sample, donor or batch); each
    row of the result is the difference of two such means of one label, i.e. a shift that the group alone causes.
    Up to ``max_per_label`` pairs are drawn per label. Entries with ``|value| <= threshold`` are set to 0 and the rest
    clipped to ``[-clip, clip]``. Training adds a random row with a random sign to each normalised input and clamps
    to ``[0, 9]`` (``HCEClassifier.train(augment=True)``).

    Parameters
    ----------
    X
        Cells × genes: an AnnData (then ``labels`` and ``groups`` may be ``obs`` column names), a dense or sparse
        matrix.
    labels
        Cell type of every cell (array, or an ``obs`` column name).
    groups
        Sample / donor / batch of every cell (array, or an ``obs`` column name).
    normalize
        ``True`` when ``X`` holds counts (normalised with :func:`schce.nn.normalize_counts` first); ``False`` when it
        is log-normalised already.
    max_per_label
        Most rows per label (scTab: 300).
    threshold, clip
        Small entries are zeroed, large ones clipped (scTab: 0.25 and 1.5).
    min_cells
        Groups with fewer cells of a label are not used for that label.
    seed
        Seeds the choice of pairs.
    layer
        Layer of an AnnData ``X``.
    rows
        Use only these cells (e.g. the training cells); default: all.

    Returns
    -------
    ``(n_rows, n_genes)`` float32 matrix (``n_rows`` may be 0 when no label occurs in two groups).
    """
    from anndata import AnnData

    if isinstance(X, AnnData):
        adata = X
        labels = adata.obs[labels].to_numpy() if isinstance(labels, str) else labels
        groups = adata.obs[groups].to_numpy() if isinstance(groups, str) else groups
        X = get_matrix(adata, layer)
    labels, groups = np.asarray(labels), np.asarray(groups)
    n_cells = X.shape[0]
    if len(labels) != n_cells or len(groups) != n_cells:
        raise ValueError(
            f"labels ({len(labels)}) and groups ({len(groups)}) need one entry per cell of X ({n_cells} cells)."
        )
    if max_per_label < 1 or threshold < 0 or clip <= 0:
        raise ValueError("max_per_label must be ≥ 1, threshold ≥ 0 and clip > 0.")
    if rows is not None:
        keep = np.zeros(n_cells, dtype=bool)
        keep[np.asarray(rows)] = True
        labels, groups = np.where(keep, labels, None), groups
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    for label in sorted(set(labels.tolist()) - {None}, key=str):
        in_label = labels == label
        means = []
        for group in sorted(set(groups[in_label].tolist()), key=str):
            idx = np.flatnonzero(in_label & (groups == group))
            if len(idx) < min_cells:
                continue
            total = np.zeros(X.shape[1])
            for start in range(0, len(idx), _CHUNK):  # in chunks, so large groups need little memory
                x = torch.from_numpy(read_rows(X, idx[start : start + _CHUNK]))
                total += (normalize_counts(x) if normalize else x).double().sum(0).numpy()
            means.append(total / len(idx))
        pairs = [(i, j) for i in range(len(means)) for j in range(i + 1, len(means))]
        if not pairs:
            continue
        chosen = rng.choice(len(pairs), size=min(len(pairs), max_per_label), replace=False)
        rows += [means[pairs[k][0]] - means[pairs[k][1]] for k in sorted(chosen)]
    if not rows:
        return np.zeros((0, X.shape[1]), dtype=np.float32)
    out = np.stack(rows)
    out[np.abs(out) <= threshold] = 0.0
    return np.clip(out, -clip, clip).astype(np.float32)


def augment(x: torch.Tensor, augmentations: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add a random row of ``augmentations`` with a random sign to every row of normalised ``x``, clamp to [0, 9]."""
    n = x.shape[0]
    rows = torch.randint(0, augmentations.shape[0], (n,), device=x.device, generator=generator)
    sign = torch.randint(0, 2, (n, 1), device=x.device, generator=generator, dtype=x.dtype) * 2 - 1
    return torch.clamp(x + sign * augmentations[rows], *CLAMP)
