"""The digits model zoo: files, cache, determinism, evaluation and the task catalogue."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from tvbase.errors import InvalidInputError, NotFoundError
from tvbase.demo.zoo import ARCHITECTURES, CONTROL_TASK, DEMO_TASKS, TASKS, Zoo, build_zoo, make_model

TINY_TASKS = ["ovr-3", "parity", "rot90"]  # one-vs-rest, a 2-label task, a transformed-input task
TINY = dict(tasks=TINY_TASKS, seed=0, epochs=1, pretrain_epochs=1, progress=False)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """A 3-task ViT zoo trained for one epoch (about a second on a CPU)."""
    return build_zoo(tmp_path_factory.mktemp("zoo"), arch="vit", **TINY)


def _shapes(path):
    with safe_open(path, framework="pt") as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}


def test_files_match_the_base(tiny_zoo):
    base = _shapes(tiny_zoo.base_path)
    assert base and all(dtype == "F32" for _, dtype in base.values())
    ranks = {len(shape) for shape, _ in base.values()}
    assert {1, 2, 4} <= ranks  # biases/norms, weight matrices, conv kernels
    assert tiny_zoo.tasks == TINY_TASKS
    for name in TINY_TASKS:
        path = tiny_zoo.task_path(name)
        assert path == tiny_zoo.root / "tasks" / f"{name}.safetensors" and path.is_file()
        assert _shapes(path) == base
    info = json.loads((tiny_zoo.root / "zoo.json").read_text())
    assert info["arch"] == "vit" and info["seed"] == 0 and info["tasks"] == TINY_TASKS
    assert isinstance(info["version"], int)
    assert set(info["finetuned_accuracy"]) == set(TINY_TASKS)
    assert set(info["base_accuracy"]) == set(TINY_TASKS) | {CONTROL_TASK.name}


def test_second_build_loads_from_cache(tiny_zoo):
    files = [tiny_zoo.root / "zoo.json", tiny_zoo.base_path] + [tiny_zoo.task_path(n) for n in TINY_TASKS]
    before = {f: f.stat().st_mtime_ns for f in files}
    again = build_zoo(tiny_zoo.root, arch="vit", **TINY)
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert again.finetuned_accuracy == tiny_zoo.finetuned_accuracy


def test_changed_config_rebuilds(tmp_path):
    one = build_zoo(tmp_path, arch="cnn", **{**TINY, "tasks": ["ovr-1"]})
    two = build_zoo(tmp_path, arch="cnn", **{**TINY, "tasks": ["ovr-2"]})
    assert two.tasks == ["ovr-2"] and (tmp_path / "tasks" / "ovr-2.safetensors").is_file()
    assert not (tmp_path / "tasks" / "ovr-1.safetensors").exists()  # the old zoo's task is gone
    assert one.root == two.root


def test_build_is_deterministic(tiny_zoo, tmp_path):
    other = build_zoo(tmp_path, arch="vit", **TINY)
    for name in TINY_TASKS:  # byte for byte, so content hashes of the checkpoints are stable too
        assert other.task_path(name).read_bytes() == tiny_zoo.task_path(name).read_bytes()
    assert other.base_path.read_bytes() == tiny_zoo.base_path.read_bytes()
    # A task's fine-tune depends on the seed and its name only, not on the other tasks.
    alone = build_zoo(tmp_path / "alone", arch="vit", **{**TINY, "tasks": ["rot90"]})
    assert alone.task_path("rot90").read_bytes() == tiny_zoo.task_path("rot90").read_bytes()


def test_evaluate_with_deltas_matches_recorded_accuracies(tiny_zoo):
    base = tiny_zoo.load_base()
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    for name in TINY_TASKS:
        assert tiny_zoo.evaluate(zero, name, delta=True) == tiny_zoo.base_accuracy[name]
        assert tiny_zoo.evaluate(base, name) == tiny_zoo.base_accuracy[name]
        tau = tiny_zoo.task_vector(name)
        assert tiny_zoo.evaluate(tau, name, delta=True) == pytest.approx(tiny_zoo.finetuned_accuracy[name], abs=1e-12)
        assert tiny_zoo.evaluate(tiny_zoo.load_finetuned(name), name) == tiny_zoo.finetuned_accuracy[name]
        assert tiny_zoo.evaluate(tau, name, split="val", delta=True) == pytest.approx(
            tiny_zoo.finetuned_val_accuracy[name], abs=1e-12
        )
    # Fine-tuning must have taught something: the recorded accuracies are a real signal.
    assert tiny_zoo.finetuned_accuracy["ovr-3"] > tiny_zoo.base_accuracy["ovr-3"]
    # The control task and catalogue tasks outside the zoo can be scored too.
    assert 0.0 <= tiny_zoo.evaluate(base, CONTROL_TASK.name) <= 1.0
    assert 0.0 <= tiny_zoo.evaluate(base, "hflip", split="val") <= 1.0


def test_predict_gives_the_labels_evaluate_scores(tiny_zoo):
    name = TINY_TASKS[0]
    tau = tiny_zoo.task_vector(name)
    predicted, targets = tiny_zoo.predict(tau, name, split="val", delta=True)
    assert predicted.shape == targets.shape == (300,) and predicted.dtype == torch.int64
    assert float((predicted == targets).double().mean()) == tiny_zoo.evaluate(tau, name, split="val", delta=True)
    # base + tau, given as a delta or as full weights, labels every image the same way
    full = {k: v + tau[k] for k, v in tiny_zoo.load_base().items()}
    assert torch.equal(tiny_zoo.predict(full, name, split="val")[0], predicted)


def test_evaluate_rejects_bad_input(tiny_zoo):
    base = tiny_zoo.load_base()
    with pytest.raises(NotFoundError, match="valid tasks"):
        tiny_zoo.evaluate(base, "no-such-task")
    with pytest.raises(InvalidInputError, match="valid splits"):
        tiny_zoo.evaluate(base, "parity", split="holdout")
    with pytest.raises(InvalidInputError, match="missing"):
        tiny_zoo.evaluate({k: v for k, v in list(base.items())[1:]}, "parity")
    name = next(iter(base))
    with pytest.raises(InvalidInputError, match=re.escape(name)):
        tiny_zoo.evaluate({**base, name: base[name].flatten()[:1]}, "parity")
    with pytest.raises(NotFoundError):
        tiny_zoo.task_path("hflip")  # in the catalogue, not in this zoo


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(InvalidInputError, match="vit"):
        build_zoo(tmp_path, arch="resnet", progress=False)
    with pytest.raises(InvalidInputError, match="valid tasks"):
        build_zoo(tmp_path, tasks=["parity", "nope"], progress=False)
    with pytest.raises(InvalidInputError, match="more than once"):
        build_zoo(tmp_path, tasks=["parity", "parity"], progress=False)
    with pytest.raises(NotFoundError):
        Zoo(tmp_path / "missing")


def test_catalogue():
    names = list(TASKS)
    assert len(names) >= 24 and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in names)
    assert all(spec.name == name for name, spec in TASKS.items())
    # Each task is distinct: a different (transform, label map) pair.
    assert len({(s.transform, s.label_map) for s in TASKS.values()}) == len(TASKS)
    assert all(len(s.label_map) == 10 and set(s.label_map) <= set(range(10)) for s in TASKS.values())
    # Contradictory pairs: same inputs, labels that disagree on every digit, declared both ways
    # (or against the base's own task, "digits").
    pairs = [(s, TASKS.get(s.contradicts, CONTROL_TASK)) for s in TASKS.values() if s.contradicts]
    assert len(pairs) >= 3
    for spec, other in pairs:
        assert other.name == spec.contradicts and other.transform == spec.transform
        assert all(a != b for a, b in zip(spec.label_map, other.label_map))
        if other is not CONTROL_TASK:
            assert other.contradicts == spec.name
    assert any(s.transform != "identity" and s.contradicts for s in TASKS.values())  # a relabelled transform


def test_demo_tasks():
    assert len(DEMO_TASKS) == 8 and set(DEMO_TASKS) <= set(TASKS)
    specs = [TASKS[n] for n in DEMO_TASKS]
    assert any(s.contradicts in DEMO_TASKS for s in specs)
    assert any(s.transform != "identity" for s in specs)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures(arch):
    model = make_model(arch, seed=0)
    n_parameters = sum(p.numel() for p in model.parameters())
    assert 20_000 <= n_parameters <= 200_000
    assert {p.ndim for p in model.parameters()} >= {1, 2, 4}
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    again = make_model(arch, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
