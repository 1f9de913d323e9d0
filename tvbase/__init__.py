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
    StorageError,
    StoreLockedError,
    TvbaseError,
    TvbaseWarning,
)
from .methods.params import FitParams


def open_store(path, at=None):
    """Open the store at ``path`` (latest version, or version ``at``)."""
    from .store import Store

    return Store.open(path, at=at)


def __getattr__(name):
    # The store (zarr, Icechunk) is imported on first use, so that `tvbase --version` and the
    # command line's start-up do not pay for it.
    if name == "Store":
        from .store import Store

        return Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "AlreadyExistsError",
    "BaseMismatchError",
    "FitParams",
    "FormatVersionError",
    "IntegrityError",
    "InvalidInputError",
    "NotFoundError",
    "StorageError",
    "Store",
    "StoreLockedError",
    "TvbaseError",
    "TvbaseWarning",
    "open_store",
    "parse_expression",
]
