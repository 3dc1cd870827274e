"""A store's provenance: the ``history`` root attribute, one entry per run or append that wrote a version.

Each version carries the whole list: an append copies its predecessor's entries and adds its own.  An entry
cannot name the version it is written into (the commit gives the version its id, after the entry is sealed
in it): the version of the newest entry is the store's own (:func:`flatnorm_dask.store.resolve_store`), and an
append fills in the version of the entry before its own, the one it started from.  :func:`store_history`
returns the entries with every version filled in.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .transaction import StoreVersion

__all__ = ["FILE_COUNTS", "HISTORY_ATTR", "continued_history", "history_entry", "history_lines", "recorded_history",
           "store_history"]

#: Root attribute holding the list of entries.
HISTORY_ATTR = "history"
#: An entry's ``files`` counts: files read (new, changed, at a new path), of which added (a cell the store
#: did not hold), re-read (same path, size or modification time changed since it was read, or its cell listed
#: twice), replaced (a cell held from another path); files vanished (held, no longer among the inputs: their
#: cells are kept); cells kept from the version the append started from.
FILE_COUNTS = ("read", "added", "reread", "replaced", "vanished", "kept")


def history_entry(kind: str, config: Mapping[str, Any], files: Mapping[str, int], filters: Sequence[str], *,
                  based_on: str | None = None, vanished: Sequence[str] = ()) -> dict[str, Any]:
    """One entry of a store's history.

    Parameters
    ----------
    kind : {"run", "append"}
        A run (a new store) or an append (a new version built on ``based_on``).
    config : mapping
        The run's config as validated (:meth:`flatnorm_dask.config.Config.to_dict`).
    files : mapping
        Counts named by :data:`FILE_COUNTS` (missing ones are 0).
    filters : sequence of str
        The physical filters whose groups the run or append changed.
    based_on : str, optional
        The version id an append started from.
    vanished : sequence of str
        Some of the files that vanished from the inputs (``files["vanished"]`` counts them all).
    """
    if kind not in ("run", "append"):
        raise ValueError(f"history entry kind must be run or append, got {kind!r}")
    unknown = set(files) - set(FILE_COUNTS)
    if unknown:
        raise ValueError(f"unknown file count(s) {sorted(unknown)}; known: {', '.join(FILE_COUNTS)}")
    return {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "kind": kind,
            "files": {name: int(files.get(name, 0)) for name in FILE_COUNTS}, "filters": list(filters),
            "version": None, "based_on": based_on, "vanished_files": list(vanished), "config": dict(config)}


def continued_history(history: Sequence[Mapping[str, Any]], based_on: str) -> list[dict[str, Any]]:
    """The entries of the version ``based_on``, for an append to add its own to: the newest names it."""
    entries = [dict(entry) for entry in history]
    if entries and not entries[-1].get("version"):
        entries[-1]["version"] = based_on
    return entries


def store_history(path: str | os.PathLike | StoreVersion) -> list[dict[str, Any]]:
    """The history of the store at ``path``, oldest first, each entry's ``version`` filled in.  A store written
    before histories has none: an empty list."""
    from .read import open_store, resolve_store

    version = resolve_store(path)
    return recorded_history(open_store(version).attrs, version.id)


def recorded_history(attrs: Mapping[str, Any], version_id: str) -> list[dict[str, Any]]:
    """The history in a store's root attributes, its newest entry naming ``version_id`` (the store's own)."""
    entries = [dict(entry) for entry in attrs.get(HISTORY_ATTR) or [] if isinstance(entry, Mapping)]
    if entries and not entries[-1].get("version"):
        entries[-1]["version"] = version_id
    return entries


def history_lines(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines for ``flatnorm info``: one per entry, oldest first."""
    lines = []
    for entry in entries:
        files = entry.get("files") or {}
        detail = [f"{files.get(name)} {name}" for name in ("added", "reread", "replaced") if files.get(name)]
        text = (f"    {entry.get('time', '?')} {entry.get('kind', '?')}: {files.get('read', '?')} file(s) read"
                f"{' (' + ', '.join(detail) + ')' if detail else ''}")
        if files.get("vanished"):
            named = entry.get("vanished_files") or []
            text += (f"; {files['vanished']} file(s) vanished from the inputs (their cells kept)"
                     + (f", e.g. {named[0]}" if named else ""))
        if files.get("kept"):
            text += f"; {files['kept']} cell(s) kept"
        filters = entry.get("filters") or []
        text += f"; filters {', '.join(map(str, filters)) if filters else 'none'}; version {entry.get('version')}"
        lines.append(text)
    return lines
