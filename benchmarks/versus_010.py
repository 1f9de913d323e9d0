"""The streamed fit against tvbase 0.1.0's fit, on a model where 0.1.0 finishes (issue 12).

    python -m benchmarks.versus_010 [--layout mid] [--tasks 8] [--old e919109] [--timeout 5400]

0.1.0 built an m x m and an n x n Gram matrix per tensor and cluster and read every input up to
ten times; the streamed fit sketches ranges instead. This benchmark checks that the speed did not
cost accuracy: both versions ingest the same seeded synthetic zoo (the scale benchmark's
generator; ``mid`` is a 32M-parameter layout with 3072 x 1024 vocabulary matrices and
4096 x 1024 MLPs) at the same budget, each in its own subprocess, and every task is rebuilt with
that version's ``get`` and compared here with its true task vector (fine-tune minus base, fp32).

The old version is exported from this checkout's git history (``git archive OLD tvbase``) and
run with its folder first on PYTHONPATH, so this must run from a git clone; its figures are
kept in the zoo cache (``versus_010-OLD-LAYOUT-T...json``) and reused by later runs. Outputs:
``OUT/versus_010.json``, ``OUT/versus_010.md`` and the ``versus-010`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from safetensors import safe_open

from benchmarks import scale
from tvbase.bench.report import command_line, machine, output_options, replace_section, write_outputs

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "versus_010"
DEFAULT_RESULTS_MD = REPO_ROOT / "benchmarks" / "RESULTS.md"
OLD = "e919109"  # the commit that was released as 0.1.0
GOAL = 1.02  # the new fit's mean relative error at most 2% above the old one's


def export_old(commit: str, into: Path) -> Path:
    """``git archive COMMIT tvbase`` unpacked under ``into``; returns the folder to put on PYTHONPATH."""
    try:
        tar = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit, "tvbase"],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise SystemExit(f"cannot export tvbase at {commit} from {REPO_ROOT}: run from a git clone "
                         f"({detail.decode(errors='replace').strip() or e})") from None
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    return into


def _head():
    done = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def rel_errors(zoo: scale.Zoo, rebuilt: dict) -> dict:
    """``{task: ||tau - tau_hat|| / ||tau||}`` over every tensor, fp32, from the rebuilt files."""
    out = {}
    with safe_open(str(zoo.base), "pt") as base:
        names = list(base.keys())
        for task, path in rebuilt.items():
            err = ref = 0.0
            with safe_open(str(zoo.task(int(task[1:]))), "pt") as ft, safe_open(str(path), "pt") as got:
                for name in names:
                    tau = ft.get_tensor(name).float() - base.get_tensor(name).float()
                    err += float((got.get_tensor(name).float() - tau).square().sum())
                    ref += float(tau.square().sum())
            out[task] = (err / ref) ** 0.5
    return out


def run_version(label, runner, zoo, tasks, work, budget, init_options=()):
    """init + ingest + ls + a get of every task with ``runner``'s tvbase; the figures and errors."""
    store = work / f"{label}.tvb"
    listing = work / f"{label}.tasks.txt"
    listing.write_text("".join(f"{n}={Path(p).resolve()}\n" for n, p in tasks.items()))
    init = runner.tvbase("init", store, "--base", zoo.base, *init_options)
    if not init.ok:
        return {"failed": init.status(f"init ({label})")}
    ingest = runner.tvbase("ingest", "-q", store, "--list", listing, "--budget", budget)
    if not ingest.ok:
        return {"failed": ingest.status(f"ingest ({label})"), "ingest_s": ingest.wall_s}
    listed = runner.tvbase("ls", store, "--json")
    own = {row["name"]: row.get("rel_error") for row in (scale._json_out(listed) or [])}
    rebuilt = {}
    for task in tasks:
        out = work / f"{label}-{task}.safetensors"
        got = runner.tvbase("get", store, task, "-o", out)
        if not got.ok:
            return {"failed": got.status(f"get {task} ({label})")}
        rebuilt[task] = out
    errors = rel_errors(zoo, rebuilt)
    for path in rebuilt.values():
        path.unlink()
    return {"ingest_s": ingest.wall_s, "ingest_cpu_s": ingest.cpu_s, "ingest_peak_rss_bytes": ingest.peak_rss_bytes,
            "disk_bytes": dir_bytes(store), "rel_error": errors, "own_rel_error": own}


