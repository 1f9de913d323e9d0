"""What every method's fit produces, and the error pass they share."""

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..codec.payload import raw_bytes  # noqa: F401 (re-exported: the methods' budgets)
from ..reconstruct import rebuild_tensor


@dataclass
class FitResult:
    """What a fit produced, ready to be written by the store format.

    method : str
        Registry name of the method that fitted the shared bases (recorded per cluster).
    clusters : dict cluster index -> {tensor name: SharedBasis}
    labels : dict task -> cluster index, or None for tasks stored on their own (per-task SVD);
        or the id of a cluster the store already holds (in ``stored_clusters``)
    stored_clusters : set of cluster ids of the store that tasks join: their bases are written
        already, and their tasks' cores are fitted to them (a task added to a fitted store)
    tasks : dict task -> {tensor name: TaskTensor}
    kind : dict task -> str, how the task is stored (``"shared"``, ``"svd"``, a seed method)
    rel_error : dict task -> ||tau_hat - tau|| / ||tau|| over the whole task vector
    energy : dict task -> ||tau||^2
    info : dict, method details worth keeping in the store's metadata
    sparse : dict task -> {"seed": int, "threshold": int} of its sparse residuals' positions
        (:mod:`tvbase.codec.sparse`), for tasks that keep one
    """

    method: str = ""
    clusters: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    kind: dict = field(default_factory=dict)
    rel_error: dict = field(default_factory=dict)
    energy: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    stored_clusters: set = field(default_factory=set)
    sparse: dict = field(default_factory=dict)

    def add(self, other):
        """Take in the tasks of ``other``, a fit of other tasks that stores each on its own
        (no clusters: LoRA adapters, tasks kept as stored)."""
        if other.clusters or other.stored_clusters or any(label is not None for label in other.labels.values()):
            raise ValueError("only a fit without clusters can be added to another")
        for part in ("tasks", "labels", "kind", "rel_error", "energy", "sparse"):
            getattr(self, part).update(getattr(other, part))
        return self


def measure_errors(source, tasks, shapes, result, device, progress):
    """Fill ``result.rel_error`` and ``result.energy``: one more pass over the task vectors."""
    bar = tqdm(total=len(tasks) * len(shapes), desc="measure error", disable=not progress, leave=False, unit="tensor")
    for t in tasks:
        err = total = 0.0
        c = result.labels[t]
        for name, shape in shapes.items():
            x = source.tensor(t, name).to(device, torch.float32)
            basis = result.clusters.get(c, {}).get(name) if c is not None else None
            xh = rebuild_tensor(shape, [(1.0, basis, result.tasks[t][name])], device=device)
            err += float((x - xh).square().sum())
            total += float(x.square().sum())
            bar.update()
        result.rel_error[t] = (err / total) ** 0.5 if total > 0 else 0.0
        result.energy[t] = total
    bar.close()
