"""The ``tvbase`` command, end to end: in-process through ``tvbase.cli.main`` and as a real process.

A module-scoped store is built through the CLI itself (init, ingest NAME=PATH, ingest --list);
read-only commands run against it, commands that write run against a copy.
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvbase.arithmetic import parse_expression
from tvbase.cli import main, parse_items
from tvbase.errors import EXIT_CODES, AlreadyExistsError, InvalidInputError, NotFoundError, StoreLockedError
from tvbase.repository import WriterLock
from tvbase.store import Store

NAME_ARGS = ["a0", "a1", "a2", "b0", "b1"]  # ingested as NAME=PATH arguments (shared fit)
LISTED = ["a_sharded", "c_new"]  # ingested from a list file (projected onto the first fit's bases)


def _run(argv):
    """main(argv) with stdout/stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _ok(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    return captured.out


def _fails(capsys, argv, expected_code):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == expected_code, (code, captured.err)
    assert captured.err.startswith("tvbase: error: "), captured.err
    assert "Traceback" not in captured.err
    return captured.err


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, zoo):
    """A store built through the CLI; returns dict(path, versions)."""
    root = tmp_path_factory.mktemp("cli")
    store = root / "store"
    code, out, err = _run(["init", store, "--base", zoo.base, "--budget", "50%", "--clusters", "2"])
    assert code == 0, err
    assert "created" in out
    versions = {"init": Store.open(store).version}
    assert versions["init"] in out

    code, out, err = _run(["ingest", store, *[f"{t}={zoo.tasks[t]}" for t in NAME_ARGS], "-q", "--device", "cpu"])
    assert code == 0, err
    versions["first"] = Store.open(store).version
    assert f"version {versions['first']}" in out
    assert all(t in out for t in NAME_ARGS)

    # list file: comments, blank lines, and paths relative to the list file (not to the cwd)
    lists = root / "lists"
    lists.mkdir()
    lines = ["# a comment", ""] + [f"{t}={os.path.relpath(zoo.tasks[t], lists)}" for t in LISTED]
    (lists / "tasks.txt").write_text("\n".join(lines) + "\n")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        code, out, err = _run(["ingest", store, "--list", lists / "tasks.txt", "-q", "--device", "cpu", "--json"])
    finally:
        os.chdir(cwd)
    assert code == 0, err
    result = json.loads(out)
    versions["later"] = result["version"]
    assert sorted(r["name"] for r in result["tasks"]) == sorted(LISTED)
    assert {r["kind"] for r in result["tasks"]} == {"projected"}
    return {"path": store, "versions": versions, "root": root}


@pytest.fixture
def cli_copy(tmp_path, cli_store):
    dest = tmp_path / "store"
    shutil.copytree(cli_store["path"], dest)
    return dest


ALL = sorted(NAME_ARGS + LISTED)


# -- reading commands ----------------------------------------------------------------------------
def test_ls_table_and_json(cli_store, capsys):
    out = _ok(capsys, ["ls", cli_store["path"]])
    lines = out.strip().splitlines()
    assert lines[0].split() == ["task", "cluster", "kind", "stored", "%", "of", "raw", "rel.", "error"]
    assert [line.split()[0] for line in lines[1:]] == ALL
    rows = json.loads(_ok(capsys, ["ls", cli_store["path"], "--json"]))
    assert [r["name"] for r in rows] == ALL
    kinds = {r["name"]: r["kind"] for r in rows}
    assert {kinds[t] for t in NAME_ARGS} == {"shared"} and {kinds[t] for t in LISTED} == {"projected"}
    assert all(isinstance(r["stored_bytes"], int) and r["stored_bytes"] > 0 for r in rows)
    assert all(0 < r["rel_error"] < 0.25 for r in rows)  # loose: default int4 factors


def test_info(cli_store, capsys):
    info = json.loads(_ok(capsys, ["info", cli_store["path"], "--json"]))
    assert info["tasks"] == len(ALL)
    assert info["clusters"] == 2
    assert info["version"] == cli_store["versions"]["later"]
    assert info["reclaimable_bytes"] == 0
    assert 0.05 < info["factor_storage"] <= 0.5 + 0.005
    assert info["params"]["budget"] == 0.5 and info["params"]["n_clusters"] == 2
    text = _ok(capsys, ["info", cli_store["path"]])
    assert f"tasks       {len(ALL)} in 2 clusters" in text
    assert "reclaimable 0 B" in text


