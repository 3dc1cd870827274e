"""The commit transaction of a store: no reader ever sees a half-written store.

A store is written as one transaction of three steps:

1. :func:`prepare_store` refuses an existing store (unless ``overwrite``) and creates an empty staging
   directory beside it, ``.NAME.partial-<id>`` (:func:`staging_path`).
2. The caller writes the groups into the staging directory (:mod:`flatnorm_dask.store.encoding`).
3. :func:`commit_store` flushes the files, consolidates the metadata, writes the commit record (the root
   attribute ``flatnorm_commit``, built by :func:`_commit_record`) as the very last write, and publishes the
   staging directory at the store's path (:func:`_publish`); or :func:`abort_store` removes it.

:func:`store_transaction` runs the three steps around a ``with`` block.  :func:`read_commit` is the one
reader of the commit record: a directory is a complete store exactly when it returns one.

A killed run leaves only its ``.NAME.partial-*`` directory, which is never opened as a store; it is not
removed automatically, because a directory of that name may belong to a run still writing on another node.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "COMMIT_ATTR",
    "IncompleteStoreError",
    "StoreError",
    "StoreExistsError",
    "abort_store",
    "commit_store",
    "is_staging",
    "prepare_store",
    "read_commit",
    "staging_path",
    "store_transaction",
]

#: Root attribute whose presence makes a store complete: the commit record.
COMMIT_ATTR = "flatnorm_commit"
# Kinds of hidden sibling of a store: a write in progress, and an old store on its way out.
_PARTIAL = "partial"
_TRASH = "trash"


class StoreError(RuntimeError):
    """A store cannot be written or read; the one-line message names its path."""


class IncompleteStoreError(StoreError):
    """The path holds no commit marker: an interrupted run, or one still writing."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(f"{os.fspath(path)}: not a complete flatnorm store (no commit marker); it was interrupted "
                         "or is being written — rerun with --overwrite")


class StoreExistsError(StoreError):
    """The output path exists and ``overwrite`` was not given."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(f"{os.fspath(path)} exists; pass --overwrite to replace it")


# ------------------------------------------------------------------------------------------------- naming

def _sibling(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` in the same directory, so that os.rename stays on one file system."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}")


def staging_path(path: str | os.PathLike) -> Path:
    """A new, unique name for writing ``path`` (a store, or any file published by a rename) beside it."""
    return _sibling(Path(path), _PARTIAL)


def is_staging(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as a write in progress (whatever it holds, it is not a store)."""
    name = Path(path).name
    return name.startswith(".") and f".{_PARTIAL}-" in name


def _leftovers(path: Path) -> list[Path]:
    """Staging directories of earlier (interrupted or running) writes of ``path``."""
    return sorted(path.parent.glob(f".{path.name}.{_PARTIAL}-*")) if path.parent.is_dir() else []


# ---------------------------------------------------------------------------------------------- the steps

def _check_target(path: Path, overwrite: bool) -> None:
    """Refuse to write ``path`` when it exists, unless ``overwrite`` and it is a Zarr store directory (complete
    or not): never, e.g., a home directory named by a typo."""
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise StoreExistsError(path)
    if path.is_dir() and not path.is_symlink():
        if (path / "zarr.json").is_file() or not any(path.iterdir()):
            return
    raise StoreError(f"{path} exists and is not a Zarr store directory; refusing to replace it, even with "
                     "--overwrite")


