"""Measure the claims of Li et al. (ICLR 2025) on the paper's setting, composing through tvbase.

    python -m benchmarks.theory.run [--out benchmarks/results] [--quick] [--markdown PATH]

Per seed: draw an orthonormal frame of discriminative and irrelevant patterns, pretrain a base
one-layer transformer on an unrelated task (``pre``), fine-tune a copy (all parameters) on each
of ``t1``, ``irr`` (pattern orthogonal to t1), ``ali`` (aligned: cos(mu_ali, mu_t1) = 0.5, same
label sign), ``con`` (contradictory: mu_con = -mu_t1, i.e. t1 with its labels flipped) and
``pcon`` (partially contradictory: cos(mu_pcon, mu_t1) = -0.5), save
safetensors checkpoints, ingest them into tvbase stores and measure every edited model
``base + store.compose(coefficients)``:

1. addition  ``base + a (tau_1 + tau_2)``, ``a`` chosen on validation from linspace(0, 2, 21);
2. negation  ``base - a tau_t1`` and the paper's form ``base + tau_keep - a tau_t1``, ``a``: the
   largest validation drop of t1 whose control task keeps >= 95% of its accuracy before negation;
3. out-of-domain: pattern (mu_t1 + mu_irr)/sqrt(2), solved by ``base + l1 tau_t1 + l2 tau_irr`` on a
   grid; with a *confounder* ((mu_t1 - mu_irr)/sqrt(2) with a random sign) a model reading only
   one in-domain pattern is right on ~3/4 of the sequences, so both vectors are needed;
4. each of the above with the task vectors stored exactly, as rank-r SVDs, at tvbase's default
   fit at a small budget (int4 factors, cluster-shared bases), and magnitude-pruned.

Writes ``OUT/theory.json`` and the table between ``<!-- theory:start -->`` and
``<!-- theory:end -->`` of ``OUT/../RESULTS.md`` (read-modify-write: other sections stay), and
prints the table. Seeded and deterministic (single-threaded CPU torch).
"""

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tvbase import FitParams, Store
from tvbase.bench.report import markers, replace_section
from tvbase.testing.metrics import relative_error

from .model import Dims, Patterns, accuracy, init_params, param_shapes, sample_task, train

MARK_START, MARK_END = markers("theory")
PAPER = "Li et al., When is Task Vector Provably Effective for Model Editing? (ICLR 2025)"

# Thresholds of the verdicts (test accuracy, binary tasks: chance = 0.5).
SOLVED = 0.90  # a task counts as solved at this accuracy
NEAR_CHANCE = 0.60  # "near chance or below": unlearned / not learned
KEEP = 0.95  # negation keeps a control task: >= 95% of its accuracy before negation (Ilharco et al.)
OOD_GAIN = 0.05  # the combination beats the best single task vector by at least this much

FINETUNED = ("t1", "irr", "ali", "con", "pcon")  # tasks with a task vector in the stores


@dataclass(frozen=True)
class Config:
    seeds: tuple = (0, 1, 2)
    n_train: int = 1000
    n_val: int = 500
    n_test: int = 1000
    pretrain_steps: int = 200
    finetune_steps: int = 200
    lr: float = 0.5
    alphas: int = 21  # addition/negation coefficients: linspace(0, 2, alphas)
    ood_grid: int = 9  # out-of-domain: linspace(0, 2, ood_grid) for each of the two coefficients
    aligned_cos: float = 0.5
    partial_cos: float = -0.5
    ranks: tuple = (1, 2)
    budget: float = 0.10
    sparse_keep: float = 0.10


FULL = Config()
QUICK = Config(
    seeds=(0,), n_train=400, n_val=250, n_test=500, pretrain_steps=100, finetune_steps=100, alphas=11, ood_grid=5, ranks=(1,)
)


def settings(cfg):
    """Setting name -> description: how the stored task vectors approximate tau."""
    out = {"exact": "full-rank fp32 factors: the store reproduces τ to float precision (the reference, not a compression)"}
    for r in cfg.ranks:
        out[f"rank-{r}"] = f"per-task rank-{r} truncated SVD of every weight matrix (tvbase FitParams(rank={r})), fp32 factors"
    out[f"budget-{cfg.budget:.0%}"] = (
        f"tvbase's default fit, FitParams(budget={cfg.budget:g}): cluster-shared Tucker-2 bases, int4 factors and dense tensors"
    )
    out[f"sparse-{cfg.sparse_keep:.0%}"] = (
        f"magnitude pruning of τ per tensor keeping the top {cfg.sparse_keep:.0%} of entries, done before ingest; "
        "stored exactly (the approximation is the pruning, not the store)"
    )
    return out


