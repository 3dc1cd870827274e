"""Nothing hangs on the cluster side: bad schedulers, bad scheduler files, workers that die, pause or never come.

Each case ends within a bounded time (``cluster.connect_timeout`` / ``cluster.worker_timeout``, set small here)
in one line naming the address, file or setting and the reason.  The listeners are real sockets on 127.0.0.1
started by the tests.
"""

import contextlib
import http.server
import json
import os
import re
import signal
import socket
import threading
import time

import dask
import distributed  # noqa: F401  its config defaults, before any test sets one of its keys
import pytest

from flatnorm_dask import cluster as cluster_module
from flatnorm_dask.cli import main
from flatnorm_dask.cluster import ClusterError, connect
from flatnorm_dask.config import Config, ConfigError, load_config
from flatnorm_dask.simulate import simulate_campaign, write_campaign

#: cluster.connect_timeout in these tests (seconds); a case may take it, plus the second of slack
#: check_scheduler allows, plus the run's own start (reading the manifest, imports already done): SLACK.
CONNECT = 1.0
SLACK = 4.0
BOUND = CONNECT + SLACK


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    tree = simulate_campaign("lsstcam", n_detectors=2, n_exposures=3, filters=("r_57",), seed=31)
    return write_campaign(tree, tmp_path_factory.mktemp("cluster_faults"), layout="simple")


