"""flatnorm-dask: flat-field normalisation scales for mosaic cameras, as a Dask workflow.

A re-build of LSST cp_pipe's ``CpFlatNormalizationTask``: per (detector, exposure) flat statistics are
decomposed as ``B = G[detector or amplifier] x E[exposure]``.
"""

from importlib.metadata import PackageNotFoundError, version

from .records import normalize, records_to_matrices, scales_dict
from .solver import ScaleResult, measure_scales, usable_cells

try:
    __version__ = version("flatnorm-dask")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "ScaleResult",
    "__version__",
    "measure_scales",
    "normalize",
    "records_to_matrices",
    "scales_dict",
    "usable_cells",
]