def _grid(n):
    return [round(2.0 * i / (n - 1), 6) for i in range(n)]


# -- the zoo -----------------------------------------------------------------------------
def task_patterns(frame, cos, partial_cos):
    """Discriminative patterns of every task (unit vectors) and the OOD confounder."""
    e = frame.e
    return {
        "pre": e(0),  # the base's pretraining task, unrelated to every other task
        "t1": e(1),
        "irr": e(2),  # irrelevant: orthogonal to t1
        "ali": cos * e(1) + math.sqrt(1 - cos**2) * e(3),  # aligned: cos(mu_ali, mu_t1) = cos > 0
        "con": -e(1),  # contradictory: the label t1 gives +1 gives -1 here
        "pcon": partial_cos * e(1) + math.sqrt(1 - partial_cos**2) * e(4),  # partially contradictory
        "ood": (e(1) + e(2)) / math.sqrt(2),  # a combination of in-domain patterns
    }, (e(1) - e(2)) / math.sqrt(2)


class TheoryZoo:
    """Trained one-layer transformers of one seed: base, fine-tunes, their checkpoints and every data split."""

    def __init__(self, cfg, seed, root, dims=Dims()):
        self.seed, self.root, self.dims = seed, Path(root), dims
        gen = torch.Generator().manual_seed(seed)
        frame = Patterns(dims, 6, gen)
        mus, confounder = task_patterns(frame, cfg.aligned_cos, cfg.partial_cos)
        sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
        self.data = {}
        for task, mu in mus.items():
            splits = sizes if task != "ood" else {"val": cfg.n_val, "test": cfg.n_test}
            self.data[task] = {s: sample_task(frame, mu, n, gen) for s, n in splits.items()}
        self.data["ood_conf"] = {
            s: sample_task(frame, mus["ood"], n, gen, confounder) for s, n in (("val", cfg.n_val), ("test", cfg.n_test))
        }

        self.base = train(init_params(dims, gen), self.data["pre"]["train"], cfg.pretrain_steps, cfg.lr)
        self.finetuned = {t: train(self.base, self.data[t]["train"], cfg.finetune_steps, cfg.lr) for t in FINETUNED}
        self.tau = {t: {k: self.finetuned[t][k] - self.base[k] for k in self.base} for t in FINETUNED}
        self.tau_sparse = {t: {k: prune(v, cfg.sparse_keep) for k, v in tau.items()} for t, tau in self.tau.items()}

        self.root.mkdir(parents=True, exist_ok=True)
        self.base_path = self.root / "base.safetensors"
        save_file(self.base, self.base_path)
        self.paths, self.sparse_paths = {}, {}
        for t in FINETUNED:
            self.paths[t] = self.root / f"{t}.safetensors"
            save_file(self.finetuned[t], self.paths[t])
            self.sparse_paths[t] = self.root / f"{t}.sparse.safetensors"
            save_file({k: self.base[k] + self.tau_sparse[t][k] for k in self.base}, self.sparse_paths[t])

    def acc(self, params, task, split="test"):
        return round(accuracy(params, self.data[task][split]), 5)  # exact for n <= 10^5 samples


def prune(t, keep):
    """Keep the ``keep`` fraction of entries of ``t`` with the largest magnitude, zero the rest."""
    n = max(1, int(round(keep * t.numel())))
    flat = t.flatten()
    out = torch.zeros_like(flat)
    idx = torch.topk(flat.abs(), n, sorted=False).indices
    out[idx] = flat[idx]
    return out.reshape(t.shape)


