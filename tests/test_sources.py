"""Tests for tvbase.io (checkpoint, save): opening, validating, reading, fingerprinting and saving checkpoints."""

import json
import os
import re
import struct
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tvbase.io.checkpoint as sources
from tvbase.errors import BaseMismatchError, InvalidInputError, NotFoundError
from tvbase.io.checkpoint import Checkpoint, check_compatible, new_rows, task_vector
from tvbase.io.save import save_checkpoint


def _tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(6, 4, generator=generator),
        "layer.0.weight": torch.randn(4, 4, generator=generator),
        "layer.0.bias": torch.randn(4, generator=generator),
        "layer.1.weight": torch.randn(4, 4, generator=generator).to(torch.bfloat16),
        "position_ids": torch.arange(6, dtype=torch.int64),
        "scale": torch.tensor(0.5),
    }


def _write_sharded(directory, tensors, shards):
    """Write ``tensors`` as shards: ``shards`` is a list of name lists, one per shard."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: tensors[name] for name in names}, directory / filename)
        weight_map.update({name: filename for name in names})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _raw_file(path, header, data=b""):
    """Write a safetensors file byte by byte, so tests can break its header on purpose."""
    encoded = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.fixture
def single(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors", tensors


@pytest.fixture
def sharded(tmp_path):
    tensors = _tensors()
    names = sorted(tensors)
    return _write_sharded(tmp_path / "sharded", tensors, [names[:2], names[2:4], names[4:]]), tensors


# --- reading -------------------------------------------------------------------------------------------


def test_single_file_round_trip(single):
    path, tensors = single
    with Checkpoint.open(path) as checkpoint:
        assert checkpoint.names == sorted(tensors)
        assert checkpoint.files == [path]
        for name, tensor in tensors.items():
            assert torch.equal(checkpoint.get(name, dtype=None), tensor)
        assert checkpoint.spec("embed.weight") == ((6, 4), "F32")
        assert checkpoint.spec("position_ids") == ((6,), "I64")
        assert checkpoint.spec("scale") == ((), "F32")
        assert checkpoint.numel("embed.weight") == 24
        assert checkpoint.numel("scale") == 1


def test_sharded_round_trip_and_hash_independent_of_sharding(single, sharded):
    directory, tensors = sharded
    with Checkpoint.open(directory) as checkpoint, Checkpoint.open(single[0]) as whole:
        assert checkpoint.names == sorted(tensors)
        assert len(checkpoint.files) == 3
        for name, tensor in tensors.items():
            assert torch.equal(checkpoint.get(name, dtype=None), tensor)
        assert checkpoint.fingerprint() == whole.fingerprint()
        assert len(whole.fingerprint()["hash"]) == 64
        assert whole.fingerprint()["tensors"]["layer.1.weight"] == {"shape": [4, 4], "dtype": "BF16"}


def test_open_index_file_directly(sharded):
    directory, tensors = sharded
    checkpoint = Checkpoint.open(directory / "model.safetensors.index.json")
    assert checkpoint.names == sorted(tensors)


def test_directory_with_one_unindexed_file(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "weights.safetensors")
    assert Checkpoint.open(tmp_path).names == ["w"]


def test_fingerprint_changes_with_content_dtype_and_name(tmp_path):
    def hash_of(tensors, name):
        save_file(tensors, tmp_path / name)
        return Checkpoint.open(tmp_path / name).fingerprint()["hash"]

    reference = hash_of({"w": torch.zeros(4)}, "a.safetensors")
    assert hash_of({"w": torch.zeros(4)}, "b.safetensors") == reference
    assert hash_of({"w": torch.tensor([0.0, 0.0, 0.0, 1e-30])}, "c.safetensors") != reference
    assert hash_of({"v": torch.zeros(4)}, "d.safetensors") != reference
    assert hash_of({"w": torch.zeros(4, dtype=torch.int32)}, "e.safetensors") != reference
    assert hash_of({"w": torch.zeros(2, 2)}, "f.safetensors") != reference


def test_fingerprint_returns_a_copy(single):
    checkpoint = Checkpoint.open(single[0])
    checkpoint.fingerprint()["tensors"].clear()
    assert len(checkpoint.fingerprint()["tensors"]) == len(single[1])


def test_bf16_and_f16_converted_to_requested_dtype(tmp_path):
    bf16 = torch.tensor([1.5, -2.25, 3.0e38], dtype=torch.bfloat16)
    f16 = torch.tensor([0.1, 65504.0], dtype=torch.float16)
    save_file({"bf16": bf16, "f16": f16}, tmp_path / "m.safetensors")
    checkpoint = Checkpoint.open(tmp_path / "m.safetensors")
    assert checkpoint.spec("bf16") == ((3,), "BF16")
    got = checkpoint.get("bf16")
    assert got.dtype == torch.float32 and torch.equal(got, bf16.float())
    assert torch.equal(checkpoint.get("f16"), f16.float())
    assert checkpoint.get("f16", dtype=None).dtype == torch.float16
    assert checkpoint.get("bf16", dtype=torch.float64).dtype == torch.float64


def test_get_is_lazy_and_keeps_one_handle_per_shard(sharded, monkeypatch):
    directory, tensors = sharded
    opened = []

    def counting_open(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return open(path, *args, **kwargs)

    checkpoint = Checkpoint.open(directory)  # reads the headers, keeps no file open
    monkeypatch.setattr(sources, "open", counting_open, raising=False)
    checkpoint.get("embed.weight")
    checkpoint.get("layer.0.bias")  # same shard
    assert opened == ["model-00001-of-00003.safetensors"]
    checkpoint.get("scale")
    assert opened == ["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    checkpoint.close()
    assert torch.equal(checkpoint.get("scale"), tensors["scale"])  # reopens after close
    assert len(opened) == 3


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile from /proc (Linux)")
def test_reads_do_not_keep_the_file_mapped(tmp_path):
    """A fit keeps its inputs open; a memory-mapped read would keep every page it touched in the
    process's resident set until then (RssFile grew by the size of every input read)."""

    def rss_file():
        line = next(x for x in open("/proc/self/status").read().splitlines() if x.startswith("RssFile"))
        return int(line.split()[1]) * 1024

    tensors = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}  # 32 MiB
    save_file(tensors, str(tmp_path / "m.safetensors"))
    checkpoint = Checkpoint.open(tmp_path / "m.safetensors")
    before = rss_file()
    for name, tensor in tensors.items():
        assert torch.equal(checkpoint.get(name), tensor)
    assert rss_file() - before < 8 * 2**20
    checkpoint.close()


