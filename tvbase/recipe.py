"""Recipes: a composition and its output written down in a YAML file, as mergekit's configs are.

::

    kind: merged             # what to write, one of KINDS (default: the kind of the command run)
    tasks:                   # task -> weight, or a list of {task: NAME, weight: NUMBER}
      math: 0.7
      code: 0.5
      toxic: -1.0
    base: ../models/base     # merged only (default: the base recorded in the store)
    output: merged/          # a directory, or a .safetensors file
    dtype: bfloat16          # float32, float16 or bfloat16

``tvbase compose STORE --recipe FILE`` writes kind ``delta``, ``tvbase apply STORE --recipe FILE``
kind ``merged``. Relative paths in a recipe are relative to the recipe's folder, so a recipe
works from any directory; options given on the command line override the recipe's values.

:func:`parse_recipe` validates loaded YAML and returns a :class:`Recipe` (a pure function);
:func:`load_recipe` reads the file. PyYAML is imported only by :func:`load_recipe`, so the
command line imports this module without paying for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from .arithmetic import MAX_ABS_COEFFICIENT
from .errors import InvalidInputError, NotFoundError
from .names import unknown_name, validate_task_name

__all__ = ["DTYPES", "KINDS", "OutputKind", "Recipe", "load_recipe", "parse_recipe"]

DTYPES = ("bfloat16", "float16", "float32")  # names of torch dtypes, looked up when a command runs
MAX_RECIPE_BYTES = 1024**2  # a recipe is a short text; a bigger file is the wrong file


@dataclass(frozen=True)
class OutputKind:
    """One kind of output a recipe can ask for.

    Attributes
    ----------
    name : str, the value of the recipe's ``kind``.
    command : str, the ``tvbase`` command that writes it.
    summary : str
    keys : tuple of str, the recipe keys it reads besides ``kind`` and ``tasks``.
    """

    name: str
    command: str
    summary: str
    keys: tuple[str, ...]


# A new kind (e.g. a LoRA adapter written by its own command) is one more row here.
KINDS = {
    kind.name: kind
    for kind in (
        OutputKind("delta", "compose", "the composition sum w_t tau_t, as a task-vector file", ("output", "dtype")),
        OutputKind("merged", "apply", "base + the composition, a model loadable as the base is",
                   ("base", "output", "dtype")),
        OutputKind("lora", "export-lora", "the composition as a PEFT LoRA adapter of at most rank 'rank'",
                   ("base", "output", "dtype", "rank")),
    )
}
_TASK_ITEM_KEYS = ("task", "weight")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (or the same request made with command-line options).

    Attributes
    ----------
    kind : str, a key of :data:`KINDS`.
    tasks : dict of str to float, task name -> weight, in the recipe's order.
    base : Path or None, the base model (kind ``merged``); None: the one recorded in the store.
    output : Path or None, where to write.
    dtype : str or None, one of :data:`DTYPES`; None: the command's default.
    rank : int or None, the largest rank of a LoRA adapter (kind ``lora``); None: the command's default.
    """

    kind: str
    tasks: dict[str, float]
    base: Path | None = None
    output: Path | None = None
    dtype: str | None = None
    rank: int | None = None

    @property
    def expression(self) -> str:
        """The tasks as an expression ``parse_expression`` reads back, e.g. ``0.7*math - 1.0*toxic``."""
        terms = [f"{' - ' if w < 0 else ' + '}{abs(w)!r}*{task}" for task, w in self.tasks.items()]
        text = "".join(terms)
        return "-" + text[3:] if text.startswith(" - ") else text[3:]

    def override(self, **options) -> Recipe:
        """The recipe with every option that is not None put in place of its value:
        command-line options given explicitly win over the recipe's values."""
        return dataclasses.replace(self, **{key: value for key, value in options.items() if value is not None})


