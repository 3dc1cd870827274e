"""The one place that sequences a run: config -> files -> read (Dask) -> solve per filter -> Zarr store.

Every step runs on whatever Dask scheduler is active: the CLI opens a ``distributed`` client with
:func:`flatnorm_dask.cluster.connect`; in a notebook, the user's own client (or none: the threaded scheduler).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr

from . import __version__
from .config import Config, SolveConfig
from .ingest import discover, problems, read_campaign, select_files, solver_inputs
from .schema import parse_selection
from .solver import FitError, ScaleResult, measure_scales, memory_bytes
from .store import (
    OutputPathError,
    append_variables,
    exposures_left_out,
    group_datasets,
    open_store,
    scales_yaml_paths,
    store_transaction,
    write_groups,
    write_scales_yaml,
)

log = logging.getLogger(__name__)

__all__ = ["FilterSummary", "RunSummary", "level_inputs", "run", "scale_dataset", "solve_dataset"]


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
        return (f"{self.name}: {self.n_exposures} exposures x {self.n_detectors} detectors x {self.n_amps} amps; "
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

    def __str__(self) -> str:
        lines = [f"store: {self.store}"] + [f"  {f}" for f in self.filters]
        lines += [f"scales: {path}" for path in self.scales_yaml]
        lines += [f"butler: {line}" for line in self.butler_datasets]
        return "\n".join(lines)


def _versions() -> dict[str, str]:
    import distributed
    import pandas
    import zarr

    return {"flatnorm_dask": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "dask": dask.__version__, "distributed": distributed.__version__, "xarray": xr.__version__,
            "zarr": zarr.__version__, "pandas": pandas.__version__}


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


def level_inputs(ds: xr.Dataset, level: str) -> xr.Dataset:
    """A node of :func:`flatnorm_dask.read_campaign` reduced to what a scaling level uses and the store keeps:
    ``background`` and ``weight`` (the statistic and its pixel count) and the reading ``status``."""
    background, weight = solver_inputs(ds, level)
    out = xr.Dataset({"background": background, "weight": weight, "status": ds["status"]}, attrs=ds.attrs)
    # The amplifier names stay at detector level too: the cpFlatNormScales export lists expScale per amp.
    return out.assign_coords(amp=ds["amp"])


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
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


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
    and the butler's scales datasets.

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

    inp, output = cfg.input, cfg.output
    if not output.store:
        raise ValueError("no output store given (output.store / --output)")
    store_path = Path(output.store)
    if output.scales_yaml:
        _outside_the_store(output.scales_yaml, store_path)
    # Entered first, so that an existing store is refused before any work; committed at the block's end.
    with store_transaction(store_path, overwrite=output.overwrite, keep_versions=output.keep_versions,
                           lock_timeout=output.lock_timeout) as txn:
        camera = load_camera(inp.camera) if inp.camera else None
        selection = parse_selection(inp.select) if inp.select else None
        fields = [selection[0]] if selection else []
        if inp.butler:
            files = butler.find_inputs(inp.butler, inp.collections, inp.dataset_type, inp.where, inp.instrument,
                                       exposure_fields=fields)
        else:
            files = discover(inp.root, inp.pattern, inp.manifest, camera, columns=fields)
        if selection:
            found = len(files)
            files = select_files(files, *selection, source=inp.butler or inp.manifest)
            log.info("%s: kept %d of %d files", inp.select, len(files), found)
        log.info("found %d files in %d filter(s)", len(files), files["physical_filter"].nunique())
        filters = sorted(files["physical_filter"].unique())
        if output.scales_yaml:
            scales_yaml_paths(output.scales_yaml, filters)  # its rule, checked before any work
        # The output repository is checked now, before any work; written to only once the store is committed.
        outbox = butler.ScalesOutput.prepare(
            output.butler, output.run, files.attrs.get("instrument") or inp.instrument, filters,
            output.dataset_type) if output.butler else None
        with cluster() if cluster is not None else contextlib.nullcontext():
            summaries = _read_solve_write(cfg, files, camera, txn.staging, show_progress)
    # Exported from the version this run committed, even if another run has committed since.
    committed = open_store(txn.version) if output.scales_yaml or outbox is not None else None
    scales_yaml = write_scales_yaml(committed, output.scales_yaml) if output.scales_yaml else []
    butler_datasets = outbox.put(committed) if outbox is not None else []
    return RunSummary(store=store_path, filters=summaries, scales_yaml=scales_yaml,
                      butler_datasets=butler_datasets)


def _outside_the_store(scales_yaml: str, store: Path) -> None:
    """The scales YAML (a file, or a directory of them) never goes into the store: a committed version is
    never changed."""
    out, resolved = Path(scales_yaml).resolve(), store.resolve()
    if out == resolved or resolved in out.parents:
        raise OutputPathError(f"{scales_yaml}: the scales YAML cannot be the store {store} or inside it")


#: Cells per dask chunk when solving from the store: large enough that a pass over a campaign is a handful
#: of tasks (each iteration is a round trip), small enough that a task's memory stays modest (~16 MB each).
SOLVE_CHUNK_CELLS = 2_000_000


def _solver_chunks(ds: xr.Dataset) -> xr.Dataset:
    """Merge the store's per-read-task chunks along exposure into chunks of about SOLVE_CHUNK_CELLS cells."""
    stored = ds["background"].chunks[ds["background"].get_axis_num("exposure")][0]
    per_exposure = ds["background"].size // max(1, ds.sizes["exposure"])
    factor = max(1, SOLVE_CHUNK_CELLS // max(1, per_exposure * stored))
    return ds.chunk({"exposure": stored * factor})


def _read_solve_write(cfg: Config, files, camera, staging: Path, show_progress: bool) -> list[FilterSummary]:
    """Read, solve every filter, write the staging store's chunks; the store is committed by the caller.

    The inputs go from the reading tasks straight into the staging store. The solver keeps them in the
    workers' memory when they fit ``solve.persist_max_mb``, and otherwise iterates over them in the store:
    worker memory is then bounded by the chunk size, not by the campaign's.
    """
    inp, solve = cfg.input, cfg.solve
    tree = read_campaign(files=files, on_error=inp.on_error, batch_size=inp.batch_size, camera=camera,
                         max_file_bytes=inp.max_file_bytes)
    nodes = group_datasets(tree)
    extra = {"camera": str(inp.camera)} if inp.camera else {}
    inputs = {name: level_inputs(ds, solve.level).assign_attrs(physical_filter=name, **extra)
              for name, ds in nodes.items()}
    root_attrs = {"config": cfg.to_dict(), "versions": _versions(),
                  "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "filters": list(nodes), "n_files": int(len(files))}
    log.info("reading %d files into %s", len(files), cfg.output.store)
    _on_cluster(write_groups(staging, inputs, root_attrs=root_attrs), show_progress, keep=False)
    staged = {name: _solver_chunks(xr.open_zarr(staging, group=name, consolidated=False)) for name in nodes}

    def solve_one(name: str) -> tuple[xr.Dataset, ScaleResult]:
        ds = staged[name]
        found = problems(nodes[name], ds["status"].values, inp.max_file_bytes)
        held = memory_bytes(ds["background"].shape, clipping=solve.clip_sigma is not None)
        try:
            fit = solve_dataset(ds, solve.level, **_solver_options(solve),
                                persist=held <= solve.persist_max_mb * 2**20)
        except FitError as err:  # no numbers rather than wrong ones: the run fails and nothing is committed
            raise FitError(f"physical_filter {name}: {err}") from None
        if not fit.converged:
            log.warning("%s: not converged after %d iterations (last change %.2e)", name, fit.iterations,
                        fit.max_change)
        out = scale_dataset(ds, fit, solve.level, attrs={"problems": found})
        return out.assign_attrs(exposures_left_out=exposures_left_out(out)), fit

    log.info("solving %s", ", ".join(nodes))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        solved = dict(zip(nodes, pool.map(solve_one, nodes)))
    log.info("writing scales and diagnostics")
    _on_cluster([append_variables(staging, name, out.drop_vars(list(inputs[name].data_vars)))
                 for name, (out, _) in solved.items()], show_progress, keep=False)
    summaries = []
    for name in nodes:
        out = xr.open_zarr(staging, group=name, consolidated=False)
        summaries.append(FilterSummary(
            name=name, n_exposures=out.sizes["exposure"], n_detectors=out.sizes["detector"],
            n_amps=out.sizes.get("amp", 0), iterations=out.attrs["iterations"],
            converged=out.attrs["converged"], residual_scatter=out.attrs["residual_scatter"],
            n_problems=len(out.attrs["problems"]), n_filled_rows=out.attrs["n_filled_rows"],
            n_empty_exposures=out.attrs["n_empty_exposures"], n_clipped=out.attrs["n_clipped"],
            deviant_rows=_deviant_rows(out)))
    return summaries
