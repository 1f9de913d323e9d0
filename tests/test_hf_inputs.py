"""What people have on disk from the Hugging Face ecosystem: mixed float precisions, integer and
boolean buffers, tied weights, hub-cache folders and hub ids. Every model here is a tiny
Llama-shaped one written to tmp_path; nothing is downloaded."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvbase.cli import main
from tvbase.errors import BaseMismatchError
from tvbase.io.checkpoint import Checkpoint, check_compatible
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
    assert main(["init", str(store), "--base", str(zoo.base), "--budget", "50%"]) == 0
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
