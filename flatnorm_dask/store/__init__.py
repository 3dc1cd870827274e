"""The Zarr store of a run: one group per physical_filter, written so that no reader ever sees half of it.

One module per job; this package re-exports their public names.

- :mod:`~flatnorm_dask.store.transaction`: staging directory, commit record, publication by rename
  (:func:`prepare_store`, :func:`commit_store`, :func:`abort_store`, :func:`store_transaction`).
- :mod:`~flatnorm_dask.store.encoding`: Datasets into Zarr groups (:func:`write_groups`,
  :func:`append_variables`, :func:`write_store`).
- :mod:`~flatnorm_dask.store.read`: complete stores only (:func:`open_store`, :func:`is_complete`), their
  groups and recorded config.
- :mod:`~flatnorm_dask.store.summary`: :func:`store_summary`, the text of ``flatnorm info``.
- :mod:`~flatnorm_dask.store.export`: ``cpFlatNormScales`` (:func:`export_scales`, :func:`write_scales_yaml`).
"""

from .encoding import append_variables, write_groups, write_store
from .export import export_scales, write_scales_yaml
from .read import group_datasets, is_complete, open_store, stored_config
from .summary import store_summary
from .transaction import (
    COMMIT_ATTR,
    IncompleteStoreError,
    StoreError,
    StoreExistsError,
    abort_store,
    commit_store,
    prepare_store,
    read_commit,
    store_transaction,
)

__all__ = [
    "COMMIT_ATTR",
    "IncompleteStoreError",
    "StoreError",
    "StoreExistsError",
    "abort_store",
    "append_variables",
    "commit_store",
    "export_scales",
    "group_datasets",
    "is_complete",
    "open_store",
    "prepare_store",
    "read_commit",
    "store_summary",
    "store_transaction",
    "stored_config",
    "write_groups",
    "write_scales_yaml",
    "write_store",
]
