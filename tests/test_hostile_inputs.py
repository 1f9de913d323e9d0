"""Hostile and broken input through the command line: a clear message, a non-zero exit and the
store exactly as it was (same version, same bytes). Completes the catalogue in test_store.py
(bad tensors, NaN/Inf, truncation, pickles, bad names, budgets) with crafted headers, symlinks,
a wrong base, expressions and a store from a newer format."""

import json
import os
import struct

import pytest

import tvbase.format as store_module
from tvbase.cli import main


def _rewrite_header(src, dst, edit):
    """Copy safetensors ``src`` to ``dst`` with its JSON header changed by ``edit(header)``."""
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    raw = json.dumps(edit(header)).encode()
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return dst


def _first_tensor(header):
    return next(k for k in sorted(header) if k != "__metadata__")


def _overlapping(header):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]], header[names[1]]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
    return header


def _past_the_file(header):
    entry = header[_first_tensor(header)]
    entry["data_offsets"] = [entry["data_offsets"][0] + 10**6, entry["data_offsets"][1] + 10**6]
    return header


def _ingest_case(kind, zoo, tmp):
    """Arguments of an `ingest` that must be refused, and a phrase of the message."""
    source = zoo.tasks["a2"]
    if kind == "overlapping offsets":
        return [f"x={_rewrite_header(source, tmp / 'x.safetensors', _overlapping)}"], "overlap"
    if kind == "offsets past the file":
        return [f"x={_rewrite_header(source, tmp / 'x.safetensors', _past_the_file)}"], "past|beyond|truncated|outside"
    if kind == "oversized header":
        path = tmp / "x.safetensors"
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
        return [f"x={path}"], "header"
    if kind == "symlink outside the input directory":
        outside = tmp / "elsewhere.safetensors"
        outside.write_bytes(source.read_bytes())
        directory = tmp / "ckpt"
        directory.mkdir()
        os.symlink(outside, directory / "model.safetensors")
        return [f"x={directory}"], "outside|symlink"
    if kind == "name with a control character":
        return [f"a\tb={source}"], "not allowed"
    if kind == "name with a path separator":
        return [f"a\\b={source}"], "not allowed"
    if kind == "wrong base":
        return [f"x={source}", "--base", str(zoo.bf16_base)], "dtype|base"
    raise AssertionError(kind)


INGEST_CASES = [
    "overlapping offsets",
    "offsets past the file",
    "oversized header",
    "symlink outside the input directory",
    "name with a control character",
    "name with a path separator",
    "wrong base",
]


@pytest.mark.parametrize("kind", INGEST_CASES)
def test_hostile_ingest_is_refused(kind, populated_copy, zoo, tmp_path, snapshot_state, capsys):
    args, phrase = _ingest_case(kind, zoo, tmp_path)
    before = snapshot_state(populated_copy)
    code = main(["ingest", str(populated_copy), *args, "-q", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("tvbase: error:") and "Traceback" not in err
    assert any(p.lower() in err.lower() for p in phrase.split("|")), err
    assert snapshot_state(populated_copy) == before


EXPRESSIONS = {
    "dangling operator": ("a0 +", 4),
    "unknown task": ("a0 + nosuchtask", 3),
    "evaluated code": ("__import__('os').system('true')", 4),
    "oversized": (" + ".join(["a0"] * 3000), 4),
    "absurd coefficient": ("1e300*a0", 4),
}


@pytest.mark.parametrize("kind", sorted(EXPRESSIONS))
def test_hostile_expression_is_refused(kind, populated_copy, tmp_path, snapshot_state, capsys):
    expression, exit_code = EXPRESSIONS[kind]
    before = snapshot_state(populated_copy)
    out = tmp_path / "out.safetensors"
    assert main(["compose", str(populated_copy), expression, "-o", str(out)]) == exit_code
    assert capsys.readouterr().err.startswith("tvbase: error:")
    assert not out.exists()
    assert snapshot_state(populated_copy) == before


def test_store_from_a_newer_format_is_refused(populated_copy, snapshot_state, capsys, monkeypatch):
    before = snapshot_state(populated_copy)
    monkeypatch.setattr(store_module, "FORMAT_VERSION", 0)  # the store now looks newer than the code
    assert main(["ls", str(populated_copy)]) == 7
    assert "newer than this tvbase" in capsys.readouterr().err
    assert main(["rm", str(populated_copy), "a0"]) == 7
    monkeypatch.undo()
    assert snapshot_state(populated_copy) == before
