"""Settings: one schema for defaults, documentation and flags; validation with one-line messages; layering;
dask config; the cluster settings passed explicitly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import dask
import pytest
import yaml

from helpers import Command, error_line  # noqa: E402
from flatnorm_dask.config import OPTIONS, SECTIONS, Config, ConfigError, load_config, render_default_yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
DEFAULT = CONFIGS / "default.yaml"


@pytest.fixture
def clean_dask_env():
    """No DASK_FLATNORM__* variable leaks in or out of a test; dask config re-read where it may have changed.

    (A re-read parses every dask YAML file with pure-Python PyYAML, dask_jobqueue's among them: ~60 ms, so
    not for the tests that leave the environment and dask's config as they found them.)
    """
    def flatnorm_env():
        return {k: v for k, v in os.environ.items() if k.startswith("DASK_FLATNORM")}

    saved = flatnorm_env()
    for k in saved:
        del os.environ[k]
    if saved or dask.config.get("flatnorm", None) is not None:
        dask.config.refresh()
    yield os.environ
    touched = flatnorm_env()
    for k in touched:
        del os.environ[k]
    os.environ.update(saved)
    if touched or saved or dask.config.get("flatnorm", None) is not None:
        dask.config.refresh()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_schema_defaults_are_exactly_default_yaml(clean_dask_env):
    documented = yaml.safe_load(DEFAULT.read_text())
    assert Config().to_dict() == documented
    assert load_config().to_dict() == documented
    assert load_config(DEFAULT) == load_config() == Config()
    assert {key: opt.default for key, opt in OPTIONS.items()} == \
        {f"{s}.{o}": v for s, body in documented.items() if s != "dask" for o, v in body.items()}
    assert dask.config.get("flatnorm", default=None) is None  # no defaults registered in dask's config


def test_default_yaml_is_generated_from_the_schema():
    assert DEFAULT.read_text() == render_default_yaml(), \
        "configs/default.yaml is stale: python -m flatnorm_dask.config > configs/default.yaml"
    # the documented command writes exactly that text
    result = subprocess.run([sys.executable, "-m", "flatnorm_dask.config"], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0 and result.stdout == render_default_yaml(), result.stderr
    text = DEFAULT.read_text()
    for key, opt in OPTIONS.items():  # each option's documentation, in full, once
        words = " ".join(opt.summary.split())
        assert " ".join(re.sub(r"^ *#", "", text, flags=re.M).split()).count(words) == 1, key
        assert "\n" not in opt.summary and opt.summary.endswith("."), key  # one sentence: the flag's help
    for section, cls in SECTIONS.items():
        assert f"# {' '.join(cls.__doc__.split())[:60]}" in text, section


def test_default_yaml_documents_every_option_once():
    lines = DEFAULT.read_text().splitlines()
    options, section = [], None
    for i, line in enumerate(lines):
        if m := re.match(r"^([a-z_]+):", line):
            section = m.group(1)
        elif m := re.match(r"^  ([a-z_]+):", line):
            options.append((i, f"{section}.{m.group(1)}"))  # e.g. input.butler and output.butler
    names = [name for _, name in options]
    assert len(names) == len(set(names)) == sum(len(SECTIONS[s].__dataclass_fields__) for s in SECTIONS)
    assert set(names) == {f"{s}.{o}" for s in SECTIONS for o in SECTIONS[s].__dataclass_fields__}
    for i, name in options:
        assert lines[i - 1].strip().startswith("#"), f"option {name} has no comment above it"
    assert re.search(r"^dask:", DEFAULT.read_text(), re.M) and lines[lines.index("dask: {}") - 1].startswith("#")


@pytest.mark.parametrize("name", ["default", "lsstcam", "testcam", "slurm"])
def test_every_shipped_config_loads_and_round_trips(name, clean_dask_env):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    json.dumps(cfg.to_dict())  # stored as a root attribute of the Zarr store
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert load_config(CONFIGS / f"{name}.yaml", {"output.store": "x.zarr"}).output.store == "x.zarr"


def test_shipped_configs_say_what_they_promise(clean_dask_env):
    lsst = load_config(CONFIGS / "lsstcam.yaml")
    assert (lsst.solve.level, lsst.input.camera, lsst.solve.tol) == ("AMP", "lsstcam", 1e-10)
    # The butler's template for the stock pipelines' statistics (spelled out here, not built by our code).
    stock = ("{run}/cpFlatStatistics/{day_obs}/{obs_id}/cpFlatStatistics_LSSTCam_{physical_filter}_"
             "{obs_id}_{detector_name}_{run_name}.yaml")
    assert lsst.input.pattern == stock
    test = load_config(CONFIGS / "testcam.yaml")
    assert (test.solve.level, test.input.camera) == ("DETECTOR", "testcam")
    assert test.input.pattern == "{physical_filter}/{exposure}/flatStats_{detector}.yaml"
    slurm = load_config(CONFIGS / "slurm.yaml")
    assert (slurm.cluster.scheduler, slurm.cluster.n_workers, slurm.cluster.wait_timeout) == ("slurm", 4, 1800)
    assert slurm.input.pattern == stock
    for key in ("cores", "memory", "walltime", "queue"):
        assert f"jobqueue.slurm.{key}" in slurm.dask_settings()
    assert not [key for key in slurm.dask_settings() if key.startswith("flatnorm")]  # no round trip


def test_slurm_config_gives_a_job_script(tmp_path, monkeypatch, clean_dask_env):
    pytest.importorskip("dask_jobqueue")
    from flatnorm_dask.cluster import job_script

    monkeypatch.chdir(tmp_path)  # the cluster creates its log directory here
    cfg = load_config(CONFIGS / "slurm.yaml")
    # dask-jobqueue's scheduler takes its dashboard port from its own options (8787 may be taken here)
    with dask.config.set({**cfg.dask_settings(), "jobqueue.slurm.scheduler-options": {"dashboard_address": ":0"}}):
        script = job_script(cfg.cluster)
    assert "#SBATCH -p normal" in script and "#SBATCH --mem=64G" in script and "#SBATCH -t 02:00:00" in script
    with pytest.raises(ValueError, match=r"cluster.scheduler is 'local': a job script needs a job-queue kind"):
        job_script(Config().cluster)


BAD = [
    ("solve:\n  levle: AMP\n", "solve.levle", "did you mean solve.level"),
    ("slove:\n  level: AMP\n", "slove", "did you mean solve"),
    ("solve:\n  store: x.zarr\n", "solve.store", "did you mean output.store"),
    ("solve:\n  iterations: ten\n", "solve.iterations", "integer"),
    ("solve:\n  iterations: 2.5\n", "solve.iterations", "integer"),
    ("solve:\n  iterations: 0\n", "solve.iterations", ">= 1"),
    ("solve:\n  level: CCD\n", "solve.level", "DETECTOR, AMP"),
    ("solve:\n  tol: 0\n", "solve.tol", "> 0"),
    ("solve:\n  tol: -1.0e-9\n", "solve.tol", "> 0"),
    ("solve:\n  tol: small\n", "solve.tol", "number"),
    ("solve:\n  max_iter: true\n", "solve.max_iter", "integer"),
    ("input:\n  on_error: ignore\n", "input.on_error", "raise, mask"),
    ("input:\n  batch_size: 0\n", "input.batch_size", ">= 1"),
    ("input:\n  root: 3\n", "input.root", "string"),
    ("input:\n  pattern: '{exposure}.yaml'\n  manifest: m.csv\n", "input.manifest", "input.pattern"),
    ("output:\n  overwrite: maybe\n", "output.overwrite", "true or false"),
    ("cluster:\n  n_workers: 0\n", "cluster.n_workers", ">= 1"),
    ("cluster:\n  memory_limit: lots\n", "cluster.memory_limit", "4GiB"),
    ("cluster:\n  scheduler: slurmm\n", "cluster.scheduler", "did you mean slurm?"),
    ("cluster:\n  scheduler: scheduler-host\n", "cluster.scheduler", "tcp://host:8786"),
    ("cluster:\n  wait_timeout: 0\n", "cluster.wait_timeout", "> 0"),
    ("cluster:\n  diagnostics: 'off'\n", "cluster.diagnostics", "true or false, got a string 'off'"),
    ("solve: 3\n", "solve", "mapping"),
    ("- solve\n", "mapping of sections", ""),
    ("dask:\n  flatnorm:\n    cluster:\n      n_workers: 2\n", "dask.flatnorm.cluster.n_workers", "cluster"),
    ("solve:\n  level: AMP\n  iterations: [1, 2\n", "line 4", "flow sequence started on line 3"),
    ("solve:\n  level: AMP\n   iterations: 3\n", "line 3", "YAML syntax error"),
]


@pytest.mark.parametrize(("text", "key", "hint"), BAD)
def test_bad_config_names_file_and_key_in_one_line(tmp_path, text, key, hint, clean_dask_env):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and key in message and hint in message
    assert "\n" not in message
    assert isinstance(err.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.yaml'}: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_values_are_normalised(tmp_path, clean_dask_env):
    path = write(tmp_path, "solve:\n  level: amp\n  tol: 1e-10\ninput:\n  on_error: MASK\n  root: ~/flats\n"
                           "output:\ncluster:\n  memory_limit: 4GiB\n  scheduler: SLURM\n")
    cfg = load_config(path)
    assert cfg.solve.level == "AMP" and cfg.input.on_error == "mask" and cfg.cluster.scheduler == "slurm"
    assert cfg.solve.tol == 1e-10  # PyYAML reads 1e-10 as a string; it is still a number
    assert cfg.input.root == os.path.expanduser("~/flats") and cfg.cluster.memory_limit == "4GiB"
    assert load_config(write(tmp_path, "")) == Config()  # an empty file is all defaults


def test_overrides_win_over_the_file(tmp_path, clean_dask_env):
    path = write(tmp_path, "solve:\n  level: AMP\n  iterations: 20\ninput:\n  root: /a\n")
    cfg = load_config(path, {"solve.level": "detector", "input.root": Path("/b"), "output.overwrite": True})
    assert (cfg.solve.level, cfg.solve.iterations, cfg.input.root, cfg.output.overwrite) == \
        ("DETECTOR", 20, "/b", True)
    with pytest.raises(ConfigError, match=r"^overrides: solve\.level: must be one of"):
        load_config(path, {"solve.level": "CCD"})
    with pytest.raises(ConfigError, match=r"^overrides: solve\.levle: unknown option; did you mean solve\.level"):
        load_config(path, {"solve.levle": "AMP"})
    with pytest.raises(ConfigError, match=r"^overrides: level: unknown option"):
        load_config(path, {"level": "AMP"})


def test_a_flag_replaces_the_files_choice(clean_dask_env):
    lsst = CONFIGS / "lsstcam.yaml"
    cfg = load_config(lsst, {"input.manifest": "files.csv"})
    assert (cfg.input.pattern, cfg.input.manifest) == (None, "files.csv")
    cfg = load_config(lsst, {"solve.iterations": 10})
    assert (cfg.solve.tol, cfg.solve.iterations) == (None, 10)
    assert load_config(lsst, {"solve.max_iter": 50}).solve.tol == 1e-10  # unrelated flags keep it
    with pytest.raises(ConfigError, match=r"overrides: input\.manifest: cannot be combined with input\.pattern"):
        load_config(lsst, {"input.manifest": "files.csv", "input.pattern": "{detector}.yaml"})


def test_cluster_defaults_come_from_dask_config(tmp_path, clean_dask_env):
    clean_dask_env["DASK_FLATNORM__CLUSTER__N_WORKERS"] = "4"
    clean_dask_env["DASK_FLATNORM__CLUSTER__MEMORY_LIMIT"] = "2GiB"
    dask.config.refresh()
    cfg = load_config()
    assert (cfg.cluster.n_workers, cfg.cluster.memory_limit) == (4, "2GiB")
    assert load_config(write(tmp_path, "cluster:\n  n_workers: 3\n")).cluster.n_workers == 3  # file wins
    assert load_config(None, {"cluster.n_workers": 2}).cluster.n_workers == 2  # flags win
    clean_dask_env["DASK_FLATNORM__CLUSTER__N_WORKERS"] = "0"
    dask.config.refresh()
    with pytest.raises(ConfigError, match=r"^dask config .*: flatnorm\.cluster\.n_workers: must be >= 1"):
        load_config()
    del clean_dask_env["DASK_FLATNORM__CLUSTER__N_WORKERS"]
    clean_dask_env["DASK_FLATNORM__CLUSTER__NWORKERS"] = "2"
    dask.config.refresh()
    with pytest.raises(ConfigError,
                       match=r"flatnorm\.cluster\.nworkers: unknown option; did you mean flatnorm\.cluster\.n_w"):
        load_config()


def test_a_stored_config_reads_back_through_the_schema(clean_dask_env):
    cfg = load_config(CONFIGS / "slurm.yaml", {"input.root": "/data", "solve.clip_sigma": 5.0,
                                               "dask.array.chunk-size": "64MiB"})
    stored = json.loads(json.dumps(cfg.to_dict()))  # as a Zarr attribute holds it
    assert Config.from_dict(stored, "scales.zarr") == cfg
    # A stored config is what was written: dask's config (the environment) does not change it.
    clean_dask_env["DASK_FLATNORM__CLUSTER__N_WORKERS"] = "0"
    dask.config.refresh()
    assert Config.from_dict(stored, "scales.zarr").cluster.n_workers == 4
    assert Config.from_dict({}, "scales.zarr") == Config()
    stored["solve"]["level"] = "CCD"
    with pytest.raises(ConfigError, match=r"^scales\.zarr: solve\.level: must be one of DETECTOR, AMP, got 'CCD'$"):
        Config.from_dict(stored, "scales.zarr")
    with pytest.raises(ConfigError, match=r"^scales\.zarr: solve\.levle: unknown option; did you mean solve\.level"):
        Config.from_dict({"solve": {"levle": "AMP"}}, "scales.zarr")


def test_dask_settings_apply_for_the_run(tmp_path, clean_dask_env):
    import distributed  # noqa: F401  (registers distributed's dask config defaults)

    path = write(tmp_path, "cluster:\n  n_workers: 3\ndask:\n  distributed:\n    worker:\n      memory:\n"
                           "        target: 0.5\n  array.chunk-size: 64MiB\n")
    cfg = load_config(path, {"dask.distributed.worker.memory.spill": 0.75})
    assert cfg.dask == {"distributed.worker.memory.target": 0.5, "array.chunk-size": "64MiB",
                        "distributed.worker.memory.spill": 0.75}
    spill_pause = dask.config.get("distributed.worker.memory.pause")
    target = dask.config.get("distributed.worker.memory.target")
    assert target != 0.5
    assert cfg.cluster.n_workers == 3
    with dask.config.set(cfg.dask_settings()):
        assert dask.config.get("flatnorm", default=None) is None  # cluster settings are passed, not set globally
        assert dask.config.get("distributed.worker.memory.target") == 0.5
        assert dask.config.get("distributed.worker.memory.pause") == spill_pause  # merged, not replaced
        assert dask.config.get("array.chunk-size") == "64MiB"
    assert dask.config.get("distributed.worker.memory.target") == target  # for the run only


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.solve.level = "AMP"  # type: ignore[misc]


# ------------------------------------------------------------------------------------- command-line flags

#: The flags of flatnorm run before the schema made them; each must keep its name.
HISTORIC_FLAGS = {
    "--input": "input.root", "--pattern": "input.pattern", "--manifest": "input.manifest",
    "--camera": "input.camera", "--on-error": "input.on_error", "--batch-size": "input.batch_size",
    "--butler": "input.butler", "--collections": "input.collections", "--dataset-type": "input.dataset_type",
    "--where": "input.where", "--instrument": "input.instrument", "--level": "solve.level",
    "--iterations": "solve.iterations", "--tol": "solve.tol", "--max-iter": "solve.max_iter",
    "--clip-sigma": "solve.clip_sigma", "--clip-rounds": "solve.clip_rounds", "--output": "output.store",
    "--scales-yaml": "output.scales_yaml", "--overwrite": "output.overwrite", "--output-butler": "output.butler",
    "--output-run": "output.run", "--scheduler": "cluster.scheduler", "--workers": "cluster.n_workers",
}


def sample(opt):
    """(flag arguments, the value the option must then have), different from the option's default."""
    text, value = {
        "str": (f"{opt.key}-text",) * 2,
        "path": (f"/flat/{opt.key}",) * 2,
        "strlist": ("a, b", ["a", "b"]),
        "int": (str(int(opt.minimum or 0) + 3), int(opt.minimum or 0) + 3),
        "float": ("0.25", 0.25),
        "memory": ("3GiB", "3GiB"),
        "scheduler": ("tcp://127.0.0.1:8786", "tcp://127.0.0.1:8786"),
        "selection": ("Observation_Reason=Flat", "observation_reason=Flat"),  # the field's canonical spelling
    }.get(opt.kind, (None, None))
    if opt.kind == "choice":
        text, value = opt.choices[-1].swapcase(), opt.choices[-1]  # case-insensitive, canonical spelling kept
    if opt.kind == "bool":
        return [opt.flag], True
    assert value is not None and value != opt.default, opt.key
    return [opt.flag, text], value


# Options that cannot be set together (one way of finding inputs; iterations or tol; a store to write or to
# append to): four command lines.
BUTLER_ONLY = {"input.butler", "input.collections", "input.where", "input.select", "solve.tol"}
GROUPS = [set(OPTIONS) - BUTLER_ONLY - {"input.manifest", "output.append"}, BUTLER_ONLY, {"input.manifest"},
          {"output.append"}]  # output.append excludes output.store and output.overwrite


@pytest.mark.parametrize("command", ["run", "demo", "job-script"])
def test_every_option_has_its_flag_and_each_flag_sets_its_option(command, clean_dask_env):
    from flatnorm_dask.cli import build_parser, config_from_args

    flags = {opt.flag: key for key, opt in OPTIONS.items()}
    assert len(flags) == len(OPTIONS) and all(flag.startswith("--") for flag in flags)  # none flagless
    assert HISTORIC_FLAGS.items() <= flags.items()
    assert set().union(*GROUPS) == set(OPTIONS)
    parser = build_parser()
    for group in GROUPS:
        argv = [command]
        for key in group:
            argv += sample(OPTIONS[key])[0]
        cfg = config_from_args(parser.parse_args(argv)).to_dict()
        for key in group:  # the parsed flag went all the way into the validated Config
            section, name = key.split(".")
            assert cfg[section][name] == sample(OPTIONS[key])[1], key


def test_flag_help_comes_from_the_schema(capsys):
    from flatnorm_dask.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for opt in OPTIONS.values():
        assert f"{opt.flag} {opt.cli_metavar + ' ' if opt.cli_metavar else ''}{' '.join(opt.help.split())}" in text
    assert "--level {DETECTOR,AMP}" in text and "(default: 1000)" in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "(default: AMP)" in " ".join(capsys.readouterr().out.split())  # the demo's own default


@pytest.mark.parametrize(("flags", "message"), [
    (["--iterations", "ten"], "command line: solve.iterations: expected an integer, got a string 'ten'"),
    (["--iterations", "0"], "command line: solve.iterations: must be >= 1, got 0"),
    (["--level", "ccd"], "command line: solve.level: must be one of DETECTOR, AMP, got 'ccd'"),
    (["--on-error", "ignore"], "command line: input.on_error: must be one of raise, mask, got 'ignore'"),
    (["--tol", "nan"], "command line: solve.tol: expected a finite number, got a string 'nan'"),
    (["--workers", "2.5"], "command line: cluster.n_workers: expected an integer, got a string '2.5'"),
    (["--memory-limit", "lots"], "command line: cluster.memory_limit: expected 'auto' or a size"),
    (["--memory-limit", "2.5"], "command line: cluster.memory_limit: a float is a fraction"),
    (["--scheduler", "slurmm"], "command line: cluster.scheduler: expected local, slurm, pbs"),
    (["--batch-size", ""], "command line: input.batch_size: expected an integer, got a string ''"),
])
def test_bad_flag_values_are_one_line_naming_the_option(flags, message, tmp_path, capsys, clean_dask_env):
    from flatnorm_dask.cli import main

    code = main(["run", *flags, "--output", str(tmp_path / "s.zarr"), "--no-progress"])
    line = error_line(subprocess.CompletedProcess([], code, "", capsys.readouterr().err))
    assert line.startswith(f"flatnorm: error: {message}"), line
    assert not (tmp_path / "s.zarr").exists()


def test_iterations_and_tol_flags_exclude_each_other(capsys):
    from flatnorm_dask.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--iterations", "3", "--tol", "1e-9"])
    assert exit_.value.code == 2
    assert "argument --tol: not allowed with argument --iterations" in capsys.readouterr().err


# ------------------------------------------------------------------------------- workflows/ and cluster

WORKFLOWS = REPO / "workflows"


@pytest.mark.parametrize(("script", "argv", "chosen"), [
    ("local.py", ["--scheduler", "tcp://10.0.0.1:8786"], "local"),
    ("local.py", ["--sched=slurm"], "local"),  # an abbreviation is the same flag
    ("existing_scheduler.py", ["tcp://10.0.0.1:8786", "--scheduler", "local"], "tcp://10.0.0.1:8786"),
    ("slurm.py", ["--kind", "jobqueue-local", "--scheduler", "local"], "jobqueue-local"),
    ("slurm.py", ["--print-job-script", "--scheduler", "pbs"], "slurm"),
])
def test_workflow_scripts_refuse_a_scheduler_flag(script, argv, chosen, tmp_path, monkeypatch, capsys):
    """Each script chooses the cluster: a user's --scheduler is refused in one line, not silently replaced."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *argv, "--output", str(tmp_path / "s.zarr"), "--no-progress"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(WORKFLOWS / script), run_name="__main__")
    line = error_line(subprocess.CompletedProcess([], exit_.value.code, "", capsys.readouterr().err))
    assert "--scheduler" in line and f"this script runs on {chosen}" in line, line
    assert not (tmp_path / "s.zarr").exists()


def test_connect_takes_its_settings_explicitly(tmp_path, clean_dask_env):
    """The cluster section reaches connect() as an argument; dask's global config plays no part."""
    from flatnorm_dask.cluster import connect

    local = Config.from_dict({"cluster": {"n_workers": 1, "threads_per_worker": 2, "memory_limit": "1GiB"}}).cluster
    stray = {"flatnorm.cluster.n_workers": 3, "flatnorm.cluster.scheduler": "tcp://10.255.255.1:1"}
    quiet = {"distributed.scheduler.dashboard.address": ":0"}  # a dask key, as a config's dask: section sets it
    with dask.config.set({**stray, **quiet}), connect(local) as client:
        workers = list(client.scheduler_info()["workers"].values())
        assert [(w["nthreads"], w["memory_limit"]) for w in workers] == [(2, 2**30)]
        address = client.scheduler.address
        scheduler_file = tmp_path / "scheduler.json"
        scheduler_file.write_text(json.dumps({"address": address}))
        for spec in (address, str(scheduler_file)):
            joined = Config.from_dict({"cluster": {"scheduler": spec}}).cluster
            with connect(joined) as other:
                assert other.scheduler.address == address
                assert len(other.scheduler_info()["workers"]) == 1
        assert len(client.scheduler_info()["workers"]) == 1  # joining and leaving left it running
    assert client.status == "closed" and client.cluster.status.name == "closed"


def _samplers(client) -> tuple:
    """What the dashboard's samplers are set to on a cluster: (event-loop tick, system monitor) intervals in
    seconds of the scheduler, and of each worker with whether it profiles its tasks."""
    def intervals(server):
        return server._tick_interval, server.periodic_callbacks["monitor"].callback_time / 1000

    scheduler = client.run_on_scheduler(lambda dask_scheduler: intervals(dask_scheduler))
    workers = client.run(lambda dask_worker: (*intervals(dask_worker), "profile" in dask_worker.periodic_callbacks))
    return scheduler, sorted(set(workers.values()))


def test_a_local_cluster_starts_with_the_dashboards_samplers_slowed(clean_dask_env):
    """Without cluster.diagnostics, the LocalCluster connect() starts has its workers' profiler off and every
    server's tick and system monitor slowed (QUIET_DASK); a key the user set (as a run's dask: section sets it)
    keeps the user's value; with cluster.diagnostics, distributed's defaults.  dask's config is never left
    changed."""
    import distributed  # noqa: F401  its defaults, before its keys are set

    from flatnorm_dask.cluster import QUIET_DASK, connect

    keys = {**QUIET_DASK, "distributed.scheduler.dashboard.address": None}
    local = {"n_workers": 1, "memory_limit": "1GiB"}
    users = {"distributed.scheduler.dashboard.address": ":0", "distributed.admin.system-monitor.interval": "1s"}
    with dask.config.set(users):
        before = {key: dask.config.get(key) for key in keys}
        with connect(Config.from_dict({"cluster": local}).cluster) as client:
            # The tick at QUIET_DASK's 1 s, the monitor at the user's 1 s (not QUIET_DASK's 2 s), no profiler.
            assert _samplers(client) == ((1.0, 1.0), [(1.0, 1.0, False)])
        assert {key: dask.config.get(key) for key in keys} == before
    with dask.config.set({"distributed.scheduler.dashboard.address": ":0"}):
        with connect(Config.from_dict({"cluster": {**local, "diagnostics": True}}).cluster) as client:
            assert _samplers(client) == ((0.02, 0.5), [(0.02, 0.5, True)])  # distributed's defaults


def test_demo_filters_are_checked_when_given(capsys):
    from flatnorm_dask.cli import build_parser, main
    from flatnorm_dask.simulate import LSSTCAM_FILTERS

    assert build_parser().parse_args(["demo", "--filters", *LSSTCAM_FILTERS]).filters == list(LSSTCAM_FILTERS)
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--filters", "g_6", "x_1"])
    assert exit_.value.code == 2
    assert f"argument --filters: unknown LSSTCam filter 'x_1' (choose from {', '.join(LSSTCAM_FILTERS)})" \
        in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_a_job_queue_run_with_the_status_of_an_interrupted_one(tmp_path):
    """Importing dask-jobqueue replaces the process's SIGINT handler (with one that calls sys.exit(), which
    would end the run with status 0, as if it had succeeded): a run on a job queue keeps its own."""
    pytest.importorskip("dask_jobqueue")
    import time

    from flatnorm_dask.simulate import SIMPLE_PATTERN, simulate_campaign, write_campaign

    root = tmp_path / "in"
    write_campaign(simulate_campaign("lsstcam", n_detectors=2, n_exposures=2, filters=("r_57",), seed=5), root,
                   layout="simple")
    bin_dir, asked = tmp_path / "bin", tmp_path / "sbatch-was-asked"
    bin_dir.mkdir()
    for name, body in (("sbatch", f"touch {asked}\necho 'Submitted batch job 4242'"), ("scancel", "true"),
                       ("squeue", "true")):  # a queue that takes the job and never starts it
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text("cluster:\n  scheduler: slurm\n  n_workers: 1\n  wait_timeout: 120\n"
                   "dask:\n  jobqueue:\n    slurm:\n      cores: 1\n      memory: 1GiB\n"
                   f"      log-directory: {tmp_path / 'logs'}\n"
                   "      scheduler-options: {dashboard_address: ':0'}\n")
    out = tmp_path / "out.zarr"
    command = Command(["run", cfg, "--input", root, "--pattern", SIMPLE_PATTERN, "--output", out, "--no-progress"],
                      env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, capture=True)
    deadline = time.monotonic() + 60
    while not asked.exists():  # the job submitted: the run is waiting for its worker
        assert command.poll() is None, command.communicate()
        assert time.monotonic() < deadline, "no job was submitted"
        time.sleep(0.05)
    command.send_signal(signal.SIGINT)
    status = command.wait(60)
    _, err = command.communicate()
    assert (status, err.strip().splitlines()[-1:]) == (130, ["flatnorm: interrupted (SIGINT)"]), err
    assert not out.exists()


def test_a_job_queue_without_workers_fails_in_one_line_and_is_shut_down(tmp_path, monkeypatch, clean_dask_env):
    """No job starts (the batch system refuses it): the run stops after cluster.wait_timeout, saying so."""
    pytest.importorskip("dask_jobqueue")
    from flatnorm_dask import cluster as cluster_module
    from flatnorm_dask.cluster import ClusterError, connect

    fake = tmp_path / "bin" / "sbatch"  # a batch system that refuses every job, on any machine
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: normal' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    started = []  # the real cluster objects connect() makes, kept to see their state afterwards
    real_class = cluster_module._jobqueue_class

    def recording_class(kind):
        def make():
            started.append(real_class(kind)())
            return started[-1]
        return make

    monkeypatch.setattr(cluster_module, "_jobqueue_class", recording_class)
    cfg = Config.from_dict({"cluster": {"scheduler": "slurm", "wait_timeout": 2}})
    settings = {"jobqueue.slurm.cores": 1, "jobqueue.slurm.memory": "1GiB",
                "distributed.scheduler.dashboard.address": ":0"}
    with dask.config.set(settings), pytest.raises(ClusterError) as err:
        with connect(cfg.cluster):
            pass
    assert str(err.value) == ("no slurm job started a worker within 2 s (cluster.wait_timeout); check the queue "
                              "and the job script")
    assert [c.scheduler.status.name for c in started] == ["closed"]
