"""The torch device a read or fit runs on, checked once at the boundary, and the CPU threads it uses."""

import contextlib
import functools
import os

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


def bf16_products(device):
    """Whether reads on ``device`` multiply integer-coded factors in bfloat16: where it has
    units for it (CUDA with bfloat16 support; a CPU with AMX or AVX-512 BF16, where torch's
    bfloat16 products ran 6-14x faster than float32 at the shapes of a rebuild). Elsewhere a
    bfloat16 product is emulated and slower. ``TVBASE_BF16_PRODUCTS=0`` turns it off."""
    return os.environ.get("TVBASE_BF16_PRODUCTS", "1") != "0" and _fast_bf16(torch.device(device).type)


@functools.cache
def _fast_bf16(device_type):
    if device_type == "cuda":  # native only: before Ampere torch emulates bfloat16, slowly
        return torch.cuda.is_bf16_supported(including_emulation=False)
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)
