"""The one place that sequences a run: config -> files -> read (Dask) -> solve per filter -> Zarr store.

Every step runs on whatever Dask scheduler is active: the CLI opens a ``distributed`` client with
:func:`flatnorm_dask.cluster.connect`; in a notebook, the user's own client (or none: the threaded scheduler).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import itertools
import logging
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.local
import numpy as np
import xarray as xr

from . import __version__
from .config import Config, SolveConfig
from .incremental import (
    ABSENT_FILL,
    NAMED_VANISHED,
    MergePlan,
    MergeSpec,
    PartReport,
    StoredGroup,
    held_files,
    merge_block,
    plan_merge,
    split_part,
    vanished_files,
)
from .ingest import (
    ABSENT,
    FILE_RECORD,
    STATUS,
    Campaign,
    Grid,
    IngestError,
    input_source,
    list_campaign,
    problems,
    solver_inputs,
    status_counts,
    verify_amp_names,
)
from .schema import parse_selection
from .solver import FitError, ScaleResult, measure_scales, memory_bytes
from .store import (
    HISTORY_ATTR,
    OutputPathError,
    StoreVersion,
    append_variables,
    committed_store,
    continued_history,
    current_version,
    exposures_left_out,
    group_datasets,
    history_entry,
    link_chunks,
    open_store,
    read_commit,
    scales_yaml_paths,
    store_transaction,
    write_chunks,
    write_groups,
    write_region,
    write_scales_yaml,
)

log = logging.getLogger(__name__)

__all__ = ["AppendReport", "FilterSummary", "RunSummary", "level_inputs", "run", "scale_dataset", "solve_dataset"]


@dataclass(frozen=True)
class FilterSummary:
    """What one filter's solve produced, for the command line's report."""

    name: str
    n_exposures: int
    n_detectors: int
    n_amps: int
    iterations: int
    converged: bool
    residual_scatter: float
    n_problems: int
    n_filled_rows: int = 0
    n_empty_exposures: int = 0
    n_clipped: int = 0
    deviant_rows: list[tuple[str, float]] = field(default_factory=list)

    def __str__(self) -> str:
        worst = ", ".join(f"{name} ({rms:.2e})" for name, rms in self.deviant_rows)
        shape = f"{self.n_exposures} exposures x {self.n_detectors} detectors" + (
            f" x {self.n_amps} amps" if self.n_amps else "")  # a DETECTOR-level store has no amplifier axis
        return (f"{self.name}: {shape}; "
                f"{self.iterations} iterations, {'converged' if self.converged else 'NOT converged'}; "
                f"residual scatter {self.residual_scatter:.3e}; {self.n_problems} problem(s); "
                f"{self.n_filled_rows} row(s) and {self.n_empty_exposures} exposure(s) without usable data; "
                f"{self.n_clipped} cell(s) clipped; "
                f"most deviant: {worst}")


@dataclass(frozen=True)
class RunSummary:
    store: Path
    filters: list[FilterSummary]
    scales_yaml: list[Path] = field(default_factory=list)
    butler_datasets: list[str] = field(default_factory=list)
    append: AppendReport | None = None

    def __str__(self) -> str:
        lines = [f"store: {self.store}"] + ([str(self.append)] if self.append else [])
        lines += [f"  {f}" for f in self.filters]
        lines += [f"scales: {path}" for path in self.scales_yaml]
        lines += [f"butler: {line}" for line in self.butler_datasets]
        return "\n".join(lines)


def _versions() -> dict[str, str]:
    """The versions of what a run used, from the installed packages' metadata (importing distributed only
    for its version would cost a small run a second)."""
    from importlib.metadata import version

    return {"flatnorm_dask": __version__, "python": platform.python_version(),
            **{name: version(name) for name in ("numpy", "dask", "distributed", "xarray", "zarr", "pandas")}}


def _level_arrays(ds: xr.Dataset, level: str) -> tuple[xr.DataArray, xr.DataArray]:
    """The statistic and its weight at a level: ``background`` and ``weight`` of a :func:`level_inputs`
    Dataset (as the store holds them), else picked from a :func:`flatnorm_dask.read_campaign` node."""
    if "background" in ds:
        return ds["background"], ds["weight"]
    return solver_inputs(ds, level)


def _solver_options(solve: SolveConfig) -> dict[str, Any]:
    """The :func:`flatnorm_dask.measure_scales` keywords a ``solve`` config section sets (``persist`` apart)."""
    return {"iterations": solve.iterations, "tol": solve.tol, "max_iter": solve.max_iter,
            "clip_sigma": solve.clip_sigma, "clip_rounds": solve.clip_rounds}


def solve_dataset(ds: xr.Dataset, level: str, **options: Any) -> ScaleResult:
    """Solve one filter's statistics at a scaling level: the one way the workflow solves a filter.

    ``ds`` is a node of :func:`flatnorm_dask.read_campaign` or its :func:`level_inputs`; ``options`` are
    :func:`flatnorm_dask.measure_scales`' keywords (iterations, tol, clip_sigma, persist, ...).
    """
    background, weight = _level_arrays(ds, level)
    return measure_scales(background, weight, **options)


#: What the store keeps of each cell's reading besides the statistic and its weight: its status and why a
#: masked cell was masked, and the identity of the file read (path, size, mtime), so that a later run can tell
#: which files are new or changed.
READING_VARIABLES = ("status", "reason", *FILE_RECORD)
#: What the solver reads of a filter's group: the statistic, its weight and the reading status.
SOLVER_VARIABLES = ("background", "weight", "status")


def level_inputs(ds: xr.Dataset, level: str) -> xr.Dataset:
    """A node of :func:`flatnorm_dask.read_campaign` reduced to what a scaling level uses and the store keeps:
    ``background`` and ``weight`` (the statistic and its pixel count) and :data:`READING_VARIABLES`."""
    background, weight = solver_inputs(ds, level)
    variables = {"background": background.variable, "weight": weight.variable,
                 **{name: ds[name].variable for name in READING_VARIABLES if name in ds}}
    # From variables and the node's coordinates, which they share: no alignment of DataArrays (a reading task
    # makes one of these per block).  The amplifier names stay at detector level too: the cpFlatNormScales
    # export lists expScale per amp.
    return xr.Dataset(variables, coords=ds.coords, attrs=ds.attrs)


def scale_dataset(ds: xr.Dataset, fit: ScaleResult, level: str, attrs: dict[str, Any] | None = None) -> xr.Dataset:
    """The store's Dataset for one filter: scales, the fitted model and the diagnostics, lazy where the input is.

    ``ds`` is a node of :func:`flatnorm_dask.read_campaign` or its :func:`level_inputs`; ``fit`` its
    :func:`solve_dataset`.  ``residual``, ``row_rms`` and ``exp_rms`` are the fit's own (see
    :class:`flatnorm_dask.ScaleResult`): the residual of every usable cell, clipped ones included, and its
    weighted RMS over used cells per row (detector or amplifier) and per exposure.
    """
    if "background" not in ds:
        ds = level_inputs(ds, level)
    cell_dims = ds["background"].dims
    row_dims = [d for d in cell_dims if d != "exposure"]
    out = xr.Dataset(
        {
            "exp_scale": fit.vectorE,
            "det_scale": fit.vectorG.transpose(*row_dims),
            "exp_scale_err": fit.errorE,
            "det_scale_err": fit.errorG.transpose(*row_dims),
            "background": ds["background"],
            "weight": ds["weight"],
            "model": fit.bgModel.transpose(*cell_dims),
            "residual": fit.residual.transpose(*cell_dims),
            "used": fit.used.transpose(*cell_dims),
            "row_rms": fit.row_rms.transpose(*row_dims),
            "exp_rms": fit.exp_rms,
            "status": ds["status"],
        },
        attrs={
            "level": level,
            "iterations": fit.iterations,
            "converged": fit.converged,
            "max_change": fit.max_change,
            "tolerance": fit.tol,
            "residual_scatter": fit.residual_scatter,
            "n_filled_rows": int(np.asarray(fit.filled_rows).sum()),
            "n_empty_exposures": int(np.asarray(fit.empty_exposures).sum()),
            "clip_rounds": fit.clip_rounds,
            "n_clipped": int(fit.clipped.sum()),
            **(attrs or {}),
        },
    )
    for name in ("detector_name", "obs_id"):
        if name in ds.coords:
            out.coords[name] = ds.coords[name]
    out["exp_scale"].attrs["long_name"] = "exposure scale E"
    out["det_scale"].attrs["long_name"] = f"{level.lower()} scale G (count-weighted mean 1)"
    out["residual"].attrs["long_name"] = "log(background / model); NaN where unusable, kept where clipped"
    out["exp_scale_err"].attrs["long_name"] = "one-sigma uncertainty of exp_scale"
    out["det_scale_err"].attrs["long_name"] = "one-sigma uncertainty of det_scale"
    out["used"].attrs["long_name"] = "cell entered the fit (usable and not clipped)"
    return out


def _deviant_rows(out: xr.Dataset, n: int = 5) -> list[tuple[str, float]]:
    rms = out["row_rms"].load()
    flat = rms.stack(row=rms.dims) if rms.ndim > 1 else rms
    order = np.argsort(-np.nan_to_num(flat.values, nan=-1.0))[:n]
    names = []
    for i in order:
        label = flat.isel({flat.dims[0]: i})
        parts = [f"{d}={label[d].item()}" for d in rms.dims]
        if "detector_name" in label.coords and label["detector_name"].item():
            parts[0] = str(label["detector_name"].item())  # R22_S11 rather than detector=94
        names.append((" ".join(parts), float(flat.values[i])))
    return names


def _client():
    """The active distributed client, or None (then dask's own schedulers run the work in this process)."""
    if "distributed" not in sys.modules:  # never imported: no client, and no import cost for a small run
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


@contextlib.contextmanager
def _in_this_process() -> Iterator[concurrent.futures.Executor | None]:
    """The scheduler of a run without a cluster: the active client if there is one (a notebook's; yields
    None), else dask's threads on a pool of this run's own (yielded), given as the function itself: dask
    imports distributed (a second of a small run) to look for a client whenever the scheduler is not a
    callable, and no client can exist when distributed was never imported."""
    if "distributed" in sys.modules:
        yield None
        return
    import dask.system
    import dask.threaded

    pool = dask.threaded.ContextAwareThreadPoolExecutor(dask.system.CPU_COUNT)
    try:
        with dask.config.set(scheduler=dask.threaded.get, pool=pool):
            yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _tasks_finished_on_error(pool: concurrent.futures.Executor | None) -> Iterator[None]:
    """On an error or an interruption, wait for the tasks already running in this process's pool before the
    error goes on (to the store transaction, which removes the staging directory): a task still writing a
    block would otherwise race the removal.  A cluster's workers need no wait: a write after the abort is
    refused (:class:`flatnorm_dask.store.transaction.StagingStore`), and the cluster is closed."""
    try:
        yield
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        raise


def _on_cluster(collections: list, show: bool, *, keep: bool) -> list:
    """Run collections on the active scheduler, with distributed's progress bar when there is a client.

    ``keep=True`` persists them (results stay on the workers, as collections); otherwise computes them and
    returns the results, re-raising the first task's exception.
    """
    client = _client()
    if client is None:
        return list(dask.persist(*collections) if keep else dask.compute(*collections))
    futures = client.persist(collections) if keep else client.compute(collections)
    if show:
        from distributed import progress

        progress(futures)
    return futures if keep else client.gather(futures)


def run(cfg: Config, *, show_progress: bool = True,
        cluster: Callable[[], contextlib.AbstractContextManager] | None = None) -> RunSummary:
    """Run the whole job described by ``cfg``.

    Reads every file (the exposures ``input.select`` keeps), solves each physical_filter independently
    (concurrently), writes the Zarr store (commit marker last) and, when configured, the scales YAML files
    and the butler's scales datasets.  With ``output.append``, reads only the files the store does not hold
    (:mod:`flatnorm_dask.incremental`), merges them with its cells, solves the filters they touch again
    (warm-started from the store's G) and commits a new version of it, only onto the version it started
    from; the summary's ``append`` says what it read, replaced and found vanished.

    Parameters
    ----------
    cfg : Config
        What to read, how to solve, where to write.
    show_progress : bool
        Show ``distributed.progress`` bars (with a distributed client).
    cluster : callable, optional
        Returns a context manager that provides the Dask cluster (e.g. :func:`flatnorm_dask.cluster.connect`);
        entered only after the output is known to be writable and the inputs are found. Without it the
        active scheduler is used: the user's client in a notebook, or dask's threads.
    """
    from . import butler
    from .camera import load_camera
    from .cluster import needs_cluster

    inp, output = cfg.input, cfg.output
    if not output.store and not output.append:
        raise ValueError("no output store given (output.store / --output, or output.append / --append)")
    store_path = Path(output.append or output.store)
    if output.scales_yaml:
        _outside_the_store(output.scales_yaml, store_path)
    # An append builds on the version the store's pointer names now, and commits only if it still does.
    appender = _Appender(current_version(store_path)) if output.append else None
    # A run without a cluster keeps its own scheduler to the end (the exports after the commit too).
    with contextlib.ExitStack() as scheduler:
        # Entered first, so that an existing store is refused before any work; committed at the block's end.
        with store_transaction(store_path, overwrite=output.overwrite, keep_versions=output.keep_versions,
                               lock_timeout=output.lock_timeout,
                               expect_version=appender.base.id if appender else None) as txn:
            camera = load_camera(inp.camera) if inp.camera else None
            selection = parse_selection(inp.select) if inp.select else None
            inputs: dict[str, Any] = {"root": inp.root, "pattern": inp.pattern, "manifest": inp.manifest}
            instrument = inp.instrument
            if inp.butler:
                files = butler.find_inputs(inp.butler, inp.collections, inp.dataset_type, inp.where, inp.instrument,
                                           exposure_fields=[selection[0]] if selection else [])
                inputs = {"files": files, "files_from": inp.butler}
                instrument = files.attrs.get("instrument") or instrument
            # Which inputs, checked (a manifest found, a pattern compiled) before any cluster starts.
            source = input_source(**inputs, camera=camera, select=selection)
            use_cluster = cluster is not None and needs_cluster(cfg.cluster, source.count)
            pool = None if use_cluster else scheduler.enter_context(_in_this_process())
            with cluster() if use_cluster else _tasks_finished_on_error(pool):
                # Listed by tasks (on the cluster when there is one); read later.
                campaign = list_campaign(**inputs, camera=camera, on_error=inp.on_error, batch_size=inp.batch_size,
                                         select=selection, max_file_bytes=inp.max_file_bytes,
                                         restrict=appender.restrict if appender else None,
                                         identity=appender is not None)
                if selection:
                    log.info("%s: kept %d of %d files", inp.select, sum(campaign.n_files.values()), campaign.n_listed)
                log.info("found %d files in %d filter(s)", sum(campaign.n_files.values()), len(campaign.filters))
                for problem in campaign.problems:
                    log.warning("%s: %s", problem["file"], problem["reason"])
                # The filters the store will hold: an append's keeps those of the store it appends to.
                filters = sorted({*campaign.filters, *(appender.groups if appender else ())})
                if output.scales_yaml:
                    scales_yaml_paths(output.scales_yaml, filters)  # its rule, checked before any reading
                # The output repository is checked now, before any reading; written to once the store is committed.
                outbox = butler.ScalesOutput.prepare(output.butler, output.run, instrument, filters,
                                                     output.dataset_type) if output.butler else None
                if appender:
                    summaries, appended = _append_read_solve_write(cfg, campaign, appender, txn.staging,
                                                                   show_progress)
                else:
                    summaries, appended = _read_solve_write(cfg, campaign, txn.staging, show_progress), None
            log.info("committing %s", store_path)
        # Exported from the version this run committed, even if another run has committed since.
        committed = open_store(txn.version) if output.scales_yaml or outbox is not None else None
        scales_yaml = write_scales_yaml(committed, output.scales_yaml) if output.scales_yaml else []
        butler_datasets = outbox.put(committed) if outbox is not None else []
    if appended is not None:
        appended = dataclasses.replace(appended, version=txn.version.id)
    return RunSummary(store=store_path, filters=summaries, scales_yaml=scales_yaml,
                      butler_datasets=butler_datasets, append=appended)


def _outside_the_store(scales_yaml: str, store: Path) -> None:
    """The scales YAML (a file, or a directory of them) never goes into the store: a committed version is
    never changed."""
    out, resolved = Path(scales_yaml).resolve(), store.resolve()
    if out == resolved or resolved in out.parents:
        raise OutputPathError(f"{scales_yaml}: the scales YAML cannot be the store {store} or inside it")


#: Cells per dask chunk when solving across the workers: large enough that a pass over a campaign is a
#: handful of tasks (each iteration is a round trip), small enough that a task's memory stays modest (~16 MB).
SOLVE_CHUNK_CELLS = 2_000_000


def _solver_chunks(ds: xr.Dataset) -> xr.Dataset:
    """Merge the per-read-task chunks along exposure into chunks of about SOLVE_CHUNK_CELLS cells."""
    stored = ds["background"].chunks[ds["background"].get_axis_num("exposure")][0]
    per_exposure = ds["background"].size // max(1, ds.sizes["exposure"])
    factor = max(1, SOLVE_CHUNK_CELLS // max(1, per_exposure * stored))
    return ds.chunk({"exposure": stored * factor})


def _filter_summary(name: str, out: xr.Dataset) -> FilterSummary:
    """A filter's line of the report, from its :func:`scale_dataset`."""
    return FilterSummary(
        name=name, n_exposures=out.sizes["exposure"], n_detectors=out.sizes["detector"],
        n_amps=out.sizes.get("amp", 0), iterations=out.attrs["iterations"], converged=out.attrs["converged"],
        residual_scatter=out.attrs["residual_scatter"], n_problems=len(out.attrs["problems"]),
        n_filled_rows=out.attrs["n_filled_rows"], n_empty_exposures=out.attrs["n_empty_exposures"],
        n_clipped=out.attrs["n_clipped"], deviant_rows=_deviant_rows(out))


def _solved(ds: xr.Dataset, name: str, solve: SolveConfig, attrs: dict[str, Any], *, persist: bool,
            initial_g: xr.DataArray | None = None) -> xr.Dataset:
    """Solve one filter and return its :func:`scale_dataset`, logging a fit that did not converge.

    ``initial_g``: the row scales to start from (an append's, those of the store it appends to)."""
    try:
        fit = solve_dataset(ds, solve.level, **_solver_options(solve), persist=persist, initial_g=initial_g)
    except FitError as err:  # no numbers rather than wrong ones: the run fails and nothing is committed
        raise FitError(f"physical_filter {name}: {err}") from None
    if not fit.converged:
        log.warning("%s: not converged after %d iterations (last change %.2e)", name, fit.iterations,
                    fit.max_change)
    out = scale_dataset(ds, fit, solve.level, attrs=attrs)
    return out.assign_attrs(exposures_left_out=exposures_left_out(out))


def _solve_in_one_task(staging: str, name: str, solve: SolveConfig, attrs: dict[str, Any],
                       initial_g: xr.DataArray | None = None) -> FilterSummary:
    """Solve a filter with numpy from its group of the staging store, and write what the fit adds there -- one
    task; only the report line goes back to the client."""
    ds = xr.open_zarr(staging, group=name, consolidated=False, chunks=None)[list(SOLVER_VARIABLES)].load()
    out = _solved(ds, name, solve, attrs, persist=False, initial_g=initial_g)
    # The writes, in this task (the synchronous scheduler given as itself: see _in_this_process).
    dask.compute(append_variables(staging, name, out.drop_vars([v for v in ds.data_vars if v in out])),
                 scheduler=dask.local.get_sync)
    return _filter_summary(name, out)


def _write_block(staging: str, level: str, name: str, block: xr.Dataset,
                 region: dict[str, slice]) -> tuple[str, list[dict[str, Any]], np.ndarray]:
    """Write a reading block's inputs into its filter's group of the staging store -- in the task that read
    it; returns what the reading found: the filter, its problems and status counts."""
    write_region(staging, name, level_inputs(block, level), region)
    return name, problems(block), status_counts(block)


def _read_solve_write(cfg: Config, campaign: Campaign, staging: Path, show_progress: bool) -> list[FilterSummary]:
    """Read, solve every filter, write the staging store's chunks; the store is committed by the caller.

    One task per block reads its files and writes them into the staging store, so that worker memory is
    bounded by the block, not by the campaign, and the client receives only what went wrong.  A filter
    within ``solve.one_task_max_mb`` is then solved by a single numpy task; a larger one across the workers,
    its inputs held in their memory up to ``solve.persist_max_mb``, else read from the store at every pass.
    """
    inp, solve = cfg.input, cfg.solve
    extra = {"camera": str(inp.camera)} if inp.camera else {}
    tree = campaign.tree()
    inputs = {name: level_inputs(tree[name].to_dataset(), solve.level).assign_attrs(physical_filter=name, **extra)
              for name in campaign.filters}
    n_files = sum(campaign.n_files.values())
    root_attrs = {"config": cfg.to_dict(), "versions": _versions(),
                  "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "filters": campaign.filters, "n_files": n_files, "problems": campaign.problems,
                  HISTORY_ATTR: [history_entry("run", cfg.to_dict(), {"read": n_files, "added": n_files},
                                               campaign.filters)]}
    # Laid out from the lazy inputs (metadata and coordinates only): the reading tasks write the chunks.
    write_groups(staging, inputs, root_attrs=root_attrs, layout_only=True)
    size = {name: memory_bytes(ds["background"].shape, clipping=solve.clip_sigma is not None)
            for name, ds in inputs.items()}
    del tree, inputs
    log.info("reading %d files into %s", n_files, cfg.output.store)
    reports = _on_cluster(campaign.blocks(functools.partial(_write_block, str(staging), solve.level)),
                          show_progress, keep=False)
    campaign.release()  # the listing tasks' tables are no longer needed on the workers
    found: dict[str, list] = {name: [] for name in campaign.filters}
    counts = np.zeros(len(STATUS), dtype=np.int64)
    for name, block_problems, block_counts in reports:
        found[name] += block_problems
        counts += block_counts
    log.debug("checked the reading: %d problem(s)", sum(map(len, found.values())))
    verify_amp_names(campaign.amp_names, campaign.amp_source, counts)
    attrs = {name: {"problems": found[name]} for name in campaign.filters}
    return _solve_and_write(solve, staging, size, attrs, {}, show_progress)


def _solve_and_write(solve: SolveConfig, staging: Path, size: dict[str, int], attrs: dict[str, dict[str, Any]],
                     initial: dict[str, xr.DataArray], show_progress: bool) -> list[FilterSummary]:
    """Solve the filters whose inputs are in the staging store (named by ``size``: the solver's memory for each)
    and write what each fit adds to its group, with its ``attrs``; warm-started from ``initial`` G where given.

    A filter within ``solve.one_task_max_mb`` is solved by a single numpy task; a larger one across the
    workers, its inputs held in their memory up to ``solve.persist_max_mb``, else read from the store at every
    pass.
    """
    names = list(size)
    one_task = [name for name in names if size[name] <= solve.one_task_max_mb * 2**20]
    across = [name for name in names if name not in one_task]
    log.info("solving %s", ", ".join(names))

    def solve_across(name: str) -> FilterSummary:
        ds = xr.open_zarr(staging, group=name, consolidated=False)[list(SOLVER_VARIABLES)]
        held = size[name] <= solve.persist_max_mb * 2**20
        out = _solved(_solver_chunks(ds), name, solve, attrs[name], persist=held, initial_g=initial.get(name))
        _on_cluster([append_variables(staging, name, out.drop_vars([v for v in SOLVER_VARIABLES if v in out]))],
                    show_progress, keep=False)
        return _filter_summary(name, out)

    tasks = [dask.delayed(_solve_in_one_task, pure=False)(str(staging), name, solve, attrs[name], initial.get(name))
             for name in one_task]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1 + len(across)) as pool:
        small = pool.submit(_on_cluster, tasks, show_progress, keep=False) if tasks else None
        large = dict(zip(across, pool.map(solve_across, across)))
        summaries = dict(zip(one_task, small.result() if small is not None else []))
    log.debug("solved and written")
    return [summaries.get(name) or large[name] for name in names]


# ------------------------------------------------------------------------------------------------ append

@dataclass(frozen=True)
class AppendReport:
    """What an append did with the inputs, against the store version it started from (see
    :mod:`flatnorm_dask.incremental`): counts as in a history entry (:data:`flatnorm_dask.store.FILE_COUNTS`),
    the first vanished files, a few replaced paths (held, new), and the versions."""

    based_on: str
    files: dict[str, int]
    vanished: list[dict[str, Any]] = field(default_factory=list)
    replaced: list[tuple[str, str]] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)
    version: str | None = None

    def __str__(self) -> str:
        f = self.files
        lines = [f"appended to version {self.based_on}: {f['read']} file(s) read ({f['added']} added, "
                 f"{f['reread']} re-read as changed, {f['replaced']} replacing another path); {f['kept']} cell(s) "
                 f"kept; filters solved again: {', '.join(self.filters) or 'none'}"
                 + (f"; new version {self.version}" if self.version else "; store unchanged")]
        lines += [f"  replaced: {old} -> {new}" for old, new in self.replaced]
        if f["vanished"]:
            lines.append(f"  {f['vanished']} file(s) vanished from the inputs; their cells are kept:")
            lines += [f"    {v['file']} ({v['physical_filter']}, exposure {v['exposure']}, detector {v['detector']})"
                      for v in self.vanished]
            if f["vanished"] > len(self.vanished):
                lines.append(f"    ... and {f['vanished'] - len(self.vanished)} more")
        return "\n".join(lines)


