"""The one writer of RESULTS.md sections (``benchmarks/RESULTS.md`` in the repository): each
benchmark owns the text between its ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers and
never touches the rest."""

import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path

from ..io.save import write_atomic


def markers(name):
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(path, name, body):
    """Replace (or append) section ``name`` of the markdown file ``path`` with ``body``, atomically."""
    path = Path(path)
    start_mark, end_mark = markers(name)
    block = f"{start_mark}\n{body.strip()}\n{end_mark}"
    text = path.read_text() if path.exists() else "# Measured results\n"
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end > start:
        nested = re.findall(r"<!-- ([\w.-]+):start -->", text[start + len(start_mark) : end])
        if nested:  # replacing would delete them: a hand edit put them there
            raise ValueError(f"section {name!r} of {path} holds other sections ({', '.join(nested)}); "
                             "move them out of its markers first")
        text = text[:start] + block + text[end + len(end_mark) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda temp: Path(temp).write_text(text))


def write_outputs(out, stem, results, table):
    """``OUT/STEM.json`` (``results``) and ``OUT/STEM.md`` (``table``), and the table printed:
    what every benchmark leaves behind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)


def output_options(parser, out, results_md):
    """``--out`` and ``--results-md``, the output options every benchmark takes."""
    parser.add_argument("--out", default=str(out), help="output folder (default %(default)s)")
    parser.add_argument("--results-md", default=str(results_md), help="RESULTS.md to update ('' for none)")


def command_line(module, argv=None):
    """``python -m MODULE ARGS``, the command a run records beside its figures."""
    return shlex.join(["python", "-m", module, *(argv if argv is not None else sys.argv[1:])])


def machine(**extra):
    """The versions and machine a run's figures come from, plus ``extra``."""
    import torch

    from .._version import __version__

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"python": platform.python_version(), "torch": torch.__version__, "tvbase": __version__, "cpus": cpus,
            "platform": platform.platform(), **extra}
