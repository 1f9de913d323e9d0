"""One exception tree for tvbase.

Every error a user can cause derives from :class:`TvbaseError`; every warning from
:class:`TvbaseWarning`. Not-found errors are also
``KeyError``, bad input is also ``ValueError``, so callers can catch what they mean. The CLI maps
each class to an exit code (see ``EXIT_CODES``) and prints the message without a traceback.
"""


class TvbaseError(Exception):
    """Root of every tvbase error."""

    def __str__(self):  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class NotFoundError(TvbaseError, KeyError):
    """A store, task, tensor or version that does not exist."""


class InvalidInputError(TvbaseError, ValueError):
    """Bad user input: a malformed name, expression, budget, file or checkpoint."""


class BaseMismatchError(InvalidInputError):
    """A checkpoint does not match the store's base model (names, shapes or dtypes)."""


class AlreadyExistsError(TvbaseError, ValueError):
    """A store or task name that is already taken."""


class IntegrityError(TvbaseError):
    """Stored data failed a checksum or consistency check."""


class FormatVersionError(TvbaseError):
    """The store was written by a newer, incompatible format version."""


class StoreLockedError(TvbaseError):
    """Another writer holds the store's lock."""


class CommitConflictError(StoreLockedError):
    """Another writer committed first, so this write was refused whole (where writers are told
    apart by Icechunk's commit conflicts, or the store changed under a fit); running the
    operation again may succeed, which is what ``wait`` does."""


class StorageError(TvbaseError):
    """The storage cannot be reached, or refused access (credentials, permissions)."""


class ClusterError(TvbaseError):
    """The Dask cluster given for a fit cannot be reached (or, for ``local:N``, started), or lost
    its workers more often than it retries; nothing was written."""


class TvbaseWarning(UserWarning):
    """Something the user should know that does not stop the operation (the CLI prints one line)."""


# CLI exit codes, one per kind of failure (2 is argparse's own usage error).
EXIT_CODES = {
    NotFoundError: 3,
    BaseMismatchError: 4,
    InvalidInputError: 4,
    AlreadyExistsError: 5,
    IntegrityError: 6,
    FormatVersionError: 7,
    StoreLockedError: 8,
    StorageError: 9,
    ClusterError: 10,
    TvbaseError: 1,
}


def exit_code(error: TvbaseError) -> int:
    """Exit code for ``error``: the most specific class in ``EXIT_CODES`` wins."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1
