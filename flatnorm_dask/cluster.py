"""Which Dask cluster a run uses: a LocalCluster sized to the machine, an existing scheduler, or a job queue.

Every setting comes in explicitly, as a :class:`~flatnorm_dask.config.ClusterConfig` (the ``cluster`` section of
the run's config); dask's global config is never changed here beyond the start of a LocalCluster, which
starts with :data:`QUIET_DASK` where the user left those keys at distributed's defaults (``cluster.diagnostics``
keeps them).  dask-jobqueue reads its own ``jobqueue.<kind>`` keys from dask's config, which the caller sets
from the config's ``dask`` section.

Nothing here waits without a bound: a running scheduler must answer within ``cluster.connect_timeout``
(:func:`check_scheduler`), and during the run a watchdog ends it when no worker has been able to run tasks
for ``cluster.worker_timeout`` seconds (none connected, all paused for lack of memory, or each one dying and
restarting).  Every failure is a :class:`ClusterError` of one line naming the address or the setting.

dask and distributed are imported inside the functions: this module is imported by the config schema (for
:data:`JOBQUEUE_KINDS`), and so by every ``flatnorm`` command, however light.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ._text import one_line
from .bounded import read_text

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

    from .config import ClusterConfig

log = logging.getLogger(__name__)

__all__ = ["JOBQUEUE_KINDS", "MEMORY_FLOOR_REASON", "MIN_WORKER_MEMORY", "SCHEDULER_NAMES", "ClusterError",
           "check_scheduler", "connect", "job_script", "memory_limit_problem", "needs_cluster", "scheduler_address",
           "scheduler_kind"]

#: dask-jobqueue backends by the name ``cluster.scheduler`` gives them (``jobqueue-local``: local processes).
JOBQUEUE_KINDS = ("slurm", "pbs", "sge", "lsf", "htcondor", "jobqueue-local")

#: The scheduler value that starts a LocalCluster on this machine (as does none at all).
LOCAL = "local"

#: Every ``cluster.scheduler`` value that is a name rather than an address or a file.
SCHEDULER_NAMES = (LOCAL, *JOBQUEUE_KINDS)

# host:port, or [IPv6]:port, without a protocol (distributed then uses tcp://).
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d+")

#: The smallest memory limit a worker can run our tasks with (the reason: :data:`MEMORY_FLOOR_REASON`).
MIN_WORKER_MEMORY = 256 * 2**20

#: Why :data:`MIN_WORKER_MEMORY`: measured, a worker process holds about 150 MiB once it has run a reading
#: and a solving task (numpy, pandas, xarray, zarr imported); ``distributed.worker.memory.pause`` and
#: ``terminate`` default to 0.8 and 0.95.
MEMORY_FLOOR_REASON = ("a worker holds about 150 MiB once it has imported what the tasks use, and distributed "
                       "pauses it at 80% of its limit and restarts it at 95%")

#: The dask settings of a LocalCluster started without ``cluster.diagnostics``: distributed's samplers that feed
#: the dashboard, slowed or stopped.  Each wakes an event loop (the scheduler's, the nannies' and the client's in
#: this process, each worker's in its own) many times a second, on the cores that read the files: measured on 2
#: cores, an idle 2-worker cluster took 0.11 core with distributed's defaults and 0.02 with these.
QUIET_DASK = {
    # The workers' statistical profiler (the dashboard's Profile page): a stack sample every 10 ms.
    "distributed.worker.profile.enabled": False,
    # Every server measures its event loop's latency every 20 ms (it warns past 3 s of delay either way).
    "distributed.admin.tick.interval": "1s",
    # Every server samples its process's CPU, memory and network every 0.5 s (the dashboard's System page).
    "distributed.admin.system-monitor.interval": "2s",
}

#: Largest scheduler file read: distributed writes a few hundred bytes of JSON.
_MAX_SCHEDULER_FILE_BYTES = 1 << 20


class ClusterError(RuntimeError):
    """The cluster cannot run the job: one line naming the address, file or setting, and the reason."""


def memory_limit_problem(nbytes: int) -> str | None:
    """Why a worker memory limit of ``nbytes`` bytes is too small for our tasks, or None when it is not."""
    if nbytes >= MIN_WORKER_MEMORY:
        return None
    return f"{nbytes / 2**20:.4g} MiB per worker is below the floor of {MIN_WORKER_MEMORY // 2**20} MiB: " \
           f"{MEMORY_FLOOR_REASON}"


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


def needs_cluster(cluster: ClusterConfig, count_files: Callable[[int], int]) -> bool:
    """Whether a run should start (or join) the cluster of ``cluster.scheduler``, or work in its own process.

    A running scheduler and a job queue are always used: the user asked for them.  A LocalCluster is started
    only for at least ``cluster.local_min_files`` input files: below that, starting its worker processes
    costs more than they would save.  ``count_files(limit)`` counts the inputs, cheaply, up to just past
    ``limit``.  The choice is logged.
    """
    if scheduler_kind(cluster.scheduler) != "local" or cluster.local_min_files == 0:
        return True
    n = count_files(cluster.local_min_files)
    if n < cluster.local_min_files:
        log.info("%d input files, fewer than cluster.local_min_files (%d): working in this process, without "
                 "starting a cluster", n, cluster.local_min_files)
        return False
    log.info("at least %d input files (cluster.local_min_files): starting a LocalCluster", cluster.local_min_files)
    return True


def _unset(settings: dict[str, object]) -> dict[str, object]:
    """The dask ``settings`` whose keys dask's config leaves at distributed's default: a value the user set (in a
    run's ``dask`` section, dask's YAML files or ``DASK_*`` variables) is kept."""
    import dask.config
    import distributed  # noqa: F401  registers its defaults

    def default(key: str) -> object:
        for layer in reversed(dask.config.defaults):
            with contextlib.suppress(KeyError):
                return dask.config.get(key, config=layer)
        return None

    return {key: value for key, value in settings.items() if dask.config.get(key, None) == default(key)}


def _local_cluster(cluster: ClusterConfig) -> LocalCluster:
    import dask
    from distributed import LocalCluster

    # File parsing holds the GIL: single-threaded worker processes, one per core unless told otherwise.
    kwargs = {"processes": True, "threads_per_worker": cluster.threads_per_worker or 1}
    if cluster.n_workers is not None:
        kwargs["n_workers"] = cluster.n_workers
    elif cluster.threads_per_worker is None:
        kwargs["n_workers"] = _cores()
    if cluster.memory_limit is not None:
        _check_memory_limit(cluster.memory_limit, kwargs["threads_per_worker"])
        kwargs["memory_limit"] = cluster.memory_limit
    # Task errors come back to the client as exceptions; the workers' own log of them (with tracebacks)
    # only shows with --debug, which lowers the "distributed" logger's level.
    level = logging.getLogger("distributed").getEffectiveLevel()
    kwargs["silence_logs"] = level if level < logging.WARNING else logging.CRITICAL
    try:
        # Read by the scheduler and nannies as they are made, and passed on to the worker processes.
        with dask.config.set({} if cluster.diagnostics else _unset(QUIET_DASK)):
            return LocalCluster(**kwargs)
    except Exception as err:  # e.g. "Nanny failed to start.", whose cause says why
        reason = one_line(err.__cause__ if err.__cause__ is not None else err)
        raise ClusterError(f"cannot start a LocalCluster of {kwargs.get('n_workers', 'default')} worker(s) "
                           f"(cluster.n_workers, cluster.memory_limit {cluster.memory_limit}): {reason}") from None


def _check_memory_limit(memory_limit: str | int | float, threads: int) -> None:
    """The per-worker limit a LocalCluster worker will resolve ``memory_limit`` to (a fraction or "auto" of
    this machine's memory), against :data:`MIN_WORKER_MEMORY`; absolute sizes were checked with the config."""
    from distributed.worker_memory import parse_memory_limit

    nbytes = parse_memory_limit(memory_limit, threads, logger=log)
    problem = memory_limit_problem(nbytes) if nbytes is not None else None
    if problem:
        raise ClusterError(f"cluster.memory_limit {memory_limit!r}: {problem}")


def _jobqueue_class(kind: str):
    import signal

    # dask_jobqueue (0.9) replaces the process's SIGINT handler when first imported, with one that calls
    # sys.exit(): a Ctrl-C would then end the run with status 0, as if it had succeeded, and without a word.
    # The handler in place before (the command's own, see cli) is put back.
    handler = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        import dask_jobqueue
        from dask_jobqueue.local import LocalCluster as JobQueueLocalCluster
    except ImportError:
        raise RuntimeError(f"cluster kind {kind!r} needs dask-jobqueue: pip install 'flatnorm-dask[jobqueue]'") from None
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
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


def scheduler_address(path: str, timeout: float) -> str:
    """The address a scheduler file (JSON written by ``dask scheduler --scheduler-file``) gives.

    A file that does not exist yet is waited for, up to ``timeout`` seconds: a batch job may start the
    scheduler and this client together.  Only a small regular text file is read (:mod:`flatnorm_dask.bounded`).

    Raises
    ------
    ClusterError
        Naming the file and what is wrong with it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = read_text(path, _MAX_SCHEDULER_FILE_BYTES)  # a FIFO or a device would block or never end
            break
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise ClusterError(f"scheduler file {path}: no such file (waited {timeout:g} s for it to appear: "
                                   f"cluster.connect_timeout)") from None
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        except (OSError, ValueError) as err:
            raise ClusterError(f"scheduler file {path}: cannot read: {_reason(err)}") from None
    problem = None
    try:
        data = json.loads(text)
    except ValueError as err:
        problem = f"not JSON ({one_line(err)})"
    else:
        if not isinstance(data, dict) or "address" not in data:
            problem = "no \"address\" in it"
        elif not isinstance(data["address"], str) or not data["address"]:
            problem = f"its \"address\" is not a text, got {str(data['address'])[:60]!r}"
    if problem:
        raise ClusterError(f"scheduler file {path}: not a Dask scheduler file: {problem} (expected the JSON "
                           f"that dask scheduler --scheduler-file writes)")
    return data["address"]


def _reason(err: BaseException) -> str:
    return err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)


def check_scheduler(address: str, timeout: float) -> None:
    """Make sure a Dask scheduler answers at ``address``, within ``timeout`` seconds (and a second more).

    distributed's own connection waits without a bound for the first message of a server that accepts the
    connection, and reads the first bytes of any other server as a message length ("Unable to allocate
    3.07 EiB" from a web server): this asks for that message with a bound, and says what answered.

    Raises
    ------
    ClusterError
        Naming the address and the reason: malformed, nothing to connect to, no answer, not Dask's protocol.
    """
    import asyncio  # here, like distributed: config.py imports this module for every command, however light
    import concurrent.futures

    from distributed.comm import CommClosedError
    from distributed.comm import connect as dask_connect
    from distributed.security import Security

    _check_address(address)
    # As a Client connects: with the TLS settings of dask's config (distributed.comm.tls.*) for tls:// addresses.
    connection_args = Security().get_connection_args("client")

    async def handshake():
        # distributed's bounded connection, then the scheduler's greeting, which nothing in it bounds
        comm = await dask_connect(address, timeout=timeout, **connection_args)
        await comm.close()

    def attempt():  # in a thread of its own: the caller may be running an event loop (a notebook)
        asyncio.run(asyncio.wait_for(handshake(), timeout + 1.0))

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flatnorm-check-scheduler") as pool:
        try:
            pool.submit(attempt).result()
            return
        except TimeoutError:
            reason = (f"it accepted the connection but sent nothing within {timeout:g} s: not a Dask scheduler "
                      f"(a web server, such as the dashboard's port, waits for a request), or one too busy "
                      f"to answer")
        except CommClosedError:
            reason = "it closed the connection without answering: not a Dask scheduler"
        except OSError as err:  # distributed gave up connecting: say why (refused, unknown host, ...)
            reason = f"cannot connect within {timeout:g} s ({_connect_failure(err, address)})"
        except Exception as err:  # noqa: BLE001  whatever a foreign server's bytes made of Dask's protocol
            log.debug("scheduler %s: %s", address, one_line(err))  # e.g. "Unable to allocate 3.07 EiB"
            reason = ("it answered, but not in Dask's protocol: not a Dask scheduler (a web server, such as "
                      "the dashboard's port?)")
    raise ClusterError(f"scheduler {address}: {reason} (cluster.connect_timeout)")


def _check_address(address: str) -> None:
    """A scheduler address distributed can connect to: known protocol, and a port for TCP-like ones."""
    from distributed.comm import get_address_host_port, parse_address
    from distributed.comm.registry import get_backend

    try:
        scheme, _ = parse_address(address, strict=True)
        get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            _, port = get_address_host_port(address, strict=True)
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is not in 1-65535")
    except ValueError as err:
        raise ClusterError(f"scheduler {address}: not a scheduler address: {one_line(err)}") from None


def _connect_failure(err: BaseException, address: str) -> str:
    """Why distributed could not connect, e.g. "Connection refused": the innermost cause of its error, or,
    when that is only its deadline cutting the last attempt short, what a plain TCP connection says."""
    import asyncio

    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    if not isinstance(err, (TimeoutError, asyncio.CancelledError)):
        return _reason(err)
    from distributed.comm import get_address_host_port

    try:
        with socket.create_connection(get_address_host_port(address), timeout=1.0):
            return "no answer in time, though it accepts connections now"
    except (OSError, ValueError) as tcp_err:
        return _reason(tcp_err)


class _Watchdog:
    """Ends a run whose cluster has had no worker able to run tasks for ``limit`` seconds.

    Every ``interval`` it asks the scheduler for its workers (an RPC bounded in time), and it counts the
    workers the scheduler removes (its ``all`` events).  A worker counts as able when it has been seen
    running, not paused, at three consecutive looks under the same address (a restarted worker comes back at
    a new address): a worker restarted every second by its nanny for exceeding its memory never counts.
    When none has been able for ``limit`` seconds, it records why and closes the client, which cancels what
    the run is waiting for; :func:`connect` then raises the reason.
    """

    LOOKS = 3
    TOPIC = "all"  # where the scheduler logs add-worker / remove-worker

    def __init__(self, client, limit: float, advice: str):
        self.client, self.limit, self.advice = client, limit, advice
        self.interval = min(2.0, limit / 10)
        self.failure: str | None = None
        self.removed = 0  # workers removed by the scheduler (died, killed, restarted), counted on its loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="flatnorm-watchdog", daemon=True)

    def _event(self, event) -> None:
        if event[1].get("action") == "remove-worker":
            self.removed += 1

    def __enter__(self) -> _Watchdog:
        self.client.subscribe_topic(self.TOPIC, self._event)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.client.status == "running":
            with contextlib.suppress(Exception):
                self.client.unsubscribe_topic(self.TOPIC)

    def _look(self) -> dict[str, str] | None:
        """Worker address -> status, or None when the scheduler does not answer in time."""
        try:
            info = self.client.sync(self.client.scheduler.identity, n_workers=-1,
                                    callback_timeout=max(1.0, self.limit / 2))
        except Exception:  # noqa: BLE001  no answer is an observation too
            return None
        return {address: str(w.get("status")) for address, w in info.get("workers", {}).items()}

    def _watch(self) -> None:
        streak: dict[str, int] = {}  # address -> consecutive looks seen running
        unable_since = time.monotonic()
        # While no worker is able: looks unanswered, workers seen paused, workers removed before this.
        silent = looks = 0
        paused: set[str] = set()
        removed = self.removed
        while not self._stop.wait(self.interval):
            workers = self._look()
            looks += 1
            if workers is None:
                silent += 1
                streak = {}
            else:
                streak = {a: streak.get(a, 0) + 1 for a, status in workers.items() if status == "running"}
                paused |= {a for a, status in workers.items() if status == "paused"}
            if max(streak.values(), default=0) >= self.LOOKS:
                unable_since, silent, looks, paused, removed = time.monotonic(), 0, 0, set(), self.removed
            elif time.monotonic() - unable_since >= self.limit:
                self._fail(self._state(silent == looks, self.removed - removed, len(paused), workers))
                return

    @staticmethod
    def _state(silent: bool, removed: int, paused: int, workers: dict[str, str] | None) -> str:
        """What the workers did while none was able, in a few words."""
        if silent:
            return "the scheduler did not answer"
        parts = []
        if removed:
            parts.append(f"workers died or were restarted {removed} time(s)")
        if paused:
            parts.append(f"{paused} worker(s) paused for lack of memory")
        if not parts:
            parts.append("no worker connected" if not workers else "no worker stayed up")
        return ", ".join(parts)

    def _fail(self, state: str) -> None:
        self.failure = (f"no worker able to run tasks for {self.limit:g} s (cluster.worker_timeout): {state}; "
                        f"{self.advice}")
        log.debug("watchdog: %s; closing the client", self.failure)
        with contextlib.suppress(Exception):
            self.client.close(timeout=max(5.0, self.limit))


def _advice(cluster: ClusterConfig, kind: str) -> str:
    """What to change when workers die or pause, by the kind of cluster."""
    if kind == "local":
        return (f"raise cluster.memory_limit (now {cluster.memory_limit}) or lower input.batch_size; "
                f"--debug shows the workers' log")
    if kind == "jobqueue":
        return (f"raise the jobs' memory (dask: jobqueue.{cluster.scheduler}.memory) or lower input.batch_size; "
                f"see the jobs' logs")
    return ("check the scheduler's workers (dask worker --memory-limit, their logs) or lower input.batch_size")


@contextlib.contextmanager
def connect(cluster: ClusterConfig) -> Iterator[Client]:
    """A ``distributed.Client`` for the run, shut down (with any cluster it started) on exit.

    ``cluster.scheduler`` picks the cluster (see :func:`scheduler_kind`): a LocalCluster sized by
    ``n_workers``, ``threads_per_worker`` and ``memory_limit``; a running scheduler (address or scheduler
    file), which must answer within ``connect_timeout`` seconds and is left running; or a dask-jobqueue
    cluster of ``n_workers`` jobs (one if unset), shaped by the ``jobqueue.<kind>`` dask settings, whose
    first worker must start within ``wait_timeout`` seconds.

    While the client is in use, a run that has had no worker able to run tasks for ``worker_timeout``
    seconds, or whose task killed ``distributed.scheduler.allowed-failures`` + 1 workers, ends with a
    :class:`ClusterError` naming the setting to change.
    """
    from distributed import CancelledError, Client, KilledWorker

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
                raise ClusterError(f"no {cluster.scheduler} job started a worker within {cluster.wait_timeout:g} s "
                                   f"(cluster.wait_timeout); check the queue and the job script") from None
        else:
            address = cluster.scheduler
            if kind == "file":
                address = scheduler_address(cluster.scheduler, cluster.connect_timeout)
                log.info("scheduler file %s: %s", cluster.scheduler, address)
            check_scheduler(address, cluster.connect_timeout)
            try:
                client = stack.enter_context(Client(address, timeout=cluster.connect_timeout))
            except OSError as err:  # it answered the check a moment ago
                raise ClusterError(f"scheduler {address}: cannot connect ({_connect_failure(err, address)}) "
                                   f"(cluster.connect_timeout)") from None
        log.info("Dask dashboard: %s", client.dashboard_link)
        scheduler, advice = client.scheduler.address, _advice(cluster, kind)
        watchdog = stack.enter_context(_Watchdog(client, cluster.worker_timeout, advice))
        try:
            yield client
        except KilledWorker as err:
            raise ClusterError(f"task {err.task!r} was running on {err.allowed_failures + 1} worker(s) that each "
                               f"died (distributed.scheduler.allowed-failures {err.allowed_failures}): a worker "
                               f"ran out of memory or crashed; {advice}") from None
        except Exception as err:
            if watchdog.failure:  # the watchdog closed the client: what the run waited for was cancelled
                raise ClusterError(watchdog.failure) from None
            if isinstance(err, CancelledError) and _CONNECTION_LOST in str(err):
                raise ClusterError(f"scheduler {scheduler}: the connection to it was lost during the run (was it "
                                   f"stopped, or its machine lost?)") from None
            raise


#: The reason distributed gives the futures it cancels when the client loses its scheduler.
_CONNECTION_LOST = "scheduler-connection-lost"
