"""A small, real model zoo: many full fine-tunes of one base model on scikit-learn's digits.

The zoo is what tvbase's tests and benchmarks compress. It is built offline in seconds on a CPU:
``load_digits`` ships with scikit-learn (1797 grey 8x8 images of the digits 0-9).

* The **base** is pretrained on the standard 10-class task, but only on 400 of the 1197 training
  images, so it is a reasonable digit classifier and nothing more.
* A **task** is an input transform plus a label map ``digit -> label`` (see :data:`TASKS`). Every
  task uses the same 10-way output head: a binary task uses labels 0 and 1 of that head. There are
  no per-task heads, so everything a fine-tune learns lives in its task vector, head included.
* Each fine-tune trains **all** parameters of the base with Adam on the task's training split.

On disk (``root`` is the folder given to :func:`build_zoo`)::

    root/base.safetensors           the pretrained base (float32 state dict)
    root/tasks/<name>.safetensors   one full fine-tuned state dict per task, same names and shapes
    root/zoo.json                   arch, seed, tasks, training config, accuracies, timings, version

Examples
--------
>>> from tvbase.demo.zoo import build_zoo, DEMO_TASKS
>>> zoo = build_zoo("zoo-vit", arch="vit", tasks=DEMO_TASKS)           # doctest: +SKIP
>>> tau = zoo.task_vector("parity")                                     # doctest: +SKIP
>>> zoo.evaluate(tau, "parity", delta=True) == zoo.finetuned_accuracy["parity"]  # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..devices import torch_threads
from ..errors import FormatVersionError, InvalidInputError, NotFoundError
from ..io.save import write_atomic

__all__ = [
    "ARCHITECTURES",
    "CONTROL_TASK",
    "DEMO_TASKS",
    "TASKS",
    "ZOO_FORMAT_VERSION",
    "TaskSpec",
    "Zoo",
    "build_zoo",
    "make_model",
]

# Bump when the data split, the models or the training recipe change: cached zoos written by
# another version are rebuilt, and zoo.json files written by a newer version are refused.
ZOO_FORMAT_VERSION = 1

N_CLASSES = 10  # the one shared output head: 10 logits, whatever the task
IMAGE_SIZE = 8  # load_digits images are 8x8

# A fixed split of the 1797 images, independent of the zoo seed so that zoos built with different
# seeds are scored on the same test images: 300 test, 300 validation, and the remaining 1197 for
# training. Fine-tunes train on all 1197; the base is pretrained on only the first 400 of them, so
# it is a decent but improvable digit classifier.
_SPLIT_SEED = 20250101
_SPLIT_SIZES = {"test": 300, "val": 300, "pretrain": 400}
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------
# Tasks: an input transform and a label map, both declarative so a task is fully described by
# its spec (and zoo.json can record it).
# --------------------------------------------------------------------------------------------


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Move the ink one pixel down and one pixel right, filling with background (0)."""
    out = torch.zeros_like(x)
    out[:, 1:, 1:] = x[:, :-1, :-1]
    return out


