"""Settings: defaults documented once, validation with one-line messages, layering, dask config."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import dask
import pytest
import yaml

from flatnorm_dask.config import DASK_DEFAULTS_FILE, SECTIONS, Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT = CONFIGS / "default.yaml"


@pytest.fixture
def clean_dask_env():
    """No DASK_FLATNORM__* variable leaks in or out of a test; dask config re-read afterwards."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("DASK_FLATNORM")}
    dask.config.refresh()
    yield os.environ
    for k in [k for k in os.environ if k.startswith("DASK_FLATNORM")]:
        del os.environ[k]
    os.environ.update(saved)
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
    # The dask-config defaults of the cluster section say the same.
    assert yaml.safe_load(DASK_DEFAULTS_FILE.read_text())["flatnorm"]["cluster"] == documented["cluster"]


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
    assert lsst.input.pattern == ("{run}/flatStats/{day_obs}/{obs_id}/flatStats_LSSTCam_{physical_filter}_"
                                  "{obs_id}_{detector_name}_{run_name}.yaml")
    test = load_config(CONFIGS / "testcam.yaml")
    assert (test.solve.level, test.input.camera) == ("DETECTOR", "testcam")
    assert test.input.pattern == "{physical_filter}/{exposure}/flatStats_{detector}.yaml"
    slurm = load_config(CONFIGS / "slurm.yaml").dask_settings()
    assert slurm["flatnorm.cluster.scheduler"] == "slurm"
    for key in ("cores", "memory", "walltime", "queue"):
        assert f"jobqueue.slurm.{key}" in slurm


def test_slurm_config_gives_a_job_script(tmp_path, monkeypatch, clean_dask_env):
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue import SLURMCluster

    monkeypatch.chdir(tmp_path)  # the cluster creates its log directory here
    with dask.config.set(load_config(CONFIGS / "slurm.yaml").dask_settings()):
        with SLURMCluster() as cluster:
            script = cluster.job_script()
    assert "#SBATCH -p normal" in script and "#SBATCH --mem=64G" in script and "#SBATCH -t 02:00:00" in script


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
                           "output:\ncluster:\n  memory_limit: 4GiB\n")
    cfg = load_config(path)
    assert cfg.solve.level == "AMP" and cfg.input.on_error == "mask"
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


def test_dask_settings_apply_for_the_run(tmp_path, clean_dask_env):
    import distributed  # noqa: F401  (registers distributed's dask config defaults)

    path = write(tmp_path, "cluster:\n  n_workers: 3\ndask:\n  distributed:\n    worker:\n      memory:\n"
                           "        target: 0.5\n  array.chunk-size: 64MiB\n")
    cfg = load_config(path, {"dask.distributed.worker.memory.spill": 0.75})
    assert cfg.dask == {"distributed.worker.memory.target": 0.5, "array.chunk-size": "64MiB",
                        "distributed.worker.memory.spill": 0.75}
    spill_pause = dask.config.get("distributed.worker.memory.pause")
    with dask.config.set(cfg.dask_settings()):
        assert dask.config.get("flatnorm.cluster.n_workers") == 3
        assert dask.config.get("distributed.worker.memory.target") == 0.5
        assert dask.config.get("distributed.worker.memory.pause") == spill_pause  # merged, not replaced
        assert dask.config.get("array.chunk-size") == "64MiB"
    assert dask.config.get("flatnorm.cluster.n_workers") is None


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.solve.level = "AMP"  # type: ignore[misc]
