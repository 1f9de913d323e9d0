"""``tvbase demo``: the main job on a small real zoo, end to end, in about a minute on a CPU.

Builds (and caches) a tiny ViT pretrained on part of scikit-learn's digits and fully fine-tuned
on eight tasks, ingests the fine-tunes into a fresh store at the default budget, and reports
storage against raw fp32 and, per task, the accuracy of base + rebuilt task vector against the
fine-tuned model; then one composition done in basis coefficients.
"""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..methods import FitParams
from ..store import Store
from .zoo import DEMO_TASKS, build_zoo

ALPHAS = np.linspace(0, 1, 21)  # the addition grid of Task Vector Bases (Zeng et al., 2025)
COMPOSE_PAIR = ("rot90", "hflip")  # two transformed-input digit tasks: raw addition keeps ~0.75 of both


def default_cache():
    return Path(os.environ.get("TVBASE_CACHE") or Path.home() / ".cache" / "tvbase")


def run_demo(cache=None, budget=None, json_output=False, arch="vit", seed=0):
    """Run the demo and print its report; returns the report as a dict."""
    cache = Path(cache) if cache else default_cache()
    started = time.perf_counter()
    zoo = build_zoo(cache / f"demo-zoo-{arch}", arch=arch, tasks=DEMO_TASKS, seed=seed, progress=not json_output)
    zoo_seconds = time.perf_counter() - started

    store_path = cache / f"demo-store-{arch}"
    if store_path.exists():
        shutil.rmtree(store_path)  # the demo's own store, rebuilt every run
    params = FitParams() if budget is None else FitParams(budget=budget)
    t0 = time.perf_counter()
    store = Store.create(store_path, zoo.base_path, params=params)
    store.ingest({t: zoo.task_path(t) for t in zoo.tasks}, progress=not json_output)
    ingest_seconds = time.perf_counter() - t0

    rows = []
    t0 = time.perf_counter()
    for task, listing in zip(store.tasks, store.ls()):
        acc = zoo.evaluate(store.get(task, device="cpu"), task, delta=True)
        rows.append(
            {
                "task": task,
                "cluster": listing["cluster"],
                "base_acc": zoo.base_accuracy[task],
                "finetuned_acc": zoo.finetuned_accuracy[task],
                "rebuilt_acc": acc,
                "normalized": acc / zoo.finetuned_accuracy[task],
                "rel_error": listing["rel_error"],
            }
        )
    rebuild_seconds = time.perf_counter() - t0
    info = store.info()
    composition = _composition(store, zoo)
    report = {
        "zoo": {"arch": arch, "tasks": len(zoo.tasks), "path": str(zoo.root), "build_or_load_seconds": zoo_seconds},
        "store": {
            "path": str(store_path),
            "budget": store.meta["params"]["budget"],
            "raw_fp32_bytes": info["raw_fp32_bytes"],
            "factor_bytes": info["factor_bytes"],
            "disk_bytes": info["disk_bytes"],
            "factor_storage": info["factor_storage"],
            "disk_storage": info["disk_storage"],
            "clusters": info["clusters"],
            "ingest_seconds": ingest_seconds,
            "rebuild_and_eval_seconds": rebuild_seconds,
        },
        "tasks": rows,
        "mean_normalized": float(np.mean([r["normalized"] for r in rows])),
        "worst_normalized": float(np.min([r["normalized"] for r in rows])),
        "composition": composition,
        "total_seconds": time.perf_counter() - started,
    }
    print(json.dumps(report, indent=2) if json_output else format_report(report))
    return report


def _composition(store, zoo):
    """Task addition of two tasks in basis coefficients, alpha chosen on validation data."""
    a, b = COMPOSE_PAIR
    best = None
    for alpha in ALPHAS[1:]:
        delta = store.compose({a: alpha, b: alpha}, device="cpu")
        score = np.mean([zoo.evaluate(delta, t, split="val", delta=True) / zoo.finetuned_val_accuracy[t] for t in (a, b)])
        if best is None or score > best[0]:
            best = (score, alpha, delta)
    _, alpha, delta = best
    accuracy = {t: zoo.evaluate(delta, t, delta=True) for t in (a, b)}
    raw = {k: alpha * (x + y) for (k, x), y in zip(zoo.task_vector(a).items(), zoo.task_vector(b).values())}
    return {
        "raw_accuracy": {t: zoo.evaluate(raw, t, delta=True) for t in (a, b)},
        "expression": f"{alpha:.2f}*{a} + {alpha:.2f}*{b}",
        "alpha": float(alpha),
        "accuracy": accuracy,
        "finetuned_accuracy": {t: zoo.finetuned_accuracy[t] for t in (a, b)},
        "base_accuracy": {t: zoo.base_accuracy[t] for t in (a, b)},
    }


def format_report(r):
    s = r["store"]
    lines = [
        f"zoo: {r['zoo']['tasks']} full fine-tunes of a tiny {r['zoo']['arch']} on sklearn digits ({r['zoo']['path']})",
        f"store: {s['path']}  budget {s['budget']:.1%}  {s['clusters']} clusters",
        f"  factors {s['factor_bytes']:,} B = {s['factor_storage']:.2%} of raw fp32 ({s['raw_fp32_bytes']:,} B); "
        f"on disk {s['disk_bytes']:,} B = {s['disk_storage']:.2%} (with metadata and history)",
        f"  ingest {s['ingest_seconds']:.1f} s, rebuild + evaluate all tasks {s['rebuild_and_eval_seconds']:.1f} s",
        "",
        f"{'task':<12} {'cluster':>7} {'base':>6} {'fine-tuned':>10} {'rebuilt':>8} {'rebuilt/ft':>10} {'rel.err':>8}",
    ]
    for row in r["tasks"]:
        lines.append(
            f"{row['task']:<12} {row['cluster'] if row['cluster'] is not None else '-':>7} {row['base_acc']:>6.3f} "
            f"{row['finetuned_acc']:>10.3f} {row['rebuilt_acc']:>8.3f} {row['normalized']:>10.3f} {row['rel_error']:>8.3f}"
        )
    lines.append(f"{'mean':<12} {'':>7} {'':>6} {'':>10} {'':>8} {r['mean_normalized']:>10.3f}")
    lines.append(f"{'worst':<12} {'':>7} {'':>6} {'':>10} {'':>8} {r['worst_normalized']:>10.3f}")
    c = r["composition"]
    lines += ["", f"composition (coefficients summed per cluster before one rebuild): base + {c['expression']}"]
    for t, acc in c["accuracy"].items():
        lines.append(
            f"  {t:<10} accuracy {acc:.3f}  (same sum of raw vectors {c['raw_accuracy'][t]:.3f}, "
            f"fine-tuned alone {c['finetuned_accuracy'][t]:.3f}, base {c['base_accuracy'][t]:.3f})"
        )
    lines.append(f"\ntotal {r['total_seconds']:.1f} s")
    return "\n".join(lines)