# Each transform maps images of shape (N, 8, 8), values in [0, 1], to the same shape.
_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, dims=(1, 2)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(1, 2)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(1, 2)),
    "hflip": lambda x: torch.flip(x, dims=(2,)),
    "vflip": lambda x: torch.flip(x, dims=(1,)),
    "transpose": lambda x: x.transpose(1, 2),
    "invert": lambda x: 1.0 - x,
    "shift": _shift,
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of the zoo: which inputs the model sees and which label it must output.

    Parameters
    ----------
    name : str
        Safe identifier (letters, digits, ``-``, ``_``); also the task's file name.
    transform : str
        Key of the input transform applied to every image (``"identity"``, ``"rot90"``, ...).
    label_map : tuple of int, length 10
        ``label_map[d]`` is the target class (an index of the shared 10-way head) for digit ``d``.
    description : str
        One line for humans.
    contradicts : str or None
        Name of a task with the same inputs and incompatible labels (same transform, different
        ``label_map``), or None. ``"digits"`` refers to :data:`CONTROL_TASK`, the base's own task.
    """

    name: str
    transform: str
    label_map: tuple[int, ...]
    description: str
    contradicts: str | None = None

    @property
    def n_labels(self) -> int:
        """Number of distinct labels the task uses (2 for a binary task, 10 for a digit task)."""
        return len(set(self.label_map))


def _label_map(rule: Callable[[int], int]) -> tuple[int, ...]:
    return tuple(int(rule(d)) for d in range(N_CLASSES))


def _catalogue() -> dict[str, TaskSpec]:
    digits = _label_map(lambda d: d)
    next_digit = _label_map(lambda d: (d + 1) % N_CLASSES)  # a derangement: no label stays put
    specs = [
        TaskSpec(f"ovr-{k}", "identity", _label_map(lambda d, k=k: d == k), f"is it a {k}? (one-vs-rest)")
        for k in range(N_CLASSES)
    ]
    specs += [
        TaskSpec("parity", "identity", _label_map(lambda d: d % 2), "is the digit odd?", "not-parity"),
        TaskSpec("not-parity", "identity", _label_map(lambda d: 1 - d % 2), "is the digit even?", "parity"),
        TaskSpec("ge5", "identity", _label_map(lambda d: d >= 5), "is the digit >= 5?", "lt5"),
        TaskSpec("lt5", "identity", _label_map(lambda d: d < 5), "is the digit < 5?", "ge5"),
        TaskSpec("mod3", "identity", _label_map(lambda d: d % 3), "the digit modulo 3 (labels 0, 1, 2)"),
        TaskSpec("digits-relabel", "identity", next_digit, "label (d + 1) mod 10 for digit d", "digits"),
    ]
    for transform in ("rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "invert", "shift"):
        contradicts = "rot90-relabel" if transform == "rot90" else None
        specs.append(TaskSpec(transform, transform, digits, f"which digit, on {transform} images", contradicts))
    specs.append(TaskSpec("rot90-relabel", "rot90", next_digit, "label (d + 1) mod 10, on rot90 images", "rot90"))
    return {spec.name: spec for spec in specs}


#: Every task of the zoo, by name. ``build_zoo(tasks=None)`` fine-tunes all of them.
TASKS: dict[str, TaskSpec] = _catalogue()

#: The base's own pretraining task (plain digits). Not fine-tuned, but :meth:`Zoo.evaluate`
#: accepts it: it is the control task of negation experiments.
CONTROL_TASK = TaskSpec("digits", "identity", _label_map(lambda d: d), "which digit (the pretraining task)")

#: Eight varied tasks for a quick demo: one-vs-rest, a contradictory pair (parity / not-parity),
#: a coarse binary task, and three transformed-input digit tasks.
DEMO_TASKS: tuple[str, ...] = ("ovr-3", "ovr-7", "parity", "not-parity", "ge5", "rot90", "hflip", "invert")


def _task_spec(name: str) -> TaskSpec:
    if name == CONTROL_TASK.name:
        return CONTROL_TASK
    if name not in TASKS:
        raise NotFoundError(
            f"unknown zoo task {name!r}; valid tasks: {', '.join(TASKS)} (and {CONTROL_TASK.name!r} for evaluation)"
        )
    return TASKS[name]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digit_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The fixed split of ``load_digits``: split name -> (images (N, 8, 8) float32 in [0, 1], digits (N,) int64)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)  # (1797, 8, 8), raw values are 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))  # (1797,)
    order = torch.from_numpy(np.random.default_rng(_SPLIT_SEED).permutation(len(labels)))
    n_test, n_val = _SPLIT_SIZES["test"], _SPLIT_SIZES["val"]
    index = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
        "pretrain": order[n_test + n_val :][: _SPLIT_SIZES["pretrain"]],  # a subset of "train"
    }
    return {split: (images[i], labels[i]) for split, i in index.items()}


@functools.lru_cache(maxsize=None)
def _task_data(task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (N, 1, 8, 8) float32 and targets (N,) int64 of ``task`` on ``split`` (cached, read-only use)."""
    spec = _task_spec(task)
    images, digits = _digit_splits()[split]
    inputs = _TRANSFORMS[spec.transform](images).unsqueeze(1).contiguous()  # (N, 8, 8) -> (N, 1, 8, 8)
    targets = torch.tensor(spec.label_map, dtype=torch.int64)[digits]  # (N,)
    return inputs, targets


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A tiny vision transformer for 8x8 images (about 0.1M parameters).

    4x4 patches (a strided convolution) give 4 tokens plus a class token; two pre-norm blocks;
    the class token's final LayerNorm feeds one 10-way linear head. (2x2 patches learn slower and
    worse from 400 images: 0.93 against 0.96 digit accuracy for the same pretraining.)

    Parameters
    ----------
    dim : int
        Token width. 64 keeps each weight matrix small enough to factorize yet not trivially low-rank.
    depth : int
        Number of transformer blocks.
    heads : int
        Attention heads per block (``dim`` must be divisible by it).
    mlp_dim : int
        Hidden width of each block's MLP (4 x dim, as in ViT).
    patch : int
        Patch side in pixels; must divide 8.
    """

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 256, patch: int = 4):
        super().__init__()
        n_tokens = (IMAGE_SIZE // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(n_tokens + 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) for images (N, 1, 8, 8)."""
        x = self.patch_embed(x)  # (N, dim, 8/patch, 8/patch)
        x = x.flatten(2).transpose(1, 2)  # (N, n_tokens, dim)
        cls = self.cls_token.expand(x.shape[0], 1, -1)  # (N, 1, dim)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (N, n_tokens + 1, dim)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))  # (N, 10)


