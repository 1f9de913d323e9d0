"""Task-vector sources: the input-format seam.

A *source* is one task's vector, read tensor by tensor as float32 deltas against the store's
base, with its input checked against the base's fingerprint when it is opened and a content
hash that the store records. The methods' fits read several tasks at once through
:class:`TaskVectors` (``tensor(task, name)``), so they never know what format a task came in.

Formats are tried in the order of :data:`INPUT_FORMATS`; the first whose ``accepts(path)`` is
true opens the path: PEFT LoRA adapters (a directory with ``adapter_config.json``, see
:mod:`tvbase.io.lora`), then full checkpoints (one ``.safetensors`` file or a sharded directory),
which accept everything else, so they come last. A LoRA adapter also hands the fit its factors
(``factors(name)``), so that it is stored without being densified.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..s3 import is_s3_url
from .checkpoint import Checkpoint, check_compatible, new_rows, task_vector
from .lora import LoraAdapter

__all__ = ["INPUT_FORMATS", "FullCheckpoint", "LoraAdapter", "StoredTask", "TaskVectorSource", "TaskVectors", "open_task"]


class TaskVectorSource(ABC):
    """One task's vector against the store's base, read one tensor at a time.

    Attributes
    ----------
    path : Path or None
        Where the task was read from (None for a task rebuilt from the store).
    label : str
        How to name the task in messages, e.g. ``"task 'math' (ckpts/math.safetensors)"``.
    """

    path: Path | None = None
    label: str = ""

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """The delta of tensor ``name``: float32, the base's shape, on the CPU."""

    @property
    @abstractmethod
    def hash(self) -> str | None:
        """Content hash of the input (64 hex digits), recorded so ``compact`` can tell whether
        the input is still the one ingested; None when there is no input file."""

    def new_rows(self, name: str) -> torch.Tensor | None:
        """Rows of tensor ``name`` after the base's (tokens the fine-tune added): its values,
        float32 (k, size of one row), or None when it has the base's shape."""
        return None

    def close(self) -> None:
        """Release open files; the base belongs to the caller and stays open."""

    def __enter__(self) -> TaskVectorSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class FullCheckpoint(TaskVectorSource):
    """A full fine-tune: a safetensors file or sharded directory with the base's tensors.

    Its float tensors may have another precision than the base's, and a tensor the base ties
    to another (``lm_head.weight`` to the embeddings) may be left out, as transformers saves
    tied models; see :func:`~tvbase.io.checkpoint.check_compatible`.

    Parameters
    ----------
    path : str or os.PathLike
    base : Checkpoint, the store's base (checked against the store's fingerprint by the caller).
    reference : dict, ``{name: {"shape": [...], "dtype": str}}``, the base's recorded tensors.
    label : str, how messages name the task.

    Raises
    ------
    NotFoundError, InvalidInputError
        If the checkpoint cannot be opened (see :meth:`Checkpoint.open`).
    BaseMismatchError
        If its tensor names, shapes or dtypes differ from the base's, or a non-float tensor
        differs from the base's.
    """

    @staticmethod
    def accepts(path: Path) -> bool:
        return True  # the fallback: Checkpoint.open says what is wrong with anything else

    def __init__(self, path: str | os.PathLike, base: Checkpoint, reference: dict, label: str):
        self.path, self.label, self._base = path if is_s3_url(path) else Path(path), label, base
        self._checkpoint = Checkpoint.open(path)
        try:
            self._tied = check_compatible(reference, self._checkpoint, label, base=base)
        except BaseException:
            self._checkpoint.close()
            raise

    def tensor(self, name: str) -> torch.Tensor:
        # a tensor tied in the base (equal bytes) moves with the one it is tied to
        return task_vector(self._base, self._checkpoint, self._tied.get(name, name), self.label)

    def new_rows(self, name: str) -> torch.Tensor | None:
        return new_rows(self._base, self._checkpoint, self._tied.get(name, name))

    @property
    def hash(self) -> str:
        return self._checkpoint.fingerprint()["hash"]

    def close(self) -> None:
        self._checkpoint.close()


class StoredTask(TaskVectorSource):
    """A task rebuilt from a store version: what ``compact`` refits when the input is gone.

    Parameters
    ----------
    snapshot : object with ``rebuild(name, coefficients, device) -> torch.Tensor``
    task : str
    device : torch.device the rebuild runs on.
    """

    def __init__(self, snapshot, task: str, device):
        self.label = f"task {task!r} (stored)"
        self._snapshot, self._task, self._device = snapshot, task, device

    def tensor(self, name: str) -> torch.Tensor:
        return self._snapshot.rebuild(name, {self._task: 1.0}, self._device).cpu()

    @property
    def hash(self) -> None:
        return None


TaskVectorSource.register(LoraAdapter)  # a source too (lora.py cannot import this module: it is imported here)
INPUT_FORMATS = [LoraAdapter, FullCheckpoint]


def open_task(path: str | os.PathLike, base: Checkpoint, reference: dict, label: str) -> TaskVectorSource:
    """Open the input at ``path`` with the first format of :data:`INPUT_FORMATS` that accepts it;
    an ``s3://`` URL is a full checkpoint (adapters are read from local folders)."""
    if is_s3_url(path):
        return FullCheckpoint(path, base, reference, label)
    path = Path(path)
    fmt = next(f for f in INPUT_FORMATS if f.accepts(path))
    return fmt(path, base, reference, label)


class TaskVectors:
    """Several tasks' sources by name: what a method's fit reads.

    Parameters
    ----------
    sources : dict task name -> TaskVectorSource
    """

    def __init__(self, sources: dict):
        self.sources = dict(sources)

    def tensor(self, task: str, name: str) -> torch.Tensor:
        """The delta of tensor ``name`` of ``task``: float32, the base's shape, on the CPU."""
        return self.sources[task].tensor(name)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()

    def __enter__(self) -> TaskVectors:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
