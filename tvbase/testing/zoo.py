"""Synthetic zoos: a random base model and fine-tunes of it whose task vectors are low rank.

:func:`build_synthetic_zoo` writes a base checkpoint with random weights and fine-tunes in
*families*: per matrix, the tasks of one family share a column subspace, a row subspace and a
core, so a shared fit can find the families as clusters. Each fine-tune's delta for a matrix
``(m, n)`` is

    qa @ (core + 0.5 * g) @ qb.T * (delta_scale * sqrt(m * n / rank) / low_rank_divisor)
    + noise_scale * g'

with ``qa`` (m, rank) and ``qb`` (n, rank) the family's orthonormal bases, ``core``
(rank, rank) the family's core and ``g``, ``g'`` the task's own standard normal draws; every other
tensor (a vector, a matrix with a side of 1) gets a dense ``delta_scale * g``. A tensor of
shape ``(m, d1, d2, ...)`` counts as the matrix ``(m, d1 * d2 * ...)`` (a conv kernel), the rule
tvbase itself factorizes by.

Everything is drawn from one seeded ``torch.Generator`` in a fixed order (the base's tensors;
per family and matrix ``qa``, ``qb``, ``core``; per task and tensor its own draws), so a zoo is
reproducible bit for bit from its arguments.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..io.save import save_checkpoint

__all__ = ["SyntheticZoo", "build_synthetic_zoo"]

CORE_SPREAD = 0.5  # std of a task's own core around its family's


@dataclass
class SyntheticZoo:
    """A base checkpoint and fine-tunes of it on disk, with their tensors in memory.

    Attributes
    ----------
    root : Path
        The folder holding every checkpoint.
    base : Path
        ``root / "base.safetensors"``.
    tasks : dict of str to Path
        Task name -> its checkpoint, in the order the tasks were given: ``root / "NAME.safetensors"``,
        or the folder ``root / "NAME"`` for a sharded one.
    base_tensors : dict of str to Tensor
        The base's tensors: the random ones (float32, the given shapes), then the frozen ones.
    task_vectors : dict of str to dict of str to Tensor
        Task name -> ``{tensor name: finetuned.float() - base.float()}``, float32 of the base's
        shapes: the task vector as a store computes it from the files (zero for frozen tensors).
    """

    root: Path
    base: Path
    tasks: dict
    base_tensors: dict
    task_vectors: dict

    def items(self, names):
        """``NAME=PATH`` arguments of ``tvbase ingest`` for the tasks ``names``."""
        return [f"{n}={self.tasks[n]}" for n in names]


def _matrix(shape):
    """(m, n) a tensor of ``shape`` gets a low-rank delta as, or None for a dense delta."""
    if len(shape) < 2:
        return None
    m, n = shape[0], math.prod(shape[1:])
    return (m, n) if min(m, n) >= 2 else None


def build_synthetic_zoo(
    root,
    shapes,
    families,
    *,
    n_families=None,
    seed=0,
    rank=3,
    delta_scale=0.05,
    noise_scale=0.002,
    low_rank_divisor=1.0,
    frozen=None,
    sharded=None,
):
    """Write a random base and low-rank fine-tunes of it under ``root``.

    Parameters
    ----------
    root : str or os.PathLike
        Folder to write to (created if needed); checkpoints already there are overwritten.
    shapes : dict of str to tuple of int
        Name -> shape of every random tensor of the base (float32, entries ~N(0, 1)), in the
        order they are drawn and stored.
    families : dict of str to int
        Task name -> its family (0, 1, ...), in the order the tasks are drawn and listed.
    n_families : int, optional
        How many families to draw bases and cores for; default ``max(families.values()) + 1``.
        Drawing more than the tasks use changes every later draw, so pass it to reproduce a zoo
        drawn with a fixed number of families whatever the tasks.
    seed : int, default 0
        Seed of the one ``torch.Generator`` everything is drawn from.
    rank : int, default 3
        Rank of each task's low-rank delta (and of its family's subspaces).
    delta_scale : float, default 0.05
        Size of the deltas: a dense delta is ``delta_scale * N(0, 1)`` per entry; a matrix's
        low-rank part is scaled by ``delta_scale * sqrt(m * n / rank) / low_rank_divisor``.
    noise_scale : float, default 0.002
        Std of the full-rank noise added to each matrix's low-rank delta.
    low_rank_divisor : float, default 1.0
        Divides the low-rank part's scale (only that: dense deltas and noise keep theirs).
    frozen : dict of str to Tensor, optional
        Further base tensors that every fine-tune carries unchanged (say an int64 buffer); they
        take no random draws and come after ``shapes`` in ``base_tensors``.
    sharded : dict of str to int, optional
        Task name -> ``max_shard_bytes``: these tasks are written with
        :func:`tvbase.io.save.save_checkpoint` as a sharded folder ``root / NAME``, which must
        come out as at least two shards.

    Returns
    -------
    SyntheticZoo
        The paths and tensors written.

    Raises
    ------
    ValueError
        On a family index outside ``0 .. n_families - 1``, a frozen tensor named like a random
        one, a sharded task that is not a task, or a sharded task that fits in one shard.
    """
    root = Path(root)
    shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
    families = dict(families)
    frozen = dict(frozen or {})
    sharded = dict(sharded or {})
    if n_families is None:
        n_families = max(families.values(), default=-1) + 1
    if any(not 0 <= f < n_families for f in families.values()):
        raise ValueError(f"family indices must be in 0..{n_families - 1}, got {sorted(set(families.values()))}")
    if set(frozen) & set(shapes):
        raise ValueError(f"frozen tensors named like random ones: {sorted(set(frozen) & set(shapes))}")
    if set(sharded) - set(families):
        raise ValueError(f"sharded tasks that are not tasks: {sorted(set(sharded) - set(families))}")

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(*shape, generator=gen) for name, shape in shapes.items()}
    base.update(frozen)
    save_file(base, root / "base.safetensors")

    # per family and matrix: column basis qa (m, rank), row basis qb (n, rank), core (rank, rank)
    bases = []
    for _ in range(n_families):
        fam = {}
        for name, shape in shapes.items():
            if ms := _matrix(shape):
                m, n = ms
                qa, _ = torch.linalg.qr(torch.randn(m, rank, generator=gen))
                qb, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen))
                fam[name] = (qa, qb, torch.randn(rank, rank, generator=gen))
        bases.append(fam)

    zoo = SyntheticZoo(root=root, base=root / "base.safetensors", tasks={}, base_tensors=base, task_vectors={})
    for task, f in families.items():
        tensors = {}
        for name, shape in shapes.items():
            if ms := _matrix(shape):
                m, n = ms
                qa, qb, core = bases[f][name]
                own = core + CORE_SPREAD * torch.randn(rank, rank, generator=gen)
                low = qa @ own @ qb.T * (delta_scale * math.sqrt(m * n / rank) / low_rank_divisor)  # (m, n)
                delta = (low + noise_scale * torch.randn(m, n, generator=gen)).reshape(shape)
            else:
                delta = delta_scale * torch.randn(*shape, generator=gen)
            tensors[name] = base[name] + delta
        tensors.update((name, t.clone()) for name, t in frozen.items())
        zoo.task_vectors[task] = {name: tensors[name].float() - base[name].float() for name in base}
        if task in sharded:
            path = root / task
            files = save_checkpoint(tensors.items(), path, max_shard_bytes=sharded[task])
            if len(files) < 3:  # two shards and the index at least
                raise ValueError(f"task {task!r} fits in one shard of {sharded[task]} bytes; pass a smaller max_shard_bytes")
        else:
            path = root / f"{task}.safetensors"
            save_file(tensors, path)
        zoo.tasks[task] = path
    return zoo
