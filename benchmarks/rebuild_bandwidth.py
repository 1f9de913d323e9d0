"""Rebuild bandwidth: the bytes a rebuild writes per second, against the device's own memory bandwidth.

Issue 12's GPU goal: rebuilding a task writes its float32 tensors at no less than half the
device's memory bandwidth. For one task of a store, every tensor is rebuilt on ``--device`` and
timed (synchronized on CUDA), two ways:

- ``device``: from factors already read from the store (host bytes, as a rebuild gets them), so
  the time is the device's share: codes moved and decoded, the products, the writes;
- ``from_store``: :meth:`Snapshot.rebuild` as ``get`` calls it, reading the factors too.

In the same run, on the same device, the plain ways of moving as many bytes: ``copy``, a
device-to-device copy of a float32 buffer as large as the largest tensor (bytes read plus
written: the usual memory-bandwidth figure), and ``fill``, writing it (bytes written). The goal's
ratio is ``device`` bytes written per second ÷ ``copy`` bytes per second. Each figure is the median
of ``--repeat`` passes after one warm-up pass.

Run::

    python -m benchmarks.rebuild_bandwidth --store STORE --task t00 --device cuda

or, with a scale zoo (``python -m benchmarks.scale`` builds them) ingested first into a scratch store
on the same device, which also records the ingest against one plain read pass of its input files
(the scale benchmark's ratio; the issue's GPU goal is at most 1.5)::

    python -m benchmarks.rebuild_bandwidth --zoo benchmarks/cache/scale/gpt2-small-T9-seed0 --tasks 8 --device cuda

Writes ``OUT/rebuild_bandwidth.json`` and ``OUT/rebuild_bandwidth.md`` (default OUT: benchmarks/results).
"""

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.scale import read_pass
from tvbase import Store
from tvbase.bench.report import command_line, machine, write_outputs
from tvbase.devices import resolve_device
from tvbase.reconstruct import rebuild_tensor

