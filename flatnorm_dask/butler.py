"""LSST data repositories: find the statistics inputs through a butler registry, put the scales back.

Optional: needs ``lsst-daf-butler`` (``pip install 'flatnorm-dask[butler]'``), imported only inside the
functions here, so the rest of the package works without it.  The dataset types default to the stock
cp_pipe pipelines' names (:data:`~flatnorm_dask.schema.STATISTICS_DATASET_TYPE` in,
:data:`~flatnorm_dask.schema.SCALES_DATASET_TYPE` out).

- :func:`find_inputs` asks the registry for the statistics datasets of some collections and returns the same
  file table as :func:`flatnorm_dask.ingest.discover` (``path, exposure, detector, physical_filter``), with
  the ids taken from the data ids and the paths from the datastore (local files as plain paths, remote ones
  as URIs that :class:`flatnorm_dask.formats.StatsReader` reads, see :mod:`flatnorm_dask.remote`), and, when
  asked, exposure record fields to down-select on.  The files are then read by our own parser in the usual
  batched Dask tasks; the butler never reads them.
- :class:`ScalesOutput` checks an output repository before the run and, once the Zarr store is committed,
  puts one scales dataset per physical_filter (dimensions instrument, physical_filter; storage class
  ``StructuredDataDict``), the structure :func:`flatnorm_dask.store.export_scales` gives.

Collections are searched in order and only the first dataset of each data id is used (``find_first``): with
a CHAINED collection, or several collections, an id present in two runs comes from the first one listed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._text import one_line
from .config import OPTIONS
from .ingest import IngestError
from .schema import SCALES_DATASET_TYPE, STATISTICS_DATASET_TYPE

if TYPE_CHECKING:
    import xarray as xr

log = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_DIMENSIONS",
    "OUTPUT_STORAGE_CLASS",
    "STATISTICS_STORAGE_CLASS",
    "ButlerError",
    "ButlerUnavailableError",
    "ScalesOutput",
    "find_inputs",
]

OUTPUT_DIMENSIONS = ("instrument", "physical_filter")
OUTPUT_STORAGE_CLASS = "StructuredDataDict"
#: The storage class of the statistics (the files our parser reads); with exposure and detector dimensions,
#: what makes a dataset type look like statistics when the asked one is not there.
STATISTICS_STORAGE_CLASS = "PropertyList"
#: The dimensions a statistics dataset type must have.
_STATISTICS_DIMENSIONS = ("exposure", "detector")
_INSTALL = "pip install 'flatnorm-dask[butler]'"


class ButlerUnavailableError(ImportError):
    """``lsst.daf.butler`` cannot be imported; the message says what to install."""


class ButlerError(RuntimeError):
    """A repository, collection, dataset type or data id problem, in one line naming the repository."""


def _daf_butler():
    try:
        import lsst.daf.butler as daf_butler
    except ImportError as err:
        raise ButlerUnavailableError(
            f"butler repositories (--butler, --output-butler) need lsst-daf-butler, which is not installed "
            f"({err}): {_INSTALL}") from None
    return daf_butler


def _open(repo: str, *, writeable: bool):
    daf_butler = _daf_butler()
    try:
        return daf_butler.Butler.from_config(os.fspath(repo), writeable=writeable)
    except Exception as err:  # FileNotFoundError, bad config, database errors...
        raise ButlerError(f"{repo}: cannot open the butler repository: {one_line(err)}") from None



def _path_of(uri) -> str:
    """A local file as a plain path (fastest to open; no URL quoting), anything else as a URI string."""
    if uri.scheme in ("file", ""):
        return uri.ospath
    return str(uri)


def find_inputs(repo: str | os.PathLike, collections: Sequence[str] | str,
                dataset_type: str = STATISTICS_DATASET_TYPE, where: str | None = None,
                instrument: str | None = None, exposure_fields: Sequence[str] = ()) -> pd.DataFrame:
    """The input file table of the statistics datasets in a butler repository.

    Parameters
    ----------
    repo : str or path-like
        Repository root, ``butler.yaml`` or repository alias.
    collections : str or sequence of str
        Collections searched in order (RUN or CHAINED collections; no wildcards): for a data id found in
        several, the first one wins.
    dataset_type : str
        Dataset type of the statistics; it must have ``exposure`` and ``detector`` dimensions.  The stock
        pipelines' name by default; repositories of older pipelines hold ``flatStats``.
    where : str, optional
        Butler query expression, e.g. ``"exposure.day_obs = 20251120 AND detector < 100"``.
    instrument : str, optional
        Only this instrument's datasets (also lets ``where`` name instrument-dependent dimensions).  Needed
        when the collections hold datasets of several instruments.
    exposure_fields : sequence of str
        Exposure record fields (e.g. ``observation_reason``) to add as columns, for
        a down-selection (:func:`flatnorm_dask.listing.selected`).

    Returns
    -------
    pandas.DataFrame
        Columns ``path, exposure, detector, physical_filter`` and ``exposure_fields``, sorted as
        :func:`~flatnorm_dask.ingest.discover` sorts them; ``attrs["instrument"]`` is the instrument of the
        data ids.

    Raises
    ------
    ButlerUnavailableError
        lsst-daf-butler is not installed.
    ButlerError, IngestError
        The repository, a collection or the dataset type does not exist (the message lists the
        statistics-like dataset types the collections hold), the query is invalid or finds nothing, or the
        datasets belong to several instruments.
    """
    repo = os.fspath(repo)
    collections = [collections] if isinstance(collections, str) else list(collections)
    if not collections:
        raise ButlerError(f"{repo}: no collections given to search for {dataset_type}")
    butler = _open(repo, writeable=False)
    daf_butler = _daf_butler()
    try:
        dtype = butler.get_dataset_type(dataset_type)
    except daf_butler.MissingDatasetTypeError:
        raise ButlerError(f"{repo}: dataset type {dataset_type!r} is not registered in the repository"
                          f"{_statistics_hint(butler, collections)}") from None
    missing = [d for d in _STATISTICS_DIMENSIONS if d not in dtype.dimensions.names]
    if missing:
        raise ButlerError(f"{repo}: dataset type {dataset_type!r} has dimensions "
                          f"{sorted(dtype.dimensions.names)}, without {', '.join(missing)}")
    if instrument is None and where:
        # A where clause naming e.g. detector or exposure columns needs the instrument fixed; a repository
        # with a single instrument leaves no doubt which.
        names = [r.name for r in butler.registry.queryDimensionRecords("instrument")]
        instrument = names[0] if len(names) == 1 else None
    kwargs = {"instrument": instrument} if instrument else {}
    held = f"{dataset_type} datasets in collection(s) {', '.join(collections)}"
    what = held + (f" where {where}" if where else "")
    try:
        refs = butler.query_datasets(dataset_type, collections=collections, find_first=True, where=where or "",
                                     with_dimension_records=bool(exposure_fields), limit=None, explain=False,
                                     **kwargs)
    except Exception as err:  # MissingCollectionError, InvalidQueryError (bad where), DataIdValueError ...
        hint = ""
        if "without constraining" in str(err):
            hint = "; give the instrument (--instrument / input.instrument) or add instrument='NAME' to --where"
        raise ButlerError(f"{repo}: cannot query {what}: {one_line(err)}{hint}") from None
    if not refs:
        for_instrument = f" for instrument {instrument}" if instrument else ""
        if where and butler.query_datasets(dataset_type, collections=collections, find_first=True, limit=1,
                                           explain=False, **kwargs):
            raise IngestError(f"{repo}: no {what}{for_instrument}")  # the where clause left nothing
        raise IngestError(f"{repo}: no {held}{for_instrument}{_statistics_hint(butler, collections)}")
    instruments = sorted({str(ref.dataId["instrument"]) for ref in refs})
    if len(instruments) > 1:
        raise IngestError(f"{repo}: {what} belong to several instruments ({', '.join(instruments)}); choose one "
                          "with --instrument (input.instrument)")
    try:
        uris = butler.get_many_uris(refs)
    except Exception as err:
        raise ButlerError(f"{repo}: cannot locate the files of {what}: {one_line(err)}") from None
    paths = []
    for ref in refs:
        uri = uris[ref].primaryURI
        if uri is None:  # a composite stored as components: not how a PropertyList is stored
            raise ButlerError(f"{repo}: {ref} is not stored as one file")
        paths.append(_path_of(uri))
    table = pd.DataFrame({
        "path": paths,
        "exposure": np.array([ref.dataId["exposure"] for ref in refs], dtype=np.int64),
        "detector": np.array([ref.dataId["detector"] for ref in refs], dtype=np.int64),
        "physical_filter": [str(ref.dataId["physical_filter"]) for ref in refs],
    })
    for name in exposure_fields:
        table[name] = pd.array([_exposure_field(ref, name, repo) for ref in refs], dtype="string")
    table = table.sort_values(["physical_filter", "exposure", "detector", "path"], kind="stable", ignore_index=True)
    table.attrs["instrument"] = instruments[0]
    log.info("%s: %d %s datasets of %s in %s", repo, len(table), dataset_type, instruments[0],
             ", ".join(collections))
    return table


def _exposure_field(ref, name: str, repo: str) -> str | None:
    """A field of the exposure record of an expanded data id (None when the record leaves it empty)."""
    record = ref.dataId.records["exposure"]
    try:
        value = getattr(record, name)
    except AttributeError:
        raise ButlerError(f"{repo}: exposure records have no field {name!r}") from None
    return None if value is None else str(value)


def _statistics_hint(butler, collections: list[str]) -> str:
    """'; statistics-like dataset types there: ...' for an error message: the dataset types the collections
    hold that have exposure and detector dimensions and the statistics' storage class."""
    flag = OPTIONS["input.dataset_type"].flag
    try:
        infos = butler.collections.query_info(collections, include_summary=True)
        names = sorted({name for info in infos for name in (info.dataset_types or ())})
        found = []
        for name in names:
            dtype = butler.get_dataset_type(name)
            if (dtype.storageClass_name == STATISTICS_STORAGE_CLASS
                    and all(d in dtype.dimensions.names for d in _STATISTICS_DIMENSIONS)):
                found.append(name)
    except Exception:  # e.g. a collection that does not exist: the query's own error says so
        return ""
    if not found:
        return (f"; the collections hold no statistics-like dataset type (dimensions exposure and detector, "
                f"storage class {STATISTICS_STORAGE_CLASS})")
    return f"; statistics-like dataset types there: {', '.join(found)} (choose with {flag} NAME)"