class _Appender:
    """An append's view of the store it appends to: restricts the listing to the files to read (as
    :func:`flatnorm_dask.ingest.list_campaign`'s ``restrict``), then reports what it found."""

    def __init__(self, base: StoreVersion):
        self.base = base
        self.groups = list((read_commit(base.path) or {}).get("groups", []))
        self.reports: list[PartReport] = []
        self.vanished: tuple[int, list[dict[str, Any]], int] = (0, [], 0)
        self._stored: xr.DataTree | None = None

    def stored(self) -> xr.DataTree:
        """The version appended to, opened lazily (:func:`flatnorm_dask.store.open_store`), once."""
        if self._stored is None:
            self._stored = open_store(self.base)
        return self._stored

    def restrict(self, parts: list[Any], summarise: Callable[[Any], Any]) -> tuple[list[Any], list[Any], int]:
        from operator import getitem

        # The store's record is read once, by a task; Dask ships it to the tasks that compare the partitions
        # with it.  Persisted step by step (each step's results stay on the workers, and dask's own schedulers
        # compute nothing twice); a cluster runs them all before the one wait, for the reports, the summaries
        # of the partitions to read and the files that vanished.
        (held,) = dask.persist(dask.delayed(held_files, pure=False)(self.base))
        split = dask.persist(*[dask.delayed(split_part, pure=False)(part, held) for part in parts])
        kept = list(dask.persist(*[dask.delayed(getitem)(s, 0) for s in split]))
        reports = list(dask.persist(*[dask.delayed(getitem)(s, 1) for s in split]))
        (vanished,) = dask.persist(dask.delayed(vanished_files, pure=False)(held, reports))
        summaries = dask.persist(*[dask.delayed(summarise, pure=False)(part) for part in kept])
        # While a cluster's workers list and compare (all of it submitted), this process opens the version for
        # the merge (the first use of dask.array, whose import alone is a few tenths of a second): work that
        # would otherwise wait for theirs.
        self.stored()
        summaries, self.reports, self.vanished = dask.compute(list(summaries), reports, vanished)
        return kept, list(summaries), sum(r.n_listed for r in self.reports)

    def report(self, campaign: Campaign) -> AppendReport:
        n_vanished, vanished, n_held = self.vanished
        counts = {name: sum(getattr(r, name) for r in self.reports) for name in ("added", "reread", "replaced")}
        files = {"read": sum(campaign.n_files.values()), **counts, "vanished": n_vanished,
                 "kept": n_held - counts["reread"] - counts["replaced"]}
        replaced = [pair for r in self.reports for pair in r.replaced_examples][:NAMED_VANISHED]
        return AppendReport(self.base.id, files, vanished, replaced, campaign.filters)


