"""tvbase: many fine-tunes of one base model as a compact, factorized task-vector basis."""

__version__ = "0.1.0"

from .arithmetic import parse_expression  # noqa: E402
from .errors import (  # noqa: E402
    AlreadyExistsError,
    BaseMismatchError,
    FormatVersionError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StoreLockedError,
    TvbaseError,
)
from .methods import FitParams  # noqa: E402
from .store import Store  # noqa: E402


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
