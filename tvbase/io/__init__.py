"""Model weights in and out: safetensors checkpoints, task-vector sources, the safetensors writer.

- :mod:`.checkpoint`: :class:`Checkpoint`, a validated lazy view of one safetensors checkpoint;
- :mod:`.sources`: the input-format seam, one task's vector read tensor by tensor against the base;
- :mod:`.hub`: snapshot folders of the Hugging Face cache, and hub ids resolved offline to them;
- :mod:`.save`: :func:`save_checkpoint` and :func:`write_atomic`.
"""

from .checkpoint import Checkpoint, check_compatible, task_vector
from .save import save_checkpoint, write_atomic
from .sources import INPUT_FORMATS, TaskVectors, TaskVectorSource, open_task

__all__ = [
    "INPUT_FORMATS",
    "Checkpoint",
    "TaskVectorSource",
    "TaskVectors",
    "check_compatible",
    "open_task",
    "save_checkpoint",
    "task_vector",
    "write_atomic",
]