#: (detector, exposure) cells per merging task of an append, and per chunk of a filter new to the store (a filter
#: the store holds keeps its chunks): each task costs tens of milliseconds whatever its size, in copying and
#: writing a block of a few MB a variable.
MERGE_BLOCK_CELLS = 10_000


def _stored_chunking(old: xr.Dataset, new: xr.Dataset) -> tuple[int, int] | None:
    """The (detector, exposure) chunk sizes of a stored group's inputs, if they all have the same and hold every
    amplifier in a chunk (as every run writes them); else None."""
    found = set()
    for name, var in new.data_vars.items():
        chunks = old[name].encoding.get("chunks") if name in old and old[name].dims == var.dims else None
        if chunks is None:
            return None
        sizes = dict(zip(var.dims, chunks))
        if "amp" in sizes and sizes["amp"] != old.sizes["amp"]:
            return None
        found.add((sizes["detector"], sizes["exposure"]))
    return found.pop() if len(found) == 1 else None


def _merged_layout(name: str, old: xr.Dataset | None, new: xr.Dataset, batch_size: int
                   ) -> tuple[MergePlan, xr.Dataset]:
    """The plan of a filter's merged inputs (the union of the store's grid and the new reading's) and its lazy
    template, which :func:`flatnorm_dask.store.write_groups` lays out (metadata and coordinates only).

    A filter the store holds keeps the store's chunks, so that the chunks the new reading leaves alone are linked
    from the store (:func:`flatnorm_dask.incremental.plan_merge`); a new one is chunked in blocks of about
    :data:`MERGE_BLOCK_CELLS` (or ``batch_size``) cells.  The merging tasks write the other chunks.
    """
    import dask.array as da

    union = {dim: np.union1d(old[dim].values, new[dim].values) if old is not None else new[dim].values
             for dim in ("detector", "exposure")}
    stored = _stored_chunking(old, new) if old is not None else None
    if stored is None:
        grid = Grid(name, union["detector"], union["exposure"], 0, max(batch_size, MERGE_BLOCK_CELLS))
        plan = plan_merge(union["detector"], union["exposure"], grid.det_chunk, grid.exp_chunk,
                          block_cells=MERGE_BLOCK_CELLS)
    else:
        plan = plan_merge(union["detector"], union["exposure"], *stored, block_cells=MERGE_BLOCK_CELLS,
                          stored=(old["detector"].values, old["exposure"].values),
                          read=(new["detector"].values, new["exposure"].values))
    det_chunks, exp_chunks = plan.chunks
    chunks = {"detector": det_chunks, "amp": (new.sizes["amp"],), "exposure": exp_chunks}
    sizes = {"detector": len(union["detector"]), "amp": new.sizes["amp"], "exposure": len(union["exposure"])}
    template = xr.Dataset(
        {name: (var.dims, da.full(tuple(sizes[d] for d in var.dims), ABSENT_FILL[name], dtype=var.dtype,
                                  chunks=tuple(chunks[d] for d in var.dims)), var.attrs)
         for name, var in new.data_vars.items()},
        coords={**union, "amp": new["amp"].values}, attrs=new.attrs)
    # The camera's detector names, of the store's detectors and the new ones; the store's read here (a few kB),
    # not by a round trip to the cluster.
    named = {int(d): str(v) for ds in (old, new) if ds is not None and "detector_name" in ds.coords
             for d, v in zip(ds["detector"].values,
                             ds["detector_name"].compute(scheduler=dask.local.get_sync).values) if v}
    if named:
        template.coords["detector_name"] = ("detector", np.array([named.get(int(d), "") for d in union["detector"]],
                                                                 dtype=object))
    return plan, template