def build_stores(cfg, zoo, root):
    """One tvbase store per setting. Returns {setting: Store}."""
    shapes = param_shapes(zoo.dims)
    full_rank = max(max(s) for s in shapes.values())
    exact = FitParams(rank=full_rank, bits=32, dense_bits=32)
    names = list(settings(cfg))
    stores = {}

    def create(name, params):
        return Store.create(root / name, zoo.base_path, params=params)

    stores[names[0]] = create(names[0], exact)
    stores[names[0]].ingest(zoo.paths, device="cpu", progress=False)
    for r, name in zip(cfg.ranks, names[1:]):
        # The first ingest fits a cluster-shared basis; with one task its rank-r basis and core
        # are that task's rank-r SVD. Later ingests store every task as its own rank-r SVD.
        s = stores[name] = create(name, FitParams(rank=r, bits=32, dense_bits=32))
        s.ingest({"t1": zoo.paths["t1"]}, device="cpu", progress=False)
        s.ingest({t: zoo.paths[t] for t in FINETUNED if t != "t1"}, device="cpu", progress=False)
    budget, sparse = names[-2], names[-1]
    stores[budget] = create(budget, FitParams(budget=cfg.budget))
    stores[budget].ingest(zoo.paths, device="cpu", progress=False)
    stores[sparse] = create(sparse, exact)
    stores[sparse].ingest(zoo.sparse_paths, device="cpu", progress=False)
    return stores


def store_summary(store, reference, sparse_reference=None):
    """Relative Frobenius error of every stored task vector against the true tau, and storage."""
    out = {"rel_error_vs_tau": {t: relative_error(store.get(t, device="cpu"), reference[t]) for t in FINETUNED}}
    if sparse_reference is not None:
        out["rel_error_vs_pruned_tau"] = {t: relative_error(store.get(t, device="cpu"), sparse_reference[t]) for t in FINETUNED}
    try:
        out["storage"] = {row["name"]: float(row["storage"]) for row in store.ls()}
    except Exception as exc:  # ls() belongs to the store's reporting API; not needed for the claims
        out["storage"] = f"unavailable: {exc}"
    return out


# -- editing through the store -------------------------------------------------------------
class Editor:
    """Edited models ``base + store.compose(coefficients)``, composed once per coefficient set."""

    def __init__(self, zoo, store):
        self.zoo, self.store = zoo, store
        self._cache = {}
        self.composes = 0

    def model(self, coefficients):
        coefficients = {t: float(a) for t, a in coefficients.items() if a != 0}
        key = tuple(sorted(coefficients.items()))
        if key not in self._cache:
            if not coefficients:
                self._cache[key] = self.zoo.base
            else:
                tau = self.store.compose(coefficients, device="cpu")
                self.composes += 1
                self._cache[key] = {k: self.zoo.base[k] + tau[k] for k in self.zoo.base}
        return self._cache[key]

    def acc(self, coefficients, task, split="test"):
        return self.zoo.acc(self.model(coefficients), task, split)


def _columns(rows):
    """A list of (nested) dicts as one list per leaf: {"alpha": [...], "t1.val": [...], ...}."""

    def leaves(row, prefix=""):
        for k, v in row.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    out = {}
    for row in rows:
        for k, v in leaves(row):
            out.setdefault(k, []).append(v)
    return out


def addition(ed, a, b, alphas):
    """base + alpha (tau_a + tau_b); alpha maximizes the mean validation accuracy on a and b."""
    curve = []
    for alpha in alphas:
        coef = {a: alpha, b: alpha}
        val, test = [ed.acc(coef, a, "val"), ed.acc(coef, b, "val")], [ed.acc(coef, a), ed.acc(coef, b)]
        curve.append({"alpha": alpha, "val": val, "test": test})
    best = max(curve, key=lambda r: sum(r["val"]))  # first (smallest alpha) of ties
    at_one = ed.acc({a: 1.0, b: 1.0}, a), ed.acc({a: 1.0, b: 1.0}, b)  # the plain sum tau_a + tau_b
    return {
        "alpha": best["alpha"],
        "acc_a": best["test"][0],
        "acc_b": best["test"][1],
        "acc_a_at_1": at_one[0],
        "acc_b_at_1": at_one[1],
        "single_a_on_a": ed.acc({a: 1.0}, a),
        "single_b_on_b": ed.acc({b: 1.0}, b),
        "single_a_on_b": ed.acc({a: 1.0}, b),
        "single_b_on_a": ed.acc({b: 1.0}, a),
        "max_over_alpha_of_min": max(min(r["test"]) for r in curve),
        "curve": _columns(curve),
    }


