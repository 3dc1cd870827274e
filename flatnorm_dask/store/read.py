"""Reading a store: only complete ones (with a commit record), lazily, one Dataset per physical_filter.

A store is opened at the version its pointer names when it is opened (:func:`resolve_store`), and stays on
it: a later commit never mixes into what an open tree reads.  Its keys are read through
:class:`CommittedStore`, which turns a key the version's manifest lists but the disk lacks (deleted chunks, or
the whole version deleted by a later commit beyond ``output.keep_versions``) into an error instead of zarr's
fill value.  :func:`verify_store` checks, with a ``stat`` per file, that every listed key is there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncGenerator, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr
from zarr.storage import LocalStore, WrapperStore

from .transaction import (
    LEGACY_VERSION,
    MANIFEST_FILE,
    IncompleteStoreError,
    StoreError,
    StoreVersion,
    read_commit,
    version_id_of,
)

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest
    from zarr.core.buffer import Buffer, BufferPrototype

    from ..config import Config

__all__ = ["CommittedStore", "DamagedStoreError", "committed_store", "group_datasets", "is_complete", "open_store",
           "open_tree", "resolve_store", "stored_config", "verify_store"]


class DamagedStoreError(StoreError):
    """A committed store lacks files its commit manifest lists (deleted or truncated after the commit)."""


def group_datasets(groups: xr.DataTree | Mapping[str, Any]) -> dict[str, xr.Dataset]:
    """One Dataset per group (physical_filter), in order, from a tree (a store's, or
    :func:`flatnorm_dask.ingest.read_campaign`'s: its children) or a mapping of Datasets or tree nodes."""
    if isinstance(groups, xr.DataTree):
        groups = groups.children
    return {name: node.to_dataset() if isinstance(node, xr.DataTree) else node for name, node in groups.items()}


def resolve_store(path: str | os.PathLike | StoreVersion) -> StoreVersion:
    """The version of the store at ``path`` that a reader opening it now reads (its pointer, resolved once).

    Any path whose symbolic links lead to a store works (the store's own name, a link to it, or a version's
    directory).  A :class:`~flatnorm_dask.store.StoreVersion` is returned as it is.

    Raises
    ------
    StoreError
        Nothing is at ``path``, or its pointer names a version that is gone.
    """
    if isinstance(path, StoreVersion):
        return path
    path = Path(path)
    if not os.path.lexists(path):
        raise StoreError(f"{path}: no such store")
    real = Path(os.path.realpath(path))
    if not real.exists():
        raise StoreError(f"{path}: the store's current version is missing (removed by hand?)")
    return StoreVersion(path, version_id_of(real) or LEGACY_VERSION, real)


def _read_manifest(version: StoreVersion, record: Mapping[str, Any]) -> dict[str, int]:
    """The manifest the commit record describes, checked against the record's digest."""
    info = record["manifest"]
    try:
        data = (version.path / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        if not version.path.is_dir():
            raise _removed(version) from None
        raise DamagedStoreError(f"{version.store}: damaged store: its commit manifest is missing") from None
    except OSError as err:
        raise StoreError(f"{version.store}: cannot read its commit manifest: {err.strerror or err}") from None
    if not isinstance(info, Mapping) or hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise DamagedStoreError(f"{version.store}: damaged store: its commit manifest was changed after the commit")
    keys = json.loads(data)["keys"]
    return {str(key): int(size) for key, size in keys.items()}


def _removed(version: StoreVersion) -> StoreError:
    return StoreError(f"{version.store}: the version opened here ({version.id}) was deleted by a later commit "
                      "(output.keep_versions); open the store again")


class CommittedStore(WrapperStore):
    """A committed version of a store, read-only: a key it lists but the disk lacks is an error.

    zarr reads a missing chunk as the fill value (NaN, say) without a word; here a key that the version's
    manifest lists raises a :class:`~flatnorm_dask.store.StoreError` naming the store and the key, and one
    of a version deleted since it was opened says so.  The manifest is read on the first missing key only
    (keys that were never written, chunks holding only the fill value, are legitimately missing).  A store from
    before versions has no manifest; instead its directory must still be the one opened (an overwrite moves
    it away, and its path then leads to the new store).  Picklable, for reads on Dask workers.
    """

    def __init__(self, store: LocalStore, *, name: str, version: str, record: Mapping[str, Any],
                 identity: tuple[int, int] | None = None) -> None:
        super().__init__(store)
        self._name, self._version, self._record, self._identity = name, version, dict(record), identity
        self._listed: dict[str, int] | None = None

    def _with_store(self, store: LocalStore) -> CommittedStore:
        return type(self)(store, name=self._name, version=self._version, record=self._record,
                          identity=self._identity)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_listed": None}  # read again where it is needed, not shipped to every task

    def _as_version(self) -> StoreVersion:
        return StoreVersion(Path(self._name), self._version, Path(self._store.root))

    def _check(self, key: str, missing: bool) -> None:
        if self._identity is not None:
            # Checked after the read: once moved away, the directory never comes back under this name, so a
            # read that went through the old directory finds it still there.
            try:
                st = os.stat(self._store.root)
                same = (st.st_dev, st.st_ino) == self._identity
            except OSError:
                same = False
            if not same:
                raise StoreError(f"{self._name}: the store was replaced since it was opened here; open it again")
        if missing and "manifest" in self._record:
            if self._listed is None:
                self._listed = _read_manifest(self._as_version(), self._record)
            if key in self._listed:
                if not Path(self._store.root).is_dir():
                    raise _removed(self._as_version())
                raise DamagedStoreError(f"{self._name}: damaged store: {key} is missing (its commit manifest lists "
                                        "it)")

    def file_of(self, key: str) -> Path:
        """The file of ``key`` in this version's directory (which may lack it: see :meth:`check_missing`)."""
        return Path(self._store.root) / key

    def check_missing(self, key: str) -> None:
        """For a key this version's directory lacks: raise as a read of it would (its manifest lists it, or the
        version was deleted or replaced since it was opened); return for a key never written (a chunk holding
        only the fill value)."""
        self._check(key, True)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
                  ) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        self._check(key, value is None)
        return value

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values):
            self._check(key, value is None)
        return values

    async def _get_many(self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
                        ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        async for key, value in self._store._get_many(requests):
            self._check(key, value is None)
            yield key, value


def _committed(path: str | os.PathLike | StoreVersion) -> tuple[StoreVersion, dict[str, Any]]:
    version = resolve_store(path)
    record = read_commit(version.path)
    if record is None and not isinstance(path, StoreVersion) and not version.path.exists():
        # Resolved just before a commit retired that version: the pointer names a newer one now.
        version = resolve_store(path)
        record = read_commit(version.path)
    if record is None:
        raise IncompleteStoreError(version.store)
    return version, record


def verify_store(path: str | os.PathLike | StoreVersion) -> int | None:
    """Check that every key the store's commit manifest lists is on disk with its recorded size.

    Cheap: one ``stat`` per file, no data read.

    Returns
    -------
    int or None
        The number of files checked; None for a store written before manifests (nothing to check).

    Raises
    ------
    DamagedStoreError
        A listed file is missing or has another size (the message names the first, and how many).
    IncompleteStoreError, StoreError
        As :func:`open_store`.
    """
    version, record = _committed(path)
    if "manifest" not in record:
        return None
    listed = _read_manifest(version, record)
    bad = []
    for key, size in listed.items():
        try:
            found = os.stat(version.path / key).st_size
        except FileNotFoundError:
            bad.append(f"{key} is missing")
            continue
        if found != size:
            bad.append(f"{key} has {found} bytes, not {size}")
    if bad:
        raise DamagedStoreError(f"{version.store}: damaged store: {bad[0]} ({len(bad)} of the {len(listed)} files "
                                "its commit manifest lists are missing or changed)")
    return len(listed)


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a committed flatnorm store with every file its commit manifest lists."""
    try:
        verify_store(path)
    except StoreError:
        return False
    return True


def open_store(path: str | os.PathLike | StoreVersion) -> xr.DataTree:
    """Open a complete store lazily: one child per physical_filter, variables as dask arrays.

    The store's pointer is resolved once: the tree reads the version current when it was opened, whatever
    is committed later (see :func:`resolve_store`; give a :class:`~flatnorm_dask.store.StoreVersion` to open
    that version).  A read of a file the version lists but the disk lacks raises
    :class:`~flatnorm_dask.store.StoreError` (see :class:`CommittedStore`).

    Raises
    ------
    StoreError
        ``path`` does not exist, or a group listed by the commit marker is missing.
    IncompleteStoreError
        ``path`` exists but has no commit marker (an interrupted or running write, or not a store).
    """
    version, record = _committed(path)
    store = committed_store(version, record)
    try:
        tree = xr.open_datatree(store, engine="zarr", chunks={}, zarr_format=3)
    except StoreError:
        raise
    except Exception as err:  # corrupt metadata: say which store
        raise StoreError(f"{version.store}: cannot open the store: {err}") from err
    missing = [g for g in record["groups"] if g not in tree.children]
    if missing:
        raise StoreError(f"{version.store}: group(s) {', '.join(missing)} listed by the commit marker are missing")
    return tree


def committed_store(path: str | os.PathLike | StoreVersion, record: Mapping[str, Any] | None = None
                    ) -> CommittedStore:
    """The Zarr store (:class:`CommittedStore`) through which :func:`open_store` reads a committed version;
    picklable, for tasks that read it with zarr directly.  ``record``: its commit record, if already read."""
    if record is None:
        version, record = _committed(path)
    else:
        version = resolve_store(path)
    identity = None
    if version.id == LEGACY_VERSION:
        st = os.stat(version.path)
        identity = (st.st_dev, st.st_ino)
    return CommittedStore(LocalStore(version.path, read_only=True), name=os.fspath(version.store),
                          version=version.id, record=record, identity=identity)


def open_tree(path_or_tree: str | os.PathLike | StoreVersion | xr.DataTree) -> xr.DataTree:
    """A tree as given, or the complete store at a path opened with :func:`open_store`."""
    return path_or_tree if isinstance(path_or_tree, xr.DataTree) else open_store(path_or_tree)


def stored_config(tree: xr.DataTree, where: str | os.PathLike) -> Config | None:
    """The run's settings a store records (its ``config`` attribute), validated by the one config schema.

    Returns None when the store records none (e.g. written by :func:`flatnorm_dask.store.write_store`
    without one).

    Raises
    ------
    StoreError
        The recorded config does not pass the schema (the message names the store and the key).
    """
    from ..config import Config

    data = tree.attrs.get("config")
    if data is None:
        return None
    try:
        return Config.from_dict(data, f"{os.fspath(where)}: config attribute")
    except ValueError as err:  # ConfigError: one line naming the key
        raise StoreError(str(err)) from None
