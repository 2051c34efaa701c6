"""RNA velocity consistency: a predicted velocity against the observed future state."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from schce.losses._validation import (
    _check_float,
    _check_non_negative,
    _check_same_shape,
)

# --------------------------------------------------------------------------------------------------------------------
# RNA velocity
# --------------------------------------------------------------------------------------------------------------------


class VelocityConsistencyLoss(nn.Module):
    """Consistency of a predicted velocity with the observed future expression.

    With expression ``x``, velocity ``v`` and future expression ``y`` (all ``(N, G)``)::

        cosine_term    = mean_i (1 - cos(v_i, y_i - x_i))
        magnitude_term = mean over all N * G entries of (x + dt * v - y)^2
        loss           = cosine_weight * cosine_term + magnitude_weight * magnitude_term

    The cosine uses :func:`torch.nn.functional.cosine_similarity` with ``eps = 1e-8``: when ``v_i`` or the
    displacement ``y_i - x_i`` is the zero vector the cosine counts as 0 (so that cell's cosine term is 1) and the
    value and gradients stay finite.

    Parameters
    ----------
    dt
        Time step of the Euler update ``x + dt * v`` (finite).
    cosine_weight
        Weight (``>= 0``) of the direction term.
    magnitude_weight
        Weight (``>= 0``) of the squared-error term.

    """

    def __init__(self, dt: float = 0.1, cosine_weight: float = 1.0, magnitude_weight: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(dt):
            raise ValueError(f"dt must be finite, got {dt!r}")
        _check_non_negative("cosine_weight", cosine_weight)
        _check_non_negative("magnitude_weight", magnitude_weight)
        self.dt = float(dt)
        self.cosine_weight = float(cosine_weight)
        self.magnitude_weight = float(magnitude_weight)

    def forward(self, expression: Tensor, velocity: Tensor, future_expression: Tensor) -> Tensor:
        """Compute the loss.

        Parameters
        ----------
        expression
            Current expression ``x``, shape ``(N, G)``, floating, ``N >= 1``.
        velocity
            Predicted velocity ``v``, shape ``(N, G)``.
        future_expression
            Observed future expression ``y``, shape ``(N, G)``.

        Returns
        -------
        Tensor
            Scalar loss.

        Raises
        ------
        ValueError
            If the inputs are not floating ``(N, G)`` tensors of one shape or ``N = 0``.

        """
        _check_float("expression", expression, 2, "(N, G)")
        if expression.shape[0] == 0:
            raise ValueError(f"expression must have shape (N, G) with N >= 1, got {tuple(expression.shape)}")
        _check_float("velocity", velocity, 2, f"(N, G) = {tuple(expression.shape)}")
        _check_same_shape("velocity", velocity, "expression", expression)
        _check_float("future_expression", future_expression, 2, f"(N, G) = {tuple(expression.shape)}")
        _check_same_shape("future_expression", future_expression, "expression", expression)

        displacement = future_expression - expression
        cosine = F.cosine_similarity(velocity, displacement, dim=1, eps=1e-8)
        cosine_term = (1 - cosine).mean()
        magnitude_term = (expression + self.dt * velocity - future_expression).square().mean()
        return self.cosine_weight * cosine_term + self.magnitude_weight * magnitude_term

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return f"dt={self.dt}, cosine_weight={self.cosine_weight}, magnitude_weight={self.magnitude_weight}"
