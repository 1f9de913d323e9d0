"""--max-memory: a fit planned to need more is refused before any work, the store unchanged."""

import pytest

from tvbase.cli import main, parse_memory
from tvbase.errors import InvalidInputError
from tvbase.methods import FitParams, get_method
from tvbase.store import Store


@pytest.mark.parametrize("text, expected", [("8G", 8 * 2**30), ("2.5GiB", int(2.5 * 2**30)), ("512m", 512 * 2**20), ("1000", 1000)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1G", "0", "5X"])
def test_parse_memory_refuses_what_is_not_a_size(bad):
    with pytest.raises(InvalidInputError, match="max-memory"):
        parse_memory(bad)


def test_plan_grows_with_the_largest_tensor_and_the_tasks():
    tucker = get_method("tvbase").make(FitParams())
    small, large = {"w": (1000, 100)}, {"w": (30522, 768)}
    assert tucker.planned_peak_bytes(large, 8) > tucker.planned_peak_bytes(small, 8)
    assert tucker.planned_peak_bytes(large, 32) > tucker.planned_peak_bytes(large, 8)
    # the old fit's Grams alone (30522^2 float64) would not fit the plan for 8 tasks
    assert tucker.planned_peak_bytes(large, 8) < 30522**2 * 8


def test_too_small_a_limit_is_refused_and_the_store_is_unchanged(populated_copy, zoo, snapshot_state, capsys):
    before = snapshot_state(populated_copy)
    argv = ["ingest", str(populated_copy), "-q", "--device", "cpu", "--max-memory", "100M", f"extra={zoo.tasks['c_new']}"]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert "planned to need" in err and "--max-memory" in err and "Nothing was written" in err
    assert main(["compact", str(populated_copy), "-q", "--device", "cpu", "--max-memory", "1M"]) == 4
    assert snapshot_state(populated_copy) == before


def test_a_sufficient_limit_lets_the_ingest_run(populated_copy, zoo):
    store = Store.open(populated_copy)
    store.ingest({"extra": zoo.tasks["c_new"]}, device="cpu", progress=False, max_memory=8 * 2**30)
    assert "extra" in Store.open(populated_copy).tasks


@pytest.mark.parametrize("layout, measured", [("bert-base", 1.45e9), ("llama-slice", 5.37e9)])
def test_plan_covers_the_peaks_the_scale_benchmark_measured(layout, measured):
    """Peak RSS of `tvbase ingest` of 8 tasks in the scale benchmark (benchmarks/RESULTS.md,
    "Scale"): a --max-memory at the plan must not let a real ingest run past it."""
    from benchmarks.scale import LAYOUTS  # the checkout's benchmarks/, on pytest's pythonpath

    shapes = {name: shape for name, shape, _ in LAYOUTS[layout].tensors}
    assert get_method("tvbase").make(FitParams()).planned_peak_bytes(shapes, 8) > measured