def test_unknown_tensor_is_not_found(single):
    checkpoint = Checkpoint.open(single[0])
    for call in (checkpoint.get, checkpoint.spec, checkpoint.numel):
        with pytest.raises(NotFoundError, match="tensor 'nope' is not in checkpoint"):
            call("nope")
    with pytest.raises(KeyError):
        checkpoint.get("nope")


# --- validation at open -------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        Checkpoint.open(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"])
def test_pickle_file_refused(tmp_path, suffix):
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InvalidInputError, match="pickle checkpoints are refused for safety.*convert it to safetensors"):
        Checkpoint.open(path)


def test_pickle_directory_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="pytorch_model.bin.*pickle checkpoints are refused for safety"):
        Checkpoint.open(tmp_path)


def test_pickle_ignored_next_to_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    assert Checkpoint.open(tmp_path).names == ["w"]


def test_other_suffix_refused(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"0" * 16)
    with pytest.raises(InvalidInputError, match="not a safetensors file"):
        Checkpoint.open(tmp_path / "model.onnx")


def test_empty_directory(tmp_path):
    with pytest.raises(InvalidInputError, match="holds no .safetensors file"):
        Checkpoint.open(tmp_path)


def test_several_files_without_index(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    save_file({"b": torch.ones(1)}, tmp_path / "b.safetensors")
    with pytest.raises(InvalidInputError, match="2 .safetensors files .* but no model.safetensors.index.json"):
        Checkpoint.open(tmp_path)


def test_file_shorter_than_8_bytes(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"\x01\x02\x03")
    with pytest.raises(InvalidInputError, match="is 3 bytes: expected at least 8"):
        Checkpoint.open(tmp_path / "m.safetensors")


def test_oversized_header(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(InvalidInputError, match="oversized header"):
        Checkpoint.open(path)


def test_header_longer_than_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(InvalidInputError, match="is truncated: its header needs 1008 bytes, the file has 10"):
        Checkpoint.open(path)


def test_truncated_data(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(InvalidInputError, match="past the 396 bytes the file holds"):
        Checkpoint.open(path)


@pytest.mark.parametrize(
    ("header", "phrase"),
    [
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"{not json", "not valid UTF-8 JSON"),
        (b"[1, 2]", "is a JSON list: expected an object"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
         b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "duplicate key 'w'"),
        ({"w": [1, 2]}, "header entry of type list"),
        ({"w": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}, "has dtype 'F31': expected one of"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "expected a list of non-negative integers"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, r"expected \[begin, end\]"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, r"expected \[begin, end\]"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "spanning 4 bytes: shape .* needs 8"),
        ({"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
         "__metadata__ that is not an object of strings"),
    ],
)  # fmt: skip
def test_malformed_header(tmp_path, header, phrase):
    path = _raw_file(tmp_path / "m.safetensors", header, b"\0" * 8)
    with pytest.raises(InvalidInputError, match=phrase):
        Checkpoint.open(path)


def test_overlapping_tensors(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    with pytest.raises(InvalidInputError, match="tensors 'a' and 'b' overlap"):
        Checkpoint.open(_raw_file(tmp_path / "m.safetensors", header, b"\0" * 12))


def test_gap_and_trailing_bytes(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    with pytest.raises(InvalidInputError, match="a gap of 4 bytes precedes tensor 'a'"):
        Checkpoint.open(_raw_file(tmp_path / "gap.safetensors", header, b"\0" * 8))
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(InvalidInputError, match="cover 4 data bytes but the file holds 8"):
        Checkpoint.open(_raw_file(tmp_path / "tail.safetensors", header, b"\0" * 8))


def test_hand_written_header_is_readable(tmp_path):
    # Our own checks must accept what safetensors accepts: metadata, a padded header, a scalar.
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "s": {"dtype": "F32", "shape": [], "data_offsets": [8, 12]},
            "v": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    data = struct.pack("<ii", 7, -3) + struct.pack("<f", 2.5)
    checkpoint = Checkpoint.open(_raw_file(tmp_path / "m.safetensors", header, data))
    assert checkpoint.get("v", dtype=None).tolist() == [7, -3]
    assert checkpoint.get("s").item() == 2.5


def test_zero_tensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({}, path)
    with pytest.raises(InvalidInputError, match="holds no tensors"):
        Checkpoint.open(path)


# --- validation of sharded indexes --------------------------------------------------------------------


def test_index_not_json(sharded):
    directory, _ = sharded
    (directory / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(InvalidInputError, match="index .* is not valid JSON"):
        Checkpoint.open(directory)


@pytest.mark.parametrize("content", [{}, {"weight_map": []}, {"weight_map": {"a": 3}}, [1]])
def test_index_without_weight_map(sharded, content):
    directory, _ = sharded
    (directory / "model.safetensors.index.json").write_text(json.dumps(content))
    with pytest.raises(InvalidInputError, match="has no valid weight_map"):
        Checkpoint.open(directory)


def test_index_names_missing_shard(sharded):
    directory, _ = sharded
    (directory / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="'model-00002-of-00003.safetensors', which is missing"):
        Checkpoint.open(directory)


def test_index_names_tensor_absent_from_shard(sharded):
    directory, _ = sharded
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InvalidInputError, match="puts tensor 'ghost' in shard .* does not hold it"):
        Checkpoint.open(directory)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/outside.safetensors", "sub/../../x.safetensors"])
def test_index_shard_escaping_directory(tmp_path, shard):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file({"w": torch.ones(1)}, tmp_path / "outside.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(InvalidInputError, match="without '..' or an absolute path"):
        Checkpoint.open(directory)


def test_index_shard_symlink_outside(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file({"w": torch.ones(1)}, tmp_path / "outside.safetensors")
    (directory / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "outside.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00001.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidInputError, match="outside the checkpoint directory"):
        Checkpoint.open(directory)


def test_single_file_symlink_outside(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file({"w": torch.ones(1)}, tmp_path / "outside.safetensors")
    (directory / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(InvalidInputError, match="outside the checkpoint directory"):
        Checkpoint.open(directory)


def test_symlink_inside_directory_allowed(tmp_path):
    directory = tmp_path / "ckpt"
    (directory / "blobs").mkdir(parents=True)
    save_file({"w": torch.ones(1)}, directory / "blobs" / "abc")
    (directory / "model.safetensors").symlink_to(directory / "blobs" / "abc")
    assert Checkpoint.open(directory).names == ["w"]


def test_index_shard_is_pickle(tmp_path):
    (tmp_path / "pytorch_model-00001.bin").write_bytes(b"\x80\x04")
    index = {"weight_map": {"w": "pytorch_model-00001.bin"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidInputError, match="pickle checkpoints are refused for safety"):
        Checkpoint.open(tmp_path)


def test_corrupt_shard_named_in_error(sharded):
    directory, _ = sharded
    shard = directory / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(InvalidInputError, match="model-00003-of-00003.safetensors.*truncated or corrupt"):
        Checkpoint.open(directory)


# --- check_compatible and task_vector -----------------------------------------------------------------


def test_check_compatible_accepts_a_fine_tune(single, tmp_path):
    base = Checkpoint.open(single[0])
    save_file(_tensors(seed=1), tmp_path / "ft.safetensors")
    check_compatible(base.fingerprint()["tensors"], Checkpoint.open(tmp_path / "ft.safetensors"), "task 'a'")


def test_check_compatible_reports_each_kind_of_mismatch(single, tmp_path):
    reference = Checkpoint.open(single[0]).fingerprint()["tensors"]
    tensors = _tensors(seed=1)
    del tensors["scale"], tensors["layer.0.bias"]
    tensors["extra.weight"] = torch.zeros(2)
    tensors["embed.weight"] = torch.zeros(6, 5)
    tensors["layer.0.weight"] = tensors["layer.0.weight"].half()
    save_file(tensors, tmp_path / "ft.safetensors")
    with pytest.raises(BaseMismatchError) as caught:
        check_compatible(reference, Checkpoint.open(tmp_path / "ft.safetensors"), "task 'math' (ft.safetensors)")
    message = str(caught.value)
    assert message.startswith("task 'math' (ft.safetensors) does not match the store's base model")
    assert "2 missing tensors: 'layer.0.bias', 'scale'" in message
    assert "1 extra tensor: 'extra.weight'" in message
    assert "1 shape mismatch: 'embed.weight' expected [6, 4], found [6, 5]" in message
    assert "1 dtype mismatch: 'layer.0.weight' expected F32, found F16" in message
    assert "must be a fine-tune of the store's base model" in message
    assert isinstance(caught.value, ValueError)


def test_check_compatible_truncates_long_lists(tmp_path):
    save_file({f"t{i:02d}": torch.zeros(1) for i in range(8)}, tmp_path / "ft.safetensors")
    expected = r"8 extra tensors: 't00', 't01', 't02', 't03', 't04', \.\.\. and 3 more"
    with pytest.raises(BaseMismatchError, match=expected):
        check_compatible({}, Checkpoint.open(tmp_path / "ft.safetensors"), "task 'x'")


def test_task_vector_is_finetuned_minus_base(tmp_path):
    base_tensors, tuned_tensors = _tensors(seed=0), _tensors(seed=1)
    save_file(base_tensors, tmp_path / "base.safetensors")
    save_file(tuned_tensors, tmp_path / "ft.safetensors")
    base, tuned = Checkpoint.open(tmp_path / "base.safetensors"), Checkpoint.open(tmp_path / "ft.safetensors")
    for name in base.names:
        delta = task_vector(base, tuned, name, "task 'a'")
        assert delta.dtype == torch.float32 and delta.shape == base_tensors[name].shape
        expected = tuned_tensors[name].double() - base_tensors[name].double()
        torch.testing.assert_close(delta, expected.float(), rtol=0, atol=1e-6)
    assert task_vector(base, tuned, "position_ids", "task 'a'").tolist() == [0, 0, 0, 0, 0, 0]


def test_task_vector_exact_for_f64_and_zero_for_large_integers(tmp_path):
    # float32 cannot tell 1e12 + 0.5 from 1e12: an F64 difference is taken before rounding.
    save_file({"n": torch.tensor([2**40 + 1]), "d": torch.tensor([1e12], dtype=torch.float64)},
              tmp_path / "base.safetensors")  # fmt: skip
    save_file({"n": torch.tensor([2**40 + 1]), "d": torch.tensor([1e12 + 0.5], dtype=torch.float64)},
              tmp_path / "ft.safetensors")  # fmt: skip
    base, tuned = Checkpoint.open(tmp_path / "base.safetensors"), Checkpoint.open(tmp_path / "ft.safetensors")
    assert task_vector(base, tuned, "n", "task 'a'").tolist() == [0.0]  # integers are never differenced
    assert task_vector(base, tuned, "d", "task 'a'").tolist() == [0.5]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_task_vector_rejects_non_finite(tmp_path, bad):
    save_file({"w": torch.zeros(3)}, tmp_path / "base.safetensors")
    save_file({"w": torch.tensor([bad, 1.0, bad])}, tmp_path / "ft.safetensors")
    base, tuned = Checkpoint.open(tmp_path / "base.safetensors"), Checkpoint.open(tmp_path / "ft.safetensors")
    with pytest.raises(InvalidInputError, match="task 'math': tensor 'w' holds 2 NaN/Inf values out of 3"):
        task_vector(base, tuned, "w", "task 'math'")


@pytest.mark.parametrize(("base_shape", "shape"), [((4,), (3,)), ((3, 2), (3, 3)), ((3, 2), (4, 3))])
def test_task_vector_shape_mismatch(tmp_path, base_shape, shape):
    """Fewer rows, or another row size, is refused (more rows of the same size are added tokens)."""
    save_file({"w": torch.zeros(base_shape)}, tmp_path / "base.safetensors")
    save_file({"w": torch.zeros(shape)}, tmp_path / "ft.safetensors")
    base, tuned = Checkpoint.open(tmp_path / "base.safetensors"), Checkpoint.open(tmp_path / "ft.safetensors")
    with pytest.raises(BaseMismatchError, match=re.escape(f"tensor 'w' has shape {list(shape)}, the base has {list(base_shape)}")):
        task_vector(base, tuned, "w", "task 'a'")


def test_task_vector_of_a_tensor_with_added_rows(tmp_path):
    base_w, tuned_w = torch.randn(3, 2), torch.randn(5, 2)
    save_file({"w": base_w}, tmp_path / "base.safetensors")
    save_file({"w": tuned_w}, tmp_path / "ft.safetensors")
    base, tuned = Checkpoint.open(tmp_path / "base.safetensors"), Checkpoint.open(tmp_path / "ft.safetensors")
    torch.testing.assert_close(task_vector(base, tuned, "w", "task 'a'"), tuned_w[:3] - base_w)
    torch.testing.assert_close(new_rows(base, tuned, "w"), tuned_w[3:])
    assert new_rows(base, base, "w") is None


# --- save_checkpoint ----------------------------------------------------------------------------------


def _assert_same(checkpoint, tensors):
    assert checkpoint.names == sorted(tensors)
    for name, tensor in tensors.items():
        stored = checkpoint.get(name, dtype=None)
        assert stored.dtype == tensor.dtype and torch.equal(stored, tensor), name


def test_save_sharded_streams_and_round_trips(tmp_path):
    tensors = _tensors()
    consumed = []

    def stream():
        for name, tensor in tensors.items():
            # Shards are written while the stream runs, not all at the end.
            consumed.append((name, len(list((tmp_path / "out").iterdir()))))
            yield name, tensor

    # At most 100 bytes per shard: embed (96 B) | layer.0.weight (64) + layer.0.bias (16) |
    # layer.1.weight (32, bf16) + position_ids (48) + scale (4).
    written = save_checkpoint(stream(), tmp_path / "out", max_shard_bytes=100, metadata={"source": "test"})
    assert consumed == list(zip(tensors, [0, 0, 1, 1, 2, 2]))
    index_path = tmp_path / "out" / "model.safetensors.index.json"
    assert written[-1] == index_path
    shards = written[:-1]
    assert [p.name for p in shards] == [f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]
    index = json.loads(index_path.read_text())
    assert index["metadata"] == {"source": "test", "total_size": sum(t.nbytes for t in tensors.values())}
    assert index["weight_map"]["embed.weight"] == "model-00001-of-00003.safetensors"
    assert index["weight_map"]["scale"] == "model-00003-of-00003.safetensors"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)
    with Checkpoint.open(tmp_path / "out") as checkpoint:
        _assert_same(checkpoint, tensors)
        for shard in checkpoint.files:  # no shard over the limit unless it holds a single tensor
            names = [n for n, f in index["weight_map"].items() if f == shard.name]
            assert len(names) == 1 or sum(tensors[n].nbytes for n in names) <= 100
        save_file(tensors, tmp_path / "single.safetensors")
        assert checkpoint.fingerprint() == Checkpoint.open(tmp_path / "single.safetensors").fingerprint()


def test_save_fits_in_one_shard(tmp_path):
    tensors = _tensors()
    written = save_checkpoint(tensors.items(), tmp_path / "out")
    assert written == [tmp_path / "out" / "model.safetensors"]
    _assert_same(Checkpoint.open(tmp_path / "out"), tensors)


def test_save_single_file_ignores_shard_limit(tmp_path):
    tensors = _tensors()
    path = tmp_path / "nested" / "m.safetensors"
    assert save_checkpoint(tensors.items(), path, max_shard_bytes=1) == [path]
    _assert_same(Checkpoint.open(path), tensors)
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temp file left


def test_save_replaces_an_earlier_checkpoint(tmp_path):
    save_checkpoint(_tensors(seed=0).items(), tmp_path / "out", max_shard_bytes=100)
    (tmp_path / "out" / "config.json").write_text("{}")
    tensors = _tensors(seed=1)
    save_checkpoint(tensors.items(), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    _assert_same(Checkpoint.open(tmp_path / "out"), tensors)
    save_checkpoint(tensors.items(), tmp_path / "out", max_shard_bytes=200)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    _assert_same(Checkpoint.open(tmp_path / "out"), tensors)


def test_save_converts_views_shared_and_grad_tensors(tmp_path):
    weight = torch.randn(4, 6, requires_grad=True)
    tensors = [
        ("transposed", weight.detach().t()),  # non-contiguous
        ("row", weight.detach()[1]),  # a view into a larger storage
        ("tied.a", weight),
        ("tied.b", weight),  # same storage twice, as with tied embeddings
    ]
    save_checkpoint(iter(tensors), tmp_path / "out")
    checkpoint = Checkpoint.open(tmp_path / "out")
    assert torch.equal(checkpoint.get("transposed"), weight.detach().t())
    assert torch.equal(checkpoint.get("row"), weight.detach()[1])
    assert torch.equal(checkpoint.get("tied.b"), weight.detach())


def test_save_failure_leaves_no_files(tmp_path):
    def stream():
        yield "a", torch.zeros(100)
        yield "b", torch.zeros(100)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        save_checkpoint(stream(), tmp_path / "out", max_shard_bytes=400)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("tensors", "kwargs", "phrase"),
    [
        ([], {}, "no tensors to save"),
        ([("a", torch.zeros(1)), ("a", torch.zeros(1))], {}, "appears twice"),
        ([("", torch.zeros(1))], {}, "is not allowed"),
        ([("__metadata__", torch.zeros(1))], {}, "is not allowed"),
        ([("a", [1.0])], {}, "expected a dense torch.Tensor"),
        ([("a", torch.zeros(2).to_sparse())], {}, "expected a dense torch.Tensor"),
        ([("a", torch.zeros(1, dtype=torch.complex128))], {}, "which safetensors cannot store"),
        (["a"], {}, r"expects \(name, tensor\) pairs"),
        ([("a", torch.zeros(1))], {"max_shard_bytes": 0}, "max_shard_bytes must be a positive integer"),
        ([("a", torch.zeros(1))], {"metadata": {"k": 1}}, "metadata must be a dict of str to str"),
    ],
)
def test_save_rejects_bad_input(tmp_path, tensors, kwargs, phrase):
    with pytest.raises(InvalidInputError, match=phrase):
        save_checkpoint(tensors, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_save_refuses_pickle_path(tmp_path):
    with pytest.raises(InvalidInputError, match="never pickle"):
        save_checkpoint([("a", torch.zeros(1))], tmp_path / "pytorch_model.bin")


# --- save_checkpoint with a plan: headers first, tensors streamed ------------------------------------


def _plan(tensors):
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


@pytest.mark.parametrize("target", ["one.safetensors", "out"])
def test_planned_save_round_trips_and_cuts_the_same_shards(tmp_path, target):
    tensors = _tensors()
    planned = save_checkpoint(tensors.items(), tmp_path / "planned" / target, max_shard_bytes=100, plan=_plan(tensors),
                              metadata={"source": "test"})
    unplanned = save_checkpoint(tensors.items(), tmp_path / "unplanned" / target, max_shard_bytes=100, metadata={"source": "test"})
    assert [p.name for p in planned] == [p.name for p in unplanned]
    if target == "out":
        index = [json.loads(p.read_text()) for p in (planned[-1], unplanned[-1])]
        assert index[0] == index[1]
    with Checkpoint.open(tmp_path / "planned" / target) as checkpoint:
        _assert_same(checkpoint, tensors)
    for file in planned:  # safetensors itself reads every file, header metadata included
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                assert f.metadata() == {"format": "pt", "source": "test"}
                for name in f.keys():
                    assert torch.equal(f.get_tensor(name), tensors[name])


def test_planned_save_writes_while_the_tensors_come_and_holds_few(tmp_path):
    live, seen = weakref.WeakSet(), []

    def stream():
        for i in range(8):
            seen.append(len(live))  # tensors not yet written and freed when the next is made
            tensor = torch.full((1000,), float(i))
            live.add(tensor)
            yield f"t{i}", tensor

    plan = [(f"t{i}", (1000,), torch.float32) for i in range(8)]
    path = tmp_path / "m.safetensors"
    save_checkpoint(stream(), path, plan=plan)
    assert max(seen) <= 3  # the one being written and two waiting, never the whole file
    with safe_open(str(path), framework="pt") as f:
        assert [float(f.get_tensor(f"t{i}")[0]) for i in range(8)] == [float(i) for i in range(8)]


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda items: items[:-1], "ended before 'scale'"),
        (lambda items: items + [("extra", torch.zeros(1))], "more tensors came than the plan"),
        (lambda items: [items[1], items[0], *items[2:]], "not the plan's next one"),
        (lambda items: [(n, t.double() if n == "layer.0.bias" else t) for n, t in items], "not the plan's next one"),
        (lambda items: [(n, t[:3] if n == "embed.weight" else t) for n, t in items], "not the plan's next one"),
    ],
)
@pytest.mark.parametrize("target", ["one.safetensors", "out"])
def test_planned_save_refuses_other_tensors_and_keeps_the_old_files(tmp_path, change, phrase, target):
    old, new = _tensors(seed=0), _tensors(seed=1)
    path = tmp_path / target
    before = save_checkpoint(old.items(), path, max_shard_bytes=100)
    contents = {p: p.read_bytes() for p in before}
    with pytest.raises(InvalidInputError, match=phrase):
        save_checkpoint(change(list(new.items())), path, max_shard_bytes=100, plan=_plan(new))
    assert sorted(p.name for p in path.parent.rglob("*") if p.is_file()) == sorted(p.name for p in before)
    assert all(p.read_bytes() == data for p, data in contents.items())


@pytest.mark.parametrize(
    "plan",
    [
        [("a", (2,))],
        [("a", (2,), torch.complex128)],
        [("a", (-1,), torch.float32)],
        [("a", (2,), torch.float32), ("a", (2,), torch.float32)],
        [("__metadata__", (2,), torch.float32)],
    ],
)
def test_save_rejects_a_bad_plan(tmp_path, plan):
    with pytest.raises(InvalidInputError, match="bad plan entry"):
        save_checkpoint([("a", torch.zeros(2))], tmp_path / "m.safetensors", plan=plan)
    assert not (tmp_path / "m.safetensors").exists()
