"""The ``tvbase`` command: parse, validate, call one library function, print.

Exit codes: 0 success, 2 usage error, and one code per error kind (see ``errors.EXIT_CODES``).
User errors print one line on stderr, never a traceback.

Start-up is kept short: this module imports neither torch nor the store at the top; each
command imports what it needs when it runs (``--version`` and ``--help`` load neither, and
``ls``, ``info`` and ``log`` read the store without torch).
"""

import argparse
import gc
import json
import shlex
import sys
import warnings
from pathlib import Path

from ._version import __version__
from .bench import DESCRIPTIONS
from .codec.bits import parse_bits
from .errors import (
    AlreadyExistsError,
    InvalidInputError,
    TvbaseError,
    TvbaseWarning,
    exit_code,
)
from .methods.params import FitParams
from .methods.registry import METHODS, get_method
from .recipe import DTYPES  # light: PyYAML is imported only when a recipe is read
MODEL_FORMS = ("a .safetensors file, a folder of shards with model.safetensors.index.json, either one at an "
               "s3://BUCKET/KEY, or the hub id org/name[@revision] of a model in the local Hugging Face cache "
               "(never downloaded)")


def parse_budget(text):
    """'3%' -> 0.03, '0.03' -> 0.03; must lie in (0, 1)."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise InvalidInputError(f"budget {text!r} is not a number; write it as '3%' or 0.03") from None
    if not (0 < value < 1):
        raise InvalidInputError(f"budget {text!r} is out of range: it must lie strictly between 0% and 100%")
    return value


_MEMORY_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
                 "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(text):
    """'8G', '2.5GiB', '512M', '1000000' -> bytes (binary units: 1G = 2**30)."""
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    unit = s[len(number):]
    try:
        value = float(number) * _MEMORY_UNITS[unit]
    except (ValueError, KeyError):
        raise InvalidInputError(f"--max-memory {text!r} is not a size; write it as 8G, 2.5GiB or 512M") from None
    if not value > 0:
        raise InvalidInputError(f"--max-memory {text!r} must be positive")
    return int(value)


def parse_items(pairs, list_file):
    """NAME=PATH arguments (and lines of a list file) -> dict, names in order given.

    Spaces around the ``=`` and at either end are dropped (``math = ckpts/math.safetensors``).
    A relative path in a list file is taken relative to the file; a hub id (``org/name[@revision]``)
    with no such path beside it names a model in the Hugging Face cache.
    """
    from .io.hub import resolve_model_path

    entries = [(p, None) for p in pairs]
    if list_file:
        path = Path(list_file)
        if not path.is_file():
            raise InvalidInputError(f"list file {list_file} does not exist")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line, path.parent))
    items = {}
    for entry, relative_to in entries:
        name, sep, text = (part.strip() for part in entry.partition("="))
        if not sep or not name or not text:
            raise InvalidInputError(f"{entry!r} is not NAME=PATH (for example math=ckpts/math.safetensors)")
        if name in items:
            raise AlreadyExistsError(f"task name {name!r} is given twice; each task needs its own name")
        # a list's paths are relative to the list; a hub id is looked up now, so that a missing
        # one is reported with the path it was looked for beside the list
        items[name] = _model_path(text) if relative_to is None else resolve_model_path(text, relative_to)
    return items


def _model_path(text):
    """A model path argument: an ``s3://`` URL stays text (a Path would fold its ``//``)."""
    from .s3 import is_s3_url

    return text if is_s3_url(text) else Path(text)


def _fit_params(args, store=None):
    base = FitParams.from_dict(store.meta["params"]) if store is not None else FitParams()
    if getattr(args, "budget", None) is not None:
        base.budget, base.rank = parse_budget(args.budget), None
    if getattr(args, "rank", None) is not None:
        base.rank = args.rank
    if getattr(args, "residual_rank", None) is not None:
        base.residual_rank = args.residual_rank
    if getattr(args, "residual_share", None) is not None:
        base.residual_share = args.residual_share
    if getattr(args, "sparse_share", None) is not None:
        base.sparse_share = args.sparse_share
    if getattr(args, "bits", None) is not None:
        base.bits = parse_bits(args.bits)
    if getattr(args, "dense_bits", None) is not None:
        base.dense_bits = parse_bits(args.dense_bits)
    if getattr(args, "lora_bits", None) is not None:
        base.lora_bits = parse_bits(args.lora_bits)
    if getattr(args, "clusters", None) is not None:
        base.n_clusters = "auto" if args.clusters == "auto" else _positive_int(args.clusters, "--clusters")
    if getattr(args, "max_rank", None) is not None:
        base.max_rank = args.max_rank
    return base


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


