"""Which Dask cluster a run uses: a LocalCluster sized to the machine, an existing scheduler, or a job queue.

Settings come from dask's config system (``flatnorm.cluster.*``, set by :mod:`flatnorm_dask.config` from the
user's YAML, or by ``DASK_FLATNORM__CLUSTER__*`` environment variables).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import dask

log = logging.getLogger(__name__)

__all__ = ["JOBQUEUE_KINDS", "connect", "job_script"]


def _local_cluster():
    from distributed import LocalCluster

    settings = dask.config.get("flatnorm.cluster", default={}) or {}
    kwargs = {}
    if settings.get("n_workers"):
        kwargs["n_workers"] = int(settings["n_workers"])
    if settings.get("threads_per_worker"):
        kwargs["threads_per_worker"] = int(settings["threads_per_worker"])
    if settings.get("memory_limit") not in (None, "auto"):
        kwargs["memory_limit"] = settings["memory_limit"]
    if "n_workers" in kwargs and "threads_per_worker" not in kwargs:
        kwargs["threads_per_worker"] = 1
    # File parsing holds the GIL: one process per core by default.
    kwargs.setdefault("processes", True)
    if "n_workers" not in kwargs and "threads_per_worker" not in kwargs:
        import os

        kwargs["n_workers"] = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                  else os.cpu_count() or 1)
        kwargs["threads_per_worker"] = 1
    # Task errors come back to the client as exceptions; the workers' own log of them (with tracebacks)
    # only shows with --debug, which lowers the "distributed" logger's level.
    level = logging.getLogger("distributed").getEffectiveLevel()
    kwargs.setdefault("silence_logs", level if level < logging.WARNING else logging.CRITICAL)
    return LocalCluster(**kwargs)


JOBQUEUE_KINDS = ("slurm", "pbs", "sge", "lsf", "htcondor", "jobqueue-local")


def _jobqueue_class(kind: str):
    try:
        import dask_jobqueue
        from dask_jobqueue.local import LocalCluster as JobQueueLocalCluster
    except ImportError:
        raise RuntimeError(f"cluster kind {kind!r} needs dask-jobqueue: pip install 'flatnorm-dask[jobqueue]'") from None
    return {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster,
            "sge": dask_jobqueue.SGECluster, "lsf": dask_jobqueue.LSFCluster,
            "htcondor": dask_jobqueue.HTCondorCluster, "jobqueue-local": JobQueueLocalCluster}[kind]


def _jobqueue_cluster(kind: str):
    cluster = _jobqueue_class(kind)()  # reads its jobqueue.<kind>.* settings from dask config
    settings = dask.config.get("flatnorm.cluster", default={}) or {}
    cluster.scale(jobs=int(settings.get("n_workers") or 1))
    return cluster


def job_script(kind: str = "slurm") -> str:
    """The batch script a dask-jobqueue cluster of ``kind`` would submit, from the current dask config."""
    with _jobqueue_class(kind)() as cluster:
        return cluster.job_script()


@contextlib.contextmanager
def connect() -> Iterator["distributed.Client"]:  # noqa: F821
    """A ``distributed.Client`` for the run, shut down (with any cluster it started) on exit.

    ``flatnorm.cluster.scheduler`` picks the cluster: unset (or ``local``) starts a LocalCluster;
    a ``tcp://``/``tls://`` address (or a scheduler file path) connects to a running scheduler;
    ``slurm``, ``pbs``, ``sge``, ``lsf``, ``htcondor`` start a dask-jobqueue cluster configured by the
    ``jobqueue.<kind>`` dask settings (``jobqueue-local`` runs the same code path on this machine).
    """
    from distributed import Client

    scheduler = dask.config.get("flatnorm.cluster.scheduler", default=None)
    cluster = None
    if scheduler in (None, "", "local"):
        cluster = _local_cluster()
        client = Client(cluster)
    elif scheduler in JOBQUEUE_KINDS:
        cluster = _jobqueue_cluster(scheduler)
        client = Client(cluster)
        client.wait_for_workers(1, timeout=dask.config.get("flatnorm.cluster.wait_timeout", default=600))
    elif str(scheduler).endswith(".json"):
        client = Client(scheduler_file=scheduler)
    else:
        client = Client(scheduler)
    log.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
