"""End to end: the ``flatnorm`` command on simulated LSST-format files, in its own process or on a cluster, into
a Zarr store."""

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
import yaml

from flatnorm_dask import measure_scales, scales_dict, workflow
from flatnorm_dask.config import load_config
from flatnorm_dask.simulate import SIMPLE_PATTERN, simulate_campaign, write_campaign
from flatnorm_dask.solver import memory_bytes
from flatnorm_dask.store import (
    IncompleteStoreError,
    StoreError,
    current_version,
    is_complete,
    open_store,
    store_history,
)
from helpers import Command, error_line, in_process  # noqa: E402

FILTERS = ("g_6", "r_57")


def in_its_own_process(*args, timeout=300, python=()):
    """The installed command, in a subprocess, as a user runs it (``python``: interpreter options)."""
    return subprocess.run([sys.executable, *python, "-m", "flatnorm_dask.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def written_campaign(tmp_path_factory, name: str, n_detectors: int, n_exposures: int):
    """A simulated campaign of both filters, written as files in a new directory: (its tree, its root)."""
    tree = simulate_campaign("lsstcam", n_detectors=n_detectors, n_exposures=n_exposures, filters=FILTERS, seed=7)
    root = tmp_path_factory.mktemp(name)
    write_campaign(tree, root, layout="simple")
    return tree, root


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    return written_campaign(tmp_path_factory, "inputs", 20, 6)


@pytest.fixture(scope="module")
def small_campaign(tmp_path_factory):
    """A campaign of a few detectors and exposures, for the runs whose size is not what they test."""
    return written_campaign(tmp_path_factory, "small", 5, 4)


@pytest.fixture(scope="module")
def amp_store(campaign, tmp_path_factory):
    _, root = campaign
    store = tmp_path_factory.mktemp("out") / "scales.zarr"
    scales = store.parent / "scales"  # a directory: one PHYSICAL_FILTER.yaml per filter
    # -X importtime lists on stderr every module the command imports.
    result = in_its_own_process("run", "--input", root, "--pattern", SIMPLE_PATTERN, "--output", store, "--level",
                                "AMP", "--workers", 2, "--scales-yaml", scales, "--no-progress", "--batch-size", 50,
                                python=("-X", "importtime"))
    assert result.returncode == 0, result.stderr
    return store, scales, result


def test_a_small_run_works_in_its_own_process(amp_store):
    """241 files below the root, far fewer than cluster.local_min_files: the command says it works in its own
    process, and never imports distributed (nor starts a cluster)."""
    _, _, result = amp_store
    assert "241 input files, fewer than cluster.local_min_files (100000): working in this process" in result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "dask.array" in imported and "distributed" not in imported


def test_local_min_files_decides_whether_a_cluster_is_started(small_campaign, tmp_path, dask_cluster, monkeypatch,
                                                               caplog):
    """At or above cluster.local_min_files the run starts its cluster (here: the session's, through a stand-in
    for connect); below, it works in its own process; both give the same store."""
    import contextlib
    import logging

    from distributed import Client

    from flatnorm_dask import cli, cluster

    _, root = small_campaign
    n_files = sum(1 for path in root.rglob("*") if path.is_file())  # every file below the root: manifest.csv too
    assert n_files == 2 * 5 * 4 + 1
    started = []

    @contextlib.contextmanager
    def connect(config):
        started.append(config.scheduler)
        with Client(dask_cluster) as client:
            yield client

    monkeypatch.setattr(cluster, "connect", connect)
    args = ["run", "--input", str(root), "--pattern", SIMPLE_PATTERN, "--level", "AMP", "--no-progress"]
    with caplog.at_level(logging.INFO, logger="flatnorm_dask"):
        assert cli.main([*args, "--output", str(tmp_path / "a.zarr"), "--local-min-files", str(n_files)]) == 0
        assert started == [None]
        assert f"at least {n_files} input files (cluster.local_min_files): starting a LocalCluster" in caplog.text
        assert cli.main([*args, "--output", str(tmp_path / "b.zarr"), "--local-min-files", str(n_files + 1)]) == 0
        assert started == [None]
        assert (f"{n_files} input files, fewer than cluster.local_min_files ({n_files + 1}): working in this "
                "process") in caplog.text
    for name in FILTERS:
        a = xr.open_zarr(tmp_path / "a.zarr", group=name).load()
        b = xr.open_zarr(tmp_path / "b.zarr", group=name).load()
        xr.testing.assert_allclose(a.drop_attrs(), b.drop_attrs(), rtol=1e-12, atol=1e-12)
    calls = []
    assert cluster.needs_cluster(load_config(None, {"cluster.scheduler": "tcp://127.0.0.1:1"}).cluster, calls.append)
    assert calls == []  # a running scheduler is used whatever the size: nothing counted




def numpy_fit(ds, level):
    """The solver on the simulated numbers themselves, in numpy."""
    if level == "AMP":
        return measure_scales(ds.amp_value.values, ds.amp_count.values)
    return measure_scales(ds.det_value.values, ds.det_count.values)


def test_cli_run_writes_a_store_matching_the_numpy_solver(campaign, amp_store):
    tree, _ = campaign
    store, _, result = amp_store
    lines = {name: [line for line in result.stdout.splitlines() if line.strip().startswith(f"{name}:")]
             for name in FILTERS}
    for name in FILTERS:
        [line] = lines[name]
        assert "10 iterations, converged;" in line and "NOT converged" not in line
    assert is_complete(store)
    for name in FILTERS:
        ds = xr.open_zarr(store, group=name)
        truth = tree[name].to_dataset().sortby(["detector", "exposure"])
        fit = numpy_fit(truth, "AMP")
        assert ds["det_scale"].dims == ("detector", "amp")
        assert ds["background"].dims == ("detector", "amp", "exposure")
        np.testing.assert_allclose(ds["det_scale"].values, fit.vectorG, rtol=1e-12)
        np.testing.assert_allclose(ds["exp_scale"].values, fit.vectorE, rtol=1e-12)
        np.testing.assert_allclose(ds["model"].values, fit.bgModel, rtol=1e-12)
        np.testing.assert_array_equal(ds["used"].values, fit.used)
        np.testing.assert_array_equal(ds["background"].values, truth.amp_value.values)
        with np.errstate(invalid="ignore", divide="ignore"):
            expected = np.where(fit.used, np.log(truth.amp_value.values / fit.bgModel), np.nan)
        np.testing.assert_allclose(ds["residual"].values, expected, rtol=1e-9, atol=1e-12)  # log of a ratio near 1
        assert ds.attrs["level"] == "AMP" and ds.attrs["iterations"] == 10
        assert ds.amp.values.tolist() == list(truth.amp.values)


def test_store_provenance_and_info(amp_store):
    store, _, _ = amp_store
    tree = open_store(store)
    assert tree.attrs["config"]["solve"]["level"] == "AMP"
    assert "numpy" in tree.attrs["versions"] and tree.attrs["created"]
    info = in_process("info", store)
    assert info.returncode == 0, info.stderr
    for word in ("g_6", "r_57", "AMP"):
        assert word in info.stdout
    # Its history: one run, which read every file, in the version the store's pointer names.
    [entry] = store_history(store)
    n_files = 2 * 20 * 6
    assert entry["kind"] == "run" and entry["files"]["read"] == entry["files"]["added"] == n_files
    assert entry["filters"] == list(FILTERS) and entry["config"] == tree.attrs["config"]
    assert entry["version"] == current_version(store).id
    assert f"run: {n_files} file(s) read ({n_files} added); filters g_6, r_57; version {entry['version']}" \
        in info.stdout


def test_exported_yaml_reads_back(campaign, amp_store):
    tree, _ = campaign
    store, scales, result = amp_store
    assert sorted(p.name for p in scales.iterdir()) == sorted(f"{name}.yaml" for name in FILTERS)
    assert [line for line in result.stdout.splitlines() if line.startswith("scales: ")] == [
        f"scales: {scales / name}.yaml" for name in sorted(FILTERS)]
    exported = {name: yaml.safe_load(open(scales / f"{name}.yaml")) for name in FILTERS}
    truth = tree["r_57"].to_dataset().sortby(["detector", "exposure"])
    fit = numpy_fit(truth, "AMP")
    expected = scales_dict(truth.exposure.values, truth.detector.values, truth.amp.values, fit.vectorE,
                           fit.vectorG)
    got = exported["r_57"]
    assert got.keys() == expected.keys()
    det = int(truth.detector[3])
    assert got["detScale"][det] == pytest.approx(expected["detScale"][det], rel=1e-12)
    assert got["expScale"][det]["C10"] == pytest.approx(expected["expScale"][det]["C10"], rel=1e-12)
    again = store.parent / "again"
    result = in_process("export", store, "--output", again)
    assert result.returncode == 0, result.stderr
    assert {name: yaml.safe_load(open(again / f"{name}.yaml")) for name in FILTERS} == exported


@pytest.mark.slow
def test_refuses_to_overwrite_and_rerun_is_identical(campaign, amp_store, tmp_path, caplog):
    _, root = campaign
    store, _, _ = amp_store
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    with caplog.at_level(logging.INFO, logger="flatnorm_dask"):
        result = in_process("run", "--input", root, "--pattern", SIMPLE_PATTERN, "--output", store, "--level",
                            "AMP", "--workers", 1, "--no-progress")
    line = error_line(result)
    assert "--overwrite" in line and str(store) in line
    assert caplog.messages == []  # refused before the inputs were counted or any cluster started
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before
    rerun = tmp_path / "rerun.zarr"
    result = in_process("run", "--input", root, "--pattern", SIMPLE_PATTERN, "--output", rerun, "--level", "AMP",
                        "--workers", 2, "--no-progress", "--batch-size", 50)
    assert result.returncode == 0, result.stderr
    for name in FILTERS:
        a, b = xr.open_zarr(store, group=name).load(), xr.open_zarr(rerun, group=name).load()
        xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())


@pytest.mark.slow
def test_bad_input_fails_with_one_line_naming_the_file(small_campaign, tmp_path):
    _, root = small_campaign
    import shutil

    inputs = tmp_path / "inputs"
    shutil.copytree(root, inputs)
    victim = sorted(inputs.rglob("flatStats_*.yaml"))[7]
    victim.write_text("!<lsst.daf.base.PropertyList>\n- [DETECTOR_MEDIAN, Double, 1.0, '']\n")
    store = tmp_path / "bad.zarr"
    result = in_process("run", "--input", inputs, "--pattern", SIMPLE_PATTERN, "--output", store, "--workers", 1,
                        "--no-progress")
    line = error_line(result)
    assert str(victim) in line and "DETECTOR_N: missing" in line
    assert not store.exists() and not list(tmp_path.glob(".bad.zarr*"))
    masked = in_process("run", "--input", inputs, "--pattern", SIMPLE_PATTERN, "--output", store, "--workers", 1,
                        "--no-progress", "--on-error", "mask")
    assert masked.returncode == 0, masked.stderr
    problems = [p for name in FILTERS for p in open_store(store)[name].attrs["problems"]]
    assert [p["file"] for p in problems] == [str(victim)]


def test_unknown_config_key_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("solve:\n  levle: AMP\n")
    result = in_process("run", cfg, "--output", tmp_path / "x.zarr")
    line = error_line(result)
    assert "levle" in line and str(cfg) in line


def test_filter_summary_line_names_only_the_axes_the_store_has():
    common = dict(name="r_57", n_exposures=6, n_detectors=20, iterations=4, converged=False,
                  residual_scatter=1e-3, n_problems=2, deviant_rows=[("R22_S11", 2e-3)])
    amp = str(workflow.FilterSummary(n_amps=16, **common))
    assert amp.startswith("r_57: 6 exposures x 20 detectors x 16 amps; 4 iterations, NOT converged; ")
    detector = str(workflow.FilterSummary(n_amps=0, **common))
    assert detector.startswith("r_57: 6 exposures x 20 detectors; 4 iterations, NOT converged; ")
    assert detector.endswith("most deviant: R22_S11 (2.00e-03)")


def test_inputs_are_checked_before_any_cluster_is_reached(tmp_path, capsys):
    """A run that names no pattern (or a missing manifest) fails on that, not on the cluster it would join:
    nothing listens at the scheduler address, and the error is still about the inputs."""
    from flatnorm_dask.cli import main

    dead = "tcp://127.0.0.1:9"  # the discard port: nothing answers there
    cases = [(["--input", str(tmp_path)], "give exactly one of a pattern (with a root directory) or a manifest"),
             (["--manifest", str(tmp_path / "missing.csv")],
              f"{tmp_path / 'missing.csv'}: cannot read manifest: No such file or directory")]
    for args, message in cases:
        assert main(["run", *args, "--output", str(tmp_path / "s.zarr"), "--scheduler", dead, "--no-progress"]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"flatnorm: error: {message}"
    assert not list(tmp_path.glob("*s.zarr*"))


@pytest.mark.slow
def test_killed_mid_write_leaves_no_complete_store_and_a_rerun_succeeds(tmp_path, scheduler_address, caplog):
    tree = simulate_campaign("lsstcam", n_detectors=40, n_exposures=5, filters=("r_57",), seed=2)
    inputs = tmp_path / "inputs"
    write_campaign(tree, inputs, layout="simple")
    store = tmp_path / "killed.zarr"
    args = ["run", "--input", inputs, "--pattern", SIMPLE_PATTERN, "--output", store, "--no-progress", "--level",
            "AMP", "--batch-size", 25]  # eight reading tasks, as with 800 files in batches of 100
    proc = Command([*args, "--workers", 1], new_session=True)  # a process and group of its own, killed whole
    # Killed once the reading tasks have written their first chunk of the inputs into the staging store
    # (the coordinates are written before any task runs, the chunks of the read statistics only by tasks).
    written: list = []
    deadline = time.time() + 120
    while not written and proc.poll() is None and time.time() < deadline:
        written = list(tmp_path.glob(".killed.zarr.versions/*.partial-*/r_57/background/c"))
        time.sleep(0.005)
    running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)  # the client and its cluster, as a node failure would
    proc.wait()
    assert running and written, "the run ended (or never wrote) before it could be killed mid-write"
    [partial] = tmp_path.glob(".killed.zarr.versions/*.partial-*")
    assert not store.exists() and not is_complete(store) and not is_complete(partial)
    with pytest.raises(IncompleteStoreError):
        open_store(partial)
    with pytest.raises(StoreError, match=f"^{store}: no such store$"):
        open_store(store)
    # The same command again (on the shared cluster), two days later: a complete store, the numbers of the
    # solver; the leftover is reported, not removed.
    two_days_ago = partial.stat().st_mtime - 2 * 86400
    os.utime(partial, (two_days_ago, two_days_ago))
    with caplog.at_level(logging.WARNING, logger="flatnorm_dask"):
        result = in_process(*args, "--scheduler", scheduler_address)
    assert result.returncode == 0, result.stderr
    assert partial.is_dir() and partial.name in caplog.text and "older than a day" in caplog.text
    ds = open_store(store)["r_57"].to_dataset()
    truth = tree["r_57"].to_dataset().sortby(["detector", "exposure"])
    np.testing.assert_allclose(ds["det_scale"].values, numpy_fit(truth, "AMP").vectorG, rtol=1e-12)


def test_store_diagnostics_are_the_fit_s_own_bit_for_bit():
    """scale_dataset writes the solver's residual and RMS; for a plain fit they equal, bit for bit, the
    formulas the workflow used before the solver returned them (log(background / model) on used cells)."""
    tree = simulate_campaign("lsstcam", n_detectors=7, n_exposures=6, filters=("r_57",), seed=9)
    ds = tree["r_57"].to_dataset().chunk({"detector": 3, "exposure": 4})
    ds["status"] = xr.zeros_like(ds["det_value"], dtype=np.uint8)
    for level in ("AMP", "DETECTOR"):
        fit = workflow.solve_dataset(ds, level)
        out = workflow.scale_dataset(ds, fit, level).compute()
        background, weight, model, used = out["background"], out["weight"], out["model"], out["used"]
        assert (~used).any() and used.any()
        before = xr.where(used, np.log(xr.where(used, background, 1.0) / model), np.nan)
        np.testing.assert_array_equal(out["residual"].values, before.values)
        w = xr.where(used, weight, 0.0)
        wr2 = w * before.fillna(0) ** 2
        row_dims = [d for d in background.dims if d != "exposure"]
        for name, dims in (("row_rms", "exposure"), ("exp_rms", row_dims)):
            total = w.sum(dims)
            expected = np.sqrt(wr2.sum(dims) / total.where(total > 0))
            np.testing.assert_allclose(out[name].values, expected.transpose(*out[name].dims).values, rtol=1e-13)
        assert out.attrs["residual_scatter"] == pytest.approx(
            float(np.sqrt(wr2.sum() / w.sum())), rel=1e-13)


def test_held_or_streamed_inputs_give_identical_stores(campaign, tmp_path, monkeypatch):
    """The workflow asks solver.memory_bytes whether a filter's inputs fit solve.persist_max_mb; held in
    memory or re-read from the store at every pass, the numbers are the same (solved across the workers:
    solve.one_task_max_mb 0)."""
    _, root = campaign
    asked = []
    real = workflow.memory_bytes

    def spy(shape, **kwargs):
        asked.append((tuple(shape), kwargs, real(shape, **kwargs)))
        return real(shape, **kwargs)

    monkeypatch.setattr(workflow, "memory_bytes", spy)
    persisted = []
    real_solve = workflow.measure_scales

    def solve(*args, **kwargs):
        persisted.append(kwargs["persist"])
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(workflow, "measure_scales", solve)
    # Each pass of a solve across the workers is a graph of its own: a few passes, with clipping, are enough.
    few_passes = {"solve.clip_sigma": 5.0, "solve.iterations": 4, "solve.clip_rounds": 2}
    stores = {}
    for limit in (0, 1):
        stores[limit] = tmp_path / f"limit{limit}.zarr"
        cfg = load_config(None, {"input.root": str(root), "input.pattern": SIMPLE_PATTERN, "solve.level": "AMP",
                                 "output.store": str(stores[limit]), "solve.persist_max_mb": limit,
                                 "solve.one_task_max_mb": 0, **few_passes})
        workflow.run(cfg, show_progress=False)
    shape = (20, 16, 6)
    assert sorted(asked) == [(shape, {"clipping": True}, memory_bytes(shape, clipping=True))] * 4
    assert memory_bytes(shape, clipping=True) < 2**20 and persisted == [False, False, True, True]
    for name in FILTERS:
        held = xr.open_zarr(stores[1], group=name).load()
        streamed = xr.open_zarr(stores[0], group=name).load()
        xr.testing.assert_identical(held.drop_attrs(), streamed.drop_attrs())
    # The same filters solved by one numpy task each (solve.one_task_max_mb, the default for this size).
    cfg = load_config(None, {"input.root": str(root), "input.pattern": SIMPLE_PATTERN, "solve.level": "AMP",
                             "output.store": str(tmp_path / "one.zarr"), **few_passes})
    workflow.run(cfg, show_progress=False)
    assert persisted[4:] == [False, False]
    for name in FILTERS:
        one = xr.open_zarr(tmp_path / "one.zarr", group=name).load()
        across = xr.open_zarr(stores[1], group=name).load()
        np.testing.assert_array_equal(one["used"].values, across["used"].values)
        xr.testing.assert_allclose(one.drop_attrs(), across.drop_attrs(), rtol=1e-12, atol=1e-12)
        assert one.attrs["n_clipped"] == across.attrs["n_clipped"]


def run_script(path: str, *args: str) -> subprocess.CompletedProcess:
    """A ``workflows/`` script run as ``__main__`` in this process (its argv, its exit status), as a
    CompletedProcess: the scripts only pick the cluster and call the CLI, which the subprocess tests cover."""
    import contextlib
    import io
    import runpy

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [path, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([path, *args], code, out.getvalue(), err.getvalue())


@pytest.mark.slow
def test_job_queue_and_existing_scheduler_entry_points(campaign, amp_store, tmp_path, dask_cluster):
    """workflows/slurm.py on dask-jobqueue's local cluster class (the SLURM code path without SLURM), and
    workflows/existing_scheduler.py on a running scheduler: both give the numbers of the LocalCluster run."""
    pytest.importorskip("dask_jobqueue")
    _, root = campaign
    reference, _, _ = amp_store
    cfg = tmp_path / "jobqueue.yaml"
    cfg.write_text("cluster:\n  n_workers: 1\n  wait_timeout: 120\n"
                   "dask:\n  jobqueue:\n    local:\n      cores: 1\n      processes: 1\n      memory: 2GiB\n"
                   f"      log-directory: {tmp_path / 'logs'}\n"
                   "      scheduler-options: {dashboard_address: ':0'}\n")  # 8787 may be taken on this machine
    workflows = os.path.join(os.path.dirname(__file__), os.pardir, "workflows")
    common = ["--input", str(root), "--pattern", SIMPLE_PATTERN, "--level", "AMP", "--no-progress",
              "--batch-size", "50"]
    script = run_script(os.path.join(workflows, "slurm.py"), "--print-job-script", "--kind", "jobqueue-local",
                        str(cfg))
    assert script.returncode == 0, script.stderr
    # The configured job memory (2GiB, one worker process a job) is what each worker is limited to.
    import re

    from dask.utils import format_bytes, parse_bytes

    limit = format_bytes(parse_bytes("2GiB") // 1).replace(" ", "")
    assert limit == "2.00GiB"
    assert re.search(rf"--memory-limit {re.escape(limit)}( |$)", script.stdout, re.M), script.stdout
    assert re.search(r"--nthreads 1( |$)", script.stdout, re.M), script.stdout
    jq = run_script(os.path.join(workflows, "slurm.py"), "--kind", "jobqueue-local", str(cfg), "--output",
                    str(tmp_path / "jq.zarr"), *common)
    assert jq.returncode == 0, jq.stderr
    workers = set(dask_cluster.scheduler.workers)
    ex = run_script(os.path.join(workflows, "existing_scheduler.py"), dask_cluster.scheduler_address, "--output",
                    str(tmp_path / "ex.zarr"), *common)
    assert ex.returncode == 0, ex.stderr
    assert set(dask_cluster.scheduler.workers) == workers  # the same workers, left running for the next run
    for store in ("jq.zarr", "ex.zarr"):
        for name in FILTERS:
            a = xr.open_zarr(reference, group=name).load()
            b = xr.open_zarr(tmp_path / store, group=name).load()
            # Another worker layout may round the matrix products' last bits differently.
            xr.testing.assert_allclose(a.drop_attrs(), b.drop_attrs(), rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(a["used"].values, b["used"].values)


def test_a_filter_without_usable_cells_fails_naming_it(small_campaign, tmp_path, scheduler_address, capsys):
    """Every file of g_6 unreadable and masked: no numbers for it is an error naming the filter, not NaN scales."""
    import shutil

    from flatnorm_dask.cli import main

    _, root = small_campaign
    inputs = tmp_path / "inputs"
    shutil.copytree(root, inputs)
    for path in (inputs / "g_6").rglob("*.yaml"):
        path.write_text("garbage: [\n")
    store = tmp_path / "out.zarr"
    status = main(["run", "--input", str(inputs), "--pattern", SIMPLE_PATTERN, "--output", str(store),
                   "--on-error", "mask", "--scheduler", scheduler_address, "--no-progress"])
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "flatnorm: error: physical_filter g_6: no usable cell: every value is non-finite or non-positive, or has "
        "no weight")
    assert not store.exists()


def test_an_error_without_an_explanation_says_so():
    """A library's bare AssertionError or KeyError('x') would be a word without context on the error line."""
    from flatnorm_dask.cli import _error_text

    assert _error_text(AssertionError()) == (
        "AssertionError (unexpected, without an explanation: --debug shows where it happened)")
    assert _error_text(KeyError("background")) == (
        "KeyError: background (unexpected, without an explanation: --debug shows where it happened)")
    assert _error_text(KeyError("detector 'R9' is not in camera 'lsstcam'")) == (
        "detector 'R9' is not in camera 'lsstcam'")
