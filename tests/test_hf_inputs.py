"""What people have on disk from the Hugging Face ecosystem: mixed float precisions, integer and
boolean buffers, tied weights, hub-cache folders and hub ids. Every model here is a tiny
Llama-shaped one written to tmp_path; nothing is downloaded."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvbase.cli import main
from tvbase.errors import BaseMismatchError, InvalidInputError, NotFoundError
from tvbase.io.checkpoint import Checkpoint, check_compatible
from tvbase.io.hub import resolve_model_path
from tvbase.io.sources import FullCheckpoint
from tvbase.methods import FitParams
from tvbase.store import Store
from tvbase.testing.metrics import relative_error

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _llama(seed=0, dtype=torch.float32, tied=True):
    """A tiny Llama-shaped state dict: tied head (a copy of the embeddings), an int64 and a bool buffer."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        EMBED: torch.randn(16, 8, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=gen),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=gen),
        "model.norm.weight": torch.ones(8) + 0.1 * torch.randn(8, generator=gen),
    }
    tensors[HEAD] = tensors[EMBED].clone() if tied else torch.randn(16, 8, generator=gen)
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    tensors["model.position_ids"] = torch.arange(6, dtype=torch.int64)
    tensors["model.causal_mask"] = torch.ones(4, 4, dtype=torch.bool).tril()
    return tensors