def test_log(cli_store, capsys):
    versions = cli_store["versions"]
    text = _ok(capsys, ["log", cli_store["path"]])
    order = [text.index(versions[k]) for k in ("later", "first", "init")]
    assert order == sorted(order), "newest first"
    assert "ingest a_sharded, c_new" in text and "ingest a0, a1, a2, b0, b1" in text and "init store" in text
    entries = json.loads(_ok(capsys, ["log", cli_store["path"], "--json"]))
    assert [e["id"] for e in entries[:3]] == [versions["later"], versions["first"], versions["init"]]


def test_get_roundtrip(cli_store, tmp_path, capsys, load_checkpoint):
    out_file = tmp_path / "a0.safetensors"
    assert "wrote task vector 'a0'" in _ok(capsys, ["get", cli_store["path"], "a0", "-o", out_file, "--device", "cpu"])
    loaded = load_file(out_file)
    expected = Store.open(cli_store["path"]).get("a0", device="cpu")
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor), name
    # --dtype, and a directory output
    _ok(capsys, ["get", cli_store["path"], "c_new", "-o", tmp_path / "dir", "--dtype", "bfloat16", "--device", "cpu"])
    loaded = load_checkpoint(tmp_path / "dir")
    expected = Store.open(cli_store["path"]).get("c_new", device="cpu", dtype=torch.bfloat16)
    assert all(loaded[n].dtype == torch.bfloat16 and torch.equal(loaded[n], expected[n]) for n in expected)


def test_compose(cli_store, tmp_path, capsys, rel_error):
    expression = "0.5*a0 - b1 + 0.3*c_new + a_sharded/4"
    out_file = tmp_path / "mix.safetensors"
    _ok(capsys, ["compose", cli_store["path"], expression, "-o", out_file, "--device", "cpu"])
    loaded = load_file(out_file)
    store = Store.open(cli_store["path"])
    coefficients = parse_expression(expression)
    expected = store.compose(coefficients, device="cpu")
    singles = {t: store.get(t, device="cpu") for t in coefficients}
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
        dense = sum(alpha * singles[t][name].double() for t, alpha in coefficients.items())
        assert rel_error(loaded[name], dense) <= 1e-5, name


def test_apply(cli_store, zoo, tmp_path, capsys, load_checkpoint, rel_error):
    expression = "0.7*a1 + 0.5*b0 - 0.2*c_new"
    out_dir = tmp_path / "merged"
    out = _ok(capsys, ["apply", cli_store["path"], expression, "--base", zoo.base, "-o", out_dir, "--device", "cpu"])
    assert "wrote base +" in out
    merged = load_checkpoint(out_dir)
    assert set(merged) == set(zoo.base_tensors)
    composed = Store.open(cli_store["path"]).compose(parse_expression(expression), device="cpu")
    for name, weight in zoo.base_tensors.items():
        assert merged[name].dtype == weight.dtype, name
        assert merged[name].shape == weight.shape
        if weight.is_floating_point():
            assert rel_error(merged[name], weight.double() + composed[name].double()) <= 1e-6, name
        else:
            assert torch.equal(merged[name], weight), name  # integer buffer kept exactly


def test_apply_keeps_bf16(zoo, tmp_path, capsys):
    store = tmp_path / "bf16store"
    _ok(capsys, ["init", store, "--base", zoo.bf16_base, "--budget", "50%"])
    _ok(capsys, ["ingest", store, *[f"{t}={p}" for t, p in zoo.bf16_tasks.items()], "-q", "--device", "cpu"])
    _ok(capsys, ["apply", store, "h0 + 0.5*h2", "--base", zoo.bf16_base, "-o", tmp_path / "out.safetensors",
                 "--device", "cpu"])
    merged = load_file(tmp_path / "out.safetensors")
    composed = Store.open(store).compose({"h0": 1.0, "h2": 0.5}, device="cpu")
    base = load_file(zoo.bf16_base)
    for name, weight in base.items():
        assert merged[name].dtype == weight.dtype, name
        if weight.is_floating_point():
            assert merged[name].dtype == torch.bfloat16
            expected = (weight.float() + composed[name]).to(torch.bfloat16)
            assert torch.equal(merged[name], expected), name
        else:
            assert torch.equal(merged[name], weight)


