"""tvbase: many fine-tunes of one base model as a compact, factorized task-vector basis."""

from ._version import __version__
from .arithmetic import parse_expression
from .errors import (
    AlreadyExistsError,
    BaseMismatchError,
    FormatVersionError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StoreLockedError,
    TvbaseError,
)
from .methods import FitParams
from .store import Store


def open_store(path, at=None):
    """Open the store at ``path`` (latest version, or version ``at``)."""
    return Store.open(path, at=at)


__all__ = [
    "AlreadyExistsError",
    "BaseMismatchError",
    "FitParams",
    "FormatVersionError",
    "IntegrityError",
    "InvalidInputError",
    "NotFoundError",
    "Store",
    "StoreLockedError",
    "TvbaseError",
    "open_store",
    "parse_expression",
]
