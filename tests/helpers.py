"""Shared by the tests: their data, PyYAML with the PropertyList tag (an independent reader/writer), the CLI
run in the test's process or in a forked one, and its error line."""

import atexit
import contextlib
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

#: Files the tests read (see data/README.md for their sources).
DATA = Path(__file__).parent / "data"

# Spelled here, not imported: the tests check flatnorm_dask.propertylist against LSST's tags, not against itself.
TAG = "lsst.daf.base.PropertyList"
DATETIME_TAG = "lsst.daf.base.DateTime"  # daf_base writes a DateTime value as this tag on its ISO-8601 string


class PropertyListLoader(yaml.SafeLoader):
    """safe_load plus the PropertyList tag, as the butler reads these files (pure-Python loader)."""


PropertyListLoader.add_constructor(TAG, lambda loader, node: loader.construct_sequence(node, deep=True))
PropertyListLoader.add_constructor(DATETIME_TAG, lambda loader, node: loader.construct_scalar(node))


class PropertyListDumper(yaml.SafeDumper):
    """PyYAML writing a PropertyList with the same representer shape as LSST's."""


class Items(list):
    """A list that PropertyListDumper writes as a tagged PropertyList sequence."""


class DateTime(str):
    """An ISO-8601 TAI time that PropertyListDumper writes as daf_base writes a DateTime element's value."""


PropertyListDumper.add_representer(Items, lambda dumper, data: dumper.represent_sequence(TAG, list(data)))
PropertyListDumper.add_representer(DateTime, lambda dumper, data: dumper.represent_scalar(DATETIME_TAG, str(data)))


def in_process(*args) -> subprocess.CompletedProcess:
    """``flatnorm ARGS`` in the test's process, as a CompletedProcess: what the command prints and returns
    without the seconds a fresh interpreter spends importing (tests of the process itself run a subprocess)."""
    from flatnorm_dask.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


#: What a run and a cluster worker import, imported once by the fork server: a process forked from it starts in
#: milliseconds instead of spending ~2 s of CPU importing xarray, dask, distributed, zarr and the package anew.
_PRELOAD = ["distributed", "flatnorm_dask.cli", "flatnorm_dask.workflow"]
#: Set in the test processes only (see :func:`fork_server`); never passed on to a command they start.
FORKSERVER_METHOD = "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"
_forks = None


def fork_server() -> multiprocessing.context.BaseContext:
    """The test process's fork server, preloaded with :data:`_PRELOAD`, for :class:`Command` and for the worker
    processes of the LocalClusters the tests start (``distributed.worker.multiprocessing-method``, as
    distributed's own test suite does; in the environment, so that it survives ``dask.config.refresh()``)."""
    global _forks
    if _forks is None:
        os.environ[FORKSERVER_METHOD] = "forkserver"
        import dask
        from distributed.utils import get_mp_context

        dask.config.refresh()
        get_mp_context()  # distributed sets its own preload once, at its first use: ours (a superset) replaces it
        _forks = multiprocessing.get_context("forkserver")
        _forks.set_forkserver_preload(_PRELOAD)
    return _forks


class Command:
    """``flatnorm ARGS`` in a process of its own, forked from a server that has imported the package (a real
    process: its own pid, session, signals, exit status and file descriptors), with the parts of
    :class:`subprocess.Popen` the tests use.  ``capture``: its standard output and error are kept (in files)
    for :meth:`communicate`, else discarded.

    Tests of the interpreter itself (its imports, the installed entry point) run ``python -m`` instead.
    """

    def __init__(self, args, env=None, capture=False, new_session=False):
        self.args = [str(a) for a in args]
        self._files = [tempfile.mkstemp(prefix="flatnorm-command-")[1] for _ in "12"] if capture else [None] * 2
        # A command starts its clusters' workers as a user's does (spawned): forked from the test's server they
        # would be its children, outside the command's session.
        environ = {k: v for k, v in os.environ.items() if k != FORKSERVER_METHOD}
        self._process = fork_server().Process(target=_command, daemon=False, args=(
            self.args, {**environ, **(env or {})}, os.getcwd(), *self._files, new_session))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode if not self._process.is_alive() else None

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """(stdout, stderr), once the command has ended ("" where not captured)."""
        self.wait(timeout)
        return tuple(Path(f).read_text() if f else "" for f in self._files)

    def __del__(self):
        for f in self._files:
            if f:
                with contextlib.suppress(OSError):
                    os.unlink(f)


def _command(args, env, cwd, stdout, stderr, new_session):
    """In the forked process: the state of a fresh ``python -m flatnorm_dask.cli ARGS`` that matters to a
    run (environment, dask's config from it, directory, SIGINT as in a terminal, standard streams), then the
    command, then what the interpreter does at exit."""
    if new_session:
        os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    import dask

    dask.config.refresh()  # the server read it from its own environment
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    from flatnorm_dask.cli import main

    sys.argv = ["flatnorm", *args]
    try:
        code = main(args)
    finally:
        atexit._run_exitfuncs()  # the fork server's children end with os._exit, which skips them
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def error_line(result) -> str:
    """The one error line of a failed run: last on stderr, alone, no traceback (log lines may precede it)."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("flatnorm: error:")] == lines[-1:]
    return lines[-1]


def combination_lookup(scales: dict, detector: int, amp_names, exposures) -> dict | None:
    """What LSST's flat combination (``exposureScaling: InputList``) takes from one scales dataset for one
    detector's input flats, written here from its documented behaviour (see the project's FORMATS.md), not
    from its code:

    - a detector that is not a key of ``expScale`` has no work: None;
    - of the input flats, it combines those whose exposure is listed under the detector's first amplifier;
    - it divides each of those, amplifier by amplifier (the camera's amplifiers, by name), by
      ``expScale[detector][amp][exposure]`` (a missing key is an error, as it is there).

    Returns ``{exposure: [scale of each amplifier]}`` for the flats combined, in input order.
    """
    per_amp = scales["expScale"].get(detector)
    if per_amp is None:
        return None
    listed = per_amp[next(iter(per_amp))]
    return {exposure: [per_amp[amp][exposure] for amp in amp_names] for exposure in exposures
            if exposure in listed}
