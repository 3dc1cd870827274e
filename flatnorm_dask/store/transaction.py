"""The commit transaction of a store: a committed store is never lost, never half-written, never mixed.

On disk (one POSIX directory; ``NAME`` is the store's name, e.g. ``scales.zarr``)::

    NAME                         symlink -> .NAME.versions/<version-id>   the pointer (relative target)
    .NAME.versions/<version-id>/ a committed Zarr v3 group, never modified after its commit
    .NAME.versions/<stamp>.partial-<token>/   a run writing (never opened as a store)
    .NAME.lock                   lock file, held (flock) only while a commit swaps the pointer

A store is written as one transaction:

1. :func:`prepare_store` checks the output path (refuses an existing store unless ``overwrite``; never
   replaces anything that is not a flatnorm store) and creates an empty staging directory in
   ``.NAME.versions/``.
2. The caller writes the groups into it (:mod:`flatnorm_dask.store.encoding`).
3. :func:`commit_store` seals it (every file flushed, metadata consolidated, the manifest of every key and its
   size written, then the commit record as the very last write) and, under the lock, checks the path again,
   renames the staging directory to a new version and points ``NAME`` at it: with ``os.symlink``, which fails
   if anything appeared at ``NAME`` (a run without ``overwrite`` never replaces a store, whatever runs beside
   it), or by renaming a new symlink over the old one (``overwrite``: atomic).  Versions beyond the newest
   ``keep_versions`` previous ones are then deleted.  Or :func:`abort_store` removes the staging directory.

:func:`store_transaction` runs the three steps around a ``with`` block.  Readers resolve the pointer once
(:func:`flatnorm_dask.store.open_store`) and so keep reading the version they opened, whatever commits later.
:func:`read_commit` is the one reader of the commit record; :func:`current_version` says which version a
store's pointer names, for a writer that must commit only if it still does (``expect_version``: an append).

A store written before versions existed (a plain directory holding the commit record) is still read, and is
moved into ``.NAME.versions/`` as a version of its own when a run overwrites it.

A killed run leaves only its staging directory, never opened as a store; it is not removed automatically (it
may belong to a run still writing on another node): :func:`prepare_store` reports those older than a day.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zarr.storage import LocalStore

from ..config import OutputConfig

log = logging.getLogger(__name__)

__all__ = [
    "COMMIT_ATTR",
    "LEGACY_VERSION",
    "MANIFEST_FILE",
    "IncompleteStoreError",
    "OutputPathError",
    "StoreChangedError",
    "StoreError",
    "StoreExistsError",
    "StagingStore",
    "StoreTransaction",
    "StoreVersion",
    "abort_store",
    "check_output_file",
    "commit_store",
    "current_version",
    "is_staging",
    "prepare_store",
    "read_commit",
    "remove_store",
    "staging_path",
    "store_transaction",
    "version_id_of",
]

#: Root attribute whose presence makes a store complete: the commit record.
COMMIT_ATTR = "flatnorm_commit"
#: File in a version's root listing every key (chunk and metadata file) of the version and its size in bytes.
MANIFEST_FILE = "flatnorm-manifest.json"
#: The version id of a store written before versions existed (a plain directory at the store's path).
LEGACY_VERSION = "legacy"

# Name parts of the hidden entries beside and below a store.
_VERSIONS = ".versions"  # .NAME.versions: the directory of the versions
_PARTIAL = "partial"  # a write in progress (a staging directory, or a file published by a rename)
_DELETING = "deleting"  # a version on its way out
_ABORT_PASSES = 20  # removals of an abandoned staging directory while late writes may still land in it
_POINTER = "pointer"  # a new pointer about to be renamed over the old one
_VERSION_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{12}$")
_STAMP = "%Y%m%dT%H%M%S.%fZ"
#: Staging directories older than this are reported by prepare_store (as left by a killed run).
_STALE_SECONDS = 86400.0
#: Why a hard link cannot be made where a copy can: another file system, one without hard links, too many links.
_NO_HARD_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)
#: fsync calls in flight at once when a store is sealed.
_FSYNC_THREADS = 32


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


class StoreChangedError(StoreError):
    """Another run committed a new version while this one was writing from the version it started from."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(f"{os.fspath(path)}: the store changed while this run was writing (another run committed "
                         "a new version); rerun")


