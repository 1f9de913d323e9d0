"""PEFT LoRA adapters as tasks: stored from their factors, rebuilt as peft merges them.

Adapters are trained-looking (random, nonzero B) on tiny transformers models built from a
config; peft's own ``merge_and_unload`` is the reference for what each adapter's update is.
"""

import json
import shutil

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tvbase.cli import main
from tvbase.errors import BaseMismatchError, InvalidInputError
from tvbase.io.lora import LoraAdapter
from tvbase.methods import FitParams
from tvbase.store import Store

BERT = dict(vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=3)


def _bert(folder, seed=0):
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT))
    model.save_pretrained(folder)
    return model


def _adapter(model, folder, seed, **options):
    """A LoRA adapter of ``model`` with random B (as if trained) saved to ``folder``; returns the
    update it makes, as peft merges it: {tensor name: merged - base}."""
    torch.manual_seed(seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"], **options})
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if p.requires_grad:  # lora factors, trained biases and modules_to_save
                p.add_(0.05 * torch.randn_like(p))
    wrapped.save_pretrained(folder)
    merged = wrapped.merge_and_unload().state_dict()
    return {k: merged[k] - before[k] for k in before if k in merged}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = _bert(root / "base")
    updates = {
        "plain": _adapter(_bert(root / "tmp0"), root / "plain", 1),
        "patterns": _adapter(_bert(root / "tmp1"), root / "patterns", 2, rank_pattern={"value": 2}, alpha_pattern={"query": 16},
                             use_rslora=True, target_modules=["query", "value", "word_embeddings"],
                             modules_to_save=["classifier"], bias="lora_only"),
    }
    shutil.rmtree(root / "tmp0"), shutil.rmtree(root / "tmp1")
    # a full fine-tune of the same base
    full = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in load_file(root / "base" / "model.safetensors").items()}
    save_file(full, root / "full.safetensors")
    return {"root": root, "model": model, "updates": updates, "base": root / "base" / "model.safetensors",
            "full": root / "full.safetensors"}


def _rel_error(store, task, update):
    err = total = 0.0
    for name, delta in store.iter_composition({task: 1.0}):
        true = update.get(name, torch.zeros_like(delta)).float()
        err += float((delta - true).square().sum())
        total += float(true.square().sum())
    return (err / total) ** 0.5


@pytest.mark.parametrize("task", ["plain", "patterns"])
def test_lora_rebuild_equals_peft_merge(bert, tmp_path, task):
    store = Store.create(tmp_path / "s", bert["base"], params=FitParams(lora_bits=32))
    store.ingest({task: bert["root"] / task}, progress=False)
    (row,) = store.ls()
    assert row["kind"] == "lora"
    assert _rel_error(store, task, bert["updates"][task]) < 1e-5  # fp32 factors: exact


def test_lora_error_at_int8_is_recorded_exactly(bert, tmp_path):
    store = Store.create(tmp_path / "s", bert["base"])  # lora_bits default: 8
    store.ingest({"patterns": bert["root"] / "patterns"}, progress=False)
    measured = _rel_error(store, "patterns", bert["updates"]["patterns"])
    assert 0 < measured < 0.03
    assert store.ls()[0]["rel_error"] == pytest.approx(measured, rel=1e-3)


def test_lora_ingest_never_densifies(bert, tmp_path, monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"ingest densified {name}")

    monkeypatch.setattr(LoraAdapter, "tensor", refuse)
    store = Store.create(tmp_path / "s", bert["base"])
    store.ingest({"plain": bert["root"] / "plain"}, progress=False)
    assert store.tasks == ["plain"]


# the tiny BERT is mostly biases and norms: a full fine-tune needs more than the default 3%
FULL_FIT = FitParams(budget=0.5)


def test_lora_and_full_fine_tunes_compose_and_survive_compact(bert, tmp_path):
    store = Store.create(tmp_path / "s", bert["base"], params=FULL_FIT)
    store.ingest({"full": bert["full"], "plain": bert["root"] / "plain", "patterns": bert["root"] / "patterns"}, progress=False)
    assert [r["kind"] for r in store.ls()] == ["shared", "lora", "lora"]
    coefficients = {"full": 0.5, "plain": 1.0, "patterns": -0.7}
    before = dict(store.iter_composition(coefficients))
    parts = {t: dict(store.iter_composition({t: 1.0})) for t in coefficients}
    for name, delta in before.items():
        expected = sum(c * parts[t][name] for t, c in coefficients.items())
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
    lora_bytes = {r["name"]: r["stored_bytes"] for r in store.ls() if r["kind"] == "lora"}

    store.compact(progress=False)
    rows = {r["name"]: r for r in store.ls()}
    assert [rows[t]["kind"] for t in ("full", "plain", "patterns")] == ["shared", "lora", "lora"]
    assert {t: rows[t]["stored_bytes"] for t in lora_bytes} == lora_bytes  # kept as they were stored
    for t in ("plain", "patterns"):
        for name, delta in store.iter_composition({t: 1.0}):
            torch.testing.assert_close(delta, parts[t][name], rtol=0, atol=0)


