"""Choose composition coefficients on validation data, as in Task Vector Bases (Zeng et al., 2025).

Both functions only call the evaluation callbacks you give them, so they work for any model,
any metric and any representation (raw vectors, a tvbase store, a baseline compressor).
"""

import numpy as np

from .errors import InvalidInputError

DEFAULT_GRID = tuple(float(a) for a in np.linspace(0.0, 1.0, 21))


def _check_grid(grid):
    grid = [float(a) for a in grid]
    if not grid or not all(np.isfinite(grid)):
        raise InvalidInputError(f"coefficient grid must be a non-empty list of finite numbers, got {grid!r}")
    return grid


def choose_addition_alpha(evaluate, grid=DEFAULT_GRID):
    """The alpha that maximizes ``evaluate(alpha)`` for ``theta_0 + alpha * sum_t tau_t``.

    Parameters
    ----------
    evaluate : callable float -> float
        Validation score of the model built with that alpha (for a group of tasks, e.g. the
        mean normalized accuracy over the group).
    grid : sequence of float, default linspace(0, 1, 21)

    Returns
    -------
    alpha : float
    scores : dict alpha -> score, every grid point evaluated
    """
    scores = {alpha: float(evaluate(alpha)) for alpha in _check_grid(grid)}
    best = max(scores, key=lambda a: (scores[a], -a))  # ties: the smaller step from the base
    return best, scores


def choose_negation_alpha(evaluate_target, evaluate_control, control_zero_shot, grid=DEFAULT_GRID, keep=0.95):
    """The alpha for ``theta_0 - alpha * tau_target`` that lowers the target most while the
    control task keeps at least ``keep`` of its zero-shot score.

    Parameters
    ----------
    evaluate_target, evaluate_control : callable float -> float
        Validation scores of the negated model on the target and on the control task.
    control_zero_shot : float
        The base model's control score.
    grid : sequence of float, default linspace(0, 1, 21)
    keep : float in (0, 1], default 0.95

    Returns
    -------
    alpha : float (0.0 when no alpha keeps the control)
    scores : dict alpha -> (target score, control score)
    """
    if not 0 < keep <= 1:
        raise InvalidInputError(f"keep must lie in (0, 1], got {keep!r}")
    scores = {alpha: (float(evaluate_target(alpha)), float(evaluate_control(alpha))) for alpha in _check_grid(grid)}
    allowed = [a for a, (_, control) in scores.items() if control >= keep * control_zero_shot]
    if not allowed:
        return 0.0, scores
    best = min(allowed, key=lambda a: (scores[a][0], a))
    return best, scores