class SmallCNN(nn.Module):
    """A small convolutional network for 8x8 images (about 0.1M parameters).

    Three 3x3 convolutions (32, 64, 64 channels; GroupNorm after the first two; 2x2 max-pooling
    after the last two), a 256 -> 128 hidden linear layer and one 10-way linear head.
    """

    def __init__(self, width: int = 32, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, 2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 2 * 2, hidden)
        self.head = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) for images (N, 1, 8, 8)."""
        x = F.relu(self.norm1(self.conv1(x)))  # (N, 32, 8, 8)
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x))), 2)  # (N, 64, 4, 4)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (N, 64, 2, 2)
        x = F.relu(self.fc(x.flatten(1)))  # (N, 256) -> (N, 128)
        return self.head(x)  # (N, 10)


@dataclasses.dataclass(frozen=True)
class _Architecture:
    """A model class and the training recipe that goes with it."""

    factory: Callable[[], nn.Module]
    description: str
    pretrain_epochs: int
    pretrain_lr: float
    finetune_epochs: int
    finetune_lr: float
    batch_size: int = 32


#: Model architectures by name: ``"vit"`` (:class:`TinyViT`) and ``"cnn"`` (:class:`SmallCNN`).
ARCHITECTURES: dict[str, _Architecture] = {
    "vit": _Architecture(TinyViT, "tiny ViT: 4x4 patches, dim 64, 2 blocks, 4 heads", 40, 2e-3, 10, 5e-4),
    "cnn": _Architecture(SmallCNN, "small CNN: 3 conv layers, 2 linear layers", 20, 1e-3, 5, 5e-4),
}


def _architecture(arch: str) -> _Architecture:
    if arch not in ARCHITECTURES:
        raise InvalidInputError(f"unknown zoo architecture {arch!r}; valid architectures: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A freshly initialized model of architecture ``arch``, seeded without touching the global RNG.

    Parameters
    ----------
    arch : {"vit", "cnn"}
        Architecture name (see :data:`ARCHITECTURES`).
    seed : int
        Seed of the initialization.

    Returns
    -------
    torch.nn.Module
        Float32 model on the CPU mapping images (N, 1, 8, 8) to logits (N, 10).
    """
    factory = _architecture(arch).factory
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def _train(model: nn.Module, task: str, split: str, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """Train every parameter of ``model`` in place with Adam and cross-entropy on the shared head."""
    inputs, targets = _task_data(task, split)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(inputs[index]), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, task: str, split: str) -> float:
    """Fraction of ``split`` that ``model`` labels correctly for ``task`` (whole split in one batch)."""
    inputs, targets = _task_data(task, split)
    model.eval()
    return float((model(inputs).argmax(dim=1) == targets).double().mean())