def test_apply_refuses_a_different_base(cli_store, zoo, tmp_path, capsys):
    err = _fails(capsys, ["apply", cli_store["path"], "a0", "--base", zoo.tasks["a0"], "-o", tmp_path / "o"], 4)
    assert "content hash differs" in err


def test_at_version_on_ls_and_get(cli_store, tmp_path, capsys):
    first = cli_store["versions"]["first"]
    rows = json.loads(_ok(capsys, ["ls", cli_store["path"], "--at", first, "--json"]))
    assert [r["name"] for r in rows] == sorted(NAME_ARGS)
    rows = json.loads(_ok(capsys, ["ls", cli_store["path"], "--at", first[:10].lower(), "--json"]))
    assert [r["name"] for r in rows] == sorted(NAME_ARGS)
    assert json.loads(_ok(capsys, ["info", cli_store["path"], "--at", first, "--json"]))["version"] == first
    assert "(no tasks)" in _ok(capsys, ["ls", cli_store["path"], "--at", cli_store["versions"]["init"]])
    _fails(capsys, ["get", cli_store["path"], "c_new", "--at", first, "-o", tmp_path / "x.safetensors"], 3)
    _ok(capsys, ["get", cli_store["path"], "b1", "--at", first, "-o", tmp_path / "b1.safetensors", "--device", "cpu"])
    old = load_file(tmp_path / "b1.safetensors")
    head = Store.open(cli_store["path"]).get("b1", device="cpu")
    assert all(torch.equal(old[n], head[n]) for n in head)
    _fails(capsys, ["ls", cli_store["path"], "--at", "NOSUCHVERSION"], 3)


# -- writing commands ----------------------------------------------------------------------------
def test_rm_and_compact(cli_copy, tmp_path, capsys):
    before = Store.open(cli_copy).version
    out = _ok(capsys, ["rm", cli_copy, "b1", "a2"])
    assert out.startswith("removed b1, a2; version ")
    rows = json.loads(_ok(capsys, ["ls", cli_copy, "--json"]))
    assert [r["name"] for r in rows] == [t for t in ALL if t not in ("b1", "a2")]
    info = json.loads(_ok(capsys, ["info", cli_copy, "--json"]))
    assert info["reclaimable_bytes"] > 0
    result = json.loads(_ok(capsys, ["compact", cli_copy, "-q", "--json", "--device", "cpu"]))
    assert result["version"] == Store.open(cli_copy).version
    assert {r["kind"] for r in result["tasks"]} == {"shared"}
    info = json.loads(_ok(capsys, ["info", cli_copy, "--json"]))
    assert info["reclaimable_bytes"] == 0 and info["tasks"] == len(ALL) - 2
    assert "compact" in _ok(capsys, ["log", cli_copy]).splitlines()[1]
    # the removed task is still readable at the old version
    rows = json.loads(_ok(capsys, ["ls", cli_copy, "--at", before, "--json"]))
    assert "b1" in [r["name"] for r in rows]
    _ok(capsys, ["get", cli_copy, "b1", "--at", before, "-o", tmp_path / "b1.safetensors", "--device", "cpu"])


def test_ingest_list_file_missing(cli_copy, tmp_path, capsys):
    err = _fails(capsys, ["ingest", cli_copy, "--list", tmp_path / "nope.txt"], 4)
    assert "nope.txt" in err


def test_ingest_nothing(cli_copy, capsys):
    assert "nothing to ingest" in _fails(capsys, ["ingest", cli_copy], 4)


def test_ingest_malformed_item(cli_copy, capsys):
    assert "NAME=PATH" in _fails(capsys, ["ingest", cli_copy, "just-a-path.safetensors"], 4)
    assert "NAME=PATH" in _fails(capsys, ["ingest", cli_copy, " = x.safetensors"], 4)


