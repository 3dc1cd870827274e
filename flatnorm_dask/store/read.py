"""Reading a store: only complete ones (with a commit record), lazily, one Dataset per physical_filter."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

from .transaction import IncompleteStoreError, StoreError, read_commit

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["group_datasets", "is_complete", "open_store", "open_tree", "stored_config"]


def group_datasets(groups: xr.DataTree | Mapping[str, Any]) -> dict[str, xr.Dataset]:
    """One Dataset per group (physical_filter), in order, from a tree (a store's, or
    :func:`flatnorm_dask.ingest.read_campaign`'s: its children) or a mapping of Datasets or tree nodes."""
    if isinstance(groups, xr.DataTree):
        groups = groups.children
    return {name: node.to_dataset() if isinstance(node, xr.DataTree) else node for name, node in groups.items()}


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a committed flatnorm store (its root holds the commit marker)."""
    return read_commit(path) is not None


def open_store(path: str | os.PathLike) -> xr.DataTree:
    """Open a complete store lazily: one child per physical_filter, variables as dask arrays.

    Raises
    ------
    StoreError
        ``path`` does not exist, or a group listed by the commit marker is missing.
    IncompleteStoreError
        ``path`` exists but has no commit marker (an interrupted or running write, or not a store).
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise StoreError(f"{path}: no such store")
    record = read_commit(path)
    if record is None:
        raise IncompleteStoreError(path)
    try:
        tree = xr.open_datatree(str(path), engine="zarr", chunks={})
    except Exception as err:  # corrupt metadata: say which store
        raise StoreError(f"{path}: cannot open the store: {err}") from err
    missing = [g for g in record["groups"] if g not in tree.children]
    if missing:
        raise StoreError(f"{path}: group(s) {', '.join(missing)} listed by the commit marker are missing")
    return tree


def open_tree(path_or_tree: str | os.PathLike | xr.DataTree) -> xr.DataTree:
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