def prepare_store(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check that ``path`` may be written and create the empty staging directory for it.

    Nothing is deleted here: an existing store is replaced only by :func:`commit_store`, once the new one
    is complete.

    Parameters
    ----------
    path : path-like
        The store to write (a directory, e.g. ``scales.zarr``).  Missing parent directories are created.
    overwrite : bool
        Allow replacing an existing store at ``path``.

    Returns
    -------
    Path
        The staging directory, ``.NAME.partial-<id>`` beside ``path``.

    Raises
    ------
    StoreExistsError
        ``path`` exists and ``overwrite`` is false.
    StoreError
        ``path`` exists but is not a Zarr store (never replaced), or the staging directory cannot be made.
    """
    path = Path(path)
    _check_target(path, overwrite)
    leftovers = _leftovers(path)
    if leftovers:
        # Not removed: another run (maybe on another node) could still be writing into one of them.
        log.warning("%d staging director%s of interrupted or running writes beside %s (e.g. %s); remove them "
                    "once no run writes there", len(leftovers), "y" if len(leftovers) == 1 else "ies", path,
                    leftovers[0].name)
    staging = staging_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:
        raise StoreError(f"{path}: cannot create the staging directory {staging}: {err.strerror or err}") from None
    return staging


def abort_store(staging: str | os.PathLike) -> None:
    """Remove a staging directory and whatever was written into it (the transaction is abandoned)."""
    shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory below ``root``, so a power cut after the rename cannot expose a
    store whose marker is on disk but whose chunks are not."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath, name))
        _fsync(Path(dirpath))  # some file systems cannot fsync a directory: then nothing more can be done


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit_record(staging: Path) -> dict[str, Any]:
    """What the commit marker records about the staged store: when, which groups, by which version.

    The one place that says what a commit holds (a later version may list the chunk keys, to verify them).
    """
    import zarr

    from .. import __version__

    groups = sorted(zarr.open_group(str(staging), mode="r", use_consolidated=False).group_keys())
    return {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "groups": groups,
            "flatnorm_dask": __version__}


def _publish(staging: Path, path: Path) -> None:
    """Rename the committed staging directory to ``path``, replacing the store there (if any) so that at every
    moment ``path`` is the complete old store, absent (between two renames), or the complete new store."""
    trash = None
    if path.exists() or path.is_symlink():
        trash = _sibling(path, _TRASH)
        try:
            os.rename(path, trash)
        except OSError as err:
            raise StoreError(f"{path}: cannot move the old store aside: {err.strerror or err}") from None
    try:
        os.rename(staging, path)
    except OSError as err:
        reason = err.strerror or str(err)
        if trash is not None:
            try:
                os.rename(trash, path)
            except OSError:
                raise StoreError(f"{path}: cannot rename the new store into place ({reason}); the old store "
                                 f"is at {trash}") from None
            raise StoreError(f"{path}: cannot rename the new store into place ({reason}); the old store is "
                             "kept") from None
        if path.exists():  # another run committed first: rename does not replace a non-empty directory
            raise StoreExistsError(path) from None
        raise StoreError(f"{path}: cannot rename the new store into place: {reason}") from None
    _fsync(path.parent)
    if trash is not None:
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)


def commit_store(staging: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Mark the staged store complete and move it to ``path``.

    The commit marker (root attribute ``flatnorm_commit`` = ``{"time", "groups", "flatnorm_dask"}``) is the
    last thing written, after every chunk is flushed and the metadata consolidated; then ``staging`` is
    renamed to ``path``.  An existing store (``overwrite``) is first renamed to ``.NAME.trash-<id>``, the new
    one renamed in, and only then the old one deleted: at every moment ``path`` is either the complete old
    store, absent (between the two renames), or the complete new store.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    StoreExistsError
        ``path`` appeared while the store was written and ``overwrite`` is false.
    StoreError
        ``staging`` is not a staged store, or a rename failed (the old store is then put back).
    """
    import zarr

    staging, path = Path(staging), Path(path)
    if not (staging / "zarr.json").is_file():
        raise StoreError(f"{staging}: not a staged store (no zarr.json; were its groups written?)")
    _check_target(path, overwrite)  # again: another run may have committed since prepare_store
    _fsync_tree(staging)
    with warnings.catch_warnings():
        # zarr notes that consolidated metadata is not in the v3 spec yet; readers without it still work.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(staging), zarr_format=3)
    record = _commit_record(staging)
    # Opened through the consolidated metadata, so the attribute update keeps it.
    zarr.open_group(str(staging), mode="r+").attrs.update({COMMIT_ATTR: record})
    _fsync(staging / "zarr.json")  # the marker itself, before the rename makes it visible
    _fsync(staging)
    _publish(staging, path)
    return path


@contextlib.contextmanager
def store_transaction(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a store as one transaction: :func:`prepare_store` on entry, yielding the staging directory to
    write into; :func:`commit_store` when the block ends normally; :func:`abort_store` if the block or the
    commit raises (or is interrupted), so that nothing is left looking complete.

    Examples
    --------
    >>> with store_transaction("scales.zarr") as staging:  # doctest: +SKIP
    ...     dask.compute(*write_groups(staging, datasets))
    """
    staging = prepare_store(path, overwrite=overwrite)
    try:
        yield staging
        commit_store(staging, path, overwrite=overwrite)
    except BaseException:
        abort_store(staging)
        raise


# ---------------------------------------------------------------------------------------------- the record

def read_commit(path: str | os.PathLike) -> dict[str, Any] | None:
    """The commit record of the store at ``path``, or None when ``path`` is not a complete store.

    Read from the root ``zarr.json`` (the v3 metadata) without opening the store.  A staging directory is
    never complete, even with a marker (between the marker write and the rename it holds one).
    """
    path = Path(path)
    if is_staging(path):
        return None
    try:
        with open(path / "zarr.json", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    record = attrs.get(COMMIT_ATTR) if isinstance(attrs, dict) else None
    if isinstance(record, dict) and isinstance(record.get("groups"), list):
        return record
    return None