def _merge_and_write(staging: str, level: str, spec: MergeSpec, old: StoredGroup | None,
                     *new: xr.Dataset) -> tuple[str, list[dict[str, Any]], np.ndarray]:
    """Merge one block of a filter (:func:`flatnorm_dask.incremental.merge_block`) and write it into the staging
    store -- a task; returns what the block holds that went wrong: the filter, its problems and status counts."""
    block = merge_block(spec, old, *new)
    write_region(staging, spec.name, block, spec.region)
    return spec.name, problems(block), status_counts(block)


def _level_block(level: str, name: str, block: xr.Dataset, region: dict[str, slice]) -> xr.Dataset:
    """A reading block's :func:`level_inputs` -- in the task that read it, for the merging tasks."""
    return level_inputs(block, level)


def _merge_tasks(campaign: Campaign, level: str, staging: Path, layouts: dict[str, tuple[MergePlan, xr.Dataset]],
                 old: dict[str, StoredGroup]) -> list[Any]:
    """One task per block of each touched filter's merge plan, fed by the reading tasks whose blocks overlap it."""
    read = iter(campaign.blocks(functools.partial(_level_block, level)))
    blocks: dict[str, list[tuple[np.ndarray, np.ndarray, Any]]] = {}
    for grid in campaign.grids:  # campaign.blocks' order: per filter, its blocks row by row
        det_chunks, exp_chunks = grid.chunks
        for i, j in itertools.product(range(len(det_chunks)), range(len(exp_chunks))):
            d0, e0 = i * grid.det_chunk, j * grid.exp_chunk
            blocks.setdefault(grid.name, []).append((grid.detectors[d0:d0 + det_chunks[i]],
                                                     grid.exposures[e0:e0 + exp_chunks[j]], next(read)))
    merge = dask.delayed(_merge_and_write, pure=False)
    tasks = []
    for name, (plan, template) in layouts.items():
        variables = {v: (template[v].dims, template[v].dtype) for v in template.data_vars}
        amps = tuple(map(str, template["amp"].values))
        for rows, columns in plan.blocks:
            dets, exps = plan.detectors[rows], plan.exposures[columns]
            # The reading's blocks whose id ranges overlap this block's (ids are sorted in both grids).
            feeding = [task for d, e, task in blocks[name]
                       if d[0] <= dets[-1] and d[-1] >= dets[0] and e[0] <= exps[-1] and e[-1] >= exps[0]]
            spec = MergeSpec(name, dets, exps, amps, {"detector": rows, "exposure": columns}, variables)
            tasks.append(merge(str(staging), level, spec, old.get(name), *feeding))
    return tasks


