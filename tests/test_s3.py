"""Stores and checkpoints on S3, against a local moto server (the ``s3`` fixture of conftest).

The storage conformance suite runs there too (tests/test_conformance.py); this module covers
what is particular to object storage: checkpoints read through s3fs, the errors of a missing
bucket, refused credentials and an unreachable endpoint, writers told apart by commit
conflicts, and a server that goes away in the middle of a write.
"""

import contextlib
import io
import json
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from tvbase import operations
from tvbase.cli import main
from tvbase.errors import (
    InvalidInputError,
    NotFoundError,
    StorageError,
    StoreLockedError,
)
from tvbase.io.checkpoint import Checkpoint, task_vector
from tvbase.store import Store
from tvbase.testing.conformance import EXACT, EXACT_TOLERANCE
from tvbase.testing.metrics import relative_error


def _run(argv):
    """main(argv) with stdout/stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _fails(argv, code):
    """Run the CLI, expect exit ``code`` and one line on stderr, no traceback: that line."""
    got, _, err = _run(argv)
    assert got == code, err
    assert err.startswith("tvbase: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _upload(s3, path, key):
    """Copy a local file, or every file of a folder, to ``s3://BUCKET/KEY``; returns the URL."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        s3.client.upload_file(str(f), s3.bucket, key if path.is_file() else f"{key.rstrip('/')}/{f.name}")
    return s3.url(key)


@pytest.fixture
def s3_zoo(s3, zoo):
    """The zoo's base, three single-file tasks and the sharded one, uploaded: {name: URL}."""
    urls = {"base": _upload(s3, zoo.base, "zoo/base.safetensors")}
    for task in ("a0", "a1", "b0"):
        urls[task] = _upload(s3, zoo.tasks[task], f"zoo/{task}.safetensors")
    urls["a_sharded"] = _upload(s3, zoo.tasks["a_sharded"], "zoo/a_sharded/")
    return urls


# -- checkpoints from S3 -------------------------------------------------------------------------


def test_checkpoints_on_s3_read_as_the_same_files_do_locally(s3_zoo, zoo):
    """A single file and a sharded prefix: same fingerprint, same task vectors, tensor for tensor."""
    with Checkpoint.open(s3_zoo["base"]) as remote_base, Checkpoint.open(zoo.base) as local_base:
        assert remote_base.fingerprint() == local_base.fingerprint()
        for task in ("a0", "a_sharded"):
            with Checkpoint.open(s3_zoo[task]) as remote, Checkpoint.open(zoo.tasks[task]) as local:
                assert remote.fingerprint() == local.fingerprint()
                if task == "a_sharded":
                    assert len(remote.files) >= 2 and all(f.startswith(s3_zoo[task]) for f in remote.files)
                for name in local_base.names:
                    assert torch.equal(task_vector(remote_base, remote, name, task), task_vector(local_base, local, name, task))


