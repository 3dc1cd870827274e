"""Which Dask cluster a run uses: a LocalCluster sized to the machine, an existing scheduler, or a job queue.

Every setting comes in explicitly, as a :class:`~flatnorm_dask.config.ClusterConfig` (the ``cluster`` section of
the run's config); nothing is read from or written to dask's global config here.  dask-jobqueue reads its own
``jobqueue.<kind>`` keys from dask's config, which the caller sets from the config's ``dask`` section.

dask and distributed are imported inside the functions: this module is imported by the config schema (for
:data:`JOBQUEUE_KINDS`), and so by every ``flatnorm`` command, however light.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

    from .config import ClusterConfig

log = logging.getLogger(__name__)

__all__ = ["JOBQUEUE_KINDS", "SCHEDULER_NAMES", "connect", "job_script", "scheduler_kind"]

#: dask-jobqueue backends by the name ``cluster.scheduler`` gives them (``jobqueue-local``: local processes).
JOBQUEUE_KINDS = ("slurm", "pbs", "sge", "lsf", "htcondor", "jobqueue-local")

#: The scheduler value that starts a LocalCluster on this machine (as does none at all).
LOCAL = "local"

#: Every ``cluster.scheduler`` value that is a name rather than an address or a file.
SCHEDULER_NAMES = (LOCAL, *JOBQUEUE_KINDS)

# host:port, or [IPv6]:port, without a protocol (distributed then uses tcp://).
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d+")


def scheduler_kind(scheduler: str | None) -> str:
    """What a ``cluster.scheduler`` value asks for: ``"local"``, ``"jobqueue"``, ``"file"`` or ``"address"``.

    None or ``local`` start a LocalCluster; a name of :data:`JOBQUEUE_KINDS` a dask-jobqueue cluster; a path
    ending in ``.json`` is a scheduler file; ``protocol://...`` or ``host:port`` is a running scheduler.

    Raises
    ------
    ValueError
        Anything else, with the closest name when it looks like a misspelt one.
    """
    if scheduler is None or scheduler == LOCAL:
        return "local"
    if scheduler in JOBQUEUE_KINDS:
        return "jobqueue"
    if scheduler.endswith(".json"):
        return "file"
    if "://" in scheduler or _HOST_PORT.fullmatch(scheduler):
        return "address"
    hint = difflib.get_close_matches(scheduler.lower(), SCHEDULER_NAMES, n=1, cutoff=0.6)
    raise ValueError(f"expected {', '.join(SCHEDULER_NAMES)}, a scheduler address (tcp://host:8786) or a "
                     f"scheduler file (*.json), got {scheduler!r}" + (f"; did you mean {hint[0]}?" if hint else ""))


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _local_cluster(cluster: ClusterConfig) -> LocalCluster:
    from distributed import LocalCluster

    # File parsing holds the GIL: single-threaded worker processes, one per core unless told otherwise.
    kwargs = {"processes": True, "threads_per_worker": cluster.threads_per_worker or 1}
    if cluster.n_workers is not None:
        kwargs["n_workers"] = cluster.n_workers
    elif cluster.threads_per_worker is None:
        kwargs["n_workers"] = _cores()
    if cluster.memory_limit is not None:
        kwargs["memory_limit"] = cluster.memory_limit
    # Task errors come back to the client as exceptions; the workers' own log of them (with tracebacks)
    # only shows with --debug, which lowers the "distributed" logger's level.
    level = logging.getLogger("distributed").getEffectiveLevel()
    kwargs["silence_logs"] = level if level < logging.WARNING else logging.CRITICAL
    return LocalCluster(**kwargs)


def _jobqueue_class(kind: str):
    try:
        import dask_jobqueue
        from dask_jobqueue.local import LocalCluster as JobQueueLocalCluster
    except ImportError:
        raise RuntimeError(f"cluster kind {kind!r} needs dask-jobqueue: pip install 'flatnorm-dask[jobqueue]'") from None
    return {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster,
            "sge": dask_jobqueue.SGECluster, "lsf": dask_jobqueue.LSFCluster,
            "htcondor": dask_jobqueue.HTCondorCluster, "jobqueue-local": JobQueueLocalCluster}[kind]


def job_script(cluster: ClusterConfig) -> str:
    """The batch script the job-queue cluster of ``cluster.scheduler`` would submit for one job.

    The job's shape comes from the ``jobqueue.<kind>`` keys of dask's config: call it inside
    ``dask.config.set(cfg.dask_settings())``, as a run does.
    """
    if scheduler_kind(cluster.scheduler) != "jobqueue":
        raise ValueError(f"cluster.scheduler is {cluster.scheduler or LOCAL!r}: a job script needs a job-queue "
                         f"kind ({', '.join(JOBQUEUE_KINDS)})")
    with _jobqueue_class(cluster.scheduler)() as jobqueue:
        return jobqueue.job_script()


@contextlib.contextmanager
def _closing(cluster):
    """Close a cluster started here on exit; on an error, without letting a failed shutdown replace it."""
    try:
        yield cluster
    except BaseException:
        try:
            cluster.close()
        except Exception:  # e.g. a job that was never submitted: distributed asserts on its state
            log.debug("closing %r after an error failed too", cluster, exc_info=True)
        raise
    cluster.close()


@contextlib.contextmanager
def connect(cluster: ClusterConfig) -> Iterator[Client]:
    """A ``distributed.Client`` for the run, shut down (with any cluster it started) on exit.

    ``cluster.scheduler`` picks the cluster (see :func:`scheduler_kind`): a LocalCluster sized by
    ``n_workers``, ``threads_per_worker`` and ``memory_limit``; a running scheduler (address or scheduler
    file), left running; or a dask-jobqueue cluster of ``n_workers`` jobs (one if unset), shaped by the
    ``jobqueue.<kind>`` dask settings, whose first worker must start within ``wait_timeout`` seconds.
    """
    from distributed import Client

    kind = scheduler_kind(cluster.scheduler)
    with contextlib.ExitStack() as stack:  # closes the client, then any cluster started here, even on error
        if kind == "local":
            client = stack.enter_context(Client(stack.enter_context(_closing(_local_cluster(cluster)))))
        elif kind == "jobqueue":
            jobs = stack.enter_context(_closing(_jobqueue_class(cluster.scheduler)()))
            jobs.scale(jobs=cluster.n_workers or 1)
            client = stack.enter_context(Client(jobs))
            try:
                client.wait_for_workers(1, timeout=cluster.wait_timeout)
            except TimeoutError:
                raise TimeoutError(f"no {cluster.scheduler} job started a worker within {cluster.wait_timeout:g} s "
                                   f"(cluster.wait_timeout); check the queue and the job script") from None
        elif kind == "file":
            client = stack.enter_context(Client(scheduler_file=cluster.scheduler))
        else:
            client = stack.enter_context(Client(cluster.scheduler))
        log.info("Dask dashboard: %s", client.dashboard_link)
        yield client