def run(layout="mid", n_tasks=8, seed=0, old=OLD, budget="3%", timeout=5400.0, cache=scale.DEFAULT_CACHE):
    zoo = scale.generate_zoo(layout, n_tasks, seed=seed, cache=cache, progress=True)
    tasks = zoo.tasks(n_tasks)
    raw = n_tasks * zoo.layout.n_params * 4
    results = {"layout": zoo.layout.name, "description": zoo.layout.description, "params": zoo.layout.n_params,
               "tasks": n_tasks, "seed": seed, "budget": budget, "old_commit": old, "new_commit": _head(), "raw_fp32_bytes": raw}
    # scratch stores beside the zoo cache: the commands recorded name them relative to the checkout
    Path(cache).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tvbase-versus-010-", dir=cache) as tmp:
        tmp = Path(tmp)
        print(f"[versus-010] new: ingest of {n_tasks} tasks ...", file=sys.stderr, flush=True)
        runner = scale.Runner(timeout=timeout, logs=tmp / "logs-new")
        # the factors alone, as 0.1.0 stores: sparse residuals' noise would swamp the error compared
        results["new"] = run_version("new", runner, zoo, tasks, tmp, budget, ("--sparse-share", "0"))
        results["new"]["commands"] = runner.records
        # the old version never changes: its figures are kept beside the zoo and reused
        cached = Path(cache) / f"versus_010-{old}-{zoo.layout.name}-T{n_tasks}-seed{seed}-budget{budget.replace('%', 'pct')}.json"
        if cached.is_file():
            print(f"[versus-010] old: figures from {cached}", file=sys.stderr, flush=True)
            results["old"] = json.loads(cached.read_text())
        else:
            print(f"[versus-010] old: ingest of {n_tasks} tasks ...", file=sys.stderr, flush=True)
            runner = scale.Runner(timeout=timeout, logs=tmp / "logs-old", source=export_old(old, tmp / "old-source"))
            results["old"] = run_version("old", runner, zoo, tasks, tmp, budget)
            results["old"]["commands"] = runner.records
            if "rel_error" in results["old"]:
                cached.write_text(json.dumps(results["old"], indent=2) + "\n")
    new, old_r = results["new"], results["old"]
    if "rel_error" in new and "rel_error" in old_r:
        mean = {k: sum(r["rel_error"].values()) / n_tasks for k, r in (("new", new), ("old", old_r))}
        results["mean_rel_error"] = mean
        results["mean_error_ratio"] = mean["new"] / mean["old"]
        results["worst_error_ratio"] = max(new["rel_error"].values()) / max(old_r["rel_error"].values())
        results["disk_ratio"] = new["disk_bytes"] / old_r["disk_bytes"]
        results["ingest_speedup"] = old_r["ingest_s"] / new["ingest_s"]
        results["meets_goal"] = results["mean_error_ratio"] <= GOAL
    return results


def format_table(results):
    r, raw = results, results["raw_fp32_bytes"]
    lines = [
        f"{r['layout']} ({r['params'] / 1e6:.1f}M parameters: {r['description']}), {r['tasks']} tasks, seed {r['seed']}, "
        f"--budget {r['budget']}; 0.1.0 = commit {r['old_commit']}, streamed = {r['new_commit']}",
        "",
        "| fit | ingest | ingest CPU | peak RSS | on disk | % of raw fp32 | mean rel. error | worst rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, name in (("old", "0.1.0 (Grams + eigh)"), ("new", "streamed")):
        v = r[label]
        if "rel_error" not in v:
            why = (v.get("failed") or {}).get("error") or v.get("failed")
            lines.append(f"| {name} | failed: {str(why)[:80]} | | | | | | |")
            continue
        errs = v["rel_error"].values()
        lines.append(f"| {name} | {v['ingest_s']:.1f} s | {v['ingest_cpu_s']:.1f} s | {v['ingest_peak_rss_bytes'] / 1e9:.2f} GB | "
                     f"{v['disk_bytes'] / 1e6:.2f} MB | {100 * v['disk_bytes'] / raw:.2f}% | {sum(errs) / len(errs):.4f} | {max(errs):.4f} |")
    if "mean_error_ratio" in r:
        lines += ["", "| task | 0.1.0 rel. error | streamed rel. error | streamed / 0.1.0 |", "|---|---|---|---|"]
        for task, e_old in r["old"]["rel_error"].items():
            e_new = r["new"]["rel_error"][task]
            lines.append(f"| {task} | {e_old:.4f} | {e_new:.4f} | {e_new / e_old:.3f} |")
        verdict = "meets" if r["meets_goal"] else "misses"
        lines += ["", f"Mean relative error, streamed / 0.1.0: **{r['mean_error_ratio']:.3f}** ({verdict} the goal "
                  f"<= {GOAL}); worst task {r['worst_error_ratio']:.3f}; bytes on disk {r['disk_ratio']:.3f}; "
                  f"ingest {r['ingest_speedup']:.1f}x faster."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versus_010", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="mid", choices=list(scale.LAYOUTS), help="zoo layout (default %(default)s)")
    parser.add_argument("--tasks", type=int, default=8, help="fine-tunes ingested at once (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="zoo seed (default %(default)s)")
    parser.add_argument("--old", default=OLD, help="the old version's commit (default %(default)s, 0.1.0)")
    parser.add_argument("--budget", default="3%", help="--budget of both ingests (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=5400.0, help="seconds per command (default %(default)s)")
    parser.add_argument("--cache", default=str(scale.DEFAULT_CACHE), help="zoo cache (default: the scale benchmark's)")
    output_options(parser, DEFAULT_OUT, DEFAULT_RESULTS_MD)
    args = parser.parse_args(argv)
    command = command_line("benchmarks.versus_010", argv)
    results = run(args.layout, args.tasks, args.seed, args.old, args.budget, args.timeout, args.cache)
    results["machine"] = machine()
    results["command"] = command
    results = json.loads(json.dumps(results, default=str).replace(str(REPO_ROOT) + "/", ""))  # paths relative to the checkout
    table = format_table(results)
    write_outputs(args.out, "versus_010", results, table)
    if args.results_md:
        body = (f"## The streamed fit against 0.1.0's fit (issue 12)\n\n`{command}`\n\n{table}\n\n"
                "Each version rebuilds every task with its own `get`; errors are measured here against the true task "
                "vectors (fp32). On-disk bytes count the whole repository folder of each store.")
        replace_section(args.results_md, "versus-010", body)
    return 0 if results.get("meets_goal") else 1


if __name__ == "__main__":
    sys.exit(main())