def negation(ed, keep, target, control, alphas, also=()):
    """base + keep - alpha tau_target; alpha: largest validation drop of ``target`` with
    ``control`` at >= KEEP of its validation accuracy at alpha = 0 (ties: smaller alpha)."""
    curve = []
    for alpha in alphas:
        coef = dict(keep)
        coef[target] = coef.get(target, 0.0) - alpha
        row = {"alpha": alpha}
        for task in (target, control):
            row[task] = {"val": ed.acc(coef, task, "val"), "test": ed.acc(coef, task)}
        for task in also:  # reported, not used to choose alpha
            row[task] = {"test": ed.acc(coef, task)}
        curve.append(row)
    before = curve[0]
    allowed = [r for r in curve if r[control]["val"] >= KEEP * before[control]["val"]]
    best = min(allowed, key=lambda r: (r[target]["val"], -r[control]["val"], r["alpha"]))
    out = {
        "alpha": best["alpha"],
        "target_finetuned": ed.acc({target: 1.0}, target),
        "target_before": before[target]["test"],
        "target_after": best[target]["test"],
        "control_before": before[control]["test"],
        "control_after": best[control]["test"],
        "control_min_over_alpha": min(r[control]["test"] for r in curve),
        "curve": _columns(curve),
    }
    for task in also:
        out[f"{task}_before"] = before[task]["test"]
        out[f"{task}_after"] = best[task]["test"]
    return out


def out_of_domain(ed, grid, task):
    """base + l1 tau_t1 + l2 tau_irr on a grid; the combination and each vector alone, chosen on val."""
    cells = []
    for l1 in grid:
        for l2 in grid:
            coef = {"t1": l1, "irr": l2}
            cells.append({"l1": l1, "l2": l2, "val": ed.acc(coef, task, "val"), "test": ed.acc(coef, task)})
    pick = lambda rows: max(rows, key=lambda r: r["val"])  # noqa: E731 - first of ties: smallest coefficients
    combo = pick(cells)
    only_t1 = pick([c for c in cells if c["l2"] == 0])
    only_irr = pick([c for c in cells if c["l1"] == 0])
    single = max((only_t1, only_irr), key=lambda r: r["val"])
    return {
        "l1": combo["l1"],
        "l2": combo["l2"],
        "acc_combo": combo["test"],
        "acc_t1_only": only_t1["test"],
        "l1_t1_only": only_t1["l1"],
        "acc_irr_only": only_irr["test"],
        "l2_irr_only": only_irr["l2"],
        "acc_best_single": single["test"],
        "grid": _columns(cells),
    }


def run_setting(cfg, zoo, store):
    ed = Editor(zoo, store)
    alphas, grid = _grid(cfg.alphas), _grid(cfg.ood_grid)
    res = {
        "finetuned_via_store": {t: ed.acc({t: 1.0}, t) for t in FINETUNED},
        "add_irr": addition(ed, "t1", "irr", alphas),
        "add_ali": addition(ed, "t1", "ali", alphas),
        "add_con": addition(ed, "t1", "con", alphas),
        "add_pcon": addition(ed, "t1", "pcon", alphas),
        "neg_base": negation(ed, {}, "t1", "pre", alphas, also=("con", "irr")),
        "neg_keep_irr": negation(ed, {"irr": 1.0}, "t1", "irr", alphas),
        "neg_keep_con": negation(ed, {"con": 1.0}, "t1", "con", alphas),
        "neg_keep_ali": negation(ed, {"ali": 1.0}, "t1", "ali", alphas),
        "ood_conf": out_of_domain(ed, grid, "ood_conf"),
        "ood_plain": out_of_domain(ed, grid, "ood"),
    }
    res["composes"] = ed.composes
    return res


# -- claims ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """One claim: ``holds(result)`` judges one seed's result of ``experiment``; ``measured`` is a
    template filled with the seed-mean of every metric (two decimals), ``{alpha}`` (per seed) and
    ``{coefs}`` (out-of-domain coefficients per seed)."""

    id: str
    text: str
    experiment: str
    holds: object
    measured: str
    contrast: bool = False  # not a claim of the paper: reported as kept / not kept


def _learned_both(r):
    return min(r["acc_a"], r["acc_b"]) >= SOLVED


def _fails_for_every_alpha(r):
    return r["max_over_alpha_of_min"] <= NEAR_CHANCE


def _unlearned_and_kept(r):
    return r["target_after"] <= NEAR_CHANCE and r["control_after"] >= KEEP * r["control_before"]


def _ood_needs_both(r):
    return r["acc_combo"] >= SOLVED and r["acc_combo"] - r["acc_best_single"] >= OOD_GAIN


_ADD = (
    "α={alpha}: t1 {acc_a}, {b} {acc_b} (at α=1: {acc_a_at_1}, {acc_b_at_1}); "
    "one vector on the other task: τ_t1→{b} {single_a_on_b}, τ_{b}→t1 {single_b_on_a}"
)
_ADD_FAILS = (
    "max over α of min(t1, {b}) = {max_over_alpha_of_min}; "
    "val-chosen α={alpha}: t1 {acc_a}, {b} {acc_b} (at α=1: {acc_a_at_1}, {acc_b_at_1})"
)
_NEG = "α={alpha}: t1 {target_before}→{target_after}, {c} {control_before}→{control_after}"

CLAIMS = [
    Claim(
        "add_irrelevant",
        "Addition learns irrelevant tasks together (mu_irr ⟂ mu_t1)",
        "add_irr",
        _learned_both,
        _ADD.replace("{b}", "irr"),
    ),
    Claim(
        "add_aligned",
        "Addition learns aligned tasks together (cos(mu_ali, mu_t1) = {cos})",
        "add_ali",
        _learned_both,
        _ADD.replace("{b}", "ali"),
    ),
    Claim(
        "add_contradictory",
        "Addition fails for contradictory tasks (mu_con = -mu_t1): one task near chance or below for every α",
        "add_con",
        _fails_for_every_alpha,
        _ADD_FAILS.replace("{b}", "con"),
    ),
    Claim(
        "add_partial_contradictory",
        "Addition fails for contradictory tasks, partial case cos(mu_pcon, mu_t1) = {pcos}: one task near chance or below for every α",
        "add_pcon",
        _fails_for_every_alpha,
        _ADD_FAILS.replace("{b}", "pcon"),
    ),
    Claim(
        "neg_irrelevant_base",
        "Negation base − α·τ_t1 unlearns t1 and keeps an irrelevant task (the base's pretraining task)",
        "neg_base",
        _unlearned_and_kept,
        "α={alpha}: t1 {target_before} (base), {target_finetuned} (fine-tuned) → {target_after}; pre {control_before}→{control_after}",
    ),
    Claim(
        "neg_contradictory_base",
        "Negation base − α·τ_t1 keeps (may improve) the contradictory task",
        "neg_base",
        lambda r: r["con_after"] >= KEEP * r["con_before"],
        "same α={alpha}: con {con_before}→{con_after} (the base never learned con)",
    ),
    Claim(
        "neg_irrelevant_kept",
        "Negation base + τ_irr − α·τ_t1 unlearns t1 and keeps the irrelevant task",
        "neg_keep_irr",
        _unlearned_and_kept,
        _NEG.replace("{c}", "irr"),
    ),
    Claim(
        "neg_contradictory_kept",
        "Negation base + τ_con − α·τ_t1 unlearns t1 and keeps the contradictory task",
        "neg_keep_con",
        _unlearned_and_kept,
        _NEG.replace("{c}", "con") + "; con ≥ {control_min_over_alpha} for every α",
    ),
    Claim(
        "neg_aligned_contrast",
        "Contrast, outside the negation guarantee: does base + τ_ali − α·τ_t1 unlearn t1 and keep the aligned task?",
        "neg_keep_ali",
        _unlearned_and_kept,
        _NEG.replace("{c}", "ali"),
        contrast=True,
    ),
    Claim(
        "ood_combination",
        "Out-of-domain task, mu = (mu_t1 + mu_irr)/√2 with a confounder: λ1·τ_t1 + λ2·τ_irr solves it, "
        "neither vector alone does as well",
        "ood_conf",
        _ood_needs_both,
        "(λ1, λ2)={coefs}: {acc_combo}; best single vector {acc_best_single} (τ_t1 only {acc_t1_only}, τ_irr only {acc_irr_only})",
    ),
    Claim(
        "ood_plain",
        "Out-of-domain task, mu = (mu_t1 + mu_irr)/√2, no confounder: λ1·τ_t1 + λ2·τ_irr solves it",
        "ood_plain",
        lambda r: r["acc_combo"] >= SOLVED,
        "(λ1, λ2)={coefs}: {acc_combo}; a single vector solves it too here: τ_t1 only {acc_t1_only}, τ_irr only {acc_irr_only}",
    ),
]


def measured_text(claim, per_seed):
    """Fill ``claim.measured`` from one experiment's per-seed results."""
    fields = {k: f"{sum(r[k] for r in per_seed) / len(per_seed):.2f}" for k, v in per_seed[0].items() if isinstance(v, (int, float))}
    if "alpha" in per_seed[0]:
        fields["alpha"] = "/".join(f"{r['alpha']:g}" for r in per_seed)
    if "l1" in per_seed[0]:
        fields["coefs"] = "/".join(f"({r['l1']:g}, {r['l2']:g})" for r in per_seed)
    return claim.measured.format_map(fields)


