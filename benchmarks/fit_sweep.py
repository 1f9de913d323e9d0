"""Sweep tvbase's fit parameters on the cached 25-task zoos of the memory-accuracy benchmark.

How the defaults of :class:`tvbase.FitParams` were chosen (benchmarks/RESULTS.md). Each variant
is ingested into a fresh store, every task is rebuilt, and three accuracy figures are taken:

- ``test``: accuracy of base + rebuilt vector / fine-tuned accuracy on the 300 test images, as
  the memory-accuracy benchmark reports it (mean and worst task);
- ``600``: the same on validation + test (600 images), half the noise of one image;
- ``agree``: fraction of those 600 images on which base + rebuilt vector predicts what the
  fine-tuned model predicts, right or wrong: the least noisy of the three.

One image moves the worst task's ``test`` figure by about 0.0034, so settings closer than that
are not told apart by it; ``agree`` and the relative error separate them better.

Run (the zoos must exist: ``tvbase bench memory-accuracy`` builds them)::

    python -m benchmarks.fit_sweep --budgets 0.03 --variant dense_bits=8 --variant dense_bits=4

Writes ``OUT/NAME.json`` and ``OUT/NAME.md`` (defaults: benchmarks/results, fit_sweep).
"""

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from tvbase import FitParams, Store
from tvbase.demo.zoo import Zoo
from tvbase.testing.metrics import relative_error

SPLITS = ("val", "test")


def _predictions(zoo, delta, task):
    """split -> (predicted labels, true labels) of base + ``delta`` on ``task``."""
    return {split: zoo.predict(delta, task, split, delta=True) for split in SPLITS}


def parse_variant(text):
    """``"dense_bits=4,residual_share=0.1"`` -> {"dense_bits": 4, "residual_share": 0.1}."""
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in FitParams.__dataclass_fields__ or key == "budget":
            raise SystemExit(f"unknown or disallowed FitParams field {key!r} in variant {text!r}")
        out[key] = value if value == "auto" else (float(value) if "." in value else int(value))
    return out


def measure(zoo, reference, params):
    """Ingest every task of ``zoo`` at ``params``; returns the record of one variant."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.create(Path(tmp) / "store", zoo.base_path, params=params)
        t0 = time.perf_counter()
        store.ingest({t: zoo.task_path(t) for t in zoo.tasks}, progress=False)
        fit_s = time.perf_counter() - t0
        info = store.info()
        per_task = {}
        for task in zoo.tasks:
            tau_hat = store.get(task)
            pred, ref = _predictions(zoo, tau_hat, task), reference[task]
            correct = sum(int((pred[s][0] == pred[s][1]).sum()) for s in SPLITS)
            correct_ref = sum(int((ref[s][0] == ref[s][1]).sum()) for s in SPLITS)
            n = sum(len(pred[s][1]) for s in SPLITS)
            per_task[task] = {
                "test": float((pred["test"][0] == pred["test"][1]).double().mean()) / zoo.finetuned_accuracy[task],
                "600": correct / correct_ref,
                "agree": sum(int((pred[s][0] == ref[s][0]).sum()) for s in SPLITS) / n,
                "rel_error": relative_error(tau_hat, zoo.task_vector(task)),
            }
    summary = {}
    for key in ("test", "600", "agree"):
        values = {t: r[key] for t, r in per_task.items()}
        worst = min(values, key=values.get)
        summary[key] = {"mean": sum(values.values()) / len(values), "worst": values[worst], "worst_task": worst}
    errors = [r["rel_error"] for r in per_task.values()]
    summary["rel_error"] = {"mean": sum(errors) / len(errors), "max": max(errors)}
    summary["storage_percent"] = 100 * info["disk_bytes"] / info["raw_fp32_bytes"]
    summary["fit_seconds"] = fit_s
    return {"params": params.to_dict(), "summary": summary, "per_task": per_task}


def format_row(arch, label, s):
    return (
        f"| {arch} | {label} | {s['storage_percent']:.2f} | {s['test']['mean']:.3f} / {s['test']['worst']:.3f} "
        f"| {s['600']['mean']:.3f} / {s['600']['worst']:.3f} | {s['agree']['mean']:.3f} / {s['agree']['worst']:.3f} "
        f"| {s['rel_error']['mean']:.3f} |"
    )


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.fit_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--zoos", nargs="+", type=Path, default=[Path("benchmarks") / "cache" / f"zoo-{a}" for a in ("vit", "cnn")],
                   help="zoo folders (default: the memory-accuracy benchmark's two 25-task zoos)")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.03], help="fractions of raw (default: 0.03)")
    p.add_argument("--variant", action="append", default=None,
                   help="FitParams overrides such as dense_bits=8,residual_share=0.1; repeat for more (default: the defaults)")
    p.add_argument("--out", type=Path, default=Path("benchmarks") / "results", help="output folder (default: %(default)s)")
    p.add_argument("--name", default="fit_sweep", help="stem of the output files (default: %(default)s)")
    args = p.parse_args(argv)
    variants = args.variant or [""]
    torch.set_num_threads(1)
    command = shlex.join(["python", "-m", "benchmarks.fit_sweep", *argv])
    rows, records = [], []
    header = ["| zoo | budget, variant | storage % | test mean / worst | 600 mean / worst | agree mean / worst | rel. error |",
              "|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(header))
    for zoo_dir in args.zoos:
        if not (zoo_dir / "zoo.json").exists():
            raise SystemExit(f"no cached zoo at {zoo_dir}; run `tvbase bench memory-accuracy` first")
        zoo = Zoo(zoo_dir)
        arch = f"{zoo.arch} seed {zoo.seed}"
        reference = {t: _predictions(zoo, zoo.task_vector(t), t) for t in zoo.tasks}
        for budget in args.budgets:
            for variant in variants:
                params = FitParams(budget=budget, **parse_variant(variant))
                record = measure(zoo, reference, params)
                label = f"{budget:.0%}{', ' + variant if variant else ''}"
                rows.append(format_row(arch, label, record["summary"]))
                print(rows[-1], flush=True)
                records.append({"arch": arch, "budget": budget, "variant": variant, **record})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"command": command, "runs": records}, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(f"Command: `{command}`\n\n" + "\n".join(header + rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
