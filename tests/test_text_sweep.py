"""The short version of benchmarks/text_sweep.py: two variants on a tiny random-BERT text zoo."""

import json

import pytest

pytest.importorskip("transformers")

from benchmarks import text_sweep  # noqa: E402
from tvbase.demo.text_zoo import build_text_zoo  # noqa: E402

from test_text_zoo import TINY_TASKS, _tiny_bert  # noqa: E402 (the text zoo tests' tiny BERT)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    model = _tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    root = tmp_path_factory.mktemp("zoo") / "zoo-minilm"
    build_text_zoo(root, tasks=TINY_TASKS[:2], steps=30, lr=3e-3, model_dir=model, progress=False)
    return root


def test_variants_and_the_activation_aware_one_are_measured(zoo_dir, tmp_path):
    assert text_sweep.main(["--zoo", str(zoo_dir), "--budget", "0.2", "--variant", "", "--variant", "dense_bits=8",
                            "--activation-aware", "1", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "text_sweep.json").read_text())
    rows = {r["variant"]: r for r in out["variants"]}
    assert list(rows) == ["defaults", "dense_bits=8", "activation-aware columns, power 1"]
    assert rows["dense_bits=8"]["params"]["dense_bits"] == 8 and rows["defaults"]["params"]["dense_bits"] == 4
    for r in rows.values():
        assert 0 < r["storage_percent"] <= 20.5  # the budget counts the store on disk
        assert 0 <= r["worst"] <= r["mean"] and set(r["per_task"]) == set(TINY_TASKS[:2])
        assert 0 < r["rel_error"] < 1
    assert "| activation-aware columns, power 1 |" in (tmp_path / "text_sweep.md").read_text()


def test_column_scales_have_rms_one_per_linear_weight(zoo_dir):
    zoo = text_sweep.TextZoo(zoo_dir)
    scales = text_sweep.column_scales(zoo, 0.5)
    base = zoo.load_base()
    assert scales and all(k in base and base[k].shape[1] == s.numel() for k, s in scales.items())
    assert all(abs(float(s.square().mean()) - 1) < 1e-4 for s in scales.values())
    assert not any("embeddings" in k for k in scales)  # lookups have no input features


def test_a_missing_zoo_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no cached text zoo"):
        text_sweep.main(["--zoo", str(tmp_path / "none")])