@contextlib.contextmanager
def listener(on_accept):
    """A TCP server on 127.0.0.1 calling ``on_accept(connection)`` for every connection; yields its address."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed at the end of the test
                return
            held.append(conn)
            on_accept(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        server.close()
        thread.join(5)
        for conn in held:
            conn.close()


def silent(conn):
    """Accept and never answer (held open until the test ends)."""


def http_reply(conn):
    """What a web server says to bytes that are not HTTP: a 400, at once."""
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    conn.close()


def hang_up(conn):
    conn.close()


@contextlib.contextmanager
def http_server():
    """A tiny HTTP server (the standard library's), which waits for a request line that Dask never sends."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"tcp://127.0.0.1:{port}"


@contextlib.contextmanager
def dashboard(dask_cluster):
    """The session cluster's own dashboard port: the web server a user most often mistakes for the scheduler."""
    yield f"tcp://127.0.0.1:{dask_cluster.scheduler.http_server.port}"


def run_cli(capsys, manifest, tmp_path, *flags):
    """``flatnorm run`` in this process: (exit status, its last stderr line, seconds taken)."""
    start = time.monotonic()
    status = main(["run", "--manifest", str(manifest), "--output", str(tmp_path / "out.zarr"), "--no-progress",
                   *map(str, flags)])
    elapsed = time.monotonic() - start
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return status, lines[-1] if lines else "", elapsed


#: The connection timeout of the cases that answer at once (a hang-up, a reply): generous, so that a loaded
#: machine's slow connect is not mistaken for no answer.  They usually end within a second, but may take the
#: whole timeout: distributed retries (with a growing back-off) a connection the server closed before its
#: connect returned, which happens when the machine is loaded.
AT_ONCE = 10.0
NOT_DASK = (r"it accepted the connection but sent nothing within 1 s: not a Dask scheduler \(a web server, such "
            r"as the dashboard's port, waits for a request\), or one too busy to answer")
SCHEDULERS = {
    "silent": (lambda _: listener(silent), NOT_DASK),
    "http_server": (lambda _: http_server(), NOT_DASK),
    "dashboard": (dashboard, NOT_DASK),
    "http_reply": (lambda _: listener(http_reply),
                   r"it answered, but not in Dask's protocol: not a Dask scheduler \(a web server, such as the "
                   r"dashboard's port\?\)", AT_ONCE),
    "hang_up": (lambda _: listener(hang_up), r"it closed the connection without answering: not a Dask scheduler",
                AT_ONCE),
    "closed_port": (lambda _: closed_port(), r"cannot connect within 1 s \(Connection refused\)"),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_a_scheduler_address_that_is_no_scheduler_ends_in_one_line(kind, manifest, tmp_path, capsys, request):
    start_server, reason, *timeout = SCHEDULERS[kind]
    timeout = timeout[0] if timeout else CONNECT
    server_cluster = request.getfixturevalue("dask_cluster") if kind == "dashboard" else None
    with start_server(server_cluster) as address:
        status, line, elapsed = run_cli(capsys, manifest, tmp_path, "--scheduler", address,
                                        "--connect-timeout", timeout)
    assert status == 1
    assert line.startswith(f"flatnorm: error: scheduler {address}: ")
    assert line.endswith(" (cluster.connect_timeout)")
    assert re.search(reason, line), line
    assert "EiB" not in line and "allocate" not in line
    assert elapsed < timeout + SLACK, elapsed
    assert not (tmp_path / "out.zarr").exists() and os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.parametrize("address, reason", [
    ("tcp://127.0.0.1:99999", "port 99999 is not in 1-65535"),
    ("carrier-pigeon://127.0.0.1:8786", "unknown address scheme 'carrier-pigeon'"),
])
def test_a_malformed_address_is_refused_at_once(address, reason):
    start = time.monotonic()
    with pytest.raises(ClusterError) as err, connect(Config.from_dict({"cluster": {"scheduler": address}}).cluster):
        pass
    assert str(err.value).startswith(f"scheduler {address}: not a scheduler address: {reason}")
    assert time.monotonic() - start < 2


def _fifo(path):
    os.mkfifo(path)  # a writer would have to open it: reading it would block for ever


SCHEDULER_FILES = {
    "binary": (lambda p: p.write_bytes(bytes(range(256))), r"cannot read: NUL byte at byte 0: a binary file, not text"),
    "not_utf8": (lambda p: p.write_bytes(b'{"address": "\xff"}'), r"cannot read: not UTF-8 text \(byte 13\)"),
    "not_json": (lambda p: p.write_text("address: tcp://x:1\n"), r"not a Dask scheduler file: not JSON \(Expecting"),
    "json_list": (lambda p: p.write_text('["tcp://127.0.0.1:8786"]'), 'not a Dask scheduler file: no "address" in it'),
    "no_address": (lambda p: p.write_text('{"type": "Scheduler"}'), 'not a Dask scheduler file: no "address" in it'),
    "address_number": (lambda p: p.write_text('{"address": 8786}'),
                       "not a Dask scheduler file: its \"address\" is not a text, got '8786'"),
    "fifo": (_fifo, r"cannot read: not a regular file \(a FIFO\): refused, it could block or never end"),
    "directory": (lambda p: p.mkdir(), "cannot read: Is a directory"),
    "huge": (lambda p: p.write_bytes(b" " * (2**20 + 1)),
             "cannot read: 1,048,577 bytes, larger than the limit of 1,048,576 bytes"),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULER_FILES))
def test_a_bad_scheduler_file_is_named_with_its_problem(kind, tmp_path):
    path = tmp_path / "scheduler.json"
    make, reason = SCHEDULER_FILES[kind]
    make(path)
    start = time.monotonic()
    cfg = Config.from_dict({"cluster": {"scheduler": str(path), "connect_timeout": CONNECT}}).cluster
    with pytest.raises(ClusterError) as err, connect(cfg):
        pass
    assert str(err.value).startswith(f"scheduler file {path}: "), err.value
    assert re.search(reason, str(err.value)), err.value
    assert time.monotonic() - start < 2


def test_a_missing_scheduler_file_is_waited_for_then_named(manifest, tmp_path, capsys):
    path = tmp_path / "nowhere" / "scheduler.json"
    status, line, elapsed = run_cli(capsys, manifest, tmp_path, "--scheduler", path, "--connect-timeout", CONNECT)
    assert status == 1
    assert line == (f"flatnorm: error: scheduler file {path}: no such file (waited 1 s for it to appear: "
                    f"cluster.connect_timeout)")
    assert CONNECT <= elapsed < BOUND


def test_a_garbage_scheduler_file_ends_in_one_line(manifest, tmp_path, capsys):
    path = tmp_path / "scheduler.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    status, line, _ = run_cli(capsys, manifest, tmp_path, "--scheduler", path)
    assert status == 1
    assert line == f"flatnorm: error: scheduler file {path}: cannot read: NUL byte at byte 8: a binary file, not text"


def test_a_scheduler_file_pointing_nowhere_names_the_address(tmp_path):
    with listener(silent) as address:
        path = tmp_path / "scheduler.json"
        path.write_text(json.dumps({"type": "Scheduler", "address": address}))
        cfg = Config.from_dict({"cluster": {"scheduler": str(path), "connect_timeout": CONNECT}}).cluster
        with pytest.raises(ClusterError, match=f"^scheduler {address}: it accepted the connection but sent "
                                               f"nothing within 1 s"), connect(cfg):
            pass


def test_a_scheduler_file_written_while_waiting_is_used(dask_cluster, tmp_path):
    """A batch job may start the scheduler and the client together: the file is waited for, then read."""
    path = tmp_path / "scheduler.json"
    writer = threading.Timer(0.5, lambda: path.write_text(json.dumps({"address": dask_cluster.scheduler_address})))
    writer.start()
    cfg = Config.from_dict({"cluster": {"scheduler": str(path), "connect_timeout": 20}}).cluster
    start = time.monotonic()
    with connect(cfg) as client:
        assert client.scheduler.address == dask_cluster.scheduler_address
        assert client.submit(sum, [1, 2, 3]).result() == 6
    writer.join()
    assert 0.5 <= time.monotonic() - start < 10


# ---- workers: too little memory, dying, paused, absent -----------------------------------------------------


@pytest.mark.parametrize("value, shown", [("100MiB", "100MiB: 100 MiB"), (50_000_000, "50000000 bytes: 47.68 MiB")])
def test_a_memory_limit_below_the_floor_is_refused_by_the_config(value, shown):
    with pytest.raises(ConfigError) as err:
        load_config(None, {"cluster.memory_limit": value})
    assert str(err.value) == (f"overrides: cluster.memory_limit: {shown} per worker is below the floor of 256 MiB: "
                              f"a worker holds about 150 MiB once it has imported what the tasks use, and "
                              f"distributed pauses it at 80% of its limit and restarts it at 95%")


def test_a_fraction_too_small_for_a_worker_is_refused_before_starting():
    cfg = Config.from_dict({"cluster": {"memory_limit": 1e-9, "n_workers": 1}}).cluster
    with pytest.raises(ClusterError, match=r"^cluster.memory_limit 1e-09: [\d.e+-]+ MiB per worker is below the "
                                           r"floor of 256 MiB"), connect(cfg):
        pass


def test_workers_that_cannot_start_end_the_run_naming_why(tmp_path):
    """A worker process that fails to start (here: a preload module that is not there) is said plainly."""
    missing = tmp_path / "no_such_preload.py"
    cfg = Config.from_dict({"cluster": {"n_workers": 1}}).cluster
    with dask.config.set({"distributed.worker.preload": [str(missing)]}), pytest.raises(ClusterError) as err:
        with connect(cfg):
            pass
    assert str(err.value) == (f"cannot start a LocalCluster of 1 worker(s) (cluster.n_workers, cluster.memory_limit "
                              f"auto): [Errno 2] No such file or directory: '{missing}'")


def test_a_memory_limit_too_small_for_a_worker_ends_the_run_naming_it(manifest, tmp_path, capsys, monkeypatch):
    """Below the floor (allowed here only): each worker is restarted by its nanny at once, for ever."""
    monkeypatch.setattr(cluster_module, "MIN_WORKER_MEMORY", 1)
    # Workers spawned, as a user's are: forked from the suite's preloaded server, a worker is over 30 MiB from
    # its first moment, takes a task and dies with it (the other way a too-small limit ends a run).
    with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}):
        status, line, elapsed = run_cli(capsys, manifest, tmp_path, "--workers", 1, "--memory-limit", "30MiB",
                                        "--worker-timeout", 3, "--local-min-files", 0)  # a LocalCluster
    assert status == 1
    assert line.startswith("flatnorm: error: no worker able to run tasks for 3 s (cluster.worker_timeout): ")
    assert line.endswith("; raise cluster.memory_limit (now 30MiB) or lower input.batch_size; --debug shows the "
                         "workers' log")
    assert elapsed < 30, elapsed
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def _kill_own_worker():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_task_that_kills_its_workers_ends_the_run_naming_the_setting():
    """Distributed's own bound (a task whose workers die allowed-failures + 1 times fails), said plainly."""
    cfg = Config.from_dict({"cluster": {"n_workers": 1, "memory_limit": "1GiB"}}).cluster
    start = time.monotonic()
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), pytest.raises(ClusterError) as err:
        with connect(cfg) as client:
            client.submit(_kill_own_worker, pure=False).result()
    assert re.fullmatch(
        r"task '_kill_own_worker-[\w-]+' was running on 1 worker\(s\) that each died \(distributed.scheduler."
        r"allowed-failures 0\): a worker ran out of memory or crashed; raise cluster.memory_limit \(now 1GiB\) "
        r"or lower input.batch_size; --debug shows the workers' log", str(err.value)), err.value
    assert time.monotonic() - start < 30