class OutputPathError(StoreError):
    """An output path (a store, a YAML file) cannot be written there; the message names the user's path."""


@dataclass(frozen=True)
class StoreVersion:
    """One committed version of a store.

    ``store`` is the path the user gave (error messages name it), ``id`` the version's id
    (:data:`LEGACY_VERSION` for a store from before versions), ``path`` the version's own directory, which
    never changes after its commit (a legacy store's is its path).
    """

    store: Path
    id: str
    path: Path


@dataclass
class StoreTransaction:
    """A store being written by :func:`store_transaction`: write into ``staging``; ``version`` is the committed
    version once the ``with`` block has ended."""

    store: Path
    staging: Path
    version: StoreVersion | None = None


# ------------------------------------------------------------------------------------------- test hook

#: Tests only: called as ``_pause_at(step, store)`` at each step of a transaction (see :func:`_checkpoint`),
#: to run several writers in a chosen order.  None in normal use.
_pause_at: Callable[[str, Path], None] | None = None
#: Tests only, for a run in another process: ``STEP[,STEP...]@DIR`` makes the run create ``DIR/STEP.<pid>`` at
#: each listed step and wait until that file is removed.
_PAUSE_ENV = "FLATNORM_TEST_PAUSE"
#: The steps, in order: staging created; store sealed (commit record written), before the lock; lock held,
#: before the re-check; version renamed into place, before the pointer; pointer published, before clean-up.
STEPS = ("prepared", "sealed", "locked", "renamed", "published")


def _checkpoint(step: str, store: Path) -> None:
    if _pause_at is not None:
        _pause_at(step, store)
    spec = os.environ.get(_PAUSE_ENV)
    if spec:
        steps, _, where = spec.partition("@")
        if step in steps.split(","):
            flag = Path(where, f"{step}.{os.getpid()}")
            flag.touch()
            deadline = time.monotonic() + 600  # a forgotten pause must not hang a run for ever
            while flag.exists() and time.monotonic() < deadline:
                time.sleep(0.01)


# ------------------------------------------------------------------------------------------------- naming

def _versions_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}{_VERSIONS}")


def version_id_of(directory: str | os.PathLike) -> str | None:
    """The version id of a committed version's directory (``.NAME.versions/<id>``), else None."""
    directory = Path(directory)
    parent = directory.parent.name
    if parent.startswith(".") and parent.endswith(_VERSIONS) and _VERSION_RE.match(directory.name):
        return directory.name
    return None


def _lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _pointer_target(path: Path, version_id: str) -> str:
    """The pointer's relative target: the store and its versions move together."""
    return f"{_versions_dir(path).name}/{version_id}"


def staging_path(path: str | os.PathLike) -> Path:
    """A new, unique hidden name beside ``path`` for writing a file that is then published by a rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_PARTIAL}-{uuid.uuid4().hex[:12]}")


def is_staging(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as a write in progress or a version being deleted (whatever it holds, it is
    not a store)."""
    name = Path(path).name
    return f".{_PARTIAL}-" in name or f".{_DELETING}-" in name


def _stamp(when: dt.datetime | None = None) -> str:
    return (when or dt.datetime.now(dt.timezone.utc)).strftime(_STAMP)


def _committed_versions(versions: Path) -> list[str]:
    """Ids of the committed versions in ``versions``, oldest first (ids sort by commit time)."""
    try:
        names = os.listdir(versions)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if _VERSION_RE.match(name))