def load_recipe(path, known=None, command=None) -> Recipe:
    """Read and validate the YAML recipe at ``path``.

    Parameters
    ----------
    path : str or Path
    known : iterable of str, optional, the store's tasks; every task must be one of them.
    command : str, optional, the command running the recipe (``"compose"``, ``"apply"``): the
        kind defaults to the command's, and a kind another command writes is refused.

    Returns
    -------
    Recipe, with relative paths taken relative to the recipe's folder.

    Raises
    ------
    NotFoundError
        If there is no file at ``path``, or a task is not in ``known``.
    InvalidInputError
        If the file is not YAML, or the recipe is invalid (see :func:`parse_recipe`).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"recipe {path} does not exist (or is not a file); check the path")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise InvalidInputError(f"recipe {path} is {size} bytes: a recipe is a short YAML file (at most "
                                f"{MAX_RECIPE_BYTES} bytes); check the path")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader(yaml))
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"recipe {path} is not UTF-8 text ({error}); save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).replace("\n", " ")
        raise InvalidInputError(f"recipe {path} is not valid YAML: {problem}{where}") from None
    return parse_recipe(data, known=known, command=command, relative_to=path.parent, where=f"recipe {path}")


def parse_recipe(data, known=None, command=None, relative_to=None, where="recipe") -> Recipe:
    """Validate a loaded recipe: a mapping with ``tasks`` and the keys its kind reads.

    Parameters
    ----------
    data : object, what ``yaml.safe_load`` gave.
    known : iterable of str, optional, the store's tasks.
    command : str, optional, the command running the recipe (see :func:`load_recipe`).
    relative_to : Path, optional, the folder relative paths are taken from.
    where : str, how messages name the recipe.

    Returns
    -------
    Recipe

    Raises
    ------
    NotFoundError
        For a task not in ``known`` (the message lists the known ones).
    InvalidInputError
        Naming the offending key and the valid ones: a recipe that is not a mapping, an unknown
        key, no ``kind`` where no command gives one, an unknown kind or one another command
        writes, no ``tasks``, a malformed task list, a task given twice, a weight that is not a
        finite number within +-1e6, a dtype not in :data:`DTYPES`, a path that is not a string.
    """
    if not isinstance(data, dict):
        raise InvalidInputError(f"{where} is {_describe(data)}: expected a mapping with the keys "
                                f"{', '.join(sorted(['kind', 'tasks', *_all_keys()]))}")
    kind = _parse_kind(data, command, where)
    valid = sorted(["kind", "tasks", *kind.keys])
    for key in data:
        if key not in valid:
            raise InvalidInputError(f"{where}: {_unknown_key(key, kind)}; valid keys for kind {kind.name!r}: "
                                    f"{', '.join(valid)}")
    if "tasks" not in data:
        raise InvalidInputError(f"{where}: key 'tasks' is missing: expected a mapping task -> weight, e.g. "
                                "'tasks: {math: 0.7, code: 0.5}'")
    tasks = _parse_tasks(data["tasks"], known, where)
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise InvalidInputError(f"{where}: key 'dtype' is {dtype!r}: expected one of {', '.join(DTYPES)}")
    base, output = (_parse_path(data, key, relative_to, where) for key in ("base", "output"))
    rank = data.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidInputError(f"{where}: key 'rank' is {_describe(rank)}: expected a positive integer")
    return Recipe(kind=kind.name, tasks=tasks, base=base, output=output, dtype=dtype, rank=rank)


def _parse_kind(data, command, where):
    kinds = ", ".join(f"{k.name} ({k.summary}; tvbase {k.command})" for k in KINDS.values())
    if "kind" not in data:
        default = [k for k in KINDS.values() if k.command == command]
        if not default:
            raise InvalidInputError(f"{where}: key 'kind' is missing; valid kinds: {kinds}")
        return default[0]
    name = data["kind"]
    if not isinstance(name, str) or name not in KINDS:
        raise InvalidInputError(f"{where}: key 'kind' is {name!r}, which is not a kind; valid kinds: {kinds}")
    kind = KINDS[name]
    if command is not None and kind.command != command:
        own = [k.name for k in KINDS.values() if k.command == command]
        raise InvalidInputError(
            f"{where}: key 'kind' is {name!r}, which `tvbase {kind.command}` writes, not `tvbase {command}`"
            f"{f' (it writes kind {own[0]!r})' if own else ''}; run `tvbase {kind.command} STORE --recipe ...`, "
            "or change the kind"
        )
    return kind


def _all_keys():
    return {key for kind in KINDS.values() for key in kind.keys}


def _unknown_key(key, kind):
    if key in _all_keys():
        users = [k.name for k in KINDS.values() if key in k.keys]
        return f"key {key!r} is not read by kind {kind.name!r} (only by {', '.join(users)}); remove it"
    close = difflib.get_close_matches(str(key), ["kind", "tasks", *_all_keys()], n=1)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _parse_tasks(value, known, where):
    """{task: weight} or [{task: ..., weight: ...}, ...] -> dict task -> float, in order."""
    if isinstance(value, dict):
        pairs = [(task, weight, f"tasks.{task}") for task, weight in value.items()]
    elif isinstance(value, list):
        pairs = []
        for i, item in enumerate(value):
            at = f"tasks[{i}]"
            if not isinstance(item, dict):
                raise InvalidInputError(f"{where}: {at} is {_describe(item)}: expected a mapping with the keys "
                                        "task and weight, e.g. '- {task: math, weight: 0.7}'")
            for key in item:
                if key not in _TASK_ITEM_KEYS:
                    raise InvalidInputError(f"{where}: {at} has unknown key {key!r}; valid keys: task, weight")
            for key in _TASK_ITEM_KEYS:
                if key not in item:
                    raise InvalidInputError(f"{where}: {at} has no key {key!r}; valid keys: task, weight")
            pairs.append((item["task"], item["weight"], f"{at}.weight"))
    else:
        raise InvalidInputError(f"{where}: key 'tasks' is {_describe(value)}: expected a mapping task -> weight "
                                "or a list of {task: NAME, weight: NUMBER}")
    if not pairs:
        raise InvalidInputError(f"{where}: key 'tasks' is empty: expected at least one task and its weight")
    known = None if known is None else sorted(known)
    tasks = {}
    for task, weight, at in pairs:
        if not isinstance(task, str):
            raise InvalidInputError(f"{where}: a task name is {_describe(task)}: expected a string "
                                    "(quote names YAML reads as numbers or booleans, e.g. 'yes')")
        if known is not None and task not in known:
            raise NotFoundError(f"{where}: {unknown_name('task', task, known)}")
        try:
            validate_task_name(task)  # a store's own names pass; checked for recipes read without one
        except InvalidInputError as error:
            raise InvalidInputError(f"{where}: {error}") from None
        if task in tasks:
            raise InvalidInputError(f"{where}: task {task!r} is given twice; give each task once, with its weight")
        tasks[task] = _parse_weight(weight, at, where)
    return tasks


def _parse_weight(weight, at, where):
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise InvalidInputError(f"{where}: {at} is {_describe(weight)}: expected a number, e.g. 0.7 or -1")
    weight = float(weight)
    if not math.isfinite(weight) or abs(weight) > MAX_ABS_COEFFICIENT:
        raise InvalidInputError(f"{where}: {at} is {weight!r}: expected a finite number within "
                                f"+-{MAX_ABS_COEFFICIENT:g}")
    return weight + 0.0  # -0.0 -> 0.0, as parse_expression does


def _parse_path(data, key, relative_to, where):
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{where}: key {key!r} is {_describe(value)}: expected a path (a non-empty string)")
    path = Path(value).expanduser()
    return path if relative_to is None or path.is_absolute() else Path(relative_to) / path


def _describe(value):
    if isinstance(value, str):
        return f"the string {value!r}"
    if value is None:
        return "empty"
    if isinstance(value, dict | list):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return f"{type(value).__name__} {value!r}"


def _unique_key_loader(yaml):
    """A safe YAML loader that refuses a key given twice (safe_load keeps the last silently)."""

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: SafeLoader reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader
