"""Ingest beyond one process: a store on S3 against one on local disk, and the fit on a Dask
LocalCluster of 1 and 2 workers against the serial fit, on one of the scale benchmark's layouts.

    python -m benchmarks.cluster [--layout bert-base] [--tasks 8] [--workers 1 2] [--seed 0]
                                 [--cache DIR] [--out DIR] [--results-md FILE]

The layout's cached zoo (the scale benchmark's seeded generator) is ingested, ``--tasks``
fine-tunes at once and the inputs on local disk, in one run and in this order: into a local
store (serial fit), into a store on an S3 server (moto, a subprocess on 127.0.0.1; serial fit),
and into local stores with ``dask="local:N"`` for each ``--workers`` N, after an untimed ingest of
the tiny layout that pays for first use (imports, the allocator). Times are ratios to the serial
local ingest of the same run. The driver's own share of each fit (range finding from
the summed sketches, Rayleigh-Ritz, allocation: the combine steps that do not spread over
workers) is timed by wrapping those functions in this process.

Every store's tasks are compared with the serial store's: equal clusters and the largest
relative difference of the recorded errors (a different torch thread count rounds differently).

Outputs: ``OUT/cluster.json``, ``OUT/cluster.md`` and the section between
``<!-- cluster:start -->`` and ``<!-- cluster:end -->`` of ``--results-md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path


from benchmarks import scale
from benchmarks.s3 import BUCKET, MotoServer
from tvbase import Store
from tvbase.bench.report import command_line, machine, output_options, replace_section, write_outputs
from tvbase.methods import tucker

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cluster"
DEFAULT_RESULTS_MD = REPO_ROOT / "benchmarks" / "RESULTS.md"

# the fit's steps that run on the driver whatever the work runs on
DRIVER_STEPS = [(tucker._Fit, "_summed_range"), (tucker._Fit, "_fit_to_budget")]


class DriverClock:
    """Seconds spent in the driver's combine steps, while installed (a context manager).

    ``_fit_to_budget`` contains the shared pass and the residual pass, so the time of its
    items is taken out: what is left is allocation and the byte predictions."""

    def __enter__(self):
        self.seconds = {"range": 0.0, "allocation": 0.0}
        self._saved = []
        self._inner = 0.0  # seconds of the passes inside _fit_to_budget
        names = {"_summed_range": "range"}
        for cls, attr in DRIVER_STEPS:
            original = getattr(cls, attr)
            self._saved.append((cls, attr, original))
            setattr(cls, attr, self._wrap(original, names.get(attr)))
        for attr in ("_lowrank_candidates", "_shared_bases"):
            original = getattr(tucker._Fit, attr)
            self._saved.append((tucker._Fit, attr, original))
            setattr(tucker._Fit, attr, self._wrap(original, None, inner=True))
        return self

    def _wrap(self, func, name, inner=False):
        @functools.wraps(func)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                if inner:
                    self._inner += spent
                elif name is not None:
                    self.seconds[name] += spent
                else:  # _fit_to_budget: its passes are the items' time, not the driver's
                    self.seconds["allocation"] += spent - self._inner
                    self._inner = 0.0
        return timed

    def __exit__(self, *exc):
        for cls, attr, original in self._saved:
            setattr(cls, attr, original)


def _ingest(path, zoo, n_tasks, dask=None):
    store = Store.create(path, zoo.base)
    with DriverClock() as clock:
        start = time.perf_counter()
        store.ingest(zoo.tasks(n_tasks), device="cpu", progress=False, dask=dask)
        seconds = time.perf_counter() - start
    return {"ingest_s": seconds, "driver_s": dict(clock.seconds), "tasks": store.ls(), "disk_bytes": store.info()["disk_bytes"]}


def _compare(run, reference):
    ref = {r["name"]: r for r in reference["tasks"]}
    got = {r["name"]: r for r in run["tasks"]}
    return {
        "same_clusters": {t: r["cluster"] for t, r in got.items()} == {t: r["cluster"] for t, r in ref.items()},
        "max_rel_error_difference": max(abs(got[t]["rel_error"] - ref[t]["rel_error"]) / ref[t]["rel_error"] for t in ref),
    }


def run(layout="bert-base", n_tasks=8, workers=(1, 2), seed=0, cache=scale.DEFAULT_CACHE):
    zoo = scale.find_zoo(cache, scale.LAYOUTS[layout], n_tasks, seed) or scale.generate_zoo(layout, n_tasks, seed, cache)
    results = {"layout": layout, "n_params": zoo.layout.n_params, "tasks": n_tasks, "seed": seed, "runs": {}}
    read = scale.read_pass([zoo.base, *zoo.tasks(n_tasks).values()])
    results["read_pass_s"] = read["inner_s"]
    with tempfile.TemporaryDirectory() as tmp, MotoServer() as server:
        import boto3

        os.environ.update({"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket=BUCKET)
        runs = results["runs"]
        warm = scale.find_zoo(cache, scale.LAYOUTS["tiny"], 2, seed) or scale.generate_zoo("tiny", 2, seed, cache)
        _ingest(f"memory://warm-up-{os.getpid()}", warm, 2)  # untimed: first-use costs (imports, allocator)
        runs["serial, local store"] = _ingest(Path(tmp) / "serial", zoo, n_tasks)
        _log(f"serial: {runs['serial, local store']['ingest_s']:.1f} s")
        runs["serial, store on S3"] = _ingest(f"s3://{BUCKET}/store", zoo, n_tasks)
        _log(f"S3: {runs['serial, store on S3']['ingest_s']:.1f} s")
        for n in workers:
            runs[f"local:{n}, local store"] = _ingest(Path(tmp) / f"local{n}", zoo, n_tasks, dask=f"local:{n}")
            _log(f"local:{n}: {runs[f'local:{n}, local store']['ingest_s']:.1f} s")
    reference = results["runs"]["serial, local store"]
    for r in results["runs"].values():
        r["over_serial"] = r["ingest_s"] / reference["ingest_s"]
        r.update(_compare(r, reference))
        r["tasks"] = [{k: t[k] for k in ("name", "cluster", "rel_error", "stored_bytes")} for t in r["tasks"]]
    return results


def _log(message):
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


def format_table(results):
    r = results
    lines = [
        f"{r['layout']} layout ({r['n_params'] / 1e6:.1f}M parameters), {r['tasks']} tasks, seed {r['seed']}, inputs on local "
        f"disk; one plain read pass of the {r['tasks'] + 1} files: {r['read_pass_s']:.1f} s",
        "",
        "| ingest | seconds | ÷ serial | driver: range QRs | driver: allocation | same clusters | max error difference | store on disk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in r["runs"].items():
        lines.append(
            f"| {name} | {run['ingest_s']:.1f} | {run['over_serial']:.2f} | {run['driver_s']['range']:.1f} s | "
            f"{run['driver_s']['allocation']:.1f} s | {'yes' if run['same_clusters'] else 'no'} | "
            f"{run['max_rel_error_difference']:.1e} | {run['disk_bytes'] / 1e6:.1f} MB |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="bert-base", choices=sorted(scale.LAYOUTS), help="default %(default)s")
    parser.add_argument("--tasks", type=int, default=8, help="fine-tunes ingested at once (default %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="LocalCluster sizes (default 1 2)")
    parser.add_argument("--seed", type=int, default=0, help="zoo seed (default %(default)s)")
    parser.add_argument("--cache", default=str(scale.DEFAULT_CACHE), help="zoo cache (default: the scale benchmark's)")
    output_options(parser, DEFAULT_OUT, DEFAULT_RESULTS_MD)
    args = parser.parse_args(argv)
    command = command_line("benchmarks.cluster", argv)
    load = os.getloadavg()[0]
    results = run(args.layout, args.tasks, args.workers, args.seed, args.cache)
    results["machine"] = machine(load_average_start=load, load_average_end=os.getloadavg()[0])
    results["command"] = command
    table = format_table(results)
    write_outputs(args.out, "cluster", results, table)
    if args.results_md:
        m = results["machine"]
        body = (f"## Ingest on S3 and on a Dask LocalCluster (issue 14)\n\n`{command}`, {m['cpus']} CPU cores, torch "
                f"{m['torch']}; 1-minute load average {m['load_average_start']:.2f} at the start, "
                f"{m['load_average_end']:.2f} at the end.\n\n{table}\n\n"
                "The S3 server is moto on the same machine (what the protocol costs, not a real bucket's latency). "
                "A LocalCluster's workers share this machine's cores (each gets cores / N torch threads), so it "
                "measures what the cluster layer costs, not a speed-up; the driver columns are the combine steps "
                "that stay on the driver however many workers there are.")
        replace_section(args.results_md, "cluster", body)


if __name__ == "__main__":
    main()