def _new_version_id(versions: Path) -> str:
    """A unique id sorting after every version already there, even if this host's clock is behind."""
    now = dt.datetime.now(dt.timezone.utc)
    existing = _committed_versions(versions)
    if existing:
        latest = dt.datetime.strptime(existing[-1].split("-")[0], _STAMP).replace(tzinfo=dt.timezone.utc)
        now = max(now, latest + dt.timedelta(microseconds=1))
    return f"{_stamp(now)}-{uuid.uuid4().hex[:12]}"


def _version_id_before(version_id: str) -> str:
    """A unique id sorting just before ``version_id`` (for a legacy store it replaces)."""
    when = dt.datetime.strptime(version_id.split("-")[0], _STAMP) - dt.timedelta(microseconds=1)
    return f"{_stamp(when)}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------------------- what is at a path

def _kind(path: Path) -> str:
    """What ``path`` holds: ``absent``; ``pointer`` (a store's symlink into its versions); ``legacy`` (a store
    directory from before versions, holding its commit record); ``empty`` (an empty directory); ``foreign``
    (anything else, another Zarr store included: never replaced)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # the latter: below a file, which _check_parent reports
        return "absent"
    except OSError as err:
        raise OutputPathError(f"{path}: cannot inspect it: {err.strerror or err}") from None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        prefix = _versions_dir(path).name + "/"
        return "pointer" if target.startswith(prefix) and _VERSION_RE.match(target[len(prefix):]) else "foreign"
    if stat.S_ISDIR(st.st_mode):
        if read_commit(path) is not None:
            return "legacy"
        try:
            with os.scandir(path) as entries:
                return "foreign" if any(entries) else "empty"
        except OSError:
            return "foreign"
    return "foreign"


def _current_id(path: Path) -> str | None:
    """The version id ``path``'s pointer names (:data:`LEGACY_VERSION` for a legacy store), None if none."""
    kind = _kind(path)
    if kind == "pointer":
        return os.readlink(path).split("/", 1)[1]
    return LEGACY_VERSION if kind == "legacy" else None


def current_version(path: str | os.PathLike) -> StoreVersion:
    """The version a store's pointer names now: what a writer that builds on the store (an append) starts from.

    Pass its ``id`` as ``expect_version`` to :func:`prepare_store` / :func:`commit_store`, and open exactly it
    with :func:`flatnorm_dask.store.open_store`.

    Raises
    ------
    StoreError
        ``path`` is not a store written by flatnorm, or its current version is missing.
    """
    path = Path(path)
    kind = _kind(path)
    if kind == "absent":
        raise StoreError(f"{path}: no such store")
    if kind == "pointer":
        version_id = _current_id(path)
        version = _versions_dir(path) / version_id
        if not version.is_dir():
            raise StoreError(f"{path}: the store's current version is missing (removed by hand?); rerun with "
                             "--overwrite")
        return StoreVersion(path, version_id, version)
    if kind == "legacy":
        return StoreVersion(path, LEGACY_VERSION, path)
    raise StoreError(f"{path}: not a flatnorm store")


# ------------------------------------------------------------------------------------ checking the outputs

def _check_parent(target: Path, shown: str | os.PathLike) -> None:
    """The directory ``target`` goes into exists or can be created, and can be written."""
    existing = target.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{os.fspath(shown)}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{os.fspath(shown)}: cannot write in {existing}: permission denied")


def check_output_file(path: str | os.PathLike) -> Path:
    """Check, before any work, that a file (e.g. the scales YAML) can be written at ``path``.

    Its directory must exist or be creatable, and be writable; ``path`` must not be a directory or a special
    file (FIFO, device, socket).  A symbolic link is followed: the file it names is the one replaced.

    Returns
    -------
    Path
        The path to write (the link's target for a symbolic link).

    Raises
    ------
    OutputPathError
        With a one-line message naming ``path``.
    """
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):  # the latter: below a file, which _check_parent reports
        st = None
    except OSError as err:
        raise OutputPathError(f"{os.fspath(path)}: cannot inspect it: {err.strerror or err}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{os.fspath(path)} is a directory; give the name of a file to write")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"{os.fspath(path)} is not a regular file (a FIFO, device or socket); refusing to "
                              "write to it")
    _check_parent(target, path)
    return target