def verdict(holding, n, contrast=False):
    if contrast:
        return f"contrast: {'kept' if holding == n else 'not kept' if holding == 0 else f'kept in {holding}/{n} seeds'}"
    if holding == n:
        return "holds"
    if holding == 0:
        return "does not hold"
    return f"mixed: holds in {holding}/{n} seeds"


def claim_rows(cfg, per_seed):
    """One row per claim and setting, aggregated over seeds (means of test accuracies)."""
    rows = []
    for claim in CLAIMS:
        for setting in settings(cfg):
            rs = [per_seed[s]["settings"][setting][claim.experiment] for s in sorted(per_seed)]
            results = [bool(claim.holds(r)) for r in rs]
            rows.append(
                {
                    "claim_id": claim.id,
                    "claim": claim.text.format(cos=cfg.aligned_cos, pcos=cfg.partial_cos),
                    "setting": setting,
                    "measured": measured_text(claim, rs),
                    "verdict": verdict(sum(results), len(results), contrast=claim.contrast),
                    "holds_per_seed": results,
                    "metrics_mean": {k: sum(r[k] for r in rs) / len(rs) for k, v in rs[0].items() if isinstance(v, (int, float))},
                }
            )
    return rows


# -- output ----------------------------------------------------------------------------------
def markdown(report):
    cfg = report["config"]
    n = len(cfg["seeds"])
    lines = [
        "## Theory: the task-arithmetic claims of Li et al. (ICLR 2025), composed through tvbase",
        "",
        f"`{report['command']}` on {report['date']}: torch {report['torch']}, {report['device']}, "
        f"wall time {report['wall_s']:.0f} s, seeds {', '.join(map(str, cfg['seeds']))}"
        + (" (quick setting)" if report["quick"] else "") + ".",
        "",
        "Setting: the paper's one-layer transformer (one softmax-attention head, ReLU MLP, linear readout; "
        f"d = {report['dims']['d']}, {report['dims']['seq']} tokens) on binary tasks defined by a discriminative "
        "pattern (label +1 if the sequence holds μ, −1 if it holds −μ; the other tokens are irrelevant patterns "
        "plus noise). The base is pretrained on an unrelated task `pre`; `t1`, `irr` (μ ⟂ μ_t1), `ali` "
        f"(cos {cfg['aligned_cos']}), `con` (μ = −μ_t1) and `pcon` (cos {cfg['partial_cos']}) are full fine-tunes of "
        "it. Every edited model is `base + store.compose({task: coefficient})`. α is chosen on a validation split "
        f"from linspace(0, 2, {cfg['alphas']}); the out-of-domain coefficients from a {cfg['ood_grid']}×{cfg['ood_grid']} "
        "grid on [0, 2]²; ties go to the smallest coefficients. "
        f"Test accuracy, mean of {n} seed{'s' if n > 1 else ''} (α listed per seed); chance is 0.50.",
        "",
        "| claim | setting | measured (test accuracy) | verdict |",
        "|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['claim']} | {r['setting']} | {r['measured']} | {r['verdict']} |")
    lines += ["", "Settings:"]
    for name, desc in report["settings"].items():
        err, size = report["tau_rel_error_mean"][name], report["storage_mean"][name]
        size = f", stored size {size:.1%} of fp32" if size is not None else ""
        lines.append(f"- **{name}**: {desc}; mean ‖τ̂ − τ‖/‖τ‖ = {err:.3f}{size}.")
    t = report["thresholds"]
    lines += [
        "",
        f"Verdicts: solved = accuracy ≥ {t['solved']:.2f}; near chance or below ≤ {t['near_chance']:.2f}; a negation "
        f"keeps a control task at ≥ {t['keep']:.0%} of its accuracy before negation (and that rule picks α); the "
        f"out-of-domain combination must beat the best single vector by ≥ {t['ood_gain']:.2f}. A verdict holds only "
        "if it holds in every seed. With μ_con = −μ_t1 the two tasks have the same inputs and opposite labels, so "
        "acc(t1) + acc(con) ≈ 1 for every model and addition cannot solve both; the partially contradictory pair "
        f"(cos {cfg['partial_cos']}) is the non-trivial test of that claim. The confounder of the out-of-domain task "
        "is a design choice: without it a single in-domain vector already solves the task (the `no confounder` rows). "
        "Aligned-task negation is a contrast, not a claim of the paper.",
    ]
    return "\n".join(lines)


