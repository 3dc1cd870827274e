"""flatnorm-dask: flat-field normalisation scales for mosaic cameras, as a Dask workflow.

A re-build of LSST cp_pipe's ``CpFlatNormalizationTask``: per (detector, exposure) flat statistics are
decomposed as ``B = G[detector or amplifier] x E[exposure]``.
"""

from importlib.metadata import PackageNotFoundError, version

# Imported here, not lazily: the submodule of the same name would otherwise shadow the function once imported.
from .compare import compare
from .records import normalize, records_to_matrices, scales_dict
from .solver import ScaleResult, measure_scales, usable_cells

try:
    __version__ = version("flatnorm-dask")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

# Imported on first use: the campaign reader needs pandas and xarray, which a light command never loads.
_LAZY = {"read_campaign": "ingest", "read_stats_file": "formats", "open_store": "store"}

__all__ = [
    "ScaleResult",
    "__version__",
    "compare",
    "measure_scales",
    "normalize",
    "open_store",
    "read_campaign",
    "read_stats_file",
    "records_to_matrices",
    "scales_dict",
    "usable_cells",
]


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
