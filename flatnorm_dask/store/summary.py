"""What a store holds, as text for ``flatnorm info``: groups and sizes, fit diagnostics, problems, provenance."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .history import history_lines, recorded_history
from .read import group_datasets, open_store, resolve_store, stored_config, verify_store
from .transaction import COMMIT_ATTR, StoreError

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["store_summary"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3e}"
    return str(value)


def _config_line(cfg: Config) -> str:
    """Where the inputs came from and how they were solved, from a validated config."""
    inp, solve = cfg.input, cfg.solve
    mode = f"tol {solve.tol}, max_iter {solve.max_iter}" if solve.tol is not None else \
        f"{solve.iterations} iterations"
    if inp.butler:
        where = (f"butler {inp.butler} ({inp.dataset_type} in {', '.join(inp.collections or [])}"
                 f"{' where ' + inp.where if inp.where else ''})")
    else:
        where = f"{inp.root} ({inp.pattern or inp.manifest})"
    if inp.select:
        where += f", exposures with {inp.select}"
    return f"  config: input {where}, camera {inp.camera}, level {solve.level}, {mode}"


def _records(items: list, key: str, most: int) -> list[str]:
    """Lines for the first ``most`` of a group's ``{key: ..., "reason": ...}`` records, then how many more."""
    lines = [f"      {item.get(key)}: {item.get('reason')}" if isinstance(item, Mapping) else f"      {item}"
             for item in items[:most]]
    if len(items) > most:
        lines.append(f"      ... and {len(items) - most} more")
    return lines


def store_summary(path: str | os.PathLike, max_problems: int = 5) -> str:
    """What a store holds, for ``flatnorm info``: groups and their sizes, fit diagnostics, problems and
    provenance.  Reads metadata only, after checking that every file the commit lists is there
    (:func:`flatnorm_dask.store.verify_store`).

    Raises
    ------
    DamagedStoreError
        A file the commit manifest lists is missing or changed.
    StoreError, IncompleteStoreError
        As :func:`flatnorm_dask.store.open_store`.
    """
    version = resolve_store(path)  # once: what is verified is what is shown, whatever commits meanwhile
    checked = verify_store(version)
    tree = open_store(version)
    attrs = dict(tree.attrs)
    marker = attrs.get(COMMIT_ATTR, {})
    lines = [f"flatnorm store {os.fspath(path)}"]
    versions = attrs.get("versions")
    if isinstance(versions, Mapping):
        lines.append("  written by " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    verified = "written before commit manifests: files not verified" if checked is None else \
        f"all {checked} files of its commit manifest present"
    lines.append(f"  created {attrs.get('created', 'unknown')}, committed {marker.get('time', 'unknown')} "
                 f"(version {version.id}); {verified}")
    try:
        cfg = stored_config(tree, path)
    except StoreError as err:  # still worth showing the rest
        lines.append(f"  config: not readable: {err}")
    else:
        if cfg is not None:
            lines.append(_config_line(cfg))
    history = recorded_history(attrs, version.id)
    if history:
        lines.append(f"  history: {len(history)} run(s) and append(s)")
        lines += history_lines(history)
    groups = group_datasets(tree)
    lines.append(f"  {len(groups)} group(s): {', '.join(groups)}")
    for name, ds in groups.items():
        ga = ds.attrs
        shape = " x ".join(f"{ds.sizes[d]} {d}s" for d in ("detector", "amp", "exposure") if d in ds.sizes)
        converged = ga.get("converged")
        state = "converged" if converged is True else "NOT converged" if converged is False else "convergence ?"
        lines.append(f"  {name}: level {ga.get('level', '?')}; {shape}; {ga.get('iterations', '?')} iterations, "
                     f"{state}; residual scatter {_fmt(ga.get('residual_scatter', '?'))}; "
                     f"{ga.get('n_files', '?')} files")
        if ga.get("clip_rounds"):
            lines.append(f"    robust fit: {ga.get('n_clipped')} cell(s) clipped in {ga['clip_rounds']} round(s)")
        problems = ga.get("problems") or []
        lines.append(f"    {len(problems)} problem(s)")
        lines += _records(problems, "file", max_problems)
        left_out = ga.get("exposures_left_out") or []
        if left_out:
            lines.append(f"    {len(left_out)} exposure(s) left out of expScale (E not finite)")
            lines += _records(left_out, "exposure", max_problems)
    return "\n".join(lines)
