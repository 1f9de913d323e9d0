"""A task added to a fitted store against the same task fitted with the others, at equal bytes.

On a scale zoo (``benchmarks.scale``): a joint fit of tasks t00..tT, a first fit of t00..t(T-1),
then tT ingested into a copy of the first store by each growth method, at the default budget and
again at the budget that gives it the bytes the joint fit gives it (its own factors and its share
of its cluster's bases; a later task's bytes are what the store grows by). In process, on the
library API; the fitted stores are kept in ``--work`` and reused by a rerun.

    python -m benchmarks.later_task --layout gpt2-small --tasks 8 --work benchmarks/cache/later
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tvbase.bench.report import command_line, machine
from benchmarks.scale import DEFAULT_CACHE, LAYOUTS, disk_share, find_zoo, generate_zoo, task_name
from tvbase.methods import FitParams
from tvbase.store import Store


def _row(store, task):
    return next(r for r in store.ls() if r["name"] == task)


def _fitted(path, zoo, tasks):
    if not path.exists():
        # the factors alone: sparse residuals' noise would swamp the errors compared
        Store.create(path, zoo.base, params=FitParams(sparse_share=0.0)).ingest(tasks, progress=False)
    return Store.open(path)


def run(layout, n_tasks, work, cache, methods):
    zoo = find_zoo(cache, LAYOUTS[layout], n_tasks + 1, 0) or generate_zoo(layout, n_tasks + 1, 0, cache)
    later = task_name(n_tasks)
    joint = _row(_fitted(work / "joint.tvb", zoo, zoo.tasks(n_tasks + 1)), later)
    first = _fitted(work / "first.tvb", zoo, zoo.tasks(n_tasks))
    rows = []
    for method in methods:
        budget = FitParams().budget
        for _ in range(2):  # the default budget, then the joint fit's bytes
            path = work / f"later-{method}.tvb"
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(first.path, path)
            store = Store.open(path)
            before, started = store.info(), time.perf_counter()
            store.ingest({later: zoo.task(n_tasks)}, params=FitParams.from_dict({**store.meta["params"], "budget": budget}),
                         method=method, progress=False)
            r, after = _row(store, later), store.info()
            grown = after["factor_bytes"] - before["factor_bytes"]
            rows.append({"method": method, "budget": budget, "kind": r["kind"], "rel_error": r["rel_error"], "bytes": grown,
                         "error_ratio": r["rel_error"] / joint["rel_error"], "ingest_s": time.perf_counter() - started})
            print(rows[-1], file=sys.stderr, flush=True)
            # from the share of raw it took on disk: below the budget where its ranks stop at --max-rank
            budget = disk_share(before, after) * joint["stored_bytes"] / grown
            shutil.rmtree(path, ignore_errors=True)
    return {"layout": layout, "tasks": n_tasks, "later_task": later, "command": command_line("benchmarks.later_task"), "machine": machine(),
            "joint": {"rel_error": joint["rel_error"], "bytes": joint["stored_bytes"]}, "later": rows}


def markdown(result):
    j = result["joint"]
    lines = [f"{result['layout']}, task {result['later_task']} after a fit of {result['tasks']} tasks; joint fit: relative error "
             f"{j['rel_error']:.4f} at {j['bytes']:,} B", "",
             "| method | kind | budget | bytes | relative error | ÷ joint (≤ 1.1 at equal bytes) | ingest |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['kind']} | {100 * r['budget']:.3g}% | {r['bytes']:,} | {r['rel_error']:.4f} | {r['error_ratio']:.3f} | "
              f"{r['ingest_s']:.0f} s |" for r in result["later"]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=list(LAYOUTS), default="gpt2-small")
    p.add_argument("--tasks", type=int, default=8, help="T: tasks of the first fit (the joint fit has T + 1)")
    p.add_argument("--methods", nargs="+", default=["tvbase", "svd"], help="growth methods (tvbase: its default, project)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="zoo cache")
    p.add_argument("--work", type=Path, default=Path("benchmarks/cache/later"), help="fitted stores, kept for a rerun")
    p.add_argument("--out", type=Path, default=None, help="JSON and markdown here (default: WORK/later_task.{json,md})")
    args = p.parse_args(argv)
    work = args.work / f"{args.layout}-T{args.tasks}"
    work.mkdir(parents=True, exist_ok=True)
    result = run(args.layout, args.tasks, work, args.cache, args.methods)
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    (out / "later_task.json").write_text(json.dumps(result, indent=1))
    (out / "later_task.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
