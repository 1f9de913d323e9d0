"""A task added to a fitted store against the same task fitted with the others, at equal bytes.

On a scale zoo (``--layout``, ``benchmarks.scale``): a joint fit of tasks t00..tT, a first fit of
t00..t(T-1), then tT ingested into a copy of the first store by each growth method, at the
default budget and again at the budget that gives it the bytes the joint fit gives it (its own
factors and its share of its cluster's bases; a later task's bytes are what the store grows by).
The scale zoo's stores hold factors alone: sparse residuals' noise would swamp the errors compared.

On the real transformer zoo (``--zoo minilm``, the memory-accuracy benchmark's MiniLM zoo, built
and cached if missing): the same steps at each ``--budgets`` for each ``--later`` task, with
tvbase's defaults, and the later task's normalized test accuracy beside its error; an error
there includes the sparse residuals' noise, so accuracy is the figure to read.

In process, on the library API; the fitted stores are kept in ``--work`` and reused by a rerun.

    python -m benchmarks.later_task --layout gpt2-small --tasks 8 --work benchmarks/cache/later
    python -m benchmarks.later_task --zoo minilm --budgets 0.0025 0.03 --later topic-f count-g
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tvbase.bench.memory_accuracy import DEFAULT_CACHE as ZOO_CACHE, FULL_TEXT, TEXT_ARCH
from tvbase.demo import text_zoo
from tvbase.bench.report import command_line, machine
from benchmarks.scale import DEFAULT_CACHE, LAYOUTS, disk_share, find_zoo, generate_zoo, task_name
from tvbase.methods import FitParams
from tvbase.store import Store


def _row(store, task):
    return next(r for r in store.ls() if r["name"] == task)


def _fitted(path, base, tasks, params):
    if not path.exists():
        Store.create(path, base, params=params).ingest(tasks, progress=False)
    return Store.open(path)


def _grown(first, work, later, task, joint, methods, accuracy=None):
    """``later`` (``task``: tensors or a checkpoint path) ingested into copies of ``first`` by each
    growth method, at the store's budget and then at the joint fit's bytes; one row per ingest."""
    rows = []
    for method in methods:
        budget = first.meta["params"]["budget"]
        for _ in range(2):  # the store's budget, then the joint fit's bytes
            path = work / f"later-{method}.tvb"
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(first.path, path)
            store = Store.open(path)
            before, started = store.info(), time.perf_counter()
            store.ingest({later: task}, params=FitParams.from_dict({**store.meta["params"], "budget": budget}),
                         method=method, progress=False)
            ingest_s = time.perf_counter() - started
            r, after = _row(store, later), store.info()
            grown = after["factor_bytes"] - before["factor_bytes"]
            rows.append({"later_task": later, "joint_budget": joint["budget"], "method": method, "budget": budget, "kind": r["kind"], "rel_error": r["rel_error"],
                         "bytes": grown, "error_ratio": r["rel_error"] / joint["rel_error"], "ingest_s": ingest_s,
                         **({"accuracy": accuracy(store, later)} if accuracy else {})})
            print(rows[-1], file=sys.stderr, flush=True)
            # from the share of raw it took on disk: below the budget where its ranks stop at --max-rank
            budget = disk_share(before, after) * joint["bytes"] / grown
            shutil.rmtree(path, ignore_errors=True)
    return rows


def _joint(store, task, accuracy=None):
    r = _row(store, task)
    return {"later_task": task, "budget": store.meta["params"]["budget"], "rel_error": r["rel_error"], "bytes": r["stored_bytes"],
            **({"accuracy": accuracy(store, task)} if accuracy else {})}


def run(layout, n_tasks, work, cache, methods):
    """The scale zoo ``layout``: tT after a fit of T tasks (no accuracy: the zoo has no model)."""
    zoo = find_zoo(cache, LAYOUTS[layout], n_tasks + 1, 0) or generate_zoo(layout, n_tasks + 1, 0, cache)
    later = task_name(n_tasks)
    factors_only = FitParams(sparse_share=0.0)
    joint = _joint(_fitted(work / "joint.tvb", zoo.base, zoo.tasks(n_tasks + 1), factors_only), later)
    first = _fitted(work / "first.tvb", zoo.base, zoo.tasks(n_tasks), factors_only)
    rows = _grown(first, work, later, zoo.task(n_tasks), joint, methods)
    return {"zoo": layout, "tasks": n_tasks, "command": command_line("benchmarks.later_task"), "machine": machine(),
            "joint": [joint], "later": rows}


def run_text(later_tasks, budgets, work, cache, methods):
    """The MiniLM zoo: each of ``later_tasks`` after a fit of the others, at each budget."""
    zoo = text_zoo.build_text_zoo(FULL_TEXT.zoo_dir(cache, TEXT_ARCH, 0), tasks=FULL_TEXT.tasks, seed=0)
    unknown = sorted(set(later_tasks) - set(zoo.tasks))
    if unknown:
        raise SystemExit(f"later_task: {unknown} are not tasks of the zoo; its tasks are {zoo.tasks}")
    paths = {t: zoo.task_path(t) for t in zoo.tasks}

    def accuracy(store, task):  # normalized: of the fine-tune's own test accuracy
        return zoo.evaluate(store.get(task), task, split="test", delta=True) / zoo.finetuned_accuracy[task]

    joints, rows = [], []
    for budget in budgets:
        params = FitParams(budget=budget)
        joint_store = _fitted(work / f"joint-{budget:g}.tvb", zoo.base_path, paths, params)
        for later in later_tasks:
            joints.append(_joint(joint_store, later, accuracy))
            others = {t: p for t, p in paths.items() if t != later}
            first = _fitted(work / f"first-{budget:g}-{later}.tvb", zoo.base_path, others, params)
            rows += _grown(first, work, later, paths[later], joints[-1], methods, accuracy)
    return {"zoo": TEXT_ARCH, "tasks": len(zoo.tasks) - 1, "command": command_line("benchmarks.later_task"),
            "machine": machine(), "joint": joints, "later": rows}


def markdown(result):
    accuracy = "accuracy" in result["later"][0]
    lines = [f"{result['zoo']}: a task ingested after a fit of {result['tasks']} tasks, against the same task in a joint "
             "fit of all of them" + (" (accuracy: normalized test accuracy)" if accuracy else ""), "",
             "| later task | method | kind | budget | bytes | relative error | ÷ joint (≤ 1.1 at equal bytes) |"
             + (" accuracy |" if accuracy else "") + " ingest |",
             "|---|---|---|---|---|---|---|" + ("---|" if accuracy else "") + "---|"]
    for j in result["joint"]:
        acc = f" {j['accuracy']:.4f} |" if accuracy else ""
        lines.append(f"| {j['later_task']} | joint fit | | {100 * j['budget']:.3g}% | {j['bytes']:,} | {j['rel_error']:.4f} | |{acc} |")
        for r in result["later"]:
            if (r["later_task"], r["joint_budget"]) == (j["later_task"], j["budget"]):
                acc = f" {r['accuracy']:.4f} |" if accuracy else ""
                lines.append(f"| {r['later_task']} | {r['method']} | {r['kind']} | {100 * r['budget']:.3g}% | {r['bytes']:,} | "
                             f"{r['rel_error']:.4f} | {r['error_ratio']:.3f} |{acc} {r['ingest_s']:.0f} s |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", choices=["scale", "minilm"], default="scale",
                   help="scale: a synthetic zoo of --layout (errors only); minilm: the real transformer zoo (with accuracy)")
    p.add_argument("--layout", choices=list(LAYOUTS), default="gpt2-small", help="the scale zoo's layout")
    p.add_argument("--tasks", type=int, default=8, help="scale zoo: T, the tasks of the first fit (the joint fit has T + 1)")
    p.add_argument("--later", nargs="+", default=["topic-f", "count-g"], help="minilm: the tasks ingested later, one at a time")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.0025, 0.03], help="minilm: the stores' budgets")
    p.add_argument("--methods", nargs="+", default=["tvbase", "svd"], help="growth methods (tvbase: its default, project)")
    p.add_argument("--cache", type=Path, default=None,
                   help=f"zoo cache (default: {DEFAULT_CACHE} for a scale zoo, {ZOO_CACHE} for minilm)")
    p.add_argument("--work", type=Path, default=Path("benchmarks/cache/later"), help="fitted stores, kept for a rerun")
    p.add_argument("--out", type=Path, default=None, help="JSON and markdown here (default: WORK/later_task.{json,md})")
    args = p.parse_args(argv)
    if args.zoo == "scale":
        work = args.work / f"{args.layout}-T{args.tasks}"
        work.mkdir(parents=True, exist_ok=True)
        result = run(args.layout, args.tasks, work, args.cache or DEFAULT_CACHE, args.methods)
    else:
        work = args.work / "minilm"
        work.mkdir(parents=True, exist_ok=True)
        result = run_text(args.later, args.budgets, work, args.cache or ZOO_CACHE, args.methods)
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    (out / "later_task.json").write_text(json.dumps(result, indent=1))
    (out / "later_task.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
