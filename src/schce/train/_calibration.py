"""Temperature scaling of a trained classifier's logits."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from schce.losses import hierarchical_cross_entropy


def fit_temperature(
    logits: np.ndarray, targets: np.ndarray, reachability: np.ndarray | None = None, max_iter: int = 100
) -> float:
    """The temperature ``T`` minimising the validation negative log-likelihood of ``softmax(logits / T)``.

    Parameters
    ----------
    logits
        ``(n_cells, n_labels)`` validation logits.
    targets
        ``(n_cells,)`` label indices.
    reachability
        With a reachability matrix the likelihood is HCE's (the probability of the true label's subtree), which
        is what an HCE model was trained to get right; without, flat cross-entropy.
    max_iter
        L-BFGS iterations.

    Returns
    -------
    ``T`` in ``[0.05, 20]``; ``> 1`` softens overconfident predictions.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.long)
    R = None if reachability is None else torch.as_tensor(reachability, dtype=torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = z / log_t.clamp(np.log(0.05), np.log(20.0)).exp()
        loss = F.cross_entropy(scaled, y) if R is None else hierarchical_cross_entropy(scaled, y, R)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(np.exp(np.clip(log_t.item(), np.log(0.05), np.log(20.0))))
