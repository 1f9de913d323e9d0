"""Rank allocation: spend a byte budget where it captures the most energy per stored byte."""

import heapq

import numpy as np


def allocate_ranks(curves, budget_bytes):
    """Choose one rank per item so the captured energy is high and the bytes stay within budget.

    Greedy on marginal gain per marginal byte: repeatedly grow the item whose next rank step
    captures the most energy per byte, skipping steps that no longer fit. Captured-energy
    curves of truncated SVD / Tucker fits are concave, so greedy is near optimal.

    Parameters
    ----------
    curves : list of (cost, gain) pairs
        ``cost`` : ndarray of shape (R_i + 1,), bytes stored at rank 0..R_i (non-decreasing).
        ``gain`` : ndarray of shape (R_i + 1,), energy captured at rank 0..R_i (non-decreasing).
    budget_bytes : float
        Bytes available for all items together (rank-0 costs included).

    Returns
    -------
    ranks : list of int, one per item.
    """
    ranks = [0] * len(curves)
    spent = float(sum(cost[0] for cost, _ in curves))
    heap = []

    def push(i):
        cost, gain = curves[i]
        r = ranks[i]
        if r + 1 < len(cost):
            step = float(cost[r + 1] - cost[r])
            ratio = float(gain[r + 1] - gain[r]) / max(step, 1e-12)
            # ties broken by item index so the result is deterministic
            heapq.heappush(heap, (-ratio, i))

    for i in range(len(curves)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        cost, _ = curves[i]
        step = float(cost[ranks[i] + 1] - cost[ranks[i]])
        if spent + step > budget_bytes:
            continue  # this item's next step does not fit; cheaper steps elsewhere still may
        spent += step
        ranks[i] += 1
        push(i)
    return ranks


def uniform_ranks(curves, rank):
    """Explicit ranks: ``rank`` for every item, capped at each item's maximum."""
    return [min(int(rank), len(cost) - 1) for cost, _ in curves]


def cumulative(values):
    """``[0, v0, v0+v1, ...]`` as float64: a curve starting at rank 0."""
    return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
