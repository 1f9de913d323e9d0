"""Recipes (tvbase.recipe): every validation error, and both kinds end to end through the CLI."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvbase.arithmetic import parse_expression
from tvbase.cli import main
from tvbase.errors import InvalidInputError, NotFoundError
from tvbase.recipe import KINDS, Recipe, load_recipe, parse_recipe
from tvbase.store import Store

KNOWN = ["a0", "a1", "b0", "c_new"]


def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- parsing -------------------------------------------------------------------------------------
def test_mapping_and_list_forms_agree(tmp_path):
    mapping = load_recipe(_write(tmp_path, """
        kind: merged
        tasks: {b0: 0.5, a0: -1, a1: 2.5e-1}
        base: models/base
        output: /abs/out
        dtype: bfloat16
    """), known=KNOWN)
    listed = load_recipe(_write(tmp_path, """
        kind: merged
        tasks:
          - {task: b0, weight: 0.5}
          - task: a0
            weight: -1
          - {task: a1, weight: 0.25}
        base: models/base
        output: /abs/out
        dtype: bfloat16
    """, "list.yaml"), known=KNOWN)
    assert mapping == listed
    assert list(mapping.tasks.items()) == [("b0", 0.5), ("a0", -1.0), ("a1", 0.25)]  # the recipe's order
    assert all(isinstance(w, float) for w in mapping.tasks.values())
    assert mapping.base == tmp_path / "models" / "base"  # relative to the recipe's folder
    assert str(mapping.output) == "/abs/out" and mapping.dtype == "bfloat16" and mapping.kind == "merged"
    assert parse_expression(mapping.expression) == mapping.tasks  # the expression reads back


def test_expression_of_a_leading_negative_weight():
    recipe = Recipe("delta", {"a0": -0.5, "b0": 1e-7, "c_new": -3.0})
    assert recipe.expression == "-0.5*a0 + 1e-07*b0 - 3.0*c_new"
    assert parse_expression(recipe.expression) == recipe.tasks


def test_kind_defaults_to_the_commands():
    assert parse_recipe({"tasks": {"a0": 1}}, command="compose").kind == "delta"
    assert parse_recipe({"tasks": {"a0": 1}}, command="apply").kind == "merged"
    assert parse_recipe({"tasks": {"a0": 1}, "rank": 8}, command="export-lora").kind == "lora"
    assert {kind.command for kind in KINDS.values()} == {"compose", "apply", "export-lora"}


@pytest.mark.parametrize("rank", [0, -3, 2.5, True, "8"])
def test_lora_rank_must_be_a_positive_integer(rank):
    with pytest.raises(InvalidInputError, match="key 'rank'.*positive integer"):
        parse_recipe({"tasks": {"a0": 1}, "rank": rank}, command="export-lora")


def test_rank_is_a_key_of_lora_recipes_only():
    with pytest.raises(InvalidInputError, match="rank"):
        parse_recipe({"tasks": {"a0": 1}, "rank": 8}, command="apply")


def test_options_override_recipe_values(tmp_path):
    recipe = parse_recipe({"tasks": {"a0": 1}, "output": "o", "dtype": "float16"}, command="compose",
                          relative_to=tmp_path)
    assert recipe.override(output=None, dtype=None) == recipe  # options not given keep the recipe's
    changed = recipe.override(output=tmp_path / "flag", dtype="float32")
    assert changed.output == tmp_path / "flag" and changed.dtype == "float32" and changed.tasks == recipe.tasks


BAD = {
    # name: (YAML text, error class, every fragment the message must hold)
    "not a mapping": ("- a0\n- b0\n", InvalidInputError, ["is a list", "expected a mapping", "kind, output, rank, tasks"]),
    "empty file": ("", InvalidInputError, ["is empty", "expected a mapping"]),
    "unknown key": ("tasks: {a0: 1}\ntaks: 1\n", InvalidInputError,
                    ["unknown key 'taks'", "did you mean 'tasks'", "valid keys for kind 'delta': dtype, kind, output, tasks"]),
    "key of another kind": ("tasks: {a0: 1}\nbase: b\n", InvalidInputError,
                            ["key 'base' is not read by kind 'delta'", "only by merged", "valid keys"]),
    "missing tasks": ("output: o\n", InvalidInputError, ["key 'tasks' is missing"]),
    "empty tasks": ("tasks: {}\n", InvalidInputError, ["key 'tasks' is empty"]),
    "tasks a string": ("tasks: a0 + b0\n", InvalidInputError, ["key 'tasks' is the string 'a0 + b0'", "mapping"]),
    "unknown task": ("tasks: {a0: 1, a00: 2}\n", NotFoundError,
                     ["no task 'a00'", "did you mean 'a0'", "Known: a0, a1, b0, c_new"]),
    "boolean task name": ("tasks: {yes: 1}\n", InvalidInputError, ["a task name is bool True", "expected a string", "quote"]),
    "task twice": ("tasks:\n  - {task: a0, weight: 1}\n  - {task: a0, weight: 2}\n", InvalidInputError,
                   ["task 'a0' is given twice"]),
    "duplicate key": ("tasks:\n  a0: 1\n  a0: 2\n", InvalidInputError, ["not valid YAML", "key 'a0' is given twice",
                                                                        "line 3"]),
    "item not a mapping": ("tasks: [a0]\n", InvalidInputError, ["tasks[0] is the string 'a0'", "task and weight"]),
    "item unknown key": ("tasks: [{task: a0, wieght: 1}]\n", InvalidInputError,
                         ["tasks[0] has unknown key 'wieght'", "valid keys: task, weight"]),
    "item without weight": ("tasks: [{task: a0}]\n", InvalidInputError, ["tasks[0] has no key 'weight'"]),
    "weight a string": ("tasks: {a0: '0.5'}\n", InvalidInputError, ["tasks.a0 is the string '0.5'", "expected a number"]),
    "weight a bool": ("tasks: {a0: true}\n", InvalidInputError, ["tasks.a0 is bool True", "expected a number"]),
    "weight missing": ("tasks: {a0: }\n", InvalidInputError, ["tasks.a0 is empty", "expected a number"]),
    "weight infinite": ("tasks: [{task: a0, weight: .inf}]\n", InvalidInputError,
                        ["tasks[0].weight is inf", "finite number within +-1e+06"]),
    "weight nan": ("tasks: {a0: .nan}\n", InvalidInputError, ["tasks.a0 is nan"]),
    "weight too large": ("tasks: {a0: 2.0e+6}\n", InvalidInputError, ["tasks.a0 is 2000000.0"]),
    "bad dtype": ("tasks: {a0: 1}\ndtype: int8\n", InvalidInputError,
                  ["key 'dtype' is 'int8'", "expected one of bfloat16, float16, float32"]),
    "bad kind": ("tasks: {a0: 1}\nkind: adapter\n", InvalidInputError,
                 ["key 'kind' is 'adapter', which is not a kind", "valid kinds: delta", "merged", "lora"]),
    "kind of another command": ("tasks: {a0: 1}\nkind: merged\n", InvalidInputError,
                                ["kind' is 'merged', which `tvbase apply` writes, not `tvbase compose`",
                                 "(it writes kind 'delta')", "run `tvbase apply STORE --recipe"]),
    "output not a string": ("tasks: {a0: 1}\noutput: [a, b]\n", InvalidInputError,
                            ["key 'output' is a list", "expected a path"]),
    "not YAML": ("tasks: {a0: 1\n", InvalidInputError, ["not valid YAML", "line 2"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_recipes_name_the_key_and_the_choices(case, tmp_path):
    text, error, fragments = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(error) as info:
        load_recipe(path, known=KNOWN, command="compose")
    message = str(info.value)
    assert message.startswith(f"recipe {path}"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message


def test_missing_kind_without_a_command_and_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match="key 'kind' is missing; valid kinds: delta .*merged"):
        parse_recipe({"tasks": {"a0": 1}})
    with pytest.raises(NotFoundError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(InvalidInputError, match="task name 'a b' is not allowed"):  # checked without a store too
        parse_recipe({"tasks": {"a b": 1}}, command="compose")


# -- the command line ----------------------------------------------------------------------------
def _ok(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _fails(capsys, argv, expected_code):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == expected_code, (code, captured.err)
    assert captured.err.startswith("tvbase: error: ") and "Traceback" not in captured.err, captured.err
    return captured.err


def test_compose_recipe_writes_the_delta(populated, tmp_path, capsys):
    recipe = _write(tmp_path, """
        tasks:
          - {task: a0, weight: 0.5}
          - {task: b1, weight: -1}
        output: out/delta.safetensors
    """)
    out = _ok(capsys, ["compose", populated["path"], "--recipe", recipe, "--device", "cpu"])
    assert "wrote '0.5*a0 - 1.0*b1'" in out
    written = load_file(tmp_path / "out" / "delta.safetensors")  # relative to the recipe's folder
    expected = Store.open(populated["path"]).compose({"a0": 0.5, "b1": -1.0}, device="cpu")
    assert set(written) == set(expected)
    assert all(written[n].dtype == torch.float32 and torch.equal(written[n], expected[n]) for n in expected)
    # -o and --dtype given on the command line win over the recipe
    _ok(capsys, ["compose", populated["path"], "--recipe", recipe, "-o", tmp_path / "flag.safetensors",
                 "--dtype", "bfloat16", "--device", "cpu"])
    flagged = load_file(tmp_path / "flag.safetensors")
    assert all(flagged[n].dtype == torch.bfloat16 for n in expected)


def test_apply_recipe_writes_the_merged_model(populated, zoo, tmp_path, capsys, rel_error):
    recipe = _write(tmp_path, f"""
        kind: merged
        tasks: {{a1: 0.7, c_new: -0.2}}
        base: {zoo.base}
        output: merged
        dtype: float16
    """)
    _ok(capsys, ["apply", populated["path"], "--recipe", recipe, "--device", "cpu"])
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    composed = Store.open(populated["path"]).compose({"a1": 0.7, "c_new": -0.2}, device="cpu")
    for name, weight in zoo.base_tensors.items():
        if weight.is_floating_point():
            assert merged[name].dtype == torch.float16, name
            assert rel_error(merged[name], weight.double() + composed[name].double()) <= 1e-3, name
        else:
            assert torch.equal(merged[name], weight), name  # integer tensors keep theirs
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["model.safetensors"]  # a single-file base


def test_command_line_errors_leave_store_and_output_alone(populated, tmp_path, capsys, snapshot_state):
    before = snapshot_state(populated["path"])
    store = populated["path"]
    recipe = _write(tmp_path, "tasks: {a0: 1}\n")
    out = tmp_path / "out"
    err = _fails(capsys, ["compose", store, "a0", "--recipe", recipe, "-o", out], 4)
    assert "give either the expression 'a0' or --recipe" in err and "not both" in err
    assert "give either an EXPRESSION" in _fails(capsys, ["apply", store, "-o", out], 4)
    assert "no output given: pass -o/--output, or set 'output:' in the recipe" in _fails(
        capsys, ["compose", store, "--recipe", recipe], 4)
    assert "which `tvbase compose` writes, not `tvbase apply`" in _fails(
        capsys, ["apply", store, "--recipe", _write(tmp_path, "kind: delta\ntasks: {a0: 1}\n", "d.yaml"), "-o", out], 4)
    assert "no task 'a00'" in _fails(capsys, ["apply", store, "--recipe", _write(tmp_path, "tasks: {a00: 1}\n", "u.yaml"),
                                              "-o", out], 3)
    assert "does not exist" in _fails(capsys, ["compose", store, "--recipe", tmp_path / "none.yaml", "-o", out], 3)
    assert not out.exists()
    assert snapshot_state(store) == before


def test_start_up_imports_neither_torch_nor_yaml():
    code = textwrap.dedent("""
        import sys
        from tvbase.cli import build_parser
        for argv in (["--version"], ["apply", "--help"], ["compose", "--help"]):
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                pass
        print(sorted(m for m in ("torch", "yaml", "transformers") if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                            cwd=Path(__file__).resolve().parents[1])  # this checkout's tvbase
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_readme_recipe_is_valid():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```yaml\n# merge.yaml\n", 1)[1].split("```", 1)[0]
    import yaml

    recipe = parse_recipe(yaml.safe_load(block), known=["code", "math", "toxic"], command="apply",
                          relative_to=Path("recipes"))
    assert recipe.kind == "merged" and recipe.tasks == {"math": 0.7, "code": 0.5, "toxic": -1.0}
    assert recipe.output == Path("recipes/merged") and recipe.base == Path("recipes/models/base")