def _finetune(base, seed=1, dtype=None, scale=0.05):
    """``base`` plus a small random delta on every float tensor, rank 2 on matrices (buffers
    kept), optionally cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    tuned = {}
    for name, t in base.items():
        if t.is_floating_point():
            if t.ndim == 2:  # (m, 2) @ (2, n)
                delta = torch.randn(t.shape[0], 2, generator=gen) @ torch.randn(2, t.shape[1], generator=gen)
            else:
                delta = torch.randn(t.shape, generator=gen)
            t = (t.float() + scale * delta).to(dtype or t.dtype)
        tuned[name] = t.clone()
    if HEAD in base and torch.equal(base[HEAD], base[EMBED]):
        tuned[HEAD] = tuned[EMBED].clone()  # a tied model stays tied
    return tuned


def _save(tensors, path):
    save_file(tensors, path)
    return path


def _source(base_path, tuned_path):
    base = Checkpoint.open(base_path)
    return base, FullCheckpoint(tuned_path, base, base.fingerprint()["tensors"], "task 'x'")


# --- mixed precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_dtype, tuned_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
     (torch.float32, torch.float64)],
)  # fmt: skip
def test_mixed_precision_task_vector_is_computed_in_fp32(tmp_path, base_dtype, tuned_dtype):
    base_tensors = _llama(dtype=base_dtype)
    tuned_tensors = _finetune(base_tensors, dtype=tuned_dtype)
    base, source = _source(_save(base_tensors, tmp_path / "b.safetensors"), _save(tuned_tensors, tmp_path / "t.safetensors"))
    for name, weight in base_tensors.items():
        delta = source.tensor(name)
        assert delta.dtype == torch.float32 and delta.shape == weight.shape
        if weight.is_floating_point():
            wide = torch.float64 if torch.float64 in (base_dtype, tuned_dtype) else torch.float32
            expected = (tuned_tensors[name].to(wide) - weight.to(wide)).float()
            assert torch.equal(delta, expected), name
            assert delta.abs().max() > 0
        else:
            assert not delta.any(), name
    source.close(), base.close()


def test_without_a_base_dtypes_must_match_exactly(tmp_path):
    # how a base opened again is checked: a bf16 copy of the base is not the base
    base = Checkpoint.open(_save(_llama(), tmp_path / "b.safetensors"))
    copy = Checkpoint.open(_save(_llama(dtype=torch.bfloat16), tmp_path / "c.safetensors"))
    with pytest.raises(BaseMismatchError, match="5 dtype mismatches"):
        check_compatible(base.fingerprint()["tensors"], copy, "base (c)")


def test_float_against_integer_is_still_a_dtype_mismatch(tmp_path):
    base_tensors = _llama()
    tuned = _finetune(base_tensors)
    tuned["model.norm.weight"] = tuned["model.norm.weight"].to(torch.int32)
    tuned["model.position_ids"] = tuned["model.position_ids"].to(torch.int32)
    with pytest.raises(BaseMismatchError, match="2 dtype mismatches: 'model.norm.weight' expected F32, found I32, "
                                                "'model.position_ids' expected I64, found I32"):
        _source(_save(base_tensors, tmp_path / "b.safetensors"), _save(tuned, tmp_path / "t.safetensors"))


def test_bf16_finetunes_of_an_fp32_base_through_the_cli(zoo, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["init", str(store), "--base", str(zoo.base), "--rank", "3"]) == 0
    items = [f"{task}={path}" for task, path in zoo.bf16_tasks.items()]
    assert main(["ingest", str(store), *items, "-q", "--device", "cpu"]) == 0, capsys.readouterr().err
    base = load_file(zoo.base)
    for task, path in zoo.bf16_tasks.items():
        tuned = load_file(path)
        expected = {name: tuned[name].float() - base[name].float() for name in base}
        assert relative_error(Store.open(store).get(task, device="cpu"), expected) < 0.2, task


# --- integer and boolean tensors -------------------------------------------------------------------


@pytest.mark.parametrize("name, change", [
    ("model.position_ids", lambda t: t.flip(0)),
    ("model.causal_mask", lambda t: ~t),
])  # fmt: skip
def test_a_changed_non_float_tensor_is_refused_by_name(tmp_path, name, change):
    base_tensors = _llama()
    tuned = _finetune(base_tensors)
    tuned[name] = change(tuned[name])
    dtype = "I64" if name == "model.position_ids" else "BOOL"
    with pytest.raises(BaseMismatchError, match=f"1 non-float tensor: '{name}' \\({dtype}\\) differs from the base's"):
        _source(_save(base_tensors, tmp_path / "b.safetensors"), _save(tuned, tmp_path / "t.safetensors"))


def test_non_float_tensors_keep_the_base_through_rebuild_and_apply(tmp_path, capsys):
    base_tensors = _llama(tied=False)
    base = _save(base_tensors, tmp_path / "base.safetensors")
    tasks = {f"t{i}": _save(_finetune(base_tensors, seed=i), tmp_path / f"t{i}.safetensors") for i in range(3)}
    store = Store.create(tmp_path / "store", base, params=FitParams(rank=4))
    store.ingest(tasks, device="cpu", progress=False)
    for buffer in ("model.position_ids", "model.causal_mask"):
        assert not store.get("t0", device="cpu")[buffer].any()
    out = tmp_path / "merged.safetensors"
    assert main(["apply", str(store.path), "t0 + 0.5*t1", "--base", str(base), "-o", str(out), "--device", "cpu"]) == 0
    merged = load_file(out)
    for buffer in ("model.position_ids", "model.causal_mask"):
        assert merged[buffer].dtype == base_tensors[buffer].dtype and torch.equal(merged[buffer], base_tensors[buffer])


# --- tied weights ------------------------------------------------------------------------------------


def test_a_finetune_saved_without_its_tied_head(tmp_path):
    base_tensors = _llama(tied=True)
    tuned = _finetune(base_tensors)
    del tuned[HEAD]  # how transformers saves a tied model
    base, source = _source(_save(base_tensors, tmp_path / "b.safetensors"), _save(tuned, tmp_path / "t.safetensors"))
    assert torch.equal(source.tensor(HEAD), tuned[EMBED] - base_tensors[EMBED])
    assert source.tensor(HEAD).abs().max() > 0
    source.close(), base.close()


def test_a_missing_untied_head_is_refused(tmp_path):
    base_tensors = _llama(tied=False)
    tuned = _finetune(base_tensors)
    del tuned[HEAD]
    with pytest.raises(BaseMismatchError, match=r"1 missing tensor: 'lm_head.weight'.*missing only when the base ties"):
        _source(_save(base_tensors, tmp_path / "b.safetensors"), _save(tuned, tmp_path / "t.safetensors"))


def test_a_tied_head_against_a_base_saved_without_it(tmp_path):
    base_tensors = _llama(tied=True)
    tuned = _finetune(base_tensors)
    del base_tensors[HEAD]  # the base was saved tied, the fine-tune with its head
    base, source = _source(_save(base_tensors, tmp_path / "b.safetensors"), _save(tuned, tmp_path / "t.safetensors"))
    assert torch.equal(source.tensor(EMBED), tuned[EMBED] - base_tensors[EMBED])
    source.close(), base.close()


def test_an_untied_head_against_a_base_saved_without_it_is_refused(tmp_path):
    base_tensors = _llama(tied=True)
    tuned = _finetune(base_tensors)
    tuned[HEAD] = tuned[HEAD] + 1.0  # the fine-tune untied its head: the base cannot hold that delta
    del base_tensors[HEAD]
    with pytest.raises(BaseMismatchError, match=r"1 extra tensor: 'lm_head.weight'.*extra only when the fine-tune ties"):
        _source(_save(base_tensors, tmp_path / "b.safetensors"), _save(tuned, tmp_path / "t.safetensors"))


def test_tied_head_through_a_store(tmp_path):
    base_tensors = _llama(tied=True)
    base = _save(base_tensors, tmp_path / "base.safetensors")
    tasks = {}
    for i in range(3):
        tuned = _finetune(base_tensors, seed=i)
        del tuned[HEAD]
        tasks[f"t{i}"] = _save(tuned, tmp_path / f"t{i}.safetensors")
    store = Store.create(tmp_path / "store", base, params=FitParams(rank=4))
    store.ingest(tasks, device="cpu", progress=False)
    tau = store.get("t0", device="cpu")
    moved = load_file(tasks["t0"])[EMBED] - base_tensors[EMBED]
    for name in (EMBED, HEAD):  # the head moved with the embeddings
        assert relative_error(tau[name], moved) < 0.3, name


# --- hub-cache folders and hub ids -------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(cache, repo_id, tensors, commit=COMMIT, refs=("main",), shards=1):
    """Lay out ``tensors`` as huggingface_hub caches a download: blobs named by hash, a snapshot
    folder of relative symlinks into them, and refs naming the commit. Returns the snapshot."""
    org, name = repo_id.split("/")
    entry = cache / f"models--{org}--{name}"
    snapshot = entry / "snapshots" / commit
    staging = cache.parent / f"staging-{org}-{name}-{commit[:6]}"
    names = sorted(tensors)
    _save_shards(tensors, staging, [names[i::shards] for i in range(shards)])
    (entry / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(staging.iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        file.rename(entry / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    staging.rmdir()
    (entry / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (entry / "refs" / ref).write_text(commit)
    return snapshot


def _save_shards(tensors, directory, shards):
    """One model.safetensors, or shards named as transformers names them with their index."""
    directory.mkdir(parents=True)
    if len(shards) == 1:
        save_file(tensors, directory / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: tensors[name] for name in names}, directory / filename)
        weight_map.update(dict.fromkeys(names, filename))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_a_sharded_cache_snapshot_opens(hub_cache):
    tensors = _llama()
    snapshot = _cache_model(hub_cache, "org/llama", tensors, shards=3)
    assert all((snapshot / f).is_symlink() for f in os.listdir(snapshot))  # index included
    with Checkpoint.open(snapshot) as checkpoint:
        assert checkpoint.names == sorted(tensors) and len(checkpoint.files) == 3
        assert all(torch.equal(checkpoint.get(n, dtype=None), t) for n, t in tensors.items())


@pytest.mark.parametrize("where", ["outside the cache", "another cache entry"])
def test_a_cache_snapshot_may_not_link_out_of_its_entry(hub_cache, tmp_path, where):
    snapshot = _cache_model(hub_cache, "org/llama", _llama(), shards=2)
    other = _cache_model(hub_cache, "org/other", _llama(seed=3))
    target = tmp_path / "elsewhere.safetensors" if where == "outside the cache" else (other / "model.safetensors").resolve()
    if where == "outside the cache":
        save_file(_llama(seed=3), target)
    shard = snapshot / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(target)
    with pytest.raises(InvalidInputError, match=r"shard .* outside the checkpoint directory .* and outside .*blobs"
                                                r".*only link into their own entry's blobs"):
        Checkpoint.open(snapshot)


def test_resolve_hub_ids_offline(hub_cache, tmp_path, monkeypatch):
    main_snapshot = _cache_model(hub_cache, "org/llama", _llama())
    tagged = _cache_model(hub_cache, "org/llama", _llama(seed=2), commit="f" * 40, refs=("v1",))
    assert resolve_model_path("org/llama") == main_snapshot
    assert resolve_model_path("org/llama@v1") == tagged
    assert resolve_model_path(f"org/llama@{'f' * 40}") == tagged  # a commit names its snapshot
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))  # HF_HOME/hub
    assert resolve_model_path("org/llama") == main_snapshot
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/huggingface/hub
    default = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    shutil.copytree(hub_cache, default, symlinks=True)
    assert resolve_model_path("org/llama") == default / main_snapshot.relative_to(hub_cache)


def test_a_local_path_wins_over_a_hub_id(hub_cache, tmp_path, monkeypatch):
    _cache_model(hub_cache, "org/llama", _llama())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "llama").mkdir(parents=True)
    assert resolve_model_path("org/llama") == Path("org/llama")


@pytest.mark.parametrize("spec, phrase", [
    ("org/absent", "there is no '{cache}/models--org--absent'"),
    ("org/llama@v9", "'{cache}/models--org--llama' holds no revision 'v9'"),
])  # fmt: skip
def test_a_hub_id_not_in_the_cache(hub_cache, spec, phrase):
    _cache_model(hub_cache, "org/llama", _llama())
    with pytest.raises(NotFoundError) as caught:
        resolve_model_path(spec)
    assert phrase.format(cache=hub_cache) in str(caught.value)
    assert "never downloads" in str(caught.value)


def test_hub_ids_through_the_cli(hub_cache, tmp_path, capsys):
    base_tensors = _llama()
    base = _cache_model(hub_cache, "meta/llama", base_tensors, shards=2)
    for i in range(3):
        tuned = _finetune(base_tensors, seed=i)
        del tuned[HEAD]  # saved tied, and as one file: a symlink to a blob without a suffix
        _cache_model(hub_cache, f"me/llama-t{i}", tuned)
    (tmp_path / "tasks.txt").write_text("t1 = me/llama-t1\n  t2=me/llama-t2@main  \n")
    store = str(tmp_path / "store")
    assert main(["init", store, "--base", "meta/llama", "--rank", "2"]) == 0
    assert main(["ingest", store, "t0=me/llama-t0", "--list", str(tmp_path / "tasks.txt"), "--base", "meta/llama",
                 "-q", "--device", "cpu"]) == 0, capsys.readouterr().err
    meta = Store.open(store).meta
    assert meta["base"]["path"] == str(base)
    assert meta["tasks"]["t0"]["source"]["path"] == str(hub_cache / "models--me--llama-t0" / "snapshots" / COMMIT)
    assert main(["compact", store, "-q", "--device", "cpu"]) == 0
    assert {t["refit_from"] for t in Store.open(store).meta["tasks"].values()} == {"original"}
    capsys.readouterr()
    assert main(["ingest", store, "t3=me/absent", "-q", "--device", "cpu"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("tvbase: error: 'me/absent' is neither a local file or folder") and err.count("\n") == 1
    (tmp_path / "more.txt").write_text("t3 = me/absent@v2\n")
    assert main(["ingest", store, "--list", str(tmp_path / "more.txt"), "-q", "--device", "cpu"]) == 3
    err = capsys.readouterr().err
    assert f"there is no {str(tmp_path / 'me' / 'absent@v2')!r}" in err  # looked for beside the list
    assert f"there is no {str(hub_cache / 'models--me--absent')!r}" in err  # and in the cache


def test_an_index_linking_out_of_a_plain_folder_is_refused(tmp_path):
    tensors = _llama()
    directory = tmp_path / "ckpt"
    _save_shards(tensors, tmp_path / "elsewhere", [sorted(tensors)[:3], sorted(tensors)[3:]])
    directory.mkdir()
    for shard in (tmp_path / "elsewhere").glob("*.safetensors"):  # the shards inside, the index outside
        shard.rename(directory / shard.name)
    (directory / "model.safetensors.index.json").symlink_to(tmp_path / "elsewhere" / "model.safetensors.index.json")
    with pytest.raises(InvalidInputError, match=r"index .* outside the checkpoint directory .*\(a link out of it"):
        Checkpoint.open(directory)


def test_equal_constant_tensors_are_not_taken_for_ties(tmp_path):
    base_tensors = _llama(tied=False)
    base_tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(8)
    base_tensors["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(8)  # equal to q's, but by coincidence
    tuned = _finetune(base_tensors)
    del tuned["model.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(BaseMismatchError, match="1 missing tensor: 'model.layers.0.self_attn.k_proj.bias'"):
        _source(_save(base_tensors, tmp_path / "b.safetensors"), _save(tuned, tmp_path / "t.safetensors"))


@pytest.mark.parametrize("case", ["differs in the last element", "zeros but the last element"])
def test_ties_are_decided_over_every_byte_of_a_large_tensor(tmp_path, case):
    # 200 x 256 float32 is 200 KiB: compared in chunks of 64, 128 and then 8 KiB
    base_tensors = _llama()
    embed = torch.randn(200, 256) if case == "differs in the last element" else torch.zeros(200, 256)
    head = embed.clone()
    if case == "differs in the last element":
        head[-1, -1] += 1.0
    else:
        embed[-1, -1] = head[-1, -1] = 1.0
    base_tensors.update({EMBED: embed, HEAD: head})
    tuned = _finetune(base_tensors)
    del tuned[HEAD]
    base_path, tuned_path = _save(base_tensors, tmp_path / "b.safetensors"), _save(tuned, tmp_path / "t.safetensors")
    if case == "differs in the last element":
        with pytest.raises(BaseMismatchError, match="1 missing tensor: 'lm_head.weight'"):
            _source(base_path, tuned_path)
    else:
        base, source = _source(base_path, tuned_path)
        assert torch.equal(source.tensor(HEAD), tuned[EMBED] - embed)
        source.close(), base.close()