GOAL = 0.5  # rebuild's bytes written per second ÷ the device's copy bandwidth, on a GPU


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    """Seconds of ``fn()`` on ``device``, its queued work included."""
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def _median_pass(fn, device, repeat):
    """Median seconds of ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()
    return statistics.median(_timed(fn, device) for _ in range(repeat))


def plain_bandwidth(numel, device, repeat):
    """``{"copy": bytes read + written per second, "fill": bytes written per second}`` of a
    float32 buffer of ``numel`` entries on ``device``."""
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    nbytes = 4 * numel
    copy_s = _median_pass(lambda: dst.copy_(src), device, repeat)
    fill_s = _median_pass(lambda: dst.fill_(1.0), device, repeat)
    return {"copy": 2 * nbytes / copy_s, "fill": nbytes / fill_s}


def measure(store, task, device, repeat=3):
    """The record of one task's rebuild on ``device``: seconds and bytes written per second,
    device-only and from the store, the plain copy and fill bandwidths, and their ratios."""
    device = resolve_device(device)
    snapshot = store._snapshot
    if task not in snapshot.meta["tasks"]:
        raise SystemExit(f"rebuild_bandwidth: the store has no task {task!r} (it has {', '.join(sorted(snapshot.meta['tasks']))})")
    shapes = snapshot.shapes
    tolerance = snapshot.bf16_tolerance({task: 1.0}, device)  # as a rebuild from the store decides
    terms = {name: snapshot._terms(name, {task: 1.0}) for name in shapes}  # read once: host bytes
    written = sum(4 * math.prod(shape) for shape in shapes.values())

    def device_pass():
        for name, shape in shapes.items():
            rebuild_tensor(shape, terms[name], device=device, bf16_tolerance=tolerance)

    def store_pass():
        for name in shapes:
            snapshot.rebuild(name, {task: 1.0}, device)

    device_s = _median_pass(device_pass, device, repeat)
    store_s = _median_pass(store_pass, device, repeat)
    plain = plain_bandwidth(max(math.prod(shape) for shape in shapes.values()), device, repeat)
    rebuild_bw = written / device_s
    return {
        "task": task, "device": str(device), "tensors": len(shapes), "bytes_written": written,
        "bfloat16_products": tolerance is not None, "repeat": repeat,
        "device_s": device_s, "from_store_s": store_s,
        "device_bytes_per_s": rebuild_bw, "from_store_bytes_per_s": written / store_s,
        "copy_bytes_per_s": plain["copy"], "fill_bytes_per_s": plain["fill"],
        "device_over_copy": rebuild_bw / plain["copy"], "device_over_fill": rebuild_bw / plain["fill"],
        "goal_device_over_copy": GOAL,
    }


def table(r, command):
    gb = 1e9
    meets = "met" if r["device_over_copy"] >= GOAL else "not met"
    return "\n".join([
        f"Command: `{command}`; task {r['task']} ({r['tensors']} tensors, {r['bytes_written'] / gb:.2f} GB written "
        f"as float32) on {r['device']}, bfloat16 products {'on' if r['bfloat16_products'] else 'off'}; "
        f"medians of {r['repeat']} passes after a warm-up.",
        "",
        "| | seconds | GB/s written | ÷ copy bandwidth | ÷ fill bandwidth |",
        "|---|---:|---:|---:|---:|",
        f"| rebuild on the device (factors read) | {r['device_s']:.3f} | {r['device_bytes_per_s'] / gb:.3g} | "
        f"{r['device_over_copy']:.3f} | {r['device_over_fill']:.3f} |",
        f"| rebuild from the store | {r['from_store_s']:.3f} | {r['from_store_bytes_per_s'] / gb:.3g} | "
        f"{r['from_store_bytes_per_s'] / r['copy_bytes_per_s']:.3f} | {r['from_store_bytes_per_s'] / r['fill_bytes_per_s']:.3f} |",
        "",
        f"Plain, same device, same run: copy {r['copy_bytes_per_s'] / gb:.1f} GB/s (read + written), fill "
        f"{r['fill_bytes_per_s'] / gb:.1f} GB/s (written). Goal on a GPU: rebuild ÷ copy ≥ {GOAL} ({meets} here).",
        *([] if "ingest_s" not in r else [
            "",
            f"Ingest of {r['tasks_ingested']} tasks on {r['device']}: {r['ingest_s']:.1f} s against {r['read_pass_s']:.2f} s "
            f"for one plain read pass of its input files: {r['ingest_over_read_pass']:.1f}x (goal on a GPU: at most 1.5)."]),
    ])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.rebuild_bandwidth", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=Path, help="a tvbase store")
    where.add_argument("--zoo", type=Path, help="a scale zoo folder (base.safetensors, t00.safetensors, ...), ingested first")
    p.add_argument("--tasks", type=int, default=8, help="with --zoo: tasks to ingest (default %(default)s)")
    p.add_argument("--task", default="t00", help="the task rebuilt (default %(default)s)")
    p.add_argument("--device", default=None, help="where to rebuild (default: CUDA where there is one, else the CPU)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = p.parse_args(argv)
    ingest = {}
    with tempfile.TemporaryDirectory(prefix="rebuild-bandwidth-") as tmp:
        if args.store is not None:
            store = Store.open(args.store)
        else:
            files = {f"t{i:02d}": args.zoo / f"t{i:02d}.safetensors" for i in range(args.tasks)}
            inputs = [args.zoo / "base.safetensors", *files.values()]
            missing = [str(f) for f in inputs if not f.exists()]
            if missing:
                raise SystemExit(f"rebuild_bandwidth: the zoo lacks {missing[0]}; build it with benchmarks.scale")
            read_pass(inputs)  # page cache warm, as the scale benchmark reads
            ingest["read_pass_s"] = read_pass(inputs)["inner_s"]
            store = Store.create(Path(tmp) / "store.tvb", args.zoo / "base.safetensors")
            ingest["ingest_s"] = _timed(lambda: store.ingest(files, device=args.device, progress=False),
                                        resolve_device(args.device))
            ingest["ingest_over_read_pass"] = ingest["ingest_s"] / ingest["read_pass_s"]
            ingest["tasks_ingested"] = args.tasks
        r = {**measure(store, args.task, args.device, args.repeat), **ingest}
    command = command_line("benchmarks.rebuild_bandwidth", argv)
    r["command"], r["machine"] = command, machine(cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    write_outputs(args.out, "rebuild_bandwidth", r, table(r, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