@contextlib.contextmanager
def threads_cluster(n_workers, **settings):
    """A LocalCluster of in-process (thread) workers: cheap to start, and its workers' memory is this process's."""
    from distributed import LocalCluster

    with dask.config.set(settings), LocalCluster(n_workers=n_workers, processes=False, threads_per_worker=1,
                                                 memory_limit="1GiB", dashboard_address=":0") as local:
        yield local


def _run_something(client):
    return client.submit(sum, [1, 2, 3], pure=False).result()


def test_a_scheduler_without_workers_ends_the_run_naming_it():
    with threads_cluster(0) as local:
        cfg = Config.from_dict({"cluster": {"scheduler": local.scheduler_address, "worker_timeout": 2}}).cluster
        start = time.monotonic()
        with pytest.raises(ClusterError) as err, connect(cfg) as client:
            _run_something(client)
    assert str(err.value) == ("no worker able to run tasks for 2 s (cluster.worker_timeout): no worker connected; "
                              "check the scheduler's workers (dask worker --memory-limit, their logs) or lower "
                              "input.batch_size")
    assert 2 <= time.monotonic() - start < 8


def test_workers_paused_for_lack_of_memory_end_the_run_naming_it():
    # Paused at 1% of 1 GiB: this process (the in-process worker's) holds far more, and is never killed.
    with threads_cluster(1, **{"distributed.worker.memory.pause": 0.01, "distributed.worker.memory.terminate": False,
                               "distributed.worker.memory.spill": False, "distributed.worker.memory.target": False}) \
            as local:
        deadline = time.monotonic() + 5
        while {w.status.name for w in local.scheduler.workers.values()} != {"paused"}:
            assert time.monotonic() < deadline, "the worker was not paused"
            time.sleep(0.05)
        cfg = Config.from_dict({"cluster": {"scheduler": local.scheduler_address, "worker_timeout": 2}}).cluster
        start = time.monotonic()
        with pytest.raises(ClusterError) as err, connect(cfg) as client:
            _run_something(client)
    assert str(err.value).startswith("no worker able to run tasks for 2 s (cluster.worker_timeout): 1 worker(s) "
                                     "paused for lack of memory; check the scheduler's workers"), err.value
    assert 2 <= time.monotonic() - start < 8


def test_healthy_workers_are_left_alone(dask_cluster):
    """The watchdog looks, and a run slower than worker_timeout goes on while a worker is up."""
    cfg = Config.from_dict({"cluster": {"scheduler": dask_cluster.scheduler_address, "worker_timeout": 0.5}}).cluster
    with connect(cfg) as client:
        assert client.submit(time.sleep, 1.5, pure=False).result() is None  # three times worker_timeout
        assert _run_something(client) == 6


def test_losing_the_scheduler_mid_run_names_it():
    with threads_cluster(1) as local:
        address = local.scheduler_address
        cfg = Config.from_dict({"cluster": {"scheduler": address, "connect_timeout": CONNECT}}).cluster
        with pytest.raises(ClusterError) as err, connect(cfg) as client:
            threading.Timer(0.5, local.close).start()
            # Running when the scheduler goes (the threaded worker's close waits for it to end).
            client.submit(time.sleep, 2.5, pure=False).result()
    assert str(err.value) == (f"scheduler {address}: the connection to it was lost during the run (was it stopped, "
                              f"or its machine lost?)")
