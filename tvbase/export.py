"""Write compositions out: the task-vector file of ``compose``, the merged model of ``apply``.

Either goes to one ``.safetensors`` file (replaced atomically) or to a new directory, written
whole or not at all (:func:`~tvbase.io.save.write_directory_atomic`). A merged model keeps the
base's layout, so whatever loads the base loads it: when the base is a Hugging Face model
directory, that directory's other files (config, tokenizer, ...; see :func:`model_files`) are
copied beside the merged weights and ``transformers``' ``from_pretrained`` loads the result.
"""

import json
import shutil
from pathlib import Path

import torch

from .io.checkpoint import PICKLE_SUFFIXES
from .io.save import check_new_directory, save_checkpoint, torch_dtype, write_directory_atomic
from .s3 import is_s3_url

__all__ = ["apply_composition", "model_files", "write_composition"]

DEFAULT_SHARD_BYTES = 2 * 1024**3

# Weights in any format a model repository ships. None of them is copied into a merged model:
# they hold the base's weights, which the merged ones replace (an ONNX or GGUF export of the base
# beside the merged safetensors would load as the base).
WEIGHT_SUFFIXES = PICKLE_SUFFIXES | {".safetensors", ".h5", ".msgpack", ".onnx", ".ot", ".gguf", ".tflite", ".npz"}
_INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json, pytorch_model.bin.index.json, ...


def model_files(directory):
    """The files of a model directory that belong beside new weights.

    Every regular file (or symlink to one, as in the Hugging Face cache) at the top level of
    ``directory`` except weight files (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.h5``,
    ``*.onnx``, ... see ``WEIGHT_SUFFIXES``), weight indexes (``*.safetensors.index.json``, ...)
    and hidden files: ``config.json``, ``generation_config.json``, tokenizer and processor files,
    chat templates, the model card. Subdirectories are not copied: in model repositories they
    hold other runtimes' exports of the base weights (``onnx/``, ``openvino/``, ``coreml/``).

    Parameters
    ----------
    directory : str or Path

    Returns
    -------
    list of Path, sorted by name.
    """
    return sorted(
        path for path in Path(directory).iterdir()
        if path.is_file() and not path.name.startswith(".") and not _is_weights(path.name)
    )


def write_composition(store, coefficients, output, device=None, dtype=None, metadata=None,
                      max_shard_bytes=DEFAULT_SHARD_BYTES):
    """Write the composition ``sum alpha_t tau_t`` (a task vector) to ``output``.

    Parameters
    ----------
    store : Store
    coefficients : dict of str to float, task name -> alpha.
    output : str or Path, a ``.safetensors`` file, or a new (or empty) directory that gets
        ``model.safetensors``, or shards plus ``model.safetensors.index.json`` when larger than
        ``max_shard_bytes``.
    device : str or torch.device, where the tensors are rebuilt (default CUDA when available).
    dtype : torch.dtype of the written tensors, default torch.float32.
    metadata : dict of str to str, stored in every file's header.

    Returns
    -------
    list of Path, the files written.
    """
    output = Path(output)
    _check_output(output)
    tensors = store.iter_composition(coefficients, device=device, dtype=dtype)  # checks the tasks
    plan = store.composition_plan(coefficients, dtype)
    return _write(output, lambda target: save_checkpoint(
        ((name, tensor.cpu()) for name, tensor in tensors), target, max_shard_bytes, metadata, plan=plan))


