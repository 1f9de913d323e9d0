"""PEFT LoRA adapters as tasks: a directory with ``adapter_config.json`` and
``adapter_model.safetensors``, read as its factors.

The update LoRA makes to a targeted weight ``W`` (out, in) is ``scaling * B @ A`` with ``A``
(r, in) and ``B`` (out, r), ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``);
``rank_pattern`` and ``alpha_pattern`` override ``r`` and ``alpha`` per module, matched as PEFT
matches them. Embeddings store ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B``
(dim, r), their update is ``scaling * (B @ A).T``; with ``fan_in_fan_out`` (GPT-2's Conv1D) the
weight is (in, out) and its update is transposed too. Conv kernels are flattened to 2-D as the
store flattens them. Weights the adapter saves whole (``modules_to_save``, trained biases) are
deltas against the base.

An adapter whose update is anything else is refused with the option that makes it so: DoRA,
other PEFT types (IA3, LoHa, LoKr, ...), LoRA variants that add terms. Nothing is densified on
the way in: :meth:`LoraAdapter.factors` hands the fit the two factors of each update.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch

from tvbase.errors import BaseMismatchError, InvalidInputError

from .checkpoint import Checkpoint, task_vector

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "LoraAdapter", "resolve_name"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # before every tensor name in a saved adapter
# options whose update is not exactly scaling * B @ A: refused, named in the message
_REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora) rescales each column of the merged weight",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "layer_replication": "layer_replication duplicates base layers",
    "use_qalora": "QA-LoRA (use_qalora) pools its inputs",
    "trainable_token_indices": "trainable_token_indices trains embedding rows outside the LoRA factors",
    "target_parameters": "target_parameters adapts raw parameters rather than modules",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors",
}
# adapter tensor suffix -> (factor, embedding?)
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


class LoraAdapter:
    """One PEFT LoRA adapter read as a task: its factors, and the weights it saves whole.

    Parameters
    ----------
    path : str or os.PathLike, the adapter directory.
    base : Checkpoint, the store's base.
    reference : dict, ``{name: {"shape": [...], "dtype": str}}``, the base's recorded tensors.
    label : str, how messages name the task.

    Raises
    ------
    InvalidInputError
        For a config that is not valid JSON, an adapter type or option whose update is not
        ``scaling * B @ A``, pickle weights, or factors that do not fit together.
    BaseMismatchError
        If a target is not a tensor of the base, or its factors do not multiply to its shape.
    """

    @staticmethod
    def accepts(path: Path) -> bool:
        return path.is_dir() and (path / ADAPTER_CONFIG).is_file()

    def __init__(self, path: str | os.PathLike, base: Checkpoint, reference: dict, label: str):
        self.path, self.label, self._base = Path(path), label, base
        self._shapes = {name: tuple(spec["shape"]) for name, spec in reference.items()}
        self._config_bytes = (self.path / ADAPTER_CONFIG).read_bytes()
        config = self._read_config()
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = [p.name for p in self.path.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth")]
            found = f"; found {pickled[0]}, a pickle file tvbase does not load: re-save it with safe_serialization=True" if pickled else ""
            raise InvalidInputError(f"{label}: the adapter directory has no {ADAPTER_WEIGHTS}{found}")
        self._weights = Checkpoint.open(weights)
        try:
            self._factors, self._whole = self._map_tensors(config)
        except BaseException:
            self._weights.close()
            raise

    # -- reading the config -------------------------------------------------------------
    def _read_config(self) -> dict:
        try:
            config = json.loads(self._config_bytes)
        except (UnicodeDecodeError, ValueError) as e:
            raise InvalidInputError(f"{self.label}: {ADAPTER_CONFIG} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise InvalidInputError(f"{self.label}: {ADAPTER_CONFIG} must hold a JSON object")
        kind = config.get("peft_type")
        if kind != "LORA":
            raise InvalidInputError(
                f"{self.label}: adapter type {kind!r} is not supported; tvbase reads PEFT LoRA adapters "
                "(peft_type LORA), whose update is scaling * B @ A. Merge the adapter into a full "
                "checkpoint (peft's merge_and_unload) and ingest that instead."
            )
        for option, why in _REFUSED_OPTIONS.items():
            if config.get(option):
                raise InvalidInputError(
                    f"{self.label}: {ADAPTER_CONFIG} sets {option}: {why}, so the update is not "
                    "scaling * B @ A. Merge the adapter into a full checkpoint (peft's merge_and_unload) "
                    "and ingest that instead."
                )
        for key in ("r", "lora_alpha"):
            if not _is_positive(config.get(key)):
                raise InvalidInputError(f"{self.label}: {ADAPTER_CONFIG} needs a positive {key}, got {config.get(key)!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = config.get(key) or {}
            if not isinstance(pattern, dict) or not all(_is_positive(v) for v in pattern.values()):
                raise InvalidInputError(f"{self.label}: {ADAPTER_CONFIG}'s {key} must map module names to positive numbers")
        return config

    def _scaling(self, config: dict, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) of ``module``, patterns matched as PEFT does."""
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    # -- mapping the adapter's tensors onto the base's -----------------------------------
    def _map_tensors(self, config: dict):
        """({base name: (left (m, r), right (n, r))} with update ``left @ right.T`` in the
        store's matrix layout, {base name: adapter tensor saved whole})."""
        pairs, whole = {}, {}
        for key in self._weights.names:
            name = key.removeprefix(PEFT_PREFIX)
            for suffix, (factor, embedding) in _FACTOR_SUFFIXES.items():
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    pairs.setdefault(module, {})[factor] = (key, embedding)
                    break
            else:
                if "lora_" in name:
                    raise InvalidInputError(
                        f"{self.label}: adapter tensor {key!r} is not a LoRA factor tvbase knows "
                        "(lora_A/lora_B weights, lora_embedding_A/B); the adapter uses a variant tvbase does not read"
                    )
                whole[self._base_name(name.replace(".base_layer.", "."), key)] = key
        factors = {}
        for module, parts in sorted(pairs.items()):
            if set(parts) != {"A", "B"}:
                missing = ({"A", "B"} - set(parts)).pop()
                raise InvalidInputError(f"{self.label}: module {module!r} has no lora_{missing} factor")
            (key_a, embedding), (key_b, _) = parts["A"], parts["B"]
            name = self._base_name(module + ".weight", key_a)
            a, b = self._weights.get(key_a), self._weights.get(key_b)
            factors[name] = self._layout(name, a, b, embedding, config, module)
        return factors, whole

    def _base_name(self, name: str, key: str) -> str:
        """The base tensor an adapter tensor belongs to: ``name`` itself, or the one base name
        that equals it up to leading module prefixes (an adapter of ``BertForX`` on a base saved
        as ``BertModel``, or the reverse)."""
        found = resolve_name(name, self._shapes)
        if found is not None:
            return found
        raise BaseMismatchError(
            f"{self.label}: adapter tensor {key!r} targets {name!r}, which is not a tensor of the store's base "
            f"({len(self._shapes)} tensors); the adapter must be trained on the store's base model"
        )

    def _layout(self, name, a, b, embedding, config, module):
        """(left (m, r), right (n, r)) for base tensor ``name`` (m, n flattened as the store does)."""
        shape = self._shapes[name]
        scaling = self._scaling(config, module)
        if embedding:  # A (r, vocab), B (dim, r): the update (vocab, dim) is (B @ A).T
            left, right = a.T, b * scaling
        else:  # A (r, in...), B (out, r, 1...): the update (out, in...) is B @ A
            left, right = b.reshape(b.shape[0], -1) * scaling, a.reshape(a.shape[0], -1).T
            if config.get("fan_in_fan_out"):  # the weight is stored (in, out)
                left, right = right, left
        r = left.shape[1]
        m, n = shape[0], math.prod(shape[1:])
        if right.shape[1] != r or (left.shape[0], right.shape[0]) != (m, n):
            raise BaseMismatchError(
                f"{self.label}: the LoRA factors of {module!r} (A {list(a.shape)}, B {list(b.shape)}) make an update "
                f"of shape {[left.shape[0], right.shape[0]]}, but base tensor {name!r} has shape {list(shape)}"
            )
        return left.contiguous(), right.contiguous()

    # -- the source interface --------------------------------------------------------------
    def factors(self, name: str):
        """``(left (m, r), right (n, r))`` float32 with the update ``left @ right.T`` of base
        tensor ``name`` in its (m, n) matrix layout, or None if the adapter does not factor it."""
        return self._factors.get(name)

    def whole(self, name: str) -> torch.Tensor | None:
        """The delta of a tensor the adapter saves whole (float32, the base's shape), or None."""
        key = self._whole.get(name)
        if key is None:
            return None
        return task_vector(self._base, _Renamed(self._weights, name, key), name, self.label)

    def tensor(self, name: str) -> torch.Tensor:
        """The delta of tensor ``name``, densified: for refits and checks, never for ingest."""
        shape = self._shapes[name]
        pair = self._factors.get(name)
        if pair is not None:
            return (pair[0] @ pair[1].T).reshape(shape)
        whole = self.whole(name)
        return whole if whole is not None else torch.zeros(shape)

    def new_rows(self, name: str) -> None:
        """An adapter never adds rows: its updates have the base's shapes."""
        return None

    @property
    def hash(self) -> str:
        """sha256 of the config's bytes and the weights' content hash."""
        digest = hashlib.sha256(b"tvbase-lora-v1\0" + self._config_bytes)
        digest.update(self._weights.fingerprint()["hash"].encode())
        return digest.hexdigest()

    def close(self) -> None:
        self._weights.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class _Renamed:
    """A checkpoint view in which adapter tensor ``key`` is called ``name`` (for task_vector)."""

    def __init__(self, checkpoint, name, key):
        self._checkpoint, self._name, self._key = checkpoint, name, key

    def spec(self, name):
        return self._checkpoint.spec(self._key)

    def get(self, name, dtype=torch.float32):
        return self._checkpoint.get(self._key, dtype=dtype)


def resolve_name(name: str, known) -> str | None:
    """``name`` if it is in ``known``, else the one name of ``known`` equal to it up to leading
    module prefixes (``bert.encoder.x`` and ``encoder.x``: a model with a task head and the same
    model without), else None."""
    if name in known:
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[i:]) in known:
            return ".".join(parts[i:])
    longer = [k for k in known if k.endswith("." + name)]
    return longer[0] if len(longer) == 1 else None


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rule: the first key ``k`` with ``module`` matching ``(.*\\.)?(k)$``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0
