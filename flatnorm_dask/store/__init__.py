"""The Zarr store of a run: one group per physical_filter, written so that no reader ever sees half of it.

One module per job; this package re-exports their public names.

- :mod:`~flatnorm_dask.store.transaction`: staging directory, commit record and manifest, immutable versions
  behind a symlink swapped under a lock (:func:`prepare_store`, :func:`commit_store`, :func:`abort_store`,
  :func:`store_transaction`, :func:`current_version`, :func:`remove_store`, :func:`check_output_file`).
- :mod:`~flatnorm_dask.store.encoding`: Datasets into Zarr groups (:func:`write_groups`,
  :func:`append_variables`, :func:`write_store`).
- :mod:`~flatnorm_dask.store.read`: complete stores only, at the version current when opened
  (:func:`open_store`, :func:`verify_store`, :func:`is_complete`), their groups and recorded config.
- :mod:`~flatnorm_dask.store.history`: the ``history`` root attribute, one entry per run or append
  (:func:`history_entry`, :func:`store_history`).
- :mod:`~flatnorm_dask.store.summary`: :func:`store_summary`, the text of ``flatnorm info``.
- :mod:`~flatnorm_dask.store.export`: ``cpFlatNormScales`` (:func:`export_scales`, :func:`write_scales_yaml`).
"""

from . import encoding, export, history, read, summary, transaction
from .encoding import *  # noqa: F403
from .export import *  # noqa: F403
from .history import *  # noqa: F403
from .read import *  # noqa: F403
from .summary import *  # noqa: F403
from .transaction import *  # noqa: F403

# The public names of the package are those of its modules.
__all__ = sorted({*transaction.__all__, *encoding.__all__, *read.__all__, *summary.__all__, *export.__all__,
                  *history.__all__})