def test_lora_only_store_then_full_fine_tunes_get_the_shared_fit(bert, tmp_path):
    """LoRA adapters are not fitted, so the first full fine-tunes still start the shared fit."""
    store = Store.create(tmp_path / "s", bert["base"], params=FULL_FIT)
    store.ingest({"plain": bert["root"] / "plain"}, progress=False)
    store.ingest({"full": bert["full"]}, progress=False)
    assert {r["name"]: r["kind"] for r in store.ls()} == {"plain": "lora", "full": "shared"}


def test_fan_in_fan_out_adapter_of_gpt2(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    update = _adapter(model, tmp_path / "adapter", 3, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    store = Store.create(tmp_path / "s", tmp_path / "base", params=FitParams(lora_bits=32))
    store.ingest({"g": tmp_path / "adapter"}, progress=False)
    assert _rel_error(store, "g", update) < 1e-5


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(("changes", "named"), [
    ({"use_dora": True}, "use_dora"),
    ({"peft_type": "IA3"}, "'IA3'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"r": 0}, "positive r"),
])
def test_adapters_whose_update_is_not_scaling_b_a_are_refused(bert, tmp_path, changes, named):
    adapter = tmp_path / "adapter"
    shutil.copytree(bert["root"] / "plain", adapter)
    _edit_config(adapter, **changes)
    store = Store.create(tmp_path / "s", bert["base"])
    version = store.version
    with pytest.raises(InvalidInputError, match=named):
        store.ingest({"x": adapter}, progress=False)
    assert store.tasks == [] and Store.open(tmp_path / "s").version == version


def test_adapter_of_another_model_is_refused(bert, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(bert["root"] / "plain", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    weights = {k.replace("encoder.layer.1.", "encoder.layer.7."): v for k, v in weights.items()}
    save_file(weights, adapter / "adapter_model.safetensors")
    store = Store.create(tmp_path / "s", bert["base"])
    with pytest.raises(BaseMismatchError, match=r"encoder\.layer\.7\..*not a tensor of the store's base"):
        store.ingest({"x": adapter}, progress=False)


def test_adapter_with_only_pickle_weights_is_refused(bert, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(bert["root"] / "plain" / "adapter_config.json", adapter)
    (adapter / "adapter_model.bin").write_bytes(b"not unpickled")
    store = Store.create(tmp_path / "s", bert["base"])
    with pytest.raises(InvalidInputError, match="adapter_model.bin, a pickle file"):
        store.ingest({"x": adapter}, progress=False)


def test_cli_ingests_an_adapter_directory(bert, tmp_path, capsys):
    assert main(["init", str(tmp_path / "s"), "--base", str(bert["base"])]) == 0
    assert main(["ingest", "-q", str(tmp_path / "s"), f"plain={bert['root'] / 'plain'}", "--lora-bits", "fp16"]) == 0
    assert "lora" in capsys.readouterr().out
    store = Store.open(tmp_path / "s")
    assert store.meta["tasks"]["plain"]["params"]["lora_bits"] == 16
    assert _rel_error(store, "plain", bert["updates"]["plain"]) < 1e-3


# -- export-lora ---------------------------------------------------------------------------
def _merged_update(bert, adapter):
    """What peft's merge of ``adapter`` onto the base changes: {name: merged - base}."""
    model = transformers.BertForSequenceClassification.from_pretrained(bert["root"] / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    return {k: merged[k] - before[k] for k in before}


def _distance(store, coefficients, update):
    err = total = 0.0
    for name, delta in store.iter_composition(coefficients):
        err += float((update[name] - delta).square().sum())
        total += float(delta.square().sum())
    return (err / total) ** 0.5


@pytest.fixture(scope="module")
def mixed_store(bert, tmp_path_factory):
    """A full fine-tune and two adapters in one store, base recorded as its transformers directory."""
    path = tmp_path_factory.mktemp("mixed") / "s"
    store = Store.create(path, bert["root"] / "base", params=FitParams(budget=0.5, lora_bits=32))
    store.ingest({"full": bert["full"], "plain": bert["root"] / "plain", "patterns": bert["root"] / "patterns"}, progress=False)
    return store


def test_export_lora_of_a_lora_task_is_exact_and_loads_in_peft(bert, mixed_store, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["export-lora", str(mixed_store.path), "patterns", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact"] and report["rel_error"] == 0
    assert _distance(mixed_store, {"patterns": 1.0}, _merged_update(bert, out)) < 1e-5


def test_export_lora_of_a_composition_reports_its_truncation_error(bert, mixed_store, tmp_path):
    from tvbase.export_lora import export_lora

    coefficients = {"full": 0.5, "plain": 1.0, "patterns": -0.7}
    report = export_lora(mixed_store, coefficients, tmp_path / "low", rank=3)
    assert not report["exact"] and 0 < report["rel_error"] < 1
    assert max(report["ranks"].values()) == 3
    assert "bert.embeddings.LayerNorm" in report["modules_to_save"]  # a full fine-tune moves norms too
    measured = _distance(mixed_store, coefficients, _merged_update(bert, tmp_path / "low"))
    assert measured == pytest.approx(report["rel_error"], rel=1e-3)
    high = export_lora(mixed_store, coefficients, tmp_path / "high", rank=64)
    assert high["exact"]
    assert _distance(mixed_store, coefficients, _merged_update(bert, tmp_path / "high")) < 1e-5


def test_export_lora_of_a_task_with_sparse_residuals_reports_what_it_leaves_out(bert, tmp_path, monkeypatch):
    """An adapter holds no random entries: the export leaves them out and measures that exactly."""
    from tvbase.export_lora import export_lora
    from tvbase.methods import tucker

    monkeypatch.setattr(tucker, "SPARSE_MIN_SIDE", 8)  # the tiny BERT's matrices are narrow
    store = Store.create(tmp_path / "s", bert["root"] / "base", params=FitParams(budget=0.3, sparse_share=0.5))
    store.ingest({"full": bert["full"]}, progress=False)
    assert "sparse" in store.meta["tasks"]["full"]
    report = export_lora(store, {"full": 1.0}, tmp_path / "adapter", rank=64)
    assert not report["exact"] and 0 < report["rel_error"] < 1
    measured = _distance(store, {"full": 1.0}, _merged_update(bert, tmp_path / "adapter"))
    assert measured == pytest.approx(report["rel_error"], rel=1e-3)


def test_export_lora_refusals_leave_no_output(bert, mixed_store, tmp_path):
    from tvbase.export_lora import export_lora

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        export_lora(mixed_store, {"plain": 1.0}, taken)
    assert [p.name for p in taken.iterdir()] == ["x"]
    bare = tmp_path / "bare" / "model.safetensors"  # a base file with no config.json beside it
    bare.parent.mkdir()
    shutil.copy(bert["base"], bare)
    store = Store.create(tmp_path / "s", bare)
    store.ingest({"plain": bert["root"] / "plain"}, progress=False)
    with pytest.raises(InvalidInputError, match="config.json, and .* has none"):
        export_lora(store, {"plain": 1.0}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_lora_from_a_recipe(bert, mixed_store, tmp_path, capsys):
    recipe = tmp_path / "adapter.yaml"
    recipe.write_text("kind: lora\ntasks:\n  full: 0.5\n  plain: 1.0\nrank: 3\noutput: out\n")
    assert main(["export-lora", str(mixed_store.path), "--recipe", str(recipe), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["exact"] and max(report["ranks"].values()) == 3
    assert (tmp_path / "out" / "adapter_config.json").is_file()  # relative to the recipe's folder


def test_conv_and_plain_module_adapters_equal_peft_merge(tmp_path):
    """LoRA on a Conv2d and a Linear of a plain torch module (no transformers): peft's merge."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.fc = torch.nn.Linear(8, 5)

    torch.manual_seed(0)
    model = Net()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors")
    update = _adapter(model, tmp_path / "adapter", 4, target_modules=["conv", "fc"], r=2)
    store = Store.create(tmp_path / "s", tmp_path / "base.safetensors", params=FitParams(lora_bits=32))
    store.ingest({"c": tmp_path / "adapter"}, progress=False)
    assert _rel_error(store, "c", update) < 1e-5