def test_list_lines_may_have_spaces_around_the_equals_sign(tmp_path):
    for folder in ("code", "local"):  # they must exist: a missing org/name path would be looked up as a hub id
        (tmp_path / "ckpts" / folder).mkdir(parents=True)
    (tmp_path / "ckpts" / "math.safetensors").touch()
    lines = ["math = ckpts/math.safetensors", "\tcode=  ckpts/code/  ", "  # a comment", "", "local = ckpts/local"]
    (tmp_path / "tasks.txt").write_text("\n".join(lines))
    items = parse_items(["cli = x.safetensors "], tmp_path / "tasks.txt")
    assert items == {
        "cli": Path("x.safetensors"),
        "math": tmp_path / "ckpts" / "math.safetensors",  # relative to the list file
        "code": tmp_path / "ckpts" / "code",
        "local": tmp_path / "ckpts" / "local",  # shaped like a hub id, but there beside the list
    }


# -- error exit codes ----------------------------------------------------------------------------
def test_exit_codes_table():
    assert EXIT_CODES[NotFoundError] == 3
    assert EXIT_CODES[InvalidInputError] == 4
    assert EXIT_CODES[AlreadyExistsError] == 5
    assert EXIT_CODES[StoreLockedError] == 8


@pytest.mark.parametrize("command", [["ls"], ["info"], ["log"], ["get", "a0", "-o", "x.safetensors"],
                                     ["compose", "a0", "-o", "x.safetensors"], ["rm", "a0"], ["compact"],
                                     ["ingest", "a=b.safetensors"]])
def test_missing_store_exits_3(command, tmp_path, capsys):
    argv = [command[0], tmp_path / "nowhere", *command[1:]]
    assert "no tvbase store" in _fails(capsys, argv, 3)
    assert not (tmp_path / "nowhere").exists()


def test_unknown_task_exits_3(cli_store, tmp_path, capsys):
    err = _fails(capsys, ["compose", cli_store["path"], "0.5*a0 + a_shardd", "-o", tmp_path / "x.safetensors"], 3)
    assert "unknown task 'a_shardd'" in err and "Did you mean 'a_sharded'?" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert "no task 'nope'" in _fails(capsys, ["get", cli_store["path"], "nope", "-o", tmp_path / "y.safetensors"], 3)
    _fails(capsys, ["rm", cli_store["path"], "nope"], 3)


@pytest.mark.parametrize("expression", ["0.5*a0 +", "a0 ** 2", "2a0", "", "a0 + (b0)", "__import__('os')"])
def test_bad_expression_exits_4(expression, cli_store, tmp_path, capsys):
    err = _fails(capsys, ["compose", cli_store["path"], expression, "-o", tmp_path / "x.safetensors"], 4)
    assert "expression" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_duplicate_exits_5(cli_copy, zoo, snapshot_state, capsys):
    before = snapshot_state(cli_copy)
    err = _fails(capsys, ["ingest", cli_copy, f"a0={zoo.tasks['a0']}", "-q"], 5)
    assert "'a0' already exists" in err
    assert snapshot_state(cli_copy) == before


def test_name_given_twice_exits_5(cli_copy, zoo, snapshot_state, capsys, tmp_path):
    """Twice in one command is malformed input (4), unlike a name already in the store (5)."""
    before = snapshot_state(cli_copy)
    (tmp_path / "l.txt").write_text(f"z={zoo.tasks['a0']}\n")
    assert "given twice" in _fails(capsys, ["ingest", cli_copy, f"z={zoo.tasks['a1']}", "--list", tmp_path / "l.txt"], 5)
    assert snapshot_state(cli_copy) == before


def test_init_existing_store_exits_5(cli_copy, zoo, capsys):
    assert "already exists" in _fails(capsys, ["init", cli_copy, "--base", zoo.base], 5)


def test_locked_exits_8(cli_copy, zoo, snapshot_state, capsys):
    before = snapshot_state(cli_copy)
    with WriterLock(cli_copy / "writer.lock"):
        err = _fails(capsys, ["ingest", cli_copy, f"x={zoo.tasks['c_new']}", "-q", "--device", "cpu"], 8)
        assert re.search(rf"\b{os.getpid()}\b", err), err
        _fails(capsys, ["rm", cli_copy, "a0", "--wait", "0.2"], 8)
        _fails(capsys, ["compact", cli_copy, "-q", "--device", "cpu"], 8)
    assert snapshot_state(cli_copy) == before
    _ok(capsys, ["rm", cli_copy, "a0"])


