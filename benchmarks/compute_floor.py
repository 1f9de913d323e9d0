"""The compute floor of ingest and get: the matrix products they do, against this machine's GEMM rate.

The scale benchmark compares ``tvbase ingest`` with one plain read pass of its inputs. That is the
floor of an ingest that does no arithmetic. This benchmark measures the other floor: it counts the
floating-point operations of every matrix product of an in-process ingest of T tasks of a cached
scale zoo, and of a ``get`` of one task (``torch.utils.flop_counter``, with in-place ``addmm_``
added; QR, eigh and SVD of the small problems are not counted), and times this machine's float32 GEMM at the shapes the fit
multiplies. ``flops ÷ GEMM rate`` is the time the products alone take at that rate; the plain
read pass (in process, the same files) is printed beside it.

Run (the zoo must exist: ``python -m benchmarks.scale`` builds it)::

    python -m benchmarks.compute_floor --zoo benchmarks/cache/scale/bert-base-T32-seed0 --tasks 8

Writes ``OUT/compute_floor.json`` and ``OUT/compute_floor.md`` (default OUT: benchmarks/results).
Wall times under the counter are slower than without it; the scale benchmark gives the real ones.
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.scale import read_pass
from tvbase import Store
from tvbase.bench.report import command_line, machine, write_outputs

# (m, k, n) of products the fit does most: a 768- or 3072-row matrix against a 512-wide sketch
# or a 320-wide randomized-SVD block, and the 30522-row embedding against the same
GEMM_SHAPES = ((768, 768, 512), (3072, 768, 512), (768, 3072, 320), (30522, 768, 320))


def gemm_rate(shapes=GEMM_SHAPES, repeats=5):
    """Best float32 GEMM rate over ``shapes`` (FLOP/s), each the best of ``repeats`` runs."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm up
        seconds = min(_timed(lambda: a @ b) for _ in range(repeats))
        best = max(best, 2 * m * k * n / seconds)
    return best


def _timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    """FLOPs of ``out.addmm_(a, b)``, which the counter's own table leaves out (rebuilds use it)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def counted(fn):
    """``(wall seconds, matmul FLOPs)`` of ``fn()`` under a FLOP counter."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops})
    started = time.perf_counter()
    with counter:
        fn()
    return time.perf_counter() - started, counter.get_total_flops()


def run(zoo, n_tasks):
    zoo = Path(zoo)
    files = {f"t{i:02d}": zoo / f"t{i:02d}.safetensors" for i in range(n_tasks)}
    inputs = [zoo / "base.safetensors", *files.values()]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise SystemExit(f"compute_floor: the zoo lacks {missing[0]} (and {len(missing) - 1} more); build it with benchmarks.scale")
    read_pass(inputs)  # page cache warm, as the scale benchmark reads
    read_s = read_pass(inputs)["inner_s"]
    rate = gemm_rate()
    with tempfile.TemporaryDirectory(prefix="compute-floor-") as tmp:
        store = Store.create(Path(tmp) / "store.tvb", zoo / "base.safetensors")
        ingest_s, ingest_flops = counted(lambda: store.ingest(files, device="cpu", progress=False))
        store = Store.open(Path(tmp) / "store.tvb")
        params = sum(math.prod(shape) for shape in store.shapes.values())
        get_s, get_flops = counted(lambda: store.get("t00", device="cpu"))
    return {
        "zoo": str(zoo), "tasks": n_tasks, "params_per_task": params, "read_pass_s": read_s,
        "gemm_flops_per_s": rate,
        "ingest": {"matmul_flops": ingest_flops, "flops_per_param": ingest_flops / (params * n_tasks),
                   "floor_s": ingest_flops / rate, "wall_s_counted": ingest_s},
        "get": {"matmul_flops": get_flops, "flops_per_param": get_flops / params,
                "floor_s": get_flops / rate, "wall_s_counted": get_s},
    }


def table(r, command):
    rows = [
        f"Command: `{command}`; {r['tasks']} tasks of {r['params_per_task'] / 1e6:.1f}M parameters; "
        f"fp32 GEMM on this machine: {r['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s (best of {len(GEMM_SHAPES)} shapes); "
        f"plain read pass of the inputs (in process): {r['read_pass_s']:.2f} s.",
        "",
        "| | matmul FLOPs | per parameter | products alone at the GEMM rate | ÷ read pass | wall under the counter |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("ingest", "get"):
        x = r[name]
        rows.append(f"| {name} | {x['matmul_flops'] / 1e12:.2f} T | {x['flops_per_param']:,.0f} | {x['floor_s']:.1f} s | "
                    f"{x['floor_s'] / r['read_pass_s']:.1f} | {x['wall_s_counted']:.1f} s |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compute_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, required=True, help="a scale zoo folder (base.safetensors, t00.safetensors, ...)")
    p.add_argument("--tasks", type=int, default=8, help="tasks to ingest")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = p.parse_args(argv)
    r = run(args.zoo, args.tasks)
    command = command_line("benchmarks.compute_floor", argv)
    r["command"], r["machine"] = command, machine()
    write_outputs(args.out, "compute_floor", r, table(r, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
