"""Fine-tunes that added tokens: embeddings with more rows than the base's.

The rows the base has are a task vector as usual; the new rows are stored whole (int8, a scale
per row). A rebuild has the rows of the longest task of the composition, the rows a task lacks
counting as zero, and ``apply`` writes a model with the grown vocabulary that transformers loads.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tvbase.errors import InvalidInputError
from tvbase.export import apply_composition
from tvbase.export_lora import export_lora
from tvbase.methods import FitParams
from tvbase.store import Store

VOCAB, ADDED = 100, 8
CONFIG = dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32)
EMBEDDING = "transformer.wte.weight"


def _fine_tune(base_dir, folder, seed, added=0):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel.from_pretrained(base_dir)
    if added:
        model.resize_token_embeddings(VOCAB + added)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)).save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    grown = _fine_tune(root / "base", root / "grown", 1, added=ADDED)
    plain = _fine_tune(root / "base", root / "plain", 2)
    assert grown[EMBEDDING].shape == (VOCAB + ADDED, 16) and plain[EMBEDDING].shape == (VOCAB, 16)
    store = Store.create(root / "s", root / "base", params=FitParams(budget=0.5))
    store.ingest({"grown": root / "grown", "plain": root / "plain"}, progress=False)
    return {"root": root, "base": base, "grown": grown, "plain": plain, "store": store}


def _close(a, b, tol):
    return float((a - b).norm() / b.norm()) < tol


def test_new_rows_are_stored_whole_and_the_rest_as_a_task_vector(zoo):
    delta = zoo["store"].get("grown", device="cpu")[EMBEDDING]
    assert delta.shape == (VOCAB + ADDED, 16)
    assert _close(delta[VOCAB:], zoo["grown"][EMBEDDING][VOCAB:], 0.02)  # int8 rows: about 1%
    assert _close(delta[:VOCAB], zoo["grown"][EMBEDDING][:VOCAB] - zoo["base"][EMBEDDING], 0.9)  # a fitted delta
    assert zoo["store"].get("plain", device="cpu")[EMBEDDING].shape == (VOCAB, 16)


def test_a_composition_has_the_longest_tasks_rows_and_counts_missing_rows_as_zero(zoo):
    store = zoo["store"]
    grown, plain = store.get("grown", device="cpu")[EMBEDDING], store.get("plain", device="cpu")[EMBEDDING]
    mixed = store.compose({"grown": 0.5, "plain": 1.0}, device="cpu")[EMBEDDING]
    assert mixed.shape == (VOCAB + ADDED, 16)
    torch.testing.assert_close(mixed[:VOCAB], 0.5 * grown[:VOCAB] + plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[VOCAB:], 0.5 * grown[VOCAB:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("request_", [{"plain": 1.0}, {"grown": 1.0}, {"grown": 0.5, "plain": -1.0}])
def test_the_composition_plan_is_what_the_composition_yields(zoo, request_):
    store = zoo["store"]
    plan = store.composition_plan(request_, torch.bfloat16)
    yielded = [(n, tuple(t.shape), t.dtype) for n, t in store.iter_composition(request_, device="cpu", dtype=torch.bfloat16)]
    assert plan == yielded
    rows = dict((n, shape) for n, shape, _ in plan)[EMBEDDING][0]
    assert rows == (VOCAB + ADDED if "grown" in request_ else VOCAB)


def test_apply_writes_a_model_with_the_grown_vocabulary(zoo, tmp_path):
    apply_composition(zoo["store"], {"grown": 1.0}, None, tmp_path / "merged", device="cpu")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == VOCAB + ADDED
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    weight = model.state_dict()[EMBEDDING]
    assert weight.shape == (VOCAB + ADDED, 16)
    assert _close(weight[VOCAB:], zoo["grown"][EMBEDDING][VOCAB:], 0.02)
    rebuilt = zoo["store"].get("grown", device="cpu")[EMBEDDING]
    torch.testing.assert_close(weight[:VOCAB], zoo["base"][EMBEDDING] + rebuilt[:VOCAB], rtol=1e-5, atol=1e-6)


def test_compact_keeps_the_new_rows_and_export_lora_refuses_them(zoo, tmp_path):
    store = Store.create(tmp_path / "s", zoo["root"] / "base", params=FitParams(budget=0.5))
    store.ingest({"grown": zoo["root"] / "grown", "plain": zoo["root"] / "plain"}, progress=False)
    before = store.get("grown", device="cpu")[EMBEDDING]
    store.compact(progress=False)
    after = store.get("grown", device="cpu")[EMBEDDING]
    torch.testing.assert_close(after[VOCAB:], before[VOCAB:], rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match="added rows .* a LoRA adapter cannot add rows"):
        export_lora(store, {"grown": 1.0}, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
