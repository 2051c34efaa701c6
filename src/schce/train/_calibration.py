"""Temperature scaling of a trained classifier's logits."""

from __future__ import annotations

import numpy as np
import torch

_T_MIN, _T_MAX = 0.05, 20.0


def fit_temperature(logits: np.ndarray, targets: np.ndarray, reachability: np.ndarray | None = None) -> float:
    """The temperature ``T`` that makes the confidence of ``softmax(logits / T)`` match how often it is right.

    The confidence of a cell is the probability of its argmax label; it is right when the argmax is the true
    label or (with ``reachability``) a descendant of it — the scTab rule the evaluation uses. ``T`` minimises the
    binary log-loss of "right" given the confidence, over a log-spaced grid refined around its best point (the
    argmax does not depend on ``T``, so this is a one-dimensional, well-posed fit).

    Parameters
    ----------
    logits
        ``(n_cells, n_labels)`` held-out logits.
    targets
        ``(n_cells,)`` label indices.
    reachability
        ``R[i, j] = 1`` when label ``j`` is label ``i`` or a descendant; ``None`` for exact matches only.

    Returns
    -------
    ``T`` in ``[0.05, 20]``; ``> 1`` softens overconfident predictions.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = np.asarray(targets)
    pred = z.argmax(1).numpy()
    right = (np.asarray(reachability, dtype=bool)[y, pred] if reachability is not None else pred == y).astype(float)
    right_t = torch.as_tensor(right)

    def loss(ts: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(ts, dtype=torch.float64)[:, None, None]
        conf = torch.softmax(z[None] / t, dim=-1).amax(-1).clamp(1e-12, 1 - 1e-12)
        ll = right_t * conf.log() + (1 - right_t) * (1 - conf).log()
        return (-ll.mean(1)).numpy()

    grid = np.exp(np.linspace(np.log(_T_MIN), np.log(_T_MAX), 61))
    best = grid[np.argmin(loss(grid))]
    fine = np.exp(np.linspace(np.log(best) - 0.1, np.log(best) + 0.1, 41)).clip(_T_MIN, _T_MAX)
    return float(fine[np.argmin(loss(fine))])