def test_tensors_are_read_with_ranged_reads_of_their_own_bytes(s3_zoo, zoo, monkeypatch):
    """Reading one tensor fetches its byte range only, never the whole object."""
    import s3fs

    ranges = []
    real = s3fs.core.S3File._fetch_range

    def recording(self, start, end):
        ranges.append((start, end))
        return real(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", recording)
    with Checkpoint.open(s3_zoo["a0"]) as checkpoint:
        entry = checkpoint._entry("l1.weight")
        ranges.clear()
        checkpoint.get("l1.weight")
    size = Path(zoo.tasks["a0"]).stat().st_size
    assert ranges and all(entry.begin <= start and end <= entry.end for start, end in ranges), (ranges, entry)
    assert sum(end - start for start, end in ranges) == entry.end - entry.begin < size


def test_a_store_built_from_s3_checkpoints_matches_one_built_from_local_files(s3_zoo, zoo, tmp_path):
    """init --base s3://..., ingest NAME=s3://... (a file and a sharded prefix), then compact
    re-reads each task from its recorded URL: the same task vectors as from the local files.
    (The stores are local: this is about the checkpoints.)"""
    tasks = ["a0", "a_sharded"]
    exact = ["--rank", "64", "--bits", "fp32", "--dense-bits", "fp32", "--clusters", "1"]
    assert _run(["init", tmp_path / "remote", "--base", s3_zoo["base"], *exact])[0] == 0
    code, _, err = _run(["ingest", tmp_path / "remote", *[f"{t}={s3_zoo[t]}" for t in tasks], "-q", "--device", "cpu"])
    assert code == 0, err
    assert _run(["init", tmp_path / "local", "--base", zoo.base, *exact])[0] == 0
    code, _, err = _run(["ingest", tmp_path / "local", *[f"{t}={zoo.tasks[t]}" for t in tasks], "-q", "--device", "cpu"])
    assert code == 0, err
    remote, local = Store.open(tmp_path / "remote"), Store.open(tmp_path / "local")
    assert remote.meta["base"]["path"] == s3_zoo["base"]
    assert {t: remote.meta["tasks"][t]["source"]["path"] for t in tasks} == {t: s3_zoo[t] for t in tasks}
    for task in tasks:
        assert relative_error(remote.get(task, device="cpu"), local.get(task, device="cpu")) < EXACT_TOLERANCE
        assert relative_error(remote.get(task, device="cpu"), zoo.task_vectors[task]) < EXACT_TOLERANCE
    remote.compact(device="cpu", progress=False)
    assert {remote.meta["tasks"][t]["refit_from"] for t in tasks} == {"original"}
    # apply against the base on S3: the merged weights alone, into a new local directory
    code, _, err = _run(["apply", tmp_path / "remote", "a0", "-o", tmp_path / "merged", "--device", "cpu"])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["model.safetensors"]


def test_bad_checkpoints_on_s3_are_refused_as_local_ones_are(s3, s3_zoo, zoo, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(zoo.tasks["a0"]).read_bytes()[:100])
    s3.client.put_object(Bucket=s3.bucket, Key="pickle/model.bin", Body=b"pickle")
    s3.client.put_object(Bucket=s3.bucket, Key="adapter/adapter_config.json", Body=b"{}")
    with pytest.raises(InvalidInputError, match="is truncated: its header needs") as remote:
        Checkpoint.open(_upload(s3, truncated, "bad/truncated.safetensors"))
    with pytest.raises(InvalidInputError) as local:
        Checkpoint.open(truncated)
    assert str(remote.value).replace(s3.url("bad/truncated.safetensors"), "F") == str(local.value).replace(str(truncated), "F")
    with pytest.raises(InvalidInputError, match="pickle checkpoints are refused"):
        Checkpoint.open(s3.url("pickle/model.bin"))
    with pytest.raises(InvalidInputError, match="holds only pickle weight files"):
        Checkpoint.open(s3.url("pickle/"))
    with pytest.raises(InvalidInputError, match="LoRA adapter"):
        Checkpoint.open(s3.url("adapter/"))
    with pytest.raises(NotFoundError, match="does not exist"):
        Checkpoint.open(s3.url("zoo/missing.safetensors"))


# -- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def s3_store(s3, zoo):
    """A store on the test bucket with two tasks: its URL."""
    store = Store.create(s3.url("store"), zoo.base, params=EXACT)
    store.ingest({t: zoo.tasks[t] for t in ("a0", "b0")}, device="cpu", progress=False)
    return s3.url("store")


@pytest.fixture
def refusing_server(s3):
    """The moto server checking every request's credentials (moto's reset-auth API; none are
    known to it, so every signed request is refused); unchecked again after the test."""

    def reset_auth(count):
        request = urllib.request.Request(f"{s3.endpoint}/moto-api/reset-auth", data=count, method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request).read()

    reset_auth(b"0")
    try:
        yield
    finally:
        reset_auth(b"inf")


def test_bad_credentials_are_one_line_and_exit_9(s3_store, s3, zoo, tmp_path, refusing_server):
    err = _fails(["ls", s3_store], 9)
    assert "refused access" in err and "InvalidAccessKeyId" in err and "AWS_ACCESS_KEY_ID" in err
    assert "refused access" in _fails(["init", s3.url("other"), "--base", zoo.base], 9)
    local = Store.create(tmp_path / "local", zoo.base, params=EXACT)  # a checkpoint on S3 is refused the same way
    assert "refused access" in _fails(["ingest", local.path, f"x={s3.url('zoo/a0.safetensors')}", "-q"], 9)
    assert Store.open(local.path).version == local.version


def test_a_missing_bucket_is_not_found(s3, zoo, tmp_path):
    err = _fails(["ls", "s3://no-such-bucket-here/store"], 3)
    assert "bucket 'no-such-bucket-here' does not exist" in err
    _fails(["init", "s3://no-such-bucket-here/store", "--base", zoo.base], 3)
    err = _fails(["init", tmp_path / "store", "--base", "s3://no-such-bucket-here/base.safetensors"], 3)
    assert "bucket 'no-such-bucket-here' does not exist" in err
    assert not (tmp_path / "store").exists()  # refused before anything was made


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_endpoint_is_one_line_and_exit_9(s3, zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    err = _fails(["ls", s3.url("store")], 9)
    assert "cannot reach http://127.0.0.1:" in err and "AWS_ENDPOINT_URL" in err
    _fails(["init", s3.url("store"), "--base", zoo.base], 9)
    _fails(["init", tmp_path / "store", "--base", s3.url("zoo/base.safetensors")], 9)
    assert not (tmp_path / "store").exists()


def test_bad_locations_and_variables_are_refused_before_any_request(s3, zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _fails(["init", "gs://bucket/store", "--base", zoo.base], 4)
    assert "is not supported" in err and "s3://BUCKET/PREFIX" in err
    assert list(tmp_path.iterdir()) == []  # never taken for a folder named gs:
    assert "does not name a valid S3 bucket" in _fails(["ls", "s3://Bad_Bucket/store"], 4)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "false")
    assert "set AWS_ALLOW_HTTP=true" in _fails(["ls", s3.url("store")], 4)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "maybe")
    assert "AWS_ALLOW_HTTP='maybe' is not a boolean" in _fails(["ls", s3.url("store")], 4)


def test_anonymous_access_reads_a_public_store(s3_store, s3, monkeypatch):
    """AWS_NO_SIGN_REQUEST=true sends unsigned requests, which a bucket readable by anyone serves."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "true")
    public = {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
              "Resource": [f"arn:aws:s3:::{s3.bucket}", f"arn:aws:s3:::{s3.bucket}/*"]}
    s3.client.put_bucket_policy(Bucket=s3.bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [public]}))
    store = Store.open(s3_store)
    assert store.tasks == ["a0", "b0"] and store.verify()["ok"]


def test_info_counts_the_objects_under_the_prefix(s3_store, s3):
    listed = sum(o["Size"] for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix="store/")
                 for o in page.get("Contents", []))
    info = Store.open(s3_store).info()
    assert info["disk_bytes"] == listed > info["factor_bytes"] > 0


# -- concurrent writers ---------------------------------------------------------------------------


def _race(monkeypatch, url, winner_task, zoo):
    """Make the next write_fit of an ingest let another writer ingest ``winner_task`` first (once)."""
    real, raced = operations.write_fit, []

    def write_fit(*args, **kwargs):
        if not raced:
            raced.append(None)  # before the winner's own write_fit comes here
            raced[0] = Store.open(url).ingest({winner_task: zoo.tasks[winner_task]}, device="cpu", progress=False)
        return real(*args, **kwargs)

    monkeypatch.setattr(operations, "write_fit", write_fit)
    return raced


def test_the_loser_of_a_race_is_refused_whole(s3_store, zoo, monkeypatch):
    raced = _race(monkeypatch, s3_store, "a1", zoo)
    loser = Store.open(s3_store)
    with pytest.raises(StoreLockedError, match="another writer committed"):
        loser.ingest({"a2": zoo.tasks["a2"]}, device="cpu", progress=False)
    head = Store.open(s3_store)
    assert head.version == raced[0] and head.tasks == ["a0", "a1", "b0"]  # the winner's work, nothing of the loser's
    assert head.log()[0]["message"] == "ingest a1" and head.verify()["ok"]


def test_with_wait_the_loser_runs_again_and_both_land(s3_store, zoo, monkeypatch):
    raced = _race(monkeypatch, s3_store, "a1", zoo)
    code, _, err = _run(["ingest", s3_store, f"a2={zoo.tasks['a2']}", "--wait", "30", "-q", "--device", "cpu"])
    assert code == 0, err
    head = Store.open(s3_store)
    assert head.tasks == ["a0", "a1", "a2", "b0"] and head.verify()["ok"]
    assert [e["message"] for e in head.log()][:2] == ["ingest a2", "ingest a1"] and head.log()[1]["id"] == raced[0]
    for task in ("a1", "a2"):
        assert relative_error(head.get(task, device="cpu"), zoo.task_vectors[task]) < EXACT_TOLERANCE


def test_two_writers_at_once_both_land_with_wait(s3_store, zoo):
    """Two threads ingest into one store at the same moment: whichever loses re-runs; nothing is lost."""
    start, errors = threading.Barrier(2), []

    def writer(task):
        try:
            store = Store.open(s3_store)
            start.wait()
            store.ingest({task: zoo.tasks[task]}, device="cpu", progress=False, wait=60)
        except Exception as e:  # noqa: BLE001 (reported below, with the other thread's outcome)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a1", "b1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    head = Store.open(s3_store)
    assert head.tasks == ["a0", "a1", "b0", "b1"] and head.verify()["ok"]
    assert sorted(e["message"] for e in head.log()[:2]) == ["ingest a1", "ingest b1"]


# -- a server that goes away ----------------------------------------------------------------------


class CuttableProxy:
    """A TCP forwarder on 127.0.0.1 to the S3 server, which the test can cut and restore.

    ``cut`` closes the listening socket and resets every open connection: what a client sees of a
    server that went away (requests fail, new connections are refused). ``restore`` listens again
    on the same port, with the server's state as it was: a server that came back.
    """

    def __init__(self, endpoint):
        target = urlparse(endpoint)
        self._target, self.port = (target.hostname, target.port), 0
        self._connections, self._lock = set(), threading.Lock()
        self.restore()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def restore(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)  # accept() wakes up to notice a cut
        self.port, self._listener, self._open = listener.getsockname()[1], listener, threading.Event()
        self._open.set()
        threading.Thread(target=self._accept, args=(listener, self._open), daemon=True).start()

    def cut(self):
        self._open.clear()
        self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for sock in connections:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close sends a reset
            sock.close()

    def _accept(self, listener, is_open):
        while is_open.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._connections |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_a_server_gone_mid_ingest_leaves_the_store_at_its_last_commit(s3, zoo, monkeypatch):
    """The server goes away after the ingest wrote its payload chunks and before its commit.

    moto keeps its state in memory, so killing it would lose the store and say nothing about
    recovery; stopping it (SIGSTOP) would leave each request waiting out the client's 60 s
    stream timeout. So the client talks to it through a proxy that is cut (connections reset,
    new ones refused) and then restored, the server's state intact: the server went away and
    came back. The failed ingest is a StorageError, and after the return the store opens at
    its last committed version, verifies, and takes the same ingest again. (The slowest test of
    this module: Icechunk retries the failed commit, with backoff, before it gives up.)
    """
    proxy = CuttableProxy(s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    url = s3.url("store")
    store = Store.create(url, zoo.base, params=EXACT)
    store.ingest({t: zoo.tasks[t] for t in ("a0", "a1", "b0")}, device="cpu", progress=False)
    committed = store.version

    real = operations.write_fit

    def write_then_cut(*args, **kwargs):
        real(*args, **kwargs)  # the new payload and offset table go to the server...
        proxy.cut()  # ...which then goes away, before the commit

    monkeypatch.setattr(operations, "write_fit", write_then_cut)
    with pytest.raises(StorageError, match="cannot reach"):  # after Icechunk's own retries (tens of seconds)
        store.ingest({"b1": zoo.tasks["b1"]}, device="cpu", progress=False)
    proxy.restore()
    monkeypatch.setattr(operations, "write_fit", real)

    reopened = Store.open(url)
    assert reopened.version == committed and reopened.tasks == ["a0", "a1", "b0"]
    assert [e["metadata"]["op"] for e in reopened.log()] == ["ingest", "init"]
    assert reopened.verify()["ok"]
    reopened.ingest({"b1": zoo.tasks["b1"]}, device="cpu", progress=False)
    assert relative_error(Store.open(url).get("b1", device="cpu"), zoo.task_vectors["b1"]) < EXACT_TOLERANCE
