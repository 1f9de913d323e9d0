"""The torch device a read or fit runs on, checked once at the boundary."""

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