def _task_seed(seed: int, task: str) -> int:
    # Depends on the task's name, not its position, so adding tasks leaves the others' fine-tunes unchanged.
    return zlib.crc32(f"{seed}:{task}".encode())


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().to(torch.float32).contiguous().clone() for name, t in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# The zoo on disk
# --------------------------------------------------------------------------------------------


class Zoo:
    """A built zoo on disk: the base, one fine-tuned checkpoint per task, and their accuracies.

    Open one with ``Zoo(root)`` after :func:`build_zoo` has written it (``build_zoo`` returns it).

    Parameters
    ----------
    root : str or os.PathLike
        Folder holding ``zoo.json``, ``base.safetensors`` and ``tasks/``.

    Attributes
    ----------
    root : pathlib.Path
        The zoo's folder.
    arch : str
        Architecture name (a key of :data:`ARCHITECTURES`).
    seed : int
        Seed the zoo was built with.
    tasks : list of str
        Fine-tuned task names, in build order.
    base_path : pathlib.Path
        ``root/base.safetensors``.
    base_accuracy : dict of str to float
        Test accuracy of the base on each task (and on ``"digits"``, the control task).
    finetuned_accuracy : dict of str to float
        Test accuracy of each task's own fine-tune.
    base_val_accuracy, finetuned_val_accuracy : dict of str to float
        The same on the validation split (for choosing coefficients without touching test).
    info : dict
        Everything zoo.json records (training config, split sizes, timings, versions).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta_path = self.root / "zoo.json"
        if not meta_path.is_file():
            raise NotFoundError(
                f"no zoo at {str(self.root)!r}: {meta_path.name} is missing; build one with build_zoo()"
            )
        info = json.loads(meta_path.read_text())
        if info.get("version", 0) > ZOO_FORMAT_VERSION:
            raise FormatVersionError(
                f"zoo at {str(self.root)!r} has format version {info['version']}, newer than this tvbase "
                f"reads ({ZOO_FORMAT_VERSION}); upgrade tvbase or rebuild the zoo"
            )
        self.info = info
        self.arch: str = info["arch"]
        self.seed: int = info["seed"]
        self.tasks: list[str] = list(info["tasks"])
        self.base_path = self.root / "base.safetensors"
        self.base_accuracy: dict[str, float] = dict(info["base_accuracy"])
        self.finetuned_accuracy: dict[str, float] = dict(info["finetuned_accuracy"])
        self.base_val_accuracy: dict[str, float] = dict(info["base_val_accuracy"])
        self.finetuned_val_accuracy: dict[str, float] = dict(info["finetuned_val_accuracy"])
        self._model: nn.Module | None = None
        self._base: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"Zoo(root={str(self.root)!r}, arch={self.arch!r}, seed={self.seed}, tasks={len(self.tasks)})"

    def task_path(self, name: str) -> Path:
        """Path of task ``name``'s fine-tuned checkpoint, ``root/tasks/<name>.safetensors``."""
        if name not in self.tasks:
            raise NotFoundError(f"task {name!r} is not in this zoo; its tasks are: {', '.join(self.tasks)}")
        return self.root / "tasks" / f"{name}.safetensors"

    def spec(self, name: str) -> TaskSpec:
        """The :class:`TaskSpec` of task ``name`` (any catalogue task, or ``"digits"``)."""
        return _task_spec(name)

    def load_base(self) -> dict[str, torch.Tensor]:
        """The base state dict: tensor name -> float32 CPU tensor (a fresh copy)."""
        return {name: t.clone() for name, t in self._base_weights().items()}

    def load_finetuned(self, name: str) -> dict[str, torch.Tensor]:
        """Task ``name``'s fine-tuned state dict: tensor name -> float32 CPU tensor."""
        return load_file(self.task_path(name))

    def task_vector(self, name: str) -> dict[str, torch.Tensor]:
        """Task vector of ``name``: fine-tuned minus base, per tensor (float32, CPU, base's shapes)."""
        base = self._base_weights()
        return {key: t - base[key] for key, t in self.load_finetuned(name).items()}

    def evaluate(
        self,
        weights: Mapping[str, torch.Tensor],
        task: str,
        split: str = "test",
        delta: bool = False,
    ) -> float:
        """Accuracy of the zoo's architecture with the given weights on one task.

        Parameters are those of :meth:`predict`.

        Returns
        -------
        float
            Fraction of the split labelled correctly, in [0, 1].
        """
        predicted, targets = self.predict(weights, task, split, delta)
        return float((predicted == targets).double().mean())

    @torch.no_grad()
    def predict(
        self,
        weights: Mapping[str, torch.Tensor],
        task: str,
        split: str = "test",
        delta: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels the zoo's architecture with the given weights predicts on one task's split.

        Parameters
        ----------
        weights : mapping of str to torch.Tensor
            A full state dict (same names and shapes as the base), or with ``delta=True`` a task
            vector (same names and shapes) that is added onto the base weights. Any float dtype
            and device; computed in float32 on the CPU.
        task : str
            Any task of :data:`TASKS` (not only this zoo's), or ``"digits"`` for the control task.
        split : {"test", "val", "train"}
            Which images to label.
        delta : bool
            Whether ``weights`` is a task vector rather than a state dict.

        Returns
        -------
        (predicted, targets) : two torch.Tensor of shape (N,), int64
            The predicted labels and the task's true labels of the split's N images.
        """
        if split not in SPLITS:
            raise InvalidInputError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        _task_spec(task)
        base = self._base_weights()
        missing = sorted(set(base) - set(weights))
        unexpected = sorted(set(weights) - set(base))
        if missing or unexpected:
            raise InvalidInputError(
                f"weights do not match the zoo's base: missing {missing or 'none'}, unexpected {unexpected or 'none'}"
            )
        state = {}
        for key, ref in base.items():
            value = weights[key].detach().to(device="cpu", dtype=torch.float32)
            if value.shape != ref.shape:
                raise InvalidInputError(
                    f"tensor {key!r} has shape {tuple(value.shape)}, the base has {tuple(ref.shape)}"
                )
            state[key] = ref + value if delta else value
        model = self._model_instance()
        model.load_state_dict(state)
        model.eval()
        inputs, targets = _task_data(task, split)
        return model(inputs).argmax(dim=1), targets

    def _base_weights(self) -> dict[str, torch.Tensor]:
        if self._base is None:
            self._base = load_file(self.base_path)
        return self._base

    def _model_instance(self) -> nn.Module:
        if self._model is None:
            self._model = make_model(self.arch).eval()
        return self._model


def _resolve_tasks(tasks: Sequence[str] | None, known: Sequence[str] | None = None, what: str = "zoo") -> list[str]:
    """``tasks`` checked against the catalogue ``known`` (default: this zoo's), or all of them."""
    known = TASKS if known is None else known
    if tasks is None:
        return list(known)
    if isinstance(tasks, str):
        raise InvalidInputError(f"tasks must be a list of task names, not the string {tasks!r}")
    names = list(tasks)
    if not names:
        raise InvalidInputError("tasks is empty; give at least one task name, or None for all of them")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidInputError(f"tasks lists {duplicates} more than once; give each task once")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidInputError(f"unknown {what} tasks {unknown}; valid tasks: {', '.join(known)}")
    return names


def _cached_info(root: Path, key: dict, extra_files: Sequence[str] = ()) -> dict | None:
    """zoo.json of a complete zoo at ``root`` built with exactly ``key``, else None; complete:
    the base, every task's checkpoint and ``extra_files`` (names in ``root``) are there."""
    try:
        info = json.loads((root / "zoo.json").read_text())
    except (OSError, ValueError):
        return None
    if any(info.get(k) != v for k, v in key.items()):
        return None
    files = [root / "base.safetensors", *(root / f for f in extra_files)]
    files += [root / "tasks" / f"{n}.safetensors" for n in info["tasks"]]
    return info if all(f.is_file() for f in files) else None


def build_zoo(
    root: str | os.PathLike,
    arch: str = "vit",
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    epochs: int | None = None,
    pretrain_epochs: int | None = None,
    progress: bool = True,
) -> Zoo:
    """Pretrain a base and fully fine-tune it on each task; write the zoo under ``root``.

    Cached: when ``root/zoo.json`` records a complete zoo with the same architecture, seed, tasks,
    epochs and format version, it is opened without training. Otherwise the zoo is (re)built;
    ``zoo.json`` is written last, so an interrupted build is never mistaken for a complete one.
    The result is deterministic for a seed (the CPU thread count is fixed during training), and a
    task's fine-tune depends only on the seed and its own name, not on the other tasks.

    Parameters
    ----------
    root : str or os.PathLike
        Output folder (created if needed).
    arch : {"vit", "cnn"}
        Architecture (see :data:`ARCHITECTURES`).
    tasks : sequence of str or None
        Task names from :data:`TASKS`, in order; None means all of them. :data:`DEMO_TASKS` is a
        quick set of eight.
    seed : int
        Seed of the initialization, pretraining and every fine-tune.
    epochs : int or None
        Fine-tuning epochs per task over its 1197 training images; None uses the architecture's
        default (10 for "vit", 5 for "cnn").
    pretrain_epochs : int or None
        Pretraining epochs over the 400 pretraining images; None uses the default (40 / 20).
    progress : bool
        Print one line per trained model to stderr.

    Returns
    -------
    Zoo
        The zoo at ``root``.
    """
    root = Path(root)
    recipe = _architecture(arch)
    names = _resolve_tasks(tasks)
    for name, value in (("epochs", epochs), ("pretrain_epochs", pretrain_epochs), ("seed", seed)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise InvalidInputError(f"{name} must be a non-negative integer, got {value!r}")
    config = {
        "pretrain_epochs": recipe.pretrain_epochs if pretrain_epochs is None else pretrain_epochs,
        "pretrain_lr": recipe.pretrain_lr,
        "finetune_epochs": recipe.finetune_epochs if epochs is None else epochs,
        "finetune_lr": recipe.finetune_lr,
        "batch_size": recipe.batch_size,
        "optimizer": "adam",
    }
    key = {"version": ZOO_FORMAT_VERSION, "arch": arch, "seed": seed, "tasks": names, "config": config}
    cached = _cached_info(root, key)
    if cached is not None:
        if progress:
            print(f"[zoo] using cached {arch} zoo at {root} ({len(names)} tasks)", file=sys.stderr, flush=True)
        return Zoo(root)

    def log(message: str) -> None:
        if progress:
            print(f"[zoo] {message}", file=sys.stderr, flush=True)

    # One thread: these models are far too small to gain from more, and a fixed count keeps
    # CPU float reductions, hence the checkpoints, identical from run to run.
    with torch_threads(1):
        info = _build(root, arch, recipe, names, seed, config, log)
    info.update(key)
    _write_json(root / "zoo.json", info)
    return Zoo(root)


def _build(root: Path, arch: str, recipe: _Architecture, names: list[str], seed: int, config: dict, log) -> dict:
    """Train and write the base and every task; return zoo.json's accuracy, split and timing fields."""
    started = time.perf_counter()
    old_meta = root / "zoo.json"
    if old_meta.exists():
        try:
            old_tasks = json.loads(old_meta.read_text()).get("tasks", [])
        except ValueError:
            old_tasks = []
        old_meta.unlink()  # the folder is no longer a complete zoo until the new zoo.json lands
        for name in set(old_tasks) - set(names):  # checkpoints of the previous zoo's other tasks
            if name in TASKS:  # only catalogue names: never a path built from arbitrary text
                (root / "tasks" / f"{name}.safetensors").unlink(missing_ok=True)
    (root / "tasks").mkdir(parents=True, exist_ok=True)

    model = make_model(arch, seed)
    n_parameters = sum(p.numel() for p in model.parameters())
    _train(model, CONTROL_TASK.name, "pretrain", config["pretrain_epochs"], config["pretrain_lr"],
           config["batch_size"], seed)
    base = _state_dict(model)
    save_file(base, root / "base.safetensors", metadata=_file_metadata(arch, seed, "base"))
    pretrain_s = time.perf_counter() - started
    evaluated = [CONTROL_TASK.name] + names
    base_acc = {t: _accuracy(model, t, "test") for t in evaluated}
    base_val = {t: _accuracy(model, t, "val") for t in evaluated}
    log(f"{arch} base ({n_parameters} parameters): digits test accuracy {base_acc['digits']:.3f}, {pretrain_s:.1f}s")

    finetuned_acc, finetuned_val, finetune_s = {}, {}, {}
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        model.load_state_dict(base)
        _train(model, name, "train", config["finetune_epochs"], config["finetune_lr"], config["batch_size"],
               _task_seed(seed, name))
        save_file(_state_dict(model), root / "tasks" / f"{name}.safetensors",
                  metadata=_file_metadata(arch, seed, "finetuned", name))
        finetuned_acc[name] = _accuracy(model, name, "test")
        finetuned_val[name] = _accuracy(model, name, "val")
        finetune_s[name] = round(time.perf_counter() - t0, 3)
        log(f"[{i + 1}/{len(names)}] {name}: test accuracy base {base_acc[name]:.3f} -> "
            f"fine-tuned {finetuned_acc[name]:.3f}, {finetune_s[name]:.1f}s")
    total_s = time.perf_counter() - started
    log(f"built {len(names)} tasks in {total_s:.1f}s")
    return {
        "n_parameters": n_parameters,
        "split_sizes": {s: len(_digit_splits()[s][1]) for s in ("pretrain", "train", "val", "test")},
        "split_seed": _SPLIT_SEED,
        "task_specs": {n: dataclasses.asdict(_task_spec(n)) for n in evaluated},
        "base_accuracy": base_acc,
        "finetuned_accuracy": finetuned_acc,
        "base_val_accuracy": base_val,
        "finetuned_val_accuracy": finetuned_val,
        "timings_s": {"pretrain": round(pretrain_s, 3), "finetune": finetune_s, "total": round(total_s, 3)},
        "torch_version": torch.__version__,
    }


def _file_metadata(arch: str, seed: int, role: str, task: str | None = None) -> dict[str, str]:
    # One key holding sorted JSON: safetensors writes several metadata keys in hash order, which
    # would make identical checkpoints differ byte for byte (and in any content hash).
    fields = {"arch": arch, "seed": seed, "role": role, "task": task, "zoo_version": ZOO_FORMAT_VERSION}
    return {"tvbase.zoo": json.dumps(fields, sort_keys=True)}


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda temp: Path(temp).write_text(text))