def test_usage_errors_exit_2(cli_store, capsys):
    for argv in ([], ["ls"], ["get", str(cli_store["path"]), "a0"], ["get", str(cli_store["path"]), "a0", "-o", "x",
                                                                          "--dtype", "int8"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_init_validates_fit_flags(zoo, tmp_path, capsys):
    _fails(capsys, ["init", tmp_path / "s", "--base", zoo.base, "--rank", "0"], 4)
    assert not (tmp_path / "s" / "repo").exists()


def test_failed_get_leaves_no_output(cli_store, tmp_path, capsys):
    _fails(capsys, ["get", cli_store["path"], "nope", "-o", tmp_path / "outdir"], 3)
    assert not (tmp_path / "outdir").exists()


def test_unavailable_device_exits_4(cli_copy, zoo, capsys):
    _fails(capsys, ["ingest", cli_copy, f"x={zoo.tasks['c_new']}", "-q", "--device", "meta"], 4)


def test_ingested_name_can_be_composed(cli_copy, zoo, tmp_path, capsys):
    code = main(["ingest", str(cli_copy), f"7b={zoo.tasks['c_new']}", "-q", "--device", "cpu"])
    capsys.readouterr()
    if code == 4:
        return  # refused at ingest: consistent with the parser
    assert code == 0
    _ok(capsys, ["compose", cli_copy, "0.5*7b", "-o", tmp_path / "x.safetensors", "--device", "cpu"])


# -- real processes ------------------------------------------------------------------------------
def test_subprocess_exit_codes_and_no_traceback(cli_store, tmp_path):
    script = Path(sys.executable).with_name("tvbase")
    console = [str(script)] if script.exists() else [sys.executable, "-m", "tvbase.cli"]
    module = [sys.executable, "-m", "tvbase.cli"]
    store = str(cli_store["path"])
    runs = {
        "missing": (module + ["ls", str(tmp_path / "nowhere")], 3),
        "bad_expression": (console + ["compose", store, "0.5*a0 +", "-o", str(tmp_path / "x.safetensors")], 4),
    }
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {k: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 cwd=tmp_path) for k, (argv, _) in runs.items()}
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[key] = (proc.returncode, out, err)
    for key, (code, out, err) in results.items():
        assert code == runs[key][1], (key, code, err)
        assert "Traceback" not in err, key
    for key, (code, out, err) in results.items():
        assert err.startswith("tvbase: error: "), (key, err)
        assert err.count("\n") <= 4 and out == "", key  # one message (plus the expression and caret)


def test_the_tvbase_command_freezes_the_collector_before_the_interpreter_exits(tmp_path):
    """``console_main`` (the installed ``tvbase``) skips the last collection at exit, after one
    collection where the command failed; ``main``, which tests and benchmarks call in
    long-lived processes, does not freeze anything."""
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="console_scripts", name="tvbase")] == ["tvbase.cli:console_main"]
    script = (
        "import gc, sys\n"
        "collected = []\n"
        "collect = gc.collect\n"
        "gc.collect = lambda *a: collected.append(a) or collect(*a)\n"
        "from tvbase.cli import console_main, main\n"
        f"code = main(['ls', {str(tmp_path / 'none.tvb')!r}])\n"
        "print(code, gc.get_freeze_count())\n"
        f"sys.argv = ['tvbase', 'ls', {str(tmp_path / 'none.tvb')!r}]\n"
        "code = console_main()\n"
        "print(code, gc.get_freeze_count() > 0, len(collected))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    first, second = done.stdout.split("\n")[:2]
    assert first == f"{EXIT_CODES[NotFoundError]} 0", done.stderr
    # a failed command collects its cycles first (its stores among them), then freezes
    assert second == f"{EXIT_CODES[NotFoundError]} True 1", done.stderr
    assert "tvbase: error:" in done.stderr
