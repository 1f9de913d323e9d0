"""Object-storage benchmark: the same ingest and get on a local store and on a store on S3.

    python -m benchmarks.s3 [--tasks 4] [--seed 0] [--repeats 3] [--cache DIR] [--out DIR] [--results-md FILE]

The scale benchmark's ``tiny`` layout (2.4M parameters, its seeded zoo generator, cached) is
ingested, ``--tasks`` fine-tunes at once, into a new local store and into a new store on an S3
server, and one task is rebuilt (``get``, ``--repeats`` times, the median kept) from each; a
third run ingests into a local store from checkpoints uploaded to the bucket (inputs read
through s3fs). An untimed ingest into an in-memory store comes first, so that no timed run
pays for first use (imports, the allocator's first growth). Times are reported as ratios to the local store within this one run, on one
machine, so the load of other processes cancels out as far as it can.

The S3 server is moto (``python -m moto.server``, a subprocess on 127.0.0.1): a local,
in-memory stand-in for S3. The ratios say what the protocol costs tvbase (requests, signing,
Icechunk's object layout), not what a real bucket's latency and bandwidth would add.
Outputs: ``OUT/s3.json``, ``OUT/s3.md`` and the section between ``<!-- s3:start -->`` and
``<!-- s3:end -->`` of ``--results-md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import scale
from tvbase import Store
from tvbase.bench.report import command_line, machine, output_options, replace_section, write_outputs

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "s3"
DEFAULT_RESULTS_MD = REPO_ROOT / "benchmarks" / "RESULTS.md"
BUCKET = "tvbase-bench"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1 at a free port, as a context manager; ``endpoint``."""

    def __enter__(self):
        port = _free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self._process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self._process.kill()
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        self._process.terminate()
        self._process.wait(timeout=30)


def _timed(func):
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def _get_s(store, task, repeats):
    """Median seconds of ``repeats`` rebuilds of ``task`` from a freshly opened store."""
    times = []
    for _ in range(repeats):
        opened = Store.open(store)
        start = time.perf_counter()
        opened.get(task, device="cpu")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ingest(path, zoo, tasks, inputs=None):
    """Create a store at ``path`` and ingest ``tasks``; returns (ingest seconds, store)."""
    store = Store.create(path, inputs["base"] if inputs else zoo.base)
    items = {t: (inputs[t] if inputs else p) for t, p in zoo.tasks(tasks).items()}
    seconds, _ = _timed(lambda: store.ingest(items, device="cpu", progress=False))
    return seconds, store


def run(tasks=4, seed=0, repeats=3, cache=scale.DEFAULT_CACHE):
    """Measure; returns the results dict (see the module docstring)."""
    import boto3

    torch.manual_seed(seed)
    zoo = scale.generate_zoo("tiny", tasks, seed=seed, cache=cache)
    first = scale.task_name(0)
    results = {"layout": "tiny", "n_params": zoo.layout.n_params, "tasks": tasks, "seed": seed, "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp, MotoServer() as server:
        env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
        os.environ.update(env)
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                              aws_access_key_id="bench", aws_secret_access_key="bench")
        client.create_bucket(Bucket=BUCKET)
        inputs = {"base": f"s3://{BUCKET}/zoo/base.safetensors"}
        for name, path in {"base": zoo.base, **zoo.tasks(tasks)}.items():
            client.upload_file(str(path), BUCKET, f"zoo/{Path(path).name}")
            inputs[name] = f"s3://{BUCKET}/zoo/{Path(path).name}"

        _ingest(f"memory://warm-up-{os.getpid()}", zoo, tasks)  # untimed: first-use costs (imports, allocator)
        local_ingest, local = _ingest(Path(tmp) / "local", zoo, tasks)
        s3_ingest, remote = _ingest(f"s3://{BUCKET}/store", zoo, tasks)
        inputs_ingest, _ = _ingest(Path(tmp) / "from-s3", zoo, tasks, inputs)
        local_get, s3_get = _get_s(local.path, first, repeats), _get_s(remote.path, first, repeats)
        results["local"] = {"ingest_s": local_ingest, "get_s": local_get, "disk_bytes": local.info()["disk_bytes"]}
        results["s3"] = {"ingest_s": s3_ingest, "get_s": s3_get, "disk_bytes": remote.info()["disk_bytes"]}
        results["inputs_on_s3"] = {"ingest_s": inputs_ingest}
    results["ratios"] = {
        "s3_ingest_over_local": s3_ingest / local_ingest,
        "s3_get_over_local": s3_get / local_get,
        "inputs_on_s3_ingest_over_local": inputs_ingest / local_ingest,
    }
    return results


def format_table(results):
    r, q = results, results["ratios"]
    return "\n".join([
        (f"tiny layout ({r['n_params'] / 1e6:.1f}M parameters), {r['tasks']} tasks, seed {r['seed']}; "
        f"get: median of {r['repeats']}"),
        "",
        "| store (inputs) | ingest s | ingest / local | get s | get / local | on disk |",
        "|---|---|---|---|---|---|",
        (f"| local (local) | {r['local']['ingest_s']:.2f} | 1.00 | {r['local']['get_s']:.3f} | 1.00 | "
        f"{r['local']['disk_bytes'] / 1e3:.0f} kB |"),
        (f"| S3 on moto (local) | {r['s3']['ingest_s']:.2f} | {q['s3_ingest_over_local']:.2f} | {r['s3']['get_s']:.3f} | "
        f"{q['s3_get_over_local']:.2f} | {r['s3']['disk_bytes'] / 1e3:.0f} kB |"),
        (f"| local (on S3 on moto) | {r['inputs_on_s3']['ingest_s']:.2f} | {q['inputs_on_s3_ingest_over_local']:.2f} | "
        "- | - | - |"),
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.s3", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=4, help="fine-tunes ingested at once (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="zoo and torch seed (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="gets timed per store, median kept (default %(default)s)")
    parser.add_argument("--cache", default=str(scale.DEFAULT_CACHE), help="zoo cache (default: the scale benchmark's)")
    output_options(parser, DEFAULT_OUT, DEFAULT_RESULTS_MD)
    args = parser.parse_args(argv)
    command = command_line("benchmarks.s3", argv)
    results = run(args.tasks, args.seed, args.repeats, args.cache)
    results["machine"] = machine(device="cpu", dtype="float32")
    results["command"] = command
    table = format_table(results)
    write_outputs(args.out, "s3", results, table)
    if args.results_md:
        body = (f"## Object storage: a store on S3 (issue 14)\n\n`{command}`\n\n{table}\n\n"
                "moto is a local, in-memory stand-in for S3 (here a subprocess on the same 2-core machine): the ratios "
                "say what the protocol costs (requests, signing, Icechunk's object layout), not what a real bucket's "
                "latency and bandwidth would add. The last row reads every input through s3fs, one ranged GET per "
                "tensor read, and a fit reads each tensor several times; the store is local there.")
        replace_section(args.results_md, "s3", body)


if __name__ == "__main__":
    main()