def apply_composition(store, coefficients, base, output, device=None, dtype=None, metadata=None,
                      max_shard_bytes=DEFAULT_SHARD_BYTES):
    """Write ``base + sum alpha_t tau_t`` to ``output``, one tensor at a time.

    Parameters
    ----------
    store : Store
    coefficients : dict of str to float, task name -> alpha.
    base : str, Path or None, the store's base model; None takes the one recorded at init
        (see :meth:`Store.open_base`: either must have the recorded content hash).
    output : str or Path, a ``.safetensors`` file (weights only), or a new (or empty) directory
        that gets ``model.safetensors``, or shards plus ``model.safetensors.index.json`` when
        larger than ``max_shard_bytes``. When the base is a directory (or its index file), the
        directory's :func:`model_files` are copied there too, so that a transformers base gives
        a folder that ``AutoModel.from_pretrained`` loads.
    device : str or torch.device, where the tensors are rebuilt and added (default CUDA when
        available).
    dtype : torch.dtype or None, of every floating-point tensor written; None keeps each
        tensor's base dtype. Integer and bool tensors always keep theirs. When given, a copied
        ``config.json`` records it (``torch_dtype``/``dtype``), so that ``from_pretrained``'s
        ``dtype="auto"`` loads what was written.
    metadata : dict of str to str, stored in every weights file's header.

    Returns
    -------
    list of Path, the files written: weights, the index if any, then the copied files.
    """
    output = Path(output)
    _check_output(output)  # before the base is hashed
    with store.open_base(base) as ckpt:
        source = _model_directory(ckpt.path) if output.suffix != ".safetensors" else None
        composition = store.iter_composition(coefficients, device=device)  # checks the tasks

        rows = {}  # tensor name -> (base rows, rows written) where tasks added rows (tokens)

        def tensors():
            for name, delta in composition:
                weight = ckpt.get(name, dtype=None)
                merged = weight.to(delta.device, torch.float32)
                if delta.shape != weight.shape:  # rows added after the base's: the base has zeros there
                    rows[name] = (weight.shape[0], delta.shape[0])
                    merged = torch.cat([merged, merged.new_zeros(delta.shape[0] - weight.shape[0], *weight.shape[1:])])
                merged = merged + delta
                if not weight.is_floating_point():
                    merged = merged.round()
                keep = dtype is None or not weight.is_floating_point()
                yield name, merged.to(weight.dtype if keep else dtype).cpu()

        def write(target):
            plan = _merged_plan(store, coefficients, ckpt, dtype)
            files = save_checkpoint(tensors(), target, max_shard_bytes, metadata, plan=plan)  # adds "format": "pt"
            return files + (_copy_model_files(source, target, dtype, _vocab_size(rows)) if source is not None else [])

        return _write(output, write)


def _merged_plan(store, coefficients, ckpt, dtype):
    """What ``apply`` writes, as :func:`save_checkpoint`'s plan: the composition's shapes, each
    tensor in ``dtype`` where it is floating point and given, else in the base's dtype; None
    where a base dtype is one the plan cannot name (the files are then written unplanned)."""
    plan = []
    for name, shape, _ in store.composition_plan(coefficients):
        kept = torch_dtype(ckpt.spec(name)[1])
        if kept is None:
            return None
        plan.append((name, shape, kept if dtype is None or not kept.is_floating_point else dtype))
    return plan


def _is_weights(name):
    return Path(name.removesuffix(_INDEX_SUFFIX)).suffix in WEIGHT_SUFFIXES


def _check_output(output):
    if output.suffix != ".safetensors" and output.suffix not in PICKLE_SUFFIXES:
        check_new_directory(output)  # a pickle path is refused by save_checkpoint


def _write(output, write):
    """``write(path)`` -> files: straight to a file path (save_checkpoint replaces it atomically,
    and refuses a pickle suffix), or into a new directory moved into place once complete."""
    if output.suffix == ".safetensors" or output.suffix in PICKLE_SUFFIXES:
        return write(output)
    names = []
    write_directory_atomic(output, lambda temp: names.extend(path.name for path in write(temp)))
    return [output / name for name in names]


def _model_directory(path):
    """The model directory of a base checkpoint: itself, the folder of its index file, or None
    for a single weights file (whose folder may hold anything) and for a base on S3 (its
    weights are written alone)."""
    if is_s3_url(path):
        return None
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent if path.name.endswith(".safetensors" + _INDEX_SUFFIX) else None


def _vocab_size(rows):
    """(old, new) vocabulary size when the composition added rows to the word embeddings (the
    tensors that grew share their base row count, the vocabulary), else None."""
    if not rows:
        return None
    old = {base for base, _ in rows.values()}
    return (old.pop(), max(new for _, new in rows.values())) if len(old) == 1 else None


def _copy_model_files(source, target, dtype, vocab_size=None):
    copied = []
    for file in model_files(source):
        if file.name == "config.json" and (dtype is not None or vocab_size is not None):
            _write_config(file, target / file.name, dtype, vocab_size)
        else:
            shutil.copyfile(file, target / file.name)  # follows symlinks: the content, not the link
        copied.append(target / file.name)
    return copied


def _write_config(source, target, dtype, vocab_size=None):
    """config.json with the dtype of the written weights and, when tasks added tokens, the new
    ``vocab_size`` (an unreadable config is copied as it is)."""
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict):
        shutil.copyfile(source, target)
        return
    if dtype is not None:
        keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]  # v4 / v5 names
        config.update(dict.fromkeys(keys, str(dtype).removeprefix("torch.")))
    if vocab_size is not None and config.get("vocab_size") == vocab_size[0]:
        config["vocab_size"] = vocab_size[1]
    target.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