@dataclass
class ScalesOutput:
    """Where and how the scales go into a butler repository; :meth:`prepare` checks it before any work."""

    repo: str
    run: str
    instrument: str
    filters: list[str]
    dataset_type: str = SCALES_DATASET_TYPE

    @classmethod
    def prepare(cls, repo: str | os.PathLike, run: str, instrument: str | None, filters: Sequence[str],
                dataset_type: str = SCALES_DATASET_TYPE) -> ScalesOutput:
        """Open the output repository and check that the run can take a dataset for every filter.

        Checked: the repository opens for writing; an existing ``dataset_type`` has the expected dimensions
        and storage class; every (instrument, physical_filter) is known to the registry; ``run``, if it
        exists, is a RUN collection without ``dataset_type`` datasets of these filters (datasets in a run are
        never replaced: choose a new run).  Nothing is written.
        """
        repo = os.fspath(repo)
        if not instrument:
            raise ButlerError(f"{repo}: no instrument for the output data ids: give input.instrument "
                              "(--instrument) when the inputs do not come from a butler")
        butler = _open(repo, writeable=True)
        daf_butler = _daf_butler()
        try:
            existing = butler.get_dataset_type(dataset_type)
        except daf_butler.MissingDatasetTypeError:
            existing = None
        if existing is not None:
            wanted = _output_dataset_type(butler, dataset_type)
            if not existing.is_compatible_with(wanted):
                raise ButlerError(f"{repo}: dataset type {existing} is registered differently from what is "
                                  f"written here ({wanted})")
        for name in filters:
            try:
                butler.registry.expandDataId(instrument=instrument, physical_filter=name)
            except Exception as err:
                raise ButlerError(f"{repo}: physical_filter {name!r} of instrument {instrument!r} is not in the "
                                  f"output repository's registry ({one_line(err)})") from None
        try:
            kind = butler.registry.getCollectionType(run)
        except daf_butler.MissingCollectionError:
            kind = None
        if kind is not None:
            if kind != daf_butler.CollectionType.RUN:
                raise ButlerError(f"{repo}: output run {run!r} exists and is a {kind.name} collection, not a RUN")
            if existing is not None:
                taken = [name for name in filters
                         if butler.find_dataset(dataset_type, collections=run, instrument=instrument,
                                                physical_filter=name) is not None]
                if taken:
                    raise ButlerError(f"{repo}: run {run!r} already holds {dataset_type} for "
                                      f"{', '.join(taken)}; choose a new --output-run")
        # Not kept open: a database connection may not survive hours of solving.
        return cls(repo=repo, run=run, instrument=instrument, filters=list(filters), dataset_type=dataset_type)

    def put(self, store: str | os.PathLike | xr.DataTree) -> list[str]:
        """Put every filter's scales of a committed store (its path, or its opened tree); all or nothing (one
        registry transaction).

        Each dataset holds :func:`flatnorm_dask.store.export_scales` of its filter: exposures without a
        usable cell are left out of ``expScale``.  Registers the dataset type and the run when absent.
        Returns one line per dataset written.
        """
        from .store import export_scales

        scales = export_scales(store)
        butler = _open(self.repo, writeable=True)
        butler.registry.registerDatasetType(_output_dataset_type(butler, self.dataset_type))
        butler.registry.registerRun(self.run)
        written = []
        with butler.transaction():
            for name, value in scales.items():
                ref = butler.put(value, self.dataset_type, run=self.run, instrument=self.instrument,
                                 physical_filter=name)
                written.append(f"{self.dataset_type} {self.instrument} {name} -> {self.repo} run {self.run} "
                               f"({ref.id})")
        log.info("put %d %s dataset(s) into %s run %s", len(written), self.dataset_type, self.repo, self.run)
        return written


def _output_dataset_type(butler, name: str):
    daf_butler = _daf_butler()
    return daf_butler.DatasetType(name, OUTPUT_DIMENSIONS, OUTPUT_STORAGE_CLASS, universe=butler.dimensions)
