"""The torch device a read or fit runs on, checked once at the boundary, and the CPU threads it uses."""

import contextlib

import torch

from .errors import InvalidInputError


def resolve_device(device):
    """``device`` as a torch.device (default: CUDA when available, else the CPU)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise InvalidInputError(f"unknown device {device!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device {str(device)!r} is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return device


@contextlib.contextmanager
def torch_threads(n):
    """Run the block with ``n`` torch CPU threads, restoring the previous count after; ``n`` None
    or 0 leaves the setting alone."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
