"""LoRA adapters and a full fine-tune of pretrained MiniLM-L6 in one store: accuracy kept.

    python -m benchmarks.lora_text [--cache benchmarks/cache] [--out benchmarks/results/lora_text]
                                   [--steps 150] [--lr 2e-3] [--rank 8]

The text zoo of the memory-accuracy benchmark (:mod:`tvbase.demo.text_zoo`: MiniLM-L6 from its
PyPI wheel, tasks over its own vocabulary, frozen heads) gives the base, the tasks and a full
fine-tune of ``FULL_TASK``. Each task of ``LORA_TASKS`` gets a PEFT LoRA adapter trained with
peft through the same frozen head (rank ``--rank`` on the attention, MLP and word-embedding
layers, Adam, ``--steps`` steps of 32 fresh sentences). The adapters and the full fine-tune are
ingested into one store at the default settings; each task is rebuilt from the store and its
test accuracy is compared with its own model's (the adapter as peft runs it, the full
fine-tune as trained); then the sum of two adapters on irrelevant tasks and the sum of an
adapter and the full fine-tune, against each task's own accuracy. Finally ``export-lora`` of
the first adapter task is loaded back with peft.

Writes ``OUT/lora_text.json`` and ``OUT/lora_text.md``; adapters are cached under
``CACHE/lora-text/``. ``tests/test_lora_text.py`` runs it on a tiny random BERT.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from tvbase import FitParams
from tvbase.demo import text_zoo
from tvbase.export_lora import export_lora
from tvbase.store import Store

FULL_TASK = "topic-d"
LORA_TASKS = ("topic-a", "topic-b", "topic-c", "first-c")
PAIRS = [("topic-a", "topic-b"), ("topic-c", FULL_TASK)]  # irrelevant tasks: their sum should keep both
TARGETS = ["query", "key", "value", "dense", "word_embeddings"]
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lora_text"


def train_adapter(zoo, task, folder, rank=8, steps=150, lr=2e-3, batch_size=32):
    """Train a LoRA adapter of the zoo's base on ``task`` through its frozen head; save it to
    ``folder`` (cached: an adapter already there with ``train.json`` is reused). Returns its test
    accuracy as peft runs it."""
    import peft

    folder = Path(folder)
    record = folder / "train.json"
    settings = {"task": task, "rank": rank, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": zoo.seed,
                "base_sha256": zoo.info["model_sha256"]}
    if record.is_file() and json.loads(record.read_text()).get("settings") == settings:
        return json.loads(record.read_text())["accuracy"]
    body = text_zoo._make_body(zoo._model_dir())
    body.load_state_dict(zoo.load_base())
    model = peft.get_peft_model(body, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0))
    ids, labels = text_zoo._cached_data(str(zoo._model_dir()), task, "train", steps * batch_size, zoo.seed)
    text_zoo._train(model, ids, labels, zoo.head(task), steps, lr, batch_size, text_zoo._task_seed(zoo.seed, task))
    test_ids, test_labels = zoo._data(task, "test")
    accuracy = text_zoo._accuracy(model, test_ids, test_labels, zoo.head(task))
    model.save_pretrained(folder, save_embedding_layers=False)  # "auto" would look the base up on the hub
    record.write_text(json.dumps({"settings": settings, "accuracy": accuracy}, indent=2))
    return accuracy


def run(cache=DEFAULT_CACHE, steps=150, lr=2e-3, rank=8, model_dir=None, zoo_steps=100, zoo_lr=3e-4, progress=True):
    """Everything measured, as a dict (see the module docstring)."""
    cache = Path(cache)
    started = time.perf_counter()
    zoo = text_zoo.build_text_zoo(cache / "lora-text" / "zoo", tasks=[FULL_TASK, *LORA_TASKS], steps=zoo_steps, lr=zoo_lr,
                                  model_dir=model_dir, progress=progress)
    own = {FULL_TASK: zoo.finetuned_accuracy[FULL_TASK]}
    adapters = {}
    for task in LORA_TASKS:
        adapters[task] = cache / "lora-text" / f"adapter-{task}-r{rank}"
        own[task] = train_adapter(zoo, task, adapters[task], rank=rank, steps=steps, lr=lr)
        if progress:
            print(f"[lora] {task}: adapter accuracy {own[task]:.3f}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        store = Store.create(Path(scratch) / "store", zoo.base_path, params=FitParams())
        store.ingest({FULL_TASK: zoo.task_path(FULL_TASK), **adapters}, progress=False)
        rows = {r["name"]: r for r in store.ls()}
        tasks = {}
        for task in [FULL_TASK, *LORA_TASKS]:
            accuracy = zoo.evaluate(store.get(task, device="cpu"), task, delta=True)
            tasks[task] = {"kind": rows[task]["kind"], "own_accuracy": own[task], "store_accuracy": accuracy,
                           "kept": accuracy / own[task], "rel_error": rows[task]["rel_error"],
                           "stored_over_raw": rows[task]["storage"], "base_accuracy": zoo.base_accuracy[task]}
        sums = []
        for a, b in PAIRS:
            delta = store.compose({a: 1.0, b: 1.0}, device="cpu")
            sums.append({"tasks": [a, b], **{f"kept_{t}": zoo.evaluate(delta, t, delta=True) / own[t] for t in (a, b)}})
        exported = Path(scratch) / "exported"
        report = export_lora(store, {LORA_TASKS[0]: 1.0}, exported, rank=rank, device="cpu", config=zoo._model_dir())
        exported_accuracy = _peft_accuracy(zoo, LORA_TASKS[0], exported)
    return {
        "command": None, "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "settings": {"steps": steps, "lr": lr, "rank": rank, "targets": TARGETS, "zoo_steps": zoo_steps, "zoo_lr": zoo_lr,
                     "model": zoo.info["model"].get("package") or "a model folder"},
        "tasks": tasks, "sums": sums,
        "export": {"task": LORA_TASKS[0], "exact": report["exact"], "rel_error": report["rel_error"],
                   "accuracy": exported_accuracy, "kept": exported_accuracy / own[LORA_TASKS[0]]},
        "seconds": time.perf_counter() - started,
    }


def _peft_accuracy(zoo, task, adapter):
    """Test accuracy of the base with ``adapter`` loaded by peft."""
    import peft

    body = text_zoo._make_body(zoo._model_dir())
    body.load_state_dict(zoo.load_base())
    model = peft.PeftModel.from_pretrained(body, adapter)
    ids, labels = zoo._data(task, "test")
    return text_zoo._accuracy(model, ids, labels, zoo.head(task))


def markdown(result):
    lines = ["| task | stored as | own accuracy | from the store | kept | rel. error | stored / raw |", "|---|---|---|---|---|---|---|"]
    for task, r in result["tasks"].items():
        lines.append(f"| {task} | {r['kind']} | {r['own_accuracy']:.3f} | {r['store_accuracy']:.3f} | {r['kept']:.3f} | "
                     f"{r['rel_error']:.4f} | {r['stored_over_raw']:.2%} |")
    lines += ["", "| sum | kept, first task | kept, second task |", "|---|---|---|"]
    for s in result["sums"]:
        a, b = s["tasks"]
        lines.append(f"| {a} + {b} | {s[f'kept_{a}']:.3f} | {s[f'kept_{b}']:.3f} |")
    e = result["export"]
    lines += ["", f"`export-lora` of {e['task']} loaded back with peft: exact {e['exact']}, accuracy kept {e['kept']:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the zoo and adapters are cached")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for lora_text.json and lora_text.md")
    p.add_argument("--steps", type=int, default=150, help="Adam steps per adapter (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="adapter learning rate (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    args = p.parse_args(argv)
    result = run(args.cache, args.steps, args.lr, args.rank)
    result["command"] = shlex.join(["python", "-m", "benchmarks.lora_text", *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_text.json").write_text(json.dumps(result, indent=2))
    (args.out / "lora_text.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
