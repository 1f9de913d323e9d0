"""``apply`` on a Hugging Face transformers base: the output directory loads with from_pretrained.

A tiny Llama (vocabulary 100, hidden 16, 2 layers, bfloat16) is built from a config, with a
word-level tokenizer made in memory (nothing is downloaded), saved with save_pretrained, and
fully fine-tuned twice by perturbing its weights; a store holds the two fine-tunes.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tvbase.cli import main
from tvbase.errors import InvalidInputError, NotFoundError
from tvbase.export import apply_composition, model_files
from tvbase.methods import FitParams
from tvbase.store import Store

COEFFICIENTS = {"math": 0.7, "code": -0.4}
BF16_ULP = 2.0**-7  # relative spacing of bfloat16 values: one rounding step
WEIGHTS = {"model.safetensors", "pytorch_model.bin", "pytorch_model.bin.index.json"}  # in the base directory
# copied, whatever else the installed transformers writes beside them (special_tokens_map.json, ...)
REQUIRED = {"config.json", "generation_config.json", "notes.txt", "tokenizer.json", "tokenizer_config.json"}


def _tokenizer():
    words = [f"w{i}" for i in range(95)]
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


def _perturbed(state, seed):
    """A full fine-tune: every float tensor moved by a low-rank (matrices) or dense step."""
    generator = torch.Generator().manual_seed(seed)
    tuned = {}
    for name, tensor in state.items():
        if tensor.ndim == 2:
            left = torch.randn(tensor.shape[0], 2, generator=generator)
            right = torch.randn(2, tensor.shape[1], generator=generator)
            step = 0.05 * left @ right / 2
        else:
            step = 0.05 * torch.randn(tensor.shape, generator=generator)
        tuned[name] = (tensor.float() + step).to(tensor.dtype)
    return tuned


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """dict(base, store, root): a bf16 tiny Llama directory and a store of two fine-tunes of it."""
    root = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    base = root / "base"
    model.save_pretrained(base)
    _tokenizer().save_pretrained(base)
    (base / "notes.txt").write_text("a file the base ships\n")
    # not copied: the base's weights in other formats, subfolders, hidden files
    (base / "pytorch_model.bin").write_bytes(b"not really pickle")
    (base / "pytorch_model.bin.index.json").write_text("{}")
    (base / "onnx").mkdir()
    (base / "onnx" / "model.onnx").write_bytes(b"onnx")
    (base / ".gitattributes").write_text("*.bin filter=lfs\n")
    state = load_file(base / "model.safetensors")
    for seed, task in enumerate(("math", "code")):
        model.load_state_dict(_perturbed(state, seed + 1))
        model.save_pretrained(root / task)
    copied = sorted(p.name for p in base.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.name not in WEIGHTS)
    assert REQUIRED <= set(copied)
    store = Store.create(root / "store", base, params=FitParams(budget=0.5))
    store.ingest({task: root / task for task in ("math", "code")}, device="cpu", progress=False)
    return {"base": base, "store": root / "store", "root": root, "copied": copied}


def _expected(hf, coefficients, dtype=None):
    """base + composition as apply computes it, from the store's own composition."""
    base = load_file(hf["base"] / "model.safetensors")
    composed = Store.open(hf["store"]).compose(coefficients, device="cpu")
    return {name: (w.float() + composed[name]).to(dtype or w.dtype) for name, w in base.items()}, base


def _assert_close(actual, expected, base):
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        # within one rounding step of the output dtype; the composition itself moved the weights
        scale = tensor.float().abs() + 1e-3
        assert ((actual[name].float() - tensor.float()).abs() <= BF16_ULP * scale).all(), name
        assert not torch.equal(actual[name].float(), base[name].float()), name


def test_model_files_skip_weights_subfolders_and_hidden_files(hf):
    assert [p.name for p in model_files(hf["base"])] == hf["copied"]


def test_apply_writes_a_directory_from_pretrained_loads(hf, tmp_path):
    out = tmp_path / "merged"
    files = apply_composition(Store.open(hf["store"]), COEFFICIENTS, None, out, device="cpu")
    assert sorted(p.name for p in files) == sorted(["model.safetensors", *hf["copied"]])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files)
    for name in hf["copied"]:
        assert (out / name).read_bytes() == (hf["base"] / name).read_bytes(), name
    expected, base = _expected(hf, COEFFICIENTS)
    assert all(t.dtype == torch.bfloat16 for t in expected.values())  # the base's dtype is kept
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    _assert_close(model.state_dict(), expected, base)
    body = transformers.AutoModel.from_pretrained(out)  # the bare LlamaModel, without lm_head
    assert torch.equal(body.state_dict()["embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])
    # the tokenizer came along and reads text as the base's does
    ids = transformers.AutoTokenizer.from_pretrained(out)("w3 w7 w94")["input_ids"]
    assert ids == transformers.AutoTokenizer.from_pretrained(hf["base"])("w3 w7 w94")["input_ids"] == [7, 11, 98]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"  # what from_pretrained checks


def test_sharded_output_has_an_index_transformers_reads(hf, tmp_path):
    out = tmp_path / "sharded"
    files = apply_composition(Store.open(hf["store"]), COEFFICIENTS, hf["base"], out, device="cpu",
                              max_shard_bytes=4096, metadata={"tvbase_expression": "0.7*math - 0.4*code"})
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    expected, base = _expected(hf, COEFFICIENTS)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    assert index["metadata"]["tvbase_expression"] == "0.7*math - 0.4*code"
    with safe_open(shards[0], "pt") as f:
        assert f.metadata() == {"format": "pt", "tvbase_expression": "0.7*math - 0.4*code"}
    assert set(index["weight_map"]) == set(expected) and set(index["weight_map"].values()) == {p.name for p in shards}
    assert {p.name for p in files} == {p.name for p in shards} | {"model.safetensors.index.json", *hf["copied"]}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    _assert_close(model.state_dict(), expected, base)


def test_dtype_override_is_written_and_recorded_in_the_config(hf, tmp_path):
    out = tmp_path / "fp32"
    apply_composition(Store.open(hf["store"]), COEFFICIENTS, None, out, device="cpu", dtype=torch.float32)
    merged = load_file(out / "model.safetensors")
    expected, _ = _expected(hf, COEFFICIENTS, dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in merged.values())
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config[next(k for k in ("dtype", "torch_dtype") if k in config)] == "float32"
    base_config = json.loads((hf["base"] / "config.json").read_text())
    assert {k: v for k, v in config.items() if "dtype" not in k} == {k: v for k, v in base_config.items()
                                                                       if "dtype" not in k}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], expected["lm_head.weight"])