def _link_stored_chunks(base: StoreVersion, staging: Path, groups: dict[str, xr.Dataset],
                        layouts: dict[str, tuple[MergePlan, xr.Dataset]]) -> list[Any]:
    """Link the store's chunks that an append keeps as they are into the staging store (laid out by
    :func:`flatnorm_dask.store.write_groups` with ``layout_only``; see :func:`flatnorm_dask.store.link_chunks`):
    every chunk of the filters it leaves alone, and those of its plan in the others.  A group whose staged
    arrays are laid out otherwise than the store's is written in full: returns the writes of the untouched
    filters that are still to be made, and replaces a touched filter's plan by one that merges every chunk."""
    source = committed_store(base)
    left: list[Any] = []
    linked = 0
    for name, ds in groups.items():
        if name in layouts:
            plan, template = layouts[name]
            if not plan.linked:
                continue
            n = link_chunks(source, staging, name, list(template.data_vars),
                            [{"detector": i, "exposure": j} for i, j in plan.linked])
            if n is None:
                log.debug("%s: the store's chunks are laid out otherwise; all of them are merged", name)
                layouts[name] = (plan.without_links(MERGE_BLOCK_CELLS), template)
        else:
            # Written by the staging store's layout as dask arrays: those are the ones to link.
            chunked = [v for v, var in ds.variables.items() if var.chunks is not None]
            n = link_chunks(source, staging, name, chunked, same_shape=True)
            if n is None:
                log.debug("%s: the store's chunks are laid out otherwise; the group is copied", name)
                left.append(write_chunks(staging, name, ds))
        linked += n or 0
    log.debug("linked %d chunk file(s) of %s", linked, base.store)
    return left


