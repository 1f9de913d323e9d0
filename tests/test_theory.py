"""End-to-end check of benchmarks/theory: the --quick run writes its outputs and the paper's core
claims hold on it, with task arithmetic done through tvbase stores.

Thresholds are explicit and sit below what the quick run measures (listed next to each), so a
broken store, composition or model would fail them.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks/ is run from the repository root, not installed

from benchmarks.theory import run as theory  # noqa: E402
from benchmarks.theory.model import Dims  # noqa: E402

APPROXIMATE = ("rank-1", "budget-10%", "sparse-10%")  # the quick run's approximate settings


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("theory")
    other = "# Benchmark results\n\n<!-- other:start -->\nkept as is\n<!-- other:end -->\n"
    (root / "RESULTS.md").write_text(other)  # another script's section must survive
    report = theory.main(["--out", str(root / "results"), "--quick"])
    return root, report


def setting(report, name):
    return report["seeds"]["0"]["settings"][name]


def test_outputs_written(quick):
    root, report = quick
    data = json.loads((root / "results" / "theory.json").read_text())
    assert data["rows"] == report["rows"]
    assert data["torch"] == torch.__version__ and data["device"].startswith("cpu")
    assert data["command"].startswith("python -m benchmarks.theory.run") and "--quick" in data["command"]
    names = list(theory.settings(theory.QUICK))
    assert names == ["exact", *APPROXIMATE]
    assert len(data["rows"]) == len(theory.CLAIMS) * len(names)
    for row in data["rows"]:
        assert row["claim"] and row["measured"] and row["setting"] in names
        assert row["verdict"].startswith(("holds", "does not hold", "mixed", "contrast"))

    md = (root / "RESULTS.md").read_text()
    assert "<!-- other:start -->\nkept as is\n<!-- other:end -->" in md
    assert md.count(theory.MARK_START) == 1 and md.count(theory.MARK_END) == 1
    section = md[md.index(theory.MARK_START) : md.index(theory.MARK_END)]
    assert "| claim | setting | measured (test accuracy) | verdict |" in section
    assert section.count("\n| ") == 1 + len(data["rows"])  # header + one line per row
    assert data["command"] in section and torch.__version__ in section


def test_write_section_replaces_only_its_own(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# R\n\n<!-- a:start -->\nA\n<!-- a:end -->\n\n{theory.MARK_START}\nold\n{theory.MARK_END}\n\ntail\n")
    theory.write_section(path, "new")
    text = path.read_text()
    assert "old" not in text and "\nnew\n" in text
    assert "<!-- a:start -->\nA\n<!-- a:end -->" in text and text.endswith("tail\n")
    theory.write_section(tmp_path / "fresh.md", "x")
    assert (tmp_path / "fresh.md").read_text().count(theory.MARK_START) == 1


def test_stores_hold_the_task_vectors(quick):
    _, report = quick
    stores = report["seeds"]["0"]["stores"]
    assert max(stores["exact"]["rel_error_vs_tau"].values()) < 1e-5  # measured ~3e-7
    assert max(stores["sparse-10%"]["rel_error_vs_pruned_tau"].values()) < 1e-5
    # the approximations really approximate: not exact, not garbage (measured ~0.03-0.1 and ~0.6)
    for name in ("rank-1", "budget-10%"):
        errors = stores[name]["rel_error_vs_tau"].values()
        assert 1e-4 < min(errors) and max(errors) < 0.3, (name, errors)
    assert 0.3 < min(stores["sparse-10%"]["rel_error_vs_tau"].values())


def test_fine_tunes_learn_their_task(quick):
    _, report = quick
    acc = report["seeds"]["0"]["accuracy"]
    assert acc["base"]["pre"] >= 0.95  # the base knows its pretraining task
    for t in theory.FINETUNED:
        assert acc["base"][t] <= 0.75, t  # ... and not the fine-tuning tasks
        assert acc[f"finetuned_{t}"][t] >= 0.95, t  # measured 1.00
        assert setting(report, "exact")["finetuned_via_store"][t] == pytest.approx(acc[f"finetuned_{t}"][t], abs=1e-6)


def test_addition_irrelevant_and_aligned(quick):
    _, report = quick
    for name in ("exact", *APPROXIMATE):
        irr = setting(report, name)["add_irr"]
        # measured: both >= 0.96; a single vector on the other task ~0.55-0.6
        assert min(irr["acc_a"], irr["acc_b"]) >= 0.9, (name, irr["acc_a"], irr["acc_b"])
        assert irr["acc_b"] - irr["single_a_on_b"] >= 0.25, name  # addition beats tau_t1 alone on irr
        assert irr["acc_a"] - irr["single_b_on_a"] >= 0.25, name
        ali = setting(report, name)["add_ali"]
        assert min(ali["acc_a"], ali["acc_b"]) >= 0.93, name  # measured 1.00


def test_addition_contradictory_fails(quick):
    _, report = quick
    for name in ("exact", *APPROXIMATE):
        con = setting(report, name)["add_con"]
        assert con["max_over_alpha_of_min"] <= 0.6, name  # measured ~0.5: acc(t1) + acc(con) ~ 1
    exact = setting(report, "exact")
    row = next(r for r in report["rows"] if r["claim_id"] == "add_contradictory" and r["setting"] == "exact")
    assert row["verdict"] == "holds"
    # the partially contradictory pair (cos -0.5) is learned together by addition in this model
    assert exact["add_pcon"]["max_over_alpha_of_min"] >= 0.9


def test_negation(quick):
    _, report = quick
    for name in ("exact", *APPROXIMATE):
        neg = setting(report, name)["neg_base"]
        # base - alpha tau_t1: t1 falls from fine-tuned 1.00 to ~0.0; pre stays at 1.00
        assert neg["target_finetuned"] - neg["target_after"] >= 0.6, name
        assert neg["target_after"] <= 0.3, name
        assert neg["control_after"] >= neg["control_before"] - 0.03, name
        assert neg["alpha"] > 0, name
        assert neg["con_after"] >= 0.9, name  # the contradictory task improves (0.5 -> ~1.0)

        kept = setting(report, name)["neg_keep_irr"]  # base + tau_irr - alpha tau_t1
        assert kept["target_after"] <= 0.3 and kept["target_before"] - kept["target_after"] >= 0.2, name
        assert kept["control_after"] >= kept["control_before"] - 0.03, name

        con = setting(report, name)["neg_keep_con"]  # base + tau_con - alpha tau_t1
        assert con["target_after"] <= 0.3 and con["control_min_over_alpha"] >= 0.9, name


def test_out_of_domain(quick):
    _, report = quick
    for name in ("exact", *APPROXIMATE):
        ood = setting(report, name)["ood_conf"]
        # measured: combination 1.00, best single vector 0.75-0.85
        assert ood["acc_combo"] >= 0.93, name
        assert ood["acc_combo"] - ood["acc_best_single"] >= 0.08, name
        assert ood["l1"] > 0 and ood["l2"] > 0, name
        assert setting(report, name)["ood_plain"]["acc_combo"] >= 0.93, name


def test_verdicts_of_the_core_claims(quick):
    _, report = quick
    verdicts = {(r["claim_id"], r["setting"]): r["verdict"] for r in report["rows"]}
    for cid in ("add_irrelevant", "add_aligned", "add_contradictory", "neg_irrelevant_base", "neg_irrelevant_kept", "ood_combination"):
        for name in ("exact", *APPROXIMATE):
            assert verdicts[cid, name] == "holds", (cid, name)


def test_zoo_is_deterministic(tmp_path):
    cfg = theory.Config(seeds=(3,), n_train=40, n_val=20, n_test=20, pretrain_steps=3, finetune_steps=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = theory.TheoryZoo(cfg, 3, tmp_path / "a", Dims())
        b = theory.TheoryZoo(cfg, 3, tmp_path / "b", Dims())
    finally:
        torch.set_num_threads(threads)
    for t in theory.FINETUNED:
        for k in a.base:
            assert torch.equal(a.finetuned[t][k], b.finetuned[t][k]), (t, k)
    assert (tmp_path / "a" / "t1.safetensors").read_bytes() == (tmp_path / "b" / "t1.safetensors").read_bytes()