def _positive_int(text, flag):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidInputError(f"{flag} must be 'auto' or a positive integer, got {text!r}")
    return value


def _print(args, data, table):
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(table)


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_table(rows, columns):
    """Plain aligned text table; ``columns`` is a list of (header, key, format)."""
    cells = [[h for h, _, _ in columns]] + [[fmt.format(r[k]) if r[k] is not None else "-" for _, k, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


# -- commands ------------------------------------------------------------------------------
def cmd_init(args):
    from .store import Store

    store = Store.create(args.store, args.base, params=_fit_params(args))
    print(f"created {args.store} for base {args.base} ({len(store.meta['tensors'])} tensors), version {store.version}")


def cmd_ingest(args):
    from .store import Store

    items = parse_items(args.items, args.list)
    store = Store.open(args.store)
    params = _fit_params(args, store)
    default_bits = get_method(args.method).default_bits
    if default_bits is not None and args.bits is None:
        params.bits = params.dense_bits = default_bits  # the seed methods' bases are fp32 in the paper
    version = store.ingest(
        items, params=params, base=args.base, device=args.device, progress=not args.quiet, wait=args.wait,
        method=args.method, n_components=args.components,
        max_memory=parse_memory(args.max_memory) if args.max_memory else None, dask=args.dask,
    )
    rows = [r for r in store.ls() if r["name"] in items]
    _print(args, {"version": version, "tasks": rows}, format_table(rows, LS_COLUMNS) + f"\nversion {version}")


LS_COLUMNS = [
    ("task", "name", "{}"),
    ("cluster", "cluster", "{}"),
    ("kind", "kind", "{}"),
    ("stored", "stored_bytes", "{:,}"),
    ("% of raw", "storage", "{:.2%}"),
    ("rel. error", "rel_error", "{:.4f}"),
]


def cmd_ls(args):
    from .store import Store

    rows = Store.open(args.store, at=args.at).ls()
    text = format_table(rows, LS_COLUMNS) if rows else "(no tasks)"
    if any(r["sparse"] for r in rows):
        text += ("\nrel. error counts the noise of sparse residuals (random entries, rescaled): it may exceed 1 "
                 "while the task keeps its accuracy; see --sparse-share")
    _print(args, rows, text)


def cmd_info(args):
    from .store import Store

    info = Store.open(args.store, at=args.at).info()
    lines = [
        f"store       {info['path']}",
        f"version     {info['version']} (format {info['format_version']})",
        f"base        {info['base']['path']} ({info['base']['tensors']} tensors, sha256 {info['base']['hash'][:12]}...)",
        f"tasks       {info['tasks']} in {info['clusters']} clusters",
        f"raw fp32    {_fmt_bytes(info['raw_fp32_bytes'])}",
        f"factors     {_fmt_bytes(info['factor_bytes'])} ({info['factor_storage']:.2%} of raw)",
        f"on disk     {_fmt_bytes(info['disk_bytes'])} ({info['disk_storage']:.2%} of raw, all versions)",
        f"  this      {_fmt_bytes(info['version_disk_bytes'])} ({info['version_disk_storage']:.2%} of raw, this version's arrays)",
        f"  history   {_fmt_bytes(info['history_bytes'])} (older versions and repository files; `tvbase gc --keep N` frees old versions)",
        f"reclaimable {_fmt_bytes(info['reclaimable_bytes'])} (run `tvbase compact`)",
    ]
    _print(args, info, "\n".join(lines))


def cmd_log(args):
    from .store import Store

    entries = Store.open(args.store).log()
    table = format_table(entries, [("version", "id", "{}"), ("time", "time", "{}"), ("message", "message", "{}")])
    _print(args, entries, table)


def cmd_get(args):
    from .io.save import save_checkpoint
    from .store import Store

    store = Store.open(args.store, at=args.at)
    request, dtype = {args.name: 1.0}, _torch_dtype(args.dtype)
    tensors = store.iter_composition(request, device=args.device, dtype=dtype)
    files = save_checkpoint(((n, t.cpu()) for n, t in tensors), args.output, plan=store.composition_plan(request, dtype),
                            metadata={"tvbase_task": args.name, "tvbase_version": store.version})
    print(f"wrote task vector {args.name!r} to {', '.join(map(str, files))}")


def _request(args, store, command):
    """What ``compose`` or ``apply`` is asked to write, from EXPRESSION or ``--recipe``: a Recipe
    and the text naming the composition. Options given on the command line win over the
    recipe's values. Nothing is written before these checks pass."""
    from .recipe import KINDS, Recipe, load_recipe

    if (args.expression is None) == (args.recipe is None):
        raise InvalidInputError(
            "give either an EXPRESSION such as '0.5*math + code' or --recipe FILE" if args.expression is None
            else f"give either the expression {args.expression!r} or --recipe {args.recipe}, not both"
        )
    options = {"output": args.output, "dtype": args.dtype, "base": getattr(args, "base", None), "rank": getattr(args, "rank", None)}
    if args.recipe is not None:
        request = load_recipe(args.recipe, known=store.tasks, command=command).override(**options)
        text = request.expression
    else:
        from .arithmetic import parse_expression

        kind = next(k.name for k in KINDS.values() if k.command == command)
        request = Recipe(kind, parse_expression(args.expression, known=store.tasks)).override(**options)
        text = args.expression
    if request.output is None:
        raise InvalidInputError("no output given: pass -o/--output, or set 'output:' in the recipe")
    return request, text


def cmd_compose(args):
    from .export import write_composition
    from .store import Store

    store = Store.open(args.store, at=args.at)
    request, text = _request(args, store, "compose")
    files = write_composition(store, request.tasks, request.output, device=args.device,
                              dtype=_torch_dtype(request.dtype or "float32"), metadata={"tvbase_expression": text})
    print(f"wrote {text!r} to {', '.join(map(str, files))}")


def cmd_apply(args):
    from .export import apply_composition
    from .store import Store

    store = Store.open(args.store, at=args.at)
    request, text = _request(args, store, "apply")
    dtype = _torch_dtype(request.dtype) if request.dtype else None
    files = apply_composition(store, request.tasks, request.base, request.output, device=args.device, dtype=dtype,
                              metadata={"tvbase_expression": text})
    print(f"wrote base + ({text}) to {request.output} ({len(files)} file(s))")


def cmd_export_lora(args):
    from .export_lora import DEFAULT_RANK, export_lora
    from .store import Store

    store = Store.open(args.store, at=args.at)
    request, text = _request(args, store, "export-lora")
    rank = request.rank or DEFAULT_RANK
    report = export_lora(store, request.tasks, request.output, rank=rank, base=request.base, device=args.device,
                         dtype=_torch_dtype(request.dtype or "float32"), config=args.config)
    how = "exact" if report["exact"] else f"truncated to rank {rank}, relative error {report['rel_error']:.4f}"
    summary = (f"wrote {text!r} as a LoRA adapter to {request.output}: {how}; "
               f"{len(report['ranks'])} LoRA layers, {len(report['modules_to_save'])} layers saved whole")
    _print(args, {k: (list(map(str, v)) if k == "files" else v) for k, v in report.items()}, summary)


def cmd_rm(args):
    from .store import Store

    version = Store.open(args.store).rm(args.names, wait=args.wait)
    print(f"removed {', '.join(args.names)}; version {version}")


def cmd_compact(args):
    from .store import Store

    store = Store.open(args.store)
    params = _fit_params(args, store)
    if args.gc is not None and args.gc < 1:  # refused before a long refit, not after it
        raise InvalidInputError(f"--gc must be a positive integer, got {args.gc!r}")
    max_memory = parse_memory(args.max_memory) if args.max_memory else None
    version = store.compact(params=params, device=args.device, progress=not args.quiet, wait=args.wait, max_memory=max_memory)
    if args.gc is not None:
        expired = store.gc(args.gc, wait=args.wait)
        print(f"expired {expired} old version(s); kept the newest {args.gc}", file=sys.stderr)
    rows = store.ls()
    _print(args, {"version": version, "tasks": rows}, format_table(rows, LS_COLUMNS) + f"\nversion {version}")


def cmd_verify(args):
    from .errors import IntegrityError
    from .store import Store

    report = Store.open(args.store, at=args.at).verify()
    c = report["checked"]
    text = f"checked {c['tasks']} tasks, {c['index_rows']} offset-table rows, {c['payload_chunks']} payload chunks: "
    _print(args, report, text + ("ok" if report["ok"] else "DAMAGED\n" + "\n".join(f"  {p}" for p in report["problems"])))
    if not report["ok"]:
        raise IntegrityError(f"{args.store} failed verification ({len(report['problems'])} problems)")


def cmd_gc(args):
    from .store import Store

    expired = Store.open(args.store).gc(args.keep, wait=args.wait)
    print(f"expired {expired} old version(s); kept the newest {args.keep}")


def cmd_demo(args):
    from .demo.run import run_demo

    run_demo(cache=args.cache, budget=parse_budget(args.budget) if args.budget else None, json_output=args.json)


def cmd_bench_memory_accuracy(args):
    from .bench.memory_accuracy import run_from_args

    # recorded in the outputs: the command line as given (main() keeps it in args.argv)
    run_from_args(args, shlex.join(["tvbase", *map(str, args.argv)]))


def _add_fit_options(p, store_defaults=False):
    # ingest and compact start from the store's recorded parameters, not from init's defaults
    note = "an option left out takes the store's recorded value (from init, the first ingest or the last compact)" if store_defaults else None
    g = p.add_argument_group("factorization", note)
    g.add_argument("--budget", help="stored bytes as a fraction of raw fp32 task vectors, e.g. 3%% or 0.03 (default 3%%)")
    g.add_argument("--rank", type=int, help="explicit rank for every matrix instead of a budget")
    g.add_argument("--residual-rank", type=int, help="with --rank: per-task residual rank on top of the shared fit")
    g.add_argument("--residual-share", type=float, help="with --budget: share of a shared fit's budget for per-task residuals (default 0.4)")
    g.add_argument("--sparse-share", type=float, help="with --budget: share of the budget for sparse residuals, what the "
                   "factors miss kept at seeded random entries (default 0.7)")
    g.add_argument("--bits", help="factor precision: int4 (default), int8, int2, fp16, fp32")
    g.add_argument("--dense-bits", help="precision of biases and norms: int4 (default), int8, fp16, fp32")
    g.add_argument("--lora-bits", help="precision of LoRA adapters' factors, stored as they are: int8 (default), fp16, fp32, int4")
    g.add_argument("--clusters", help="number of task clusters, or auto (eigengap; default)")
    g.add_argument("--max-rank", type=int, help="largest rank considered per matrix (default 256)")


def _add_memory_option(p):
    p.add_argument("--max-memory", metavar="SIZE", help="refuse, before any work, a fit planned to need more memory "
                   "than this (e.g. 8G, 2.5GiB); default: no limit")


def build_parser():
    parser = argparse.ArgumentParser(prog="tvbase", description="Store many fine-tunes of one base model as a compact task-vector basis.")
    parser.add_argument("--version", action="version", version=f"tvbase {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def device(p):
        p.add_argument("--device", help="cuda or cpu (default: cuda when available)")

    def reader(p):
        p.add_argument("--at", metavar="VERSION", help="read this version (id, unique prefix or tag) instead of the latest")

    def writer(p):
        p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="wait this long for another writer: for its lock, or, on S3, re-running this write "
                       "after another writer committed first (default: %(default)s, refuse at once)")

    def listing(p):
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def store(p):
        p.add_argument("store", help="the store made by `tvbase init`: a directory or s3://BUCKET/PREFIX")

    p = command("init", cmd_init, "create a store for one base model")
    p.add_argument("store", help="where to create the store: a directory that does not exist or is empty, or an "
                   "s3://BUCKET/PREFIX that holds no store (see the README for the AWS variables)")
    p.add_argument("--base", required=True, help=f"base model: {MODEL_FORMS}")
    _add_fit_options(p)

    p = command("ingest", cmd_ingest, "add fine-tuned checkpoints as tasks (one commit)")
    store(p)
    p.add_argument("items", nargs="*", metavar="NAME=PATH", help=f"a task's name and its fine-tune: {MODEL_FORMS}")
    p.add_argument("--list", metavar="FILE", help="file with one NAME=PATH per line (paths relative to the file; "
                   "spaces around '=', blank lines and lines starting with # are ignored)")
    p.add_argument("--base", help="where the base model is now, if it moved since init (a path or hub id; "
                   "default: the path recorded by init)")
    p.add_argument(
        "--method", default="tvbase", choices=list(METHODS), metavar="METHOD",
        help="; ".join(f"{name}: {m.summary}" for name, m in METHODS.items()) + " (default tvbase)",
    )
    p.add_argument("--components", type=int, metavar="M", help="seed methods: number of basis vectors (default T/2)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dask", metavar="ADDRESS", help="run the fit's per-task and per-tensor work on a Dask cluster: a "
                   "scheduler address such as tcp://HOST:8786, or local:N for N worker processes on this machine; "
                   "the workers must be able to read every input path (needs tvbase[dask])")
    _add_fit_options(p, store_defaults=True)
    _add_memory_option(p)
    device(p), writer(p), listing(p)

    p = command("get", cmd_get, "rebuild one task vector into a safetensors file")
    store(p)
    p.add_argument("name", help="the task to rebuild (see `tvbase ls`)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file (or directory for shards)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written tensors (default: %(default)s)")
    device(p), reader(p)

    def composition(p):
        p.add_argument("expression", nargs="?", help="tasks and weights, e.g. '0.7*math + 0.5*code - toxic' "
                       "(or --recipe)")
        p.add_argument("--recipe", metavar="FILE", help="YAML recipe with the tasks and weights, and optionally "
                       "output, dtype, base and kind, instead of EXPRESSION; options given here override its "
                       "values, and its relative paths are relative to its folder (default: none)")

    p = command("compose", cmd_compose, "rebuild a composition such as '0.5*math + 0.3*code - toxic'")
    p.add_argument("store")
    composition(p)
    p.add_argument("-o", "--output", type=Path, help="output .safetensors file, or a new (or empty) directory for shards + "
                   "index (default: the recipe's output; one of the two is required)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the written tensors (default: the recipe's, "
                   "else float32)")
    device(p), reader(p)

    p = command("apply", cmd_apply, "write base + composition as a loadable checkpoint (a transformers directory "
                "when the base is one)")
    p.add_argument("store")
    composition(p)
    p.add_argument("--base", type=_model_path, help="the base model the store was created for (default: the recipe's, else the "
                   "path recorded at init, if its content is unchanged)")
    p.add_argument("-o", "--output", type=Path, help="output: a new (or empty) directory that gets model.safetensors (or "
                   "shards + index when large) and, for a base directory, its config and tokenizer files; or a "
                   ".safetensors file, weights only (default: the recipe's output; one of the two is required)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of every floating-point tensor written (default: "
                   "the recipe's, else each tensor keeps the base's dtype); integer tensors keep theirs")
    device(p), reader(p)

    p = command("export-lora", cmd_export_lora, "write a task or composition as a PEFT LoRA adapter directory")
    p.add_argument("store", help="the store")
    composition(p)
    p.add_argument("-o", "--output", type=Path, help="a new (or empty) adapter directory: adapter_config.json + "
                   "adapter_model.safetensors (default: the recipe's output; one of the two is required)")
    p.add_argument("--rank", type=int, help="largest rank of any layer; a layer whose update has a higher rank is "
                   "truncated to it and the error reported (default: the recipe's, else 64)")
    p.add_argument("--base", type=_model_path, help="where the base model is, if it moved since init (default: the recipe's, "
                   "else the path recorded at init, if its content is unchanged)")
    p.add_argument("--config", type=Path, help="folder with the model's config.json, for its layer types (default: "
                   "the base's folder)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the adapter's tensors (default: the recipe's, "
                   "else float32)")
    device(p), reader(p), listing(p)

    p = command("ls", cmd_ls, "list tasks: cluster, stored bytes, relative error")
    store(p)
    reader(p), listing(p)

    p = command("info", cmd_info, "store summary: size on disk against raw fp32")
    store(p)
    reader(p), listing(p)

    p = command("log", cmd_log, "list versions, newest first")
    store(p)
    listing(p)

    p = command("rm", cmd_rm, "remove tasks (one commit; compact reclaims their bytes)")
    store(p)
    p.add_argument("names", nargs="+", metavar="NAME", help="tasks to remove")
    writer(p)

    p = command("compact", cmd_compact, "refit clusters and shared factors over all tasks (one commit)")
    store(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--gc", type=int, metavar="KEEP", help="then expire all but the newest KEEP versions, as "
                   "`tvbase gc --keep KEEP` (default: keep every version)")
    _add_fit_options(p, store_defaults=True)
    _add_memory_option(p)
    device(p), writer(p), listing(p)

    p = command("verify", cmd_verify, "check every checksum, offset-table row and task's metadata")
    store(p)
    reader(p), listing(p)

    p = command("gc", cmd_gc, "expire all but the newest N versions and delete what only they used")
    store(p)
    p.add_argument("--keep", type=int, required=True, metavar="N", help="versions of main to keep (>= 1)")
    writer(p)

    p = command("demo", cmd_demo, "build a small real zoo on sklearn digits, ingest it, report accuracy and storage")
    p.add_argument("--cache", help="where the zoo is cached (default: $TVBASE_CACHE or ~/.cache/tvbase)")
    p.add_argument("--budget", help="storage budget (default 3%%)")
    listing(p)

    bench = sub.add_parser("bench", help="run a benchmark (default paths relative to the current directory)",
                           description="Run one of tvbase's benchmarks.")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", parser_class=_LazyOptionsParser,
                                      help="the benchmark to run")
    for name, (description, add_options, func) in BENCHMARKS.items():
        p = benchmarks.add_parser(name, help=description, description=description, add_options=add_options)
        p.set_defaults(func=func)
    return parser


class _LazyOptionsParser(argparse.ArgumentParser):
    """A subcommand parser whose options are added by ``add_options(parser)`` only when it parses
    or prints its help: a benchmark's options live in its harness, imported only then."""

    def __init__(self, *args, add_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_options = add_options

    def _add_pending_options(self):
        if self._add_options is not None:
            add, self._add_options = self._add_options, None
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_pending_options()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._add_pending_options()
        return super().format_help()


def _memory_accuracy_options(p):
    from .bench.memory_accuracy import add_arguments

    add_arguments(p)


# name -> (description, adds its options to a parser, runs it); the harness is imported only
# when its benchmark is asked for, so no other command pays for it
BENCHMARKS = {
    "memory-accuracy": (
        DESCRIPTIONS["memory-accuracy"],
        _memory_accuracy_options,
        cmd_bench_memory_accuracy,
    ),
}


def _warning_printer(show):
    """``warnings.showwarning`` that prints tvbase's warnings as one line on stderr, like errors."""

    def print_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TvbaseWarning):
            print(f"tvbase: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return print_warning


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = parser._subparsers._group_actions[0].choices
    if argv and argv[0] in commands and commands[argv[0]]._subparsers is None:
        # intermixed: options may come between positionals (`ingest STORE -q a=x b=y`); not for
        # a command group such as `bench`, whose subcommand argparse cannot intermix
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    args.argv = argv
    try:
        with warnings.catch_warnings():  # restores the warning filters and showwarning on exit
            warnings.simplefilter("always", TvbaseWarning)
            warnings.showwarning = _warning_printer(warnings.showwarning)
            args.func(args)
    except TvbaseError as e:
        print(f"tvbase: error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("tvbase: interrupted; the store is unchanged unless a commit was reported", file=sys.stderr)
        return 130
    return 0


def console_main():
    """The ``tvbase`` command: :func:`main`, then leave what it made to the operating system.

    Freezing the garbage collector's objects skips the interpreter's last collection over
    everything torch loaded, 0.5 s at the exit of every command that imports it; nothing
    tvbase writes waits on it (every file is closed, every commit made, before ``main``
    returns). Not done by ``main`` itself, which tests and benchmarks call in long-lived
    processes.
    """
    code = main()
    if code:
        # A failed command leaves cycles (its exception's frames and the generators and stores
        # they hold): collect them while everything they use is alive. Left frozen to the
        # interpreter's exit, about one `get` in 25 on a damaged store aborted (SIGABRT) instead
        # of exiting 6; none in 50 with this collection.
        gc.collect()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console_main())
