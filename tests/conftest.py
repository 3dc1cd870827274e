"""Fixtures shared by the test modules.

Starting a LocalCluster of worker processes costs seconds; most tests that need a real cluster only need one,
not their own.  ``dask_cluster`` is started once per session and shared: tests use its client
(``dask_client``) or pass its address to the command (``--scheduler ADDRESS``), which joins it instead of
starting a cluster.  Tests that kill workers or need a differently shaped cluster start their own.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest

# The suite starts dozens of processes (test workers, runs, cluster workers, a kernel), each importing the
# package anew.  Where the environment turns bytecode caching off (PYTHONDONTWRITEBYTECODE, as some CI images
# do), each would compile every module from source: the suite turns it back on for itself and its children
# (__pycache__ is ignored by git).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

from helpers import fork_server  # noqa: E402  (tests/ is on sys.path, as for every test module)


def pytest_configure(config):
    """Worker processes of the LocalClusters started here (the session's and the tests' own) fork from a server
    that has imported distributed and the package, instead of each spawning an interpreter that imports them
    (~2 s of CPU a worker); the commands the tests run start theirs as a user's do.  Set up in each process that
    runs tests, not in pytest-xdist's controller, which runs none."""
    xdist_controller = not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", 0))
    if not xdist_controller:
        fork_server()


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one test process more than this machine has cores, as some tests
    mostly wait (for a timeout, a signalled command, a kernel): measured on 2 cores, the suite took 137 s in 3
    processes against 149 s in 2.  ``--maxprocesses`` still caps it."""
    from flatnorm_dask.cluster import _cores  # the cores a LocalCluster of flatnorm's would use

    return _cores() + 1


def _dask_settings() -> dict:
    """dask's config as flat ``{dotted key: value}``."""
    import dask

    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("", dask.config.config)
    return flat


@pytest.fixture(scope="session", autouse=True)
def dask_config_at_start() -> dict:
    """dask's config before any other fixture of the session (autouse: set up first in its scope)."""
    return _dask_settings()


@pytest.fixture(autouse=True)
def dask_config_left_as_found(dask_config_at_start):
    """No test, nor a fixture of any scope it starts, leaves dask's global config changed: a setting left
    behind changes what every later test of the process runs with.  Keys a first import adds (a library's
    defaults) are not changes."""
    yield
    before, after = dask_config_at_start, _dask_settings()
    changed = {key: (value, after.get(key, "(removed)")) for key, value in before.items()
               if key not in after or after[key] != value}
    assert not changed, f"dask config changed by this test (before, after): {changed}"


def pytest_collection_finish(session):
    """Python's cyclic garbage collector, for a test process: what is alive once the tests are collected
    (pytest, the libraries, the test modules: hundreds of thousands of objects that live to the end) is left
    out of its collections (``gc.freeze``), and young objects are collected every 10,000 allocations rather
    than 700.  Every object is still freed as before when nothing refers to it; a cycle is freed a little
    later.  Measured on four of the heaviest modules: 10.7 s of collections down to 4.6 s."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


@pytest.fixture(autouse=True)
def fsyncs(monkeypatch) -> list:
    """The paths a commit in the test's process asks to flush, recorded instead of flushed.

    fsync is about power cuts, which no test here can make; each one waits for the disk, and the suite commits
    hundreds of stores.  That commits ask for the right flushes is tested (test_commit.py) on this record.
    """
    from flatnorm_dask.store import transaction

    asked: list = []
    monkeypatch.setattr(transaction, "_fsync", asked.append)
    return asked


@pytest.fixture(scope="session")
def dask_cluster():
    """A LocalCluster of two single-threaded worker processes, shared by the whole session.

    It starts as flatnorm starts its own (:data:`~flatnorm_dask.cluster.QUIET_DASK`: no profiler, slow ticks):
    idle through most of the session, with distributed's defaults its processes took ~50 s of the suite's CPU.
    """
    import dask
    from distributed import LocalCluster

    from flatnorm_dask.cluster import QUIET_DASK

    # Set while it is made (its servers read them then, and pass them to the worker processes), not for the
    # session: tests that start a cluster of their own must see dask's config as a user's run does.
    with dask.config.set(QUIET_DASK):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with cluster:
        yield cluster


@pytest.fixture
def dask_client(dask_cluster):
    """A client of the shared cluster, the active scheduler for the duration of one test.

    The workers are shared: a test must not kill or restart them, and should not leave data on them.
    """
    from distributed import Client

    with Client(dask_cluster) as client:
        yield client


@pytest.fixture(scope="session")
def scheduler_address(dask_cluster) -> str:
    """The shared cluster's address, for ``flatnorm run --scheduler ADDRESS`` (no cluster start-up per run)."""
    return dask_cluster.scheduler_address
