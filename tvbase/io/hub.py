"""Models in the local Hugging Face hub cache: their folders, and hub ids resolved offline.

``huggingface_hub`` keeps a downloaded model as ``CACHE/models--ORG--NAME/`` with three parts:
``blobs/`` (the files' contents, named by hash), ``refs/REVISION`` (a text file holding the
commit hash a branch or tag points to) and ``snapshots/COMMIT/`` (the model's files as relative
symlinks into ``../../blobs/``). tvbase reads a snapshot folder like any checkpoint folder,
counting links into its own entry's ``blobs/`` as inside it (:func:`cache_blobs`), and turns a
hub id ``ORG/NAME[@REVISION]`` into that folder (:func:`resolve_model_path`). Nothing is
downloaded, and ``huggingface_hub`` is not needed: the layout is all these functions read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tvbase.errors import InvalidInputError, NotFoundError
from tvbase.s3 import is_s3_url

__all__ = ["absolute_path", "cache_blobs", "hub_cache_dir", "is_hub_id", "resolve_model_path"]

# ORG/NAME as the hub allows them, then an optional @REVISION (a branch, tag or commit; "refs/pr/1")
_HUB_ID = re.compile(r"(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+(?:/[\w.-]+)*))?")


def hub_cache_dir() -> Path:
    """The hub cache folder: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def is_hub_id(text: str | os.PathLike) -> bool:
    """Whether ``text`` has the form of a hub id, ``ORG/NAME`` or ``ORG/NAME@REVISION``."""
    match = _HUB_ID.fullmatch(os.fspath(text))
    return match is not None and ".." not in (match["revision"] or "").split("/")


def resolve_model_path(path: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> Path:
    """Where a base or checkpoint named by the user is: a local path, or a cached hub model.

    Parameters
    ----------
    path : str or os.PathLike
        A local file or folder, or a hub id ``ORG/NAME`` or ``ORG/NAME@REVISION`` (branch, tag
        or commit hash; default ``main``). A local path that exists always wins.
    relative_to : str or os.PathLike, optional
        The folder a relative local path is relative to (a list file's); default the current one.

    Returns
    -------
    Path or str
        The local path when it exists or ``path`` is not a hub id (opening it then says what is
        wrong), else the snapshot folder ``CACHE/models--ORG--NAME/snapshots/COMMIT``; an
        ``s3://`` URL is returned as it is.

    Raises
    ------
    NotFoundError
        If ``path`` looks like a hub id, does not exist locally, and the model or revision is
        not in the cache; the message says where it looked.
    InvalidInputError
        If the cache entry's ref is malformed.
    """
    if is_s3_url(path):  # an object in a bucket: never a local path, never a hub id
        return path
    local = Path(relative_to or "", path)
    if local.exists() or not is_hub_id(path):
        return local
    match = _HUB_ID.fullmatch(os.fspath(path))
    revision = match["revision"] or "main"
    entry = hub_cache_dir() / f"models--{match['org']}--{match['name']}"
    snapshots = entry / "snapshots"
    ref = entry / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        if not re.fullmatch(r"[\w.-]+", commit) or commit.strip(".") == "":
            raise InvalidInputError(
                f"hub cache ref {str(ref)!r} holds {commit[:80]!r}: expected a commit hash; the cache entry "
                "is damaged: download the model again."
            )
    else:
        commit = revision  # a commit hash names its snapshot folder directly
    snapshot = snapshots / commit
    if snapshot.is_dir():
        return snapshot
    where = f"{str(entry)!r} holds no revision {revision!r}" if entry.is_dir() else f"there is no {str(entry)!r}"
    raise NotFoundError(
        f"{os.fspath(path)!r} is neither a local file or folder (there is no {str(local)!r}) nor a model in "
        f"the local Hugging Face cache ({where}; the cache is $HF_HUB_CACHE, else $HF_HOME/hub, else "
        "~/.cache/huggingface/hub). Check the path; for a hub model, tvbase "
        "never downloads: fetch it first (e.g. `huggingface-cli download ORG/NAME`), point HF_HUB_CACHE at "
        "your cache, or pass the model's local folder."
    )


def cache_blobs(directory: Path) -> Path | None:
    """The ``blobs/`` folder of the hub cache entry ``directory`` lies in, or None outside the cache.

    ``directory`` (or a folder above it) must be ``ENTRY/snapshots/COMMIT`` of an entry named
    ``TYPE--...`` (``models--org--name``) that has a ``blobs/`` folder.
    """
    directory = directory.resolve()
    for folder in (directory, *directory.parents):
        entry = folder.parent.parent
        if folder.parent.name == "snapshots" and "--" in entry.name and (entry / "blobs").is_dir():
            return entry / "blobs"
    return None


def absolute_path(path: str | os.PathLike) -> Path | str:
    """``path`` made absolute without following symlinks: what a store records for an input
    (an ``s3://`` URL is already absolute, and stays a str).

    A file of a cache snapshot is a symlink to a blob without the file's name or suffix, so the
    link, not its target, is what can be opened again (by ``compact``, or as the base).
    """
    return path if is_s3_url(path) else Path(os.path.abspath(path))
