"""Write compositions out: base + sum of task vectors as a loadable checkpoint."""

import torch

from .io.save import save_checkpoint


def apply_composition(store, coefficients, base, output, device=None, max_shard_bytes=2 * 1024**3):
    """Write ``base + sum alpha_t tau_t`` to ``output``, one tensor at a time.

    Parameters
    ----------
    store : Store
    coefficients : dict task name -> float
    base : path of the base checkpoint (must be the store's base: same fingerprint hash)
    output : a ``.safetensors`` file, or a directory that gets sharded safetensors plus
        ``model.safetensors.index.json`` when larger than ``max_shard_bytes``.

    Returns
    -------
    list of Path, the files written. Each tensor keeps the base's dtype.
    """
    with store.open_base(base) as ckpt:

        def tensors():
            for name, delta in store.iter_composition(coefficients, device=device):
                weight = ckpt.get(name, dtype=None)
                merged = weight.to(delta.device, torch.float32) + delta
                if not weight.is_floating_point():
                    merged = merged.round()
                yield name, merged.to(weight.dtype).cpu()

        return save_checkpoint(tensors(), output, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