def _check_target(path: Path, overwrite: bool, expect_version: str | None) -> None:
    """May a commit now put a version at ``path``?  (Checked when the run starts, and again under the lock.)"""
    kind = _kind(path)
    if kind == "foreign":
        raise StoreError(f"{path} exists and is not a flatnorm store; refusing to replace it, even with "
                         "--overwrite")
    if expect_version is not None:
        if kind not in ("pointer", "legacy"):
            raise StoreChangedError(path) if kind == "absent" else StoreError(f"{path}: not a flatnorm store")
        if _current_id(path) != expect_version:
            raise StoreChangedError(path)
        return
    if kind != "absent" and not overwrite:
        raise StoreExistsError(path)


# ---------------------------------------------------------------------------------------------- the steps

def prepare_store(path: str | os.PathLike, *, overwrite: bool = False, expect_version: str | None = None) -> Path:
    """Check that ``path`` may be written and create the empty staging directory for it.

    Nothing is deleted here: an existing store is replaced only by :func:`commit_store`, once the new one
    is complete.

    Parameters
    ----------
    path : path-like
        The store to write (e.g. ``scales.zarr``).  Missing parent directories are created.
    overwrite : bool
        Allow replacing an existing store at ``path``.
    expect_version : str, optional
        The run builds on the store's current version (an append): ``path`` must be a store whose pointer
        names this version id (see :func:`current_version`), now and at the commit.

    Returns
    -------
    Path
        The staging directory, in ``.NAME.versions/`` beside ``path``.

    Raises
    ------
    StoreExistsError
        ``path`` exists and ``overwrite`` is false.
    StoreChangedError
        ``expect_version`` is given and the store's pointer names another version.
    StoreError
        ``path`` exists but is not a flatnorm store (never replaced), or the directory cannot be written.
    """
    path = Path(path)
    _check_target(path, overwrite, expect_version)
    _check_parent(path, path)
    versions = _versions_dir(path)
    try:
        versions.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"{path}: cannot create it: {err.strerror or err}") from None
    if versions.is_symlink() or not versions.is_dir():
        raise OutputPathError(f"{path}: {versions.name} beside it is not a directory written by flatnorm; "
                              "remove it")
    _report_leftovers(path, versions)
    staging = versions / f"{_stamp()}.{_PARTIAL}-{uuid.uuid4().hex[:12]}"
    try:
        staging.mkdir(parents=True)  # parents: a failed run's abort_store may just have removed an empty one
    except OSError as err:
        raise OutputPathError(f"{path}: cannot write beside it: {err.strerror or err}") from None
    _checkpoint("prepared", path)
    return staging


def _report_leftovers(path: Path, versions: Path) -> None:
    """Warn about staging directories of runs killed long ago; never remove them (one could still be writing
    on another node)."""
    now = time.time()
    stale = []
    for name in sorted(os.listdir(versions)):
        if f".{_PARTIAL}-" in name:
            with contextlib.suppress(OSError):
                if now - os.stat(versions / name).st_mtime > _STALE_SECONDS:
                    stale.append(name)
    if stale:
        log.warning("%s: %d unfinished write%s older than a day in %s (e.g. %s), left by killed runs; remove "
                    "them once no run writes there", path, len(stale), "" if len(stale) == 1 else "s",
                    versions, stale[0])