def test_single_file_output_is_weights_only(hf, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert apply_composition(Store.open(hf["store"]), {"math": 1.0}, None, out, device="cpu") == [out]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]
    expected, base = _expected(hf, {"math": 1.0})
    _assert_close(load_file(out), expected, base)


def test_outputs_that_would_mix_files_are_refused(hf, tmp_path):
    store = Store.open(hf["store"])
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="is not empty"):
        apply_composition(store, COEFFICIENTS, None, full, device="cpu")
    assert [p.name for p in full.iterdir()] == ["config.json"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidInputError, match="existing file"):
        apply_composition(store, COEFFICIENTS, None, tmp_path / "afile", device="cpu")
    assert (tmp_path / "afile").read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    apply_composition(store, COEFFICIENTS, None, empty, device="cpu")  # an empty directory is filled
    assert (empty / "model.safetensors").is_file() and (empty / "config.json").is_file()


def test_a_failed_write_leaves_nothing(hf, tmp_path, monkeypatch):
    import tvbase.export

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(tvbase.export, "_copy_model_files", fail)  # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        apply_composition(Store.open(hf["store"]), COEFFICIENTS, None, tmp_path / "new" / "out", device="cpu")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory, no made parent
    with pytest.raises(NotFoundError, match="nope"):
        apply_composition(Store.open(hf["store"]), {"nope": 1.0}, None, tmp_path / "out", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_recorded_base_that_moved_or_changed_is_refused(hf, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(hf["base"], base)
    store = Store.create(tmp_path / "store", base, params=FitParams(budget=0.5))
    store.ingest({"math": hf["root"] / "math"}, device="cpu", progress=False)
    moved = tmp_path / "moved"
    base.rename(moved)
    with pytest.raises(NotFoundError, match=r"not at .*base any more; pass its new location with --base"):
        apply_composition(store, {"math": 1.0}, None, tmp_path / "out", device="cpu")
    apply_composition(store, {"math": 1.0}, moved, tmp_path / "out", device="cpu")
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    moved.rename(base)  # back where it was, but with one value changed
    weights = load_file(base / "model.safetensors")
    weights["lm_head.weight"][0, 0] += 1
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidInputError, match=r"base recorded at init .* changed since.*pass the original base "
                                                r"with --base"):
        apply_composition(store, {"math": 1.0}, None, tmp_path / "out2", device="cpu")
    assert not (tmp_path / "out2").exists()


def test_cli_apply_defaults_to_the_recorded_base(hf, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["apply", str(hf["store"]), "0.7*math - 0.4*code", "-o", str(out), "--device", "cpu",
                 "--dtype", "float16"]) == 0
    assert "wrote base + (0.7*math - 0.4*code)" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected, _ = _expected(hf, COEFFICIENTS, dtype=torch.float16)
    for name, tensor in expected.items():
        torch.testing.assert_close(model.state_dict()[name].to(torch.float16), tensor, rtol=2**-10, atol=1e-4)
    capsys.readouterr()  # transformers' progress bars
    assert main(["apply", str(hf["store"]), "math", "-o", str(out), "--device", "cpu"]) == 4  # now not empty
    err = capsys.readouterr().err
    assert err.startswith("tvbase: error: output directory") and "not empty" in err and "Traceback" not in err


def test_a_sharded_base_given_by_its_index_file(hf, tmp_path):
    """The content hash does not depend on sharding, so a resharded copy is the same base; given
    by its index file, its folder is the model directory whose files are copied."""
    from tvbase.io.save import save_checkpoint

    base = tmp_path / "resharded"
    save_checkpoint(load_file(hf["base"] / "model.safetensors").items(), base, max_shard_bytes=4096)
    shutil.copyfile(hf["base"] / "config.json", base / "config.json")
    out = tmp_path / "out"
    apply_composition(Store.open(hf["store"]), COEFFICIENTS, base / "model.safetensors.index.json", out, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    expected, original = _expected(hf, COEFFICIENTS)
    _assert_close(load_file(out / "model.safetensors"), expected, original)