def _append_read_solve_write(cfg: Config, campaign: Campaign, appender: _Appender, staging: Path,
                             show_progress: bool) -> tuple[list[FilterSummary], AppendReport]:
    """An append's reading, solving and writing into the staging store: the store's cells and the newly read
    files merged per filter, the filters with new reads solved again (warm-started from the store's G), the
    others copied as they are; the store is committed by the caller."""
    inp, solve = cfg.input, cfg.solve
    stored = appender.stored()
    base = group_datasets(stored)
    for name, ds in base.items():
        if ds.attrs.get("level") != solve.level:
            raise ValueError(f"{appender.base.store}: group {name} was solved at level {ds.attrs.get('level')}, not "
                             f"{solve.level}; an append solves at the store's level (--level)")
    stored_amps = next((tuple(map(str, ds["amp"].values)) for ds in base.values() if "amp" in ds.coords), None)
    if campaign.filters and stored_amps is not None and tuple(campaign.amp_names) != stored_amps:
        raise IngestError(f"{appender.base.store}: the new files list amplifiers {list(campaign.amp_names)} "
                          f"({campaign.amp_source}), the store {list(stored_amps)}")
    report = appender.report(campaign)
    extra = {"camera": str(inp.camera)} if inp.camera else {}
    tree = campaign.tree() if campaign.filters else None
    new = {name: level_inputs(tree[name].to_dataset(), solve.level).assign_attrs(physical_filter=name, **extra)
           for name in campaign.filters}
    names = sorted({*base, *new})
    layouts = {name: _merged_layout(name, base.get(name), ds, inp.batch_size) for name, ds in new.items()}
    groups = {name: layouts[name][1] if name in new else base[name] for name in names}  # untouched: as stored
    attrs = dict(stored.attrs)
    history = [*continued_history(attrs.get(HISTORY_ATTR) or [], appender.base.id),
               history_entry("append", cfg.to_dict(), report.files, campaign.filters, based_on=appender.base.id,
                             vanished=[v["file"] for v in report.vanished])]
    root_attrs = {"config": cfg.to_dict(), "versions": _versions(), "created": attrs.get("created"),
                  "appended": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "filters": names,
                  "n_files": int(attrs.get("n_files", 0)) + report.files["added"],
                  "problems": [*(attrs.get("problems") or []), *campaign.problems], HISTORY_ATTR: history}
    write_groups(staging, groups, root_attrs=root_attrs, layout_only=True)
    held = {name: StoredGroup(committed_store(appender.base), name, base[name]["detector"].values,
                              base[name]["exposure"].values) for name in new if name in base}
    # The store's chunks that stay as they are are linked; the untouched filters' groups whole, unless laid out
    # otherwise (then copied); the touched ones' other chunks merged block by block.
    copies = _link_stored_chunks(appender.base, staging, groups, layouts)
    log.info("reading %d files and merging them with the store's cells into %s", report.files["read"],
             appender.base.store)
    reports = _on_cluster([*copies, *_merge_tasks(campaign, solve.level, staging, layouts, held)], show_progress,
                          keep=False)
    campaign.release()
    found: dict[str, list] = {name: [] for name in new}
    counts = {name: np.zeros(len(STATUS), dtype=np.int64) for name in new}
    for name, block_problems, block_counts in (r for r in reports if isinstance(r, tuple)):
        found[name] += block_problems
        counts[name] += block_counts
    size = {name: memory_bytes(layouts[name][1]["background"].shape, clipping=solve.clip_sigma is not None)
            for name in new}
    solve_attrs = {name: {"problems": found[name], "n_files": int(counts[name].sum() - counts[name][ABSENT])}
                   for name in new}
    # Read here (a few kB), not by a round trip to the cluster.
    initial = {name: base[name]["det_scale"].compute(scheduler=dask.local.get_sync) for name in new if name in base}
    solved = dict(zip(size, _solve_and_write(solve, staging, size, solve_attrs, initial, show_progress)))
    summaries = [solved.get(name) or _filter_summary(name, base[name]) for name in names]
    return summaries, report
