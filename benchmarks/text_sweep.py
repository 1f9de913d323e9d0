"""Sweep tvbase's fit parameters on the cached MiniLM text zoo (the levers of issue 15).

The text zoo's counterpart of ``benchmarks/fit_sweep.py``: each variant is a fresh store of
every task of the zoo at ``--budget``, each task rebuilt and evaluated on its test split; the
table gives storage, mean / worst normalized accuracy, the mean relative error and the clusters.

``--activation-aware POWER`` adds a variant that weighs each linear weight's task-vector columns
by the RMS of its input features (to the power POWER, normalized to RMS 1 per tensor), measured
through the base model on 64 validation inputs of every task: the scaled vectors are stored,
rebuilt and unscaled before they are evaluated (the idea of AWQ / ASVD, tried without changing
the fit).

Run (the zoo must exist: ``tvbase bench memory-accuracy --archs minilm`` builds it)::

    python -m benchmarks.text_sweep --budget 0.0025 --variant "" --variant dense_bits=2 --activation-aware 0.5

Writes ``OUT/NAME.json`` and ``OUT/NAME.md`` (defaults: benchmarks/results, text_sweep).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.fit_sweep import parse_variant
from tvbase import FitParams, Store
from tvbase.bench.report import command_line, write_outputs
from tvbase.demo.text_zoo import TextZoo
from tvbase.testing.metrics import relative_error

CALIBRATION_INPUTS = 64  # validation inputs per task that the activation RMS is measured on


def input_rms(zoo):
    """Linear weight name -> RMS of each input feature (in_features,), through the base model."""
    base = zoo.load_base()
    body = zoo._load({k: torch.zeros_like(v) for k, v in base.items()}, delta=True)
    sums, counts, hooks = {}, {}, []
    for name, module in body.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(_, inputs, key=f"{name}.weight"):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.square().sum(0)
                counts[key] = counts.get(key, 0) + x.shape[0]
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for task in zoo.tasks:
                ids, _ = zoo._data(task, "val")
                body(input_ids=ids[:CALIBRATION_INPUTS])
    finally:
        for h in hooks:
            h.remove()
    return {k: (s / counts[k]).sqrt().float() for k, s in sums.items()}


def column_scales(zoo, power):
    """Per linear weight, the column scales of the activation-aware variant (RMS 1 per tensor)."""
    out = {}
    for key, rms in input_rms(zoo).items():
        s = rms.clamp_min(1e-12) ** power
        out[key] = s / s.square().mean().sqrt()
    return out


def measure(zoo, params, scales=None):
    """Ingest every task at ``params`` (columns scaled by ``scales`` first, if given); the record."""
    base = zoo.load_base()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {t: zoo.task_path(t) for t in zoo.tasks}
        if scales:
            for t in zoo.tasks:
                tau = zoo.task_vector(t)
                tuned = {k: (base[k] + (tau[k] * scales[k] if k in scales else tau[k])).contiguous() for k in base}
                paths[t] = tmp / f"{t}.safetensors"
                save_file(tuned, paths[t])
        store = Store.create(tmp / "store", zoo.base_path, params=params)
        t0 = time.perf_counter()
        store.ingest(paths, progress=False)
        fit_s = time.perf_counter() - t0
        info = store.info()
        normalized, errors = {}, []
        for t in zoo.tasks:
            tau_hat = store.get(t)
            if scales:
                tau_hat = {k: (v / scales[k] if k in scales else v) for k, v in tau_hat.items()}
            normalized[t] = zoo.evaluate(tau_hat, t, "test", delta=True) / zoo.finetuned_accuracy[t]
            errors.append(relative_error(tau_hat, zoo.task_vector(t)))
    worst = min(normalized, key=normalized.get)
    return {
        "params": params.to_dict(),
        "storage_percent": 100 * info["disk_bytes"] / info["raw_fp32_bytes"],
        "mean": sum(normalized.values()) / len(normalized),
        "worst": normalized[worst],
        "worst_task": worst,
        "rel_error": sum(errors) / len(errors),
        "clusters": info["clusters"],
        "fit_seconds": fit_s,
        "per_task": normalized,
    }


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.text_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, default=Path("benchmarks") / "cache" / "zoo-minilm", help="the text zoo's folder")
    p.add_argument("--budget", type=float, default=0.0025, help="--budget of every variant (default %(default)s)")
    p.add_argument("--variant", action="append", default=None,
                   help="FitParams fields, e.g. 'dense_bits=2,n_clusters=1' ('' for the defaults); repeatable")
    p.add_argument("--activation-aware", type=float, action="append", default=[], metavar="POWER",
                   help="add the activation-aware variant with this power (repeatable)")
    p.add_argument("--name", default="text_sweep", help="output file stem (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("benchmarks") / "results", help="output folder (default %(default)s)")
    args = p.parse_args(argv)
    if not (args.zoo / "zoo.json").exists():
        raise SystemExit(f"no cached text zoo at {args.zoo}; run `tvbase bench memory-accuracy --archs minilm` first")
    torch.set_num_threads(args.threads)
    zoo = TextZoo(args.zoo)
    runs = [(text, parse_variant(text), None) for text in (args.variant if args.variant is not None else [""])]
    for power in args.activation_aware:
        runs.append((f"activation-aware columns, power {power:g}", {}, power))
    rows, records = [], []
    for label, fields, power in runs:
        scales = column_scales(zoo, power) if power is not None else None
        r = measure(zoo, FitParams(budget=args.budget, **fields), scales)
        records.append({"variant": label or "defaults", **r})
        rows.append(f"| {label or 'defaults'} | {r['storage_percent']:.3f} | {r['mean']:.3f} / {r['worst']:.3f} | "
                    f"{r['worst_task']} | {r['rel_error']:.3f} | {r['clusters']} |")
        print(rows[-1], file=sys.stderr, flush=True)
    header = [f"`{command_line('benchmarks.text_sweep', argv)}`", "",
              f"{args.zoo.name}: {len(zoo.tasks)} tasks at --budget {args.budget:g}", "",
              "| variant | storage % | mean / worst | worst task | mean rel. error | clusters |", "|---|---:|---:|---|---:|---:|"]
    write_outputs(args.out, args.name, {"budget": args.budget, "zoo": str(args.zoo), "variants": records}, "\n".join(header + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
