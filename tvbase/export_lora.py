"""Write a task or a composition as a PEFT LoRA adapter: ``tvbase export-lora``.

Each matrix's update comes from the store as factors (:meth:`Snapshot.factors`), never as an
m x n matrix, and is brought to SVD form through two thin QRs and one small SVD. Where its
rank is at most ``rank`` the adapter holds it exactly (up to the factors' stored precision);
otherwise it is truncated to ``rank`` and the energy left out is reported. Weights that LoRA
cannot express go in as peft expresses them: every bias, whole, with ``bias: "all"``; other
changed weights (norms, weights of layers LoRA does not wrap) as ``modules_to_save``.

Which layer a weight belongs to (``Linear``, ``Embedding``, GPT-2's ``Conv1D``, a conv) decides
how peft stores its factors, so the base must be a transformers model directory: the model is
built from its ``config.json`` on the meta device (no weights are read or downloaded).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import InvalidInputError
from .io.hub import resolve_model_path
from .io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, resolve_name
from .reconstruct import svd_form

DEFAULT_RANK = 64  # the largest rank of an exported layer when none is asked for
# layer types LoRA wraps, by class name -> how peft lays out the factors of their weight
_LORA_LAYERS = {"Linear": "linear", "Embedding": "embedding", "Conv1D": "conv1d",
                "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv"}


@torch.no_grad()
def export_lora(store, coefficients, output, rank=DEFAULT_RANK, base=None, device=None, dtype=torch.float32, config=None):
    """Write ``sum alpha_t tau_t`` as a PEFT LoRA adapter directory ``output``.

    Parameters
    ----------
    store : Store
    coefficients : dict task name -> float
    output : path of a new directory (refused if it exists and is not empty)
    rank : int, the largest rank of any layer's factors
    base : the base model (default: the store's recorded base)
    device : where the factors are reduced (default: CUDA when available)
    dtype : torch dtype of the adapter's tensors
    config : folder holding the model's ``config.json`` (default: the base's folder)

    Returns
    -------
    dict with ``files`` (paths written), ``rel_error`` (of the adapter's update against the
    composition, from the singular values left out; 0 when exact), ``exact`` (bool), ``ranks``
    ({layer: rank}), ``modules_to_save`` (list of layers saved whole).
    """
    from .devices import resolve_device

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidInputError(f"--rank must be a positive integer, got {rank!r}")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InvalidInputError(f"output {output} exists and is not an empty directory; choose a new path")
    grown = {t: rows for t in coefficients if (rows := store._snapshot.added_rows(t))}
    if grown:
        task, rows = next(iter(grown.items()))
        raise InvalidInputError(
            f"task {task!r} added rows to {', '.join(sorted(rows))} (new tokens): a LoRA adapter cannot add rows "
            "to the base's weights; use `tvbase apply` for a model with the new vocabulary"
        )
    device = resolve_device(device)
    base_path = resolve_model_path(base) if base else Path(store.meta["base"]["path"])
    config_dir = Path(config) if config else base_path if base_path.is_dir() else base_path.parent
    config_dir = config_dir.parent if config_dir.name == "config.json" else config_dir
    layers = _layers(config_dir)  # tensor name of the model -> (layer name, layer type, parameter name)
    with store.open_base(base) as checkpoint:
        owner = {}  # checkpoint tensor name -> (layer, type, parameter)
        for name in store.meta["tensors"]:
            model_name = resolve_name(name, layers)
            if model_name is not None:
                owner[name] = layers[model_name]
        tensors, ranks, whole = {}, {}, {}
        left_out = energy = 0.0
        snapshot = store._snapshot
        for name in store.meta["tensors"]:
            if not checkpoint.get(name, dtype=None).is_floating_point():
                continue  # integer buffers are never differenced
            layer, kind, parameter = owner.get(name, (None, None, None))
            pair = snapshot.factors(name, coefficients, device) if kind in _LORA_LAYERS and parameter == "weight" else None
            if pair is None:
                delta = snapshot.rebuild(name, coefficients, device)
                total = float(delta.double().square().sum())
                if total == 0:
                    continue
                if layer is None:
                    raise InvalidInputError(
                        f"tensor {name!r} changes but belongs to no layer of the model built from {config_dir / 'config.json'}; "
                        "a PEFT adapter cannot hold it"
                    )
                whole.setdefault(layer, {})[name] = delta
                energy += total
                continue
            left, right, s = svd_form(*pair)
            r = min(rank, int((s > s[:1] * 1e-6).sum()) if len(s) else 0)
            if snapshot.has_sparse(name, coefficients):  # random entries no adapter holds: measured whole
                delta = snapshot.rebuild(name, coefficients, device).double().reshape(left.shape[0], -1)
                energy += float(delta.square().sum())
                left_out += float((delta - left[:, :r] @ right[:, :r].T).square().sum())
            else:
                energy += float(s.double().square().sum())
                left_out += float(s[r:].double().square().sum())
            if r == 0:
                continue
            key = PEFT_PREFIX + layer
            a, b = _peft_factors(_LORA_LAYERS[kind], left[:, :r], right[:, :r], checkpoint.spec(name)[0])
            for part, value in zip(_factor_keys(_LORA_LAYERS[kind]), (a, b)):
                tensors[f"{key}.{part}"] = value.to(dtype).cpu().contiguous()
            ranks[layer] = r
        # layers saved whole: biases go in through bias="all", the rest as modules_to_save
        modules_to_save = sorted({layer for layer, parts in whole.items() if any(owner[n][2] != "bias" for n in parts)} - set(ranks))
        conflicts = sorted({layer for layer, parts in whole.items() if layer in ranks and any(owner[n][2] != "bias" for n in parts)})
        if conflicts:
            raise InvalidInputError(f"layers {conflicts} change both a LoRA weight and another weight; a PEFT adapter cannot hold that")
        any_bias = any(owner[n][2] == "bias" for parts in whole.values() for n in parts)
        for name, (layer, kind, parameter) in owner.items():
            changed = whole.get(layer, {}).get(name)
            if layer in modules_to_save or (any_bias and parameter == "bias"):
                value = checkpoint.get(name).to(device) + (changed if changed is not None else 0)
                wrapped = layer in ranks and parameter == "bias"  # peft wraps the layer: its own weights live in base_layer
                tensors[f"{PEFT_PREFIX}{layer}.{'base_layer.' if wrapped else ''}{parameter}"] = value.to(dtype).cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "r": max(ranks.values(), default=1),
        "lora_alpha": max(ranks.values(), default=1),
        # scaling alpha / r = 1 for every layer: the factors carry the whole update
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "target_modules": sorted(ranks),
        "fan_in_fan_out": any(owner_kind == "Conv1D" for _, owner_kind, _ in owner.values()),
        "bias": "all" if any_bias else "none",
        "modules_to_save": modules_to_save or None,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": str(base_path if base_path.is_dir() else config_dir),
        "task_type": None,
    }
    files = _write_adapter(output, config, tensors)
    rel_error = (left_out / energy) ** 0.5 if energy > 0 else 0.0
    return {"files": files, "rel_error": rel_error, "exact": left_out == 0, "ranks": ranks, "modules_to_save": modules_to_save}


def _layers(config_dir):
    """{parameter name of the model: (layer name, layer class name, parameter name)}, from the
    model ``config_dir/config.json`` describes, built on the meta device."""
    if not (config_dir / "config.json").is_file():
        raise InvalidInputError(
            f"export-lora needs the model's config.json, and {config_dir} has none: the layer each weight "
            "belongs to decides how peft stores it; pass the transformers model directory with --base or --config"
        )
    try:
        import transformers
    except ImportError:
        raise InvalidInputError("export-lora needs transformers to read the base's config.json: pip install transformers") from None
    config = transformers.AutoConfig.from_pretrained(config_dir, local_files_only=True)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    with torch.device("meta"):
        model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
    layers = {}
    for layer, module in model.named_modules():
        for parameter, _ in module.named_parameters(recurse=False):
            layers[f"{layer}.{parameter}" if layer else parameter] = (layer, type(module).__name__, parameter)
    return layers


def _factor_keys(layout):
    return ("lora_embedding_A", "lora_embedding_B") if layout == "embedding" else ("lora_A.weight", "lora_B.weight")


def _peft_factors(layout, left, right, shape):
    """(A, B) as peft stores them for an update ``left @ right.T`` of a weight of ``shape``."""
    r = left.shape[1]
    if layout in ("embedding", "conv1d"):  # update (rows, cols) = (B @ A).T: A = left.T, B = right
        return left.T, right
    if layout == "conv":  # A (r, in, k...), B (out, r, 1...)
        return right.T.reshape(r, *shape[1:]), left.reshape(shape[0], r, *([1] * (len(shape) - 2)))
    return right.T, left  # Linear: update (out, in) = B @ A


def _write_adapter(output, config, tensors):
    """Write the adapter into a fresh folder beside ``output``, then move it into place."""
    from safetensors.torch import save_file

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [output / ADAPTER_CONFIG, output / ADAPTER_WEIGHTS]