def abort_store(staging: str | os.PathLike) -> None:
    """Remove a staging directory and whatever was written into it (the transaction is abandoned), and the
    versions directory it was in if that is now empty (a first run that failed leaves nothing).

    The directory is first renamed away, so that a write still running on a worker (the run failed at another
    task) finds no staging directory and is refused (:class:`StagingStore`) instead of making it again.
    """
    staging = Path(staging)
    doomed = staging.with_name(f"{staging.name}.{_DELETING}-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(staging, doomed)
    except OSError:
        doomed = staging
    # A write that had opened its file before the rename lands in the doomed directory and can keep the first
    # removal from emptying it; later writes fail (they find no staging root), so a few passes suffice.
    for _ in range(_ABORT_PASSES):
        shutil.rmtree(doomed, ignore_errors=True)
        if not os.path.lexists(doomed):
            break
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()


class StagingStore(LocalStore):
    """The Zarr store a staging directory is written through (on workers too): it never creates its root.

    zarr's LocalStore makes its directory again on any write; a chunk write still running on a worker after
    its run failed elsewhere (and removed the staging directory) would bring it back.  Here such a write, or
    one after the commit renamed the directory, is refused.
    """

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: this write came after its store was committed or abandoned")

    async def _open(self, *, mode: Any = None) -> None:
        self._require_root()
        await super()._open(mode=mode)

    async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(self._put, key, value, exclusive)

    def set_sync(self, key: str, value: Any) -> None:
        self._ensure_open_sync()
        self._check_writable()
        self._put(key, value, False)

    def _file_of(self, key: str) -> Path:
        """The file of ``key``, its missing directories made."""
        # zarr makes every missing parent, the root too: checking the root first leaves a window in which
        # an abort renames it away and the write makes it again.  Here only directories below the root are
        # made, one at a time, so a write after the rename fails wherever it is.
        self._require_root()
        directory = self.root
        for part in Path(key).parts[:-1]:
            directory = directory / part
            with contextlib.suppress(FileExistsError):
                directory.mkdir()
        return self.root / key

    def _put(self, key: str, value: Any, exclusive: bool) -> None:
        data = value.as_buffer_like()
        try:
            path = self._file_of(key)
            try:
                with open(path, "xb") as file:  # the usual case: a new key
                    file.write(data)
                return
            except FileExistsError:
                if exclusive:
                    raise
            # A key written again gets a new file, renamed over the old one: never written in place, for the
            # old file may be a hard link to a committed version's (see link).
            partial = path.with_name(f"{path.name}.{_PARTIAL}-{uuid.uuid4().hex[:12]}")
            try:
                with open(partial, "xb") as file:
                    file.write(data)
                os.replace(partial, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(partial)
                raise
        except FileNotFoundError:
            self._require_root()  # the root went away meanwhile: say so
            raise

    def link(self, key: str, source: str | os.PathLike) -> bool:
        """Make ``key`` the file ``source`` (a chunk of a committed version, which never changes): a hard link,
        or a copy where the file system cannot make one (another device, no hard links).  Returns False, and
        makes nothing, when ``source`` does not exist.

        A linked file is never written through: :meth:`_put` replaces a key's file rather than writing into it.
        """
        try:
            try:
                try:
                    os.link(source, self.root / key)
                except FileNotFoundError:
                    if not os.path.lexists(source):
                        return False
                    os.link(source, self._file_of(key))  # its directory was not made yet (most are: tried first)
            except OSError as err:
                if isinstance(err, FileNotFoundError) or err.errno not in _NO_HARD_LINK:
                    raise
                shutil.copyfile(source, self._file_of(key))
        except FileNotFoundError:
            if not os.path.lexists(source):
                return False
            self._require_root()  # the root went away: say so
            raise
        return True

    def _ensure_open_sync(self) -> None:
        self._require_root()
        super()._ensure_open_sync()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even on a FIFO
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory: then nothing more can be done
    finally:
        os.close(fd)


def _seal_files(root: Path) -> dict[str, int]:
    """Flush every file and directory below ``root`` (so that a power cut after the commit cannot expose a
    record whose chunks are not on disk) and return every key below it with its size, but the root's own
    ``zarr.json`` (the record's file, written last) and the manifest."""
    keys, paths = {}, []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath, name)
            paths.append(file)
            key = file.relative_to(root).as_posix()
            if key not in ("zarr.json", MANIFEST_FILE):
                keys[key] = file.stat().st_size
        paths.append(Path(dirpath))
    # Each fsync waits for the disk: many at once (threads: the waits release the GIL) cost about one.
    with concurrent.futures.ThreadPoolExecutor(max_workers=_FSYNC_THREADS) as pool:
        list(pool.map(_fsync, paths))
    return keys


def _write_manifest(staging: Path, keys: dict[str, int]) -> dict[str, Any]:
    """Write the manifest; return what the commit record says of it (so that a changed manifest is seen)."""
    data = json.dumps({"format": 1, "keys": dict(sorted(keys.items()))}, separators=(",", ":")).encode()
    file = staging / MANIFEST_FILE
    file.write_bytes(data)
    _fsync(file)
    return {"file": MANIFEST_FILE, "keys": len(keys), "bytes": sum(keys.values()),
            "sha256": hashlib.sha256(data).hexdigest()}


def _commit_record(groups: list[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """What the commit marker records about the staged store: when, which groups, by which version, and its
    manifest.  The one place that says what a commit holds."""
    from .. import __version__

    return {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "groups": groups,
            "flatnorm_dask": __version__, "manifest": manifest}


def _seal(staging: Path) -> None:
    """Make the staged store a complete version: flushed, consolidated, its manifest and, last, its record."""
    import zarr

    # zarr notes, at every consolidation, that consolidated metadata is not in the v3 spec yet (readers without
    # it still work).  A narrow filter, added (or moved to the front) at each call, so that it also holds inside
    # a caller's warnings.catch_warnings(); a catch_warnings() here would not be thread-safe, and commits run in
    # threads of one process (a notebook, the tests).
    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", module="zarr")
    # The root group as consolidated: its groups are listed from the consolidated metadata (no directory
    # listing, which would also meet the manifest), and the attribute update rewrites it with that metadata.
    root = zarr.consolidate_metadata(str(staging), zarr_format=3)
    keys = _seal_files(staging)
    record = _commit_record(sorted(root.group_keys()), _write_manifest(staging, keys))
    root.attrs.update({COMMIT_ATTR: record})
    _fsync(staging / "zarr.json")  # the marker itself, before the rename makes it visible
    _fsync(staging)


@contextlib.contextmanager
def _commit_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold ``.NAME.lock`` (flock) for the critical section of a commit; give up after ``timeout`` seconds.

    On a file system without flock the commit goes on unlocked: ``os.symlink`` alone still keeps a run without
    overwrite from replacing a store; clean-up and appends are then only as safe as the timing.
    """
    lock = _lock_file(path)
    try:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
        except PermissionError:  # a lock file made by another user of a shared directory: reading is enough
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise OutputPathError(f"{path}: cannot open its lock file beside it: {err.strerror or err}") from None
    locked = False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputPathError(f"{path}: {lock.name} beside it is not a regular file; remove it")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreError(f"{path}: another run has been committing to it for more than {timeout:g} s; "
                                     "try again later or raise output.lock_timeout (--lock-timeout)") from None
                time.sleep(0.02)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning("%s: the file system does not support locks (%s); committing without one", path,
                            err.strerror)
                break
        yield
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _publish(path: Path, version_id: str, replace: bool) -> None:
    """Point ``path`` at the version; ``replace`` an existing store (pointer, legacy or empty directory).

    Without ``replace``, ``os.symlink`` fails if anything is at ``path``.  With it, a new symlink is renamed
    over the old pointer (atomic); a legacy store is first moved into the versions as a version of its own.
    """
    target = _pointer_target(path, version_id)
    kind = _kind(path)
    if not replace or kind == "absent":
        try:
            os.symlink(target, path)
        except FileExistsError:
            raise StoreExistsError(path) from None
        return
    if kind == "foreign":  # appeared without taking the lock: never replaced
        raise StoreError(f"{path} exists and is not a flatnorm store; refusing to replace it, even with "
                         "--overwrite")
    moved = None
    if kind == "legacy":  # becomes the version just before the new one
        moved = _versions_dir(path) / _version_id_before(version_id)
        os.rename(path, moved)
    elif kind == "empty":
        os.rmdir(path)
    tmp = path.with_name(f".{path.name}.{_POINTER}-{uuid.uuid4().hex[:12]}")
    os.symlink(target, tmp)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        if moved is not None:
            with contextlib.suppress(OSError):
                os.rename(moved, path)
        raise


def _retire_old_versions(path: Path, keep_versions: int) -> None:
    """Under the lock: mark versions beyond the pointer's and the newest ``keep_versions`` others for deletion
    (a rename, so that the lock is held only briefly), and remove pointers left by killed commits."""
    versions = _versions_dir(path)
    current = _current_id(path)
    others = [v for v in reversed(_committed_versions(versions)) if v != current]
    for old in others[keep_versions:]:
        with contextlib.suppress(OSError):
            os.rename(versions / old, versions / f"{old}.{_DELETING}-{uuid.uuid4().hex[:12]}")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{_POINTER}-*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _delete_retired(path: Path) -> None:
    """Delete the versions marked for deletion (by this commit, or by one killed before it could)."""
    versions = _versions_dir(path)
    for old in versions.glob(f"*.{_DELETING}-*"):
        shutil.rmtree(old, ignore_errors=True)


def commit_store(staging: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False,
                 expect_version: str | None = None, keep_versions: int = OutputConfig.keep_versions,
                 lock_timeout: float = OutputConfig.lock_timeout) -> StoreVersion:
    """Mark the staged store complete and make it the store's current version.

    The staged files are flushed, the metadata consolidated, the manifest (``flatnorm-manifest.json``: every
    key and its size) written, and the commit record (root attribute ``flatnorm_commit`` = ``{"time",
    "groups", "flatnorm_dask", "manifest"}``) written last.  Then, holding the store's lock, the path is
    checked again, the staging directory renamed to a new version, and the pointer published: at every
    moment ``path`` names the complete old version or the complete new one.

    Parameters
    ----------
    staging, path : path-like
        The directory :func:`prepare_store` made for ``path``, with the groups written; the store.
    overwrite : bool
        Replace an existing store (never something that is not a flatnorm store).
    expect_version : str, optional
        Commit only if the pointer still names this version (an append that read it); implies replacing it.
    keep_versions : int
        Previous versions kept after the commit (the newest ones), for readers that opened them.
    lock_timeout : float
        Seconds to wait for another run's commit to finish.

    Returns
    -------
    StoreVersion
        The committed version.

    Raises
    ------
    StoreExistsError
        ``path`` appeared while the store was written and ``overwrite`` is false; nothing is replaced.
    StoreChangedError
        ``expect_version`` is no longer the store's current version.
    StoreError
        ``staging`` is not a staged store, the lock could not be had in time, or a rename failed.  The staging
        directory is left for the caller to abort; a version renamed in but not published is removed.
    """
    staging, path = Path(staging), Path(path)
    versions = _versions_dir(path)
    if f".{_PARTIAL}-" not in staging.name or not (staging / "zarr.json").is_file() or \
            not versions.is_dir() or not os.path.samefile(staging.parent, versions):
        raise StoreError(f"{path}: nothing staged to commit (were its groups written?)")
    _seal(staging)
    _checkpoint("sealed", path)
    with _commit_lock(path, lock_timeout):
        _checkpoint("locked", path)
        _check_target(path, overwrite, expect_version)  # again: another run may have committed since
        version_id = _new_version_id(versions)
        version = versions / version_id
        try:
            os.rename(staging, version)
        except OSError as err:
            raise StoreError(f"{path}: cannot commit the new store: {err.strerror or err}") from None
        try:
            _checkpoint("renamed", path)
            _publish(path, version_id, replace=overwrite or expect_version is not None)
            _fsync(path.parent)
        except BaseException as err:
            shutil.rmtree(version, ignore_errors=True)  # never published: nobody can be reading it
            if isinstance(err, OSError) and not isinstance(err, StoreError):
                raise StoreError(f"{path}: cannot publish the new store: {err.strerror or err}") from None
            raise
        _checkpoint("published", path)
        _retire_old_versions(path, keep_versions)
    _delete_retired(path)
    return StoreVersion(path, version_id, version)


@contextlib.contextmanager
def store_transaction(path: str | os.PathLike, *, overwrite: bool = False, expect_version: str | None = None,
                      keep_versions: int = OutputConfig.keep_versions,
                      lock_timeout: float = OutputConfig.lock_timeout) -> Iterator[StoreTransaction]:
    """Write a store as one transaction: :func:`prepare_store` on entry, yielding a :class:`StoreTransaction`
    whose ``staging`` directory the block writes into; :func:`commit_store` when the block ends normally
    (then ``version`` is set); :func:`abort_store` if the block or the commit raises (or is interrupted), so
    that nothing is left looking complete.  The keywords are :func:`commit_store`'s.

    Examples
    --------
    >>> with store_transaction("scales.zarr") as txn:  # doctest: +SKIP
    ...     dask.compute(*write_groups(txn.staging, datasets))
    >>> txn.version.id  # doctest: +SKIP
    '20261125T172312.123456Z-3f2a9c01b7de'
    """
    path = Path(path)
    txn = StoreTransaction(path, prepare_store(path, overwrite=overwrite, expect_version=expect_version))
    try:
        yield txn
        txn.version = commit_store(txn.staging, path, overwrite=overwrite, expect_version=expect_version,
                                   keep_versions=keep_versions, lock_timeout=lock_timeout)
    except OSError as err:
        abort_store(txn.staging)
        if _inside(err, txn.staging):  # e.g. a full disk: say which store, not which file of the staging
            raise OutputPathError(f"{path}: cannot write it: {err.strerror or err}") from err
        raise
    except BaseException:
        abort_store(txn.staging)
        raise


def _inside(err: OSError, directory: Path) -> bool:
    """Whether the error names a file below ``directory``."""
    where = os.path.abspath(directory) + os.sep
    return any(isinstance(name, str) and os.path.abspath(name).startswith(where)
               for name in (err.filename, err.filename2))


def remove_store(path: str | os.PathLike, *, lock_timeout: float = OutputConfig.lock_timeout) -> None:
    """Delete a store: its pointer and every committed version (readers of them then get errors).

    Staging directories of runs still writing are left alone.  A path that is not a flatnorm store is refused.
    """
    path = Path(path)
    kind = _kind(path)
    if kind == "absent" and not _versions_dir(path).is_dir():
        raise StoreError(f"{path}: no such store")
    if kind == "foreign":
        raise StoreError(f"{path} is not a flatnorm store; refusing to remove it")
    with _commit_lock(path, lock_timeout):
        if kind == "legacy":
            _versions_dir(path).mkdir(exist_ok=True)
            os.rename(path, _versions_dir(path) / _new_version_id(_versions_dir(path)))
        elif kind in ("pointer", "empty"):
            (os.unlink if kind == "pointer" else os.rmdir)(path)
        _retire_old_versions(path, keep_versions=0)
    _delete_retired(path)
    with contextlib.suppress(OSError):  # left when a run is still writing there
        _versions_dir(path).rmdir()


# ---------------------------------------------------------------------------------------------- the record

def read_commit(path: str | os.PathLike) -> dict[str, Any] | None:
    """The commit record of the store at ``path``, or None when ``path`` is not a complete store.

    Read from the root ``zarr.json`` (the v3 metadata) without opening the store, through the pointer.  A
    staging directory is never complete, even with a marker (between the marker write and the rename it holds
    one).
    """
    path = Path(path)
    if is_staging(path) or is_staging(os.path.realpath(path)):
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