def to_json(obj, indent=0):
    """JSON with one key per line, but every list of numbers (curves, grids) on a single line."""
    pad = " " * indent
    if isinstance(obj, dict) and obj:
        items = [f'{pad} {json.dumps(str(k))}: {to_json(v, indent + 1).lstrip()}' for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        return pad + "[\n" + ",\n".join(to_json(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return pad + json.dumps(obj, ensure_ascii=False)


def write_section(path, section):
    """Replace this benchmark's section of ``path`` (see :mod:`tvbase.bench.report`)."""
    replace_section(path, "theory", section)


def run(cfg, workdir, log=print):
    per_seed = {}
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        zoo = TheoryZoo(cfg, seed, Path(workdir) / f"seed{seed}" / "checkpoints")
        stores = build_stores(cfg, zoo, Path(workdir) / f"seed{seed}" / "stores")
        t1 = time.perf_counter()
        entry = {
            "accuracy": {
                "base": {t: zoo.acc(zoo.base, t) for t in zoo.data},
                **{f"finetuned_{t}": {u: zoo.acc(zoo.finetuned[t], u) for u in zoo.data} for t in FINETUNED},
            },
            "stores": {},
            "settings": {},
        }
        for setting, store in stores.items():
            pruned = zoo.tau_sparse if setting.startswith("sparse") else None
            entry["stores"][setting] = store_summary(store, zoo.tau, pruned)
            entry["settings"][setting] = run_setting(cfg, zoo, store)
        t2 = time.perf_counter()
        entry["seconds"] = {"train_and_ingest": t1 - t0, "edit": t2 - t1}
        per_seed[seed] = entry
        log(f"seed {seed}: zoo and stores {t1 - t0:.1f} s, edits {t2 - t1:.1f} s")
    return per_seed


def _store_mean(per_seed, setting, key):
    """Mean over seeds and tasks of a per-task store figure (None where unavailable)."""
    values = [per_seed[s]["stores"][setting][key] for s in per_seed]
    if not all(isinstance(v, dict) for v in values):
        return None
    return sum(sum(v.values()) / len(v) for v in values) / len(values)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.theory.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for theory.json (default: benchmarks/results)")
    parser.add_argument("--markdown", default=None, help="markdown file to update (default: OUT/../RESULTS.md)")
    parser.add_argument("--quick", action="store_true", help="one seed, smaller data and grids (for tests)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    md_path = Path(args.markdown) if args.markdown else out.parent / "RESULTS.md"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and fair on a shared machine
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="tvbase-theory-") as work:
            per_seed = run(cfg, work)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - start

    dims = Dims()
    names = settings(cfg)
    report = {
        "benchmark": "theory",
        "paper": PAPER,
        "command": " ".join(["python -m benchmarks.theory.run", *(argv if argv is not None else sys.argv[1:])]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "torch": torch.__version__,
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores), 1 torch thread",
        "python": platform.python_version(),
        "wall_s": wall,
        "config": asdict(cfg),
        "dims": asdict(dims),
        "thresholds": {"solved": SOLVED, "near_chance": NEAR_CHANCE, "keep": KEEP, "ood_gain": OOD_GAIN},
        "settings": names,
        "tau_rel_error_mean": {name: _store_mean(per_seed, name, "rel_error_vs_tau") for name in names},
        "storage_mean": {name: _store_mean(per_seed, name, "storage") for name in names},
        "rows": claim_rows(cfg, per_seed),
        "seeds": {str(s): v for s, v in per_seed.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "theory.json").write_text(to_json(report) + "\n")
    section = markdown(report)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    write_section(md_path, section)
    print(section)
    print(f"\nwrote {out / 'theory.json'} and the theory section of {md_path} ({wall:.0f} s)")
    return report


if __name__ == "__main__":
    main()
