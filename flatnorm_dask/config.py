"""Run settings: one schema for the defaults, the allowed values, the validation, the documentation and the
command-line flags of every option.

Each option is a field of a frozen dataclass below, made with :func:`_option`: its default is the field's,
and its :class:`Option` (in the field's metadata) holds its rule, its documentation and its flag.  From it:

- :func:`load_config` and :meth:`Config.from_dict` validate (one-line :class:`ConfigError` naming the source
  and the dotted key, with a "did you mean" hint for a misspelt name);
- :func:`render_default_yaml` writes ``configs/default.yaml`` (every option, its documentation and its
  default); regenerate the file with ``python -m flatnorm_dask.config > configs/default.yaml``;
- the ``flatnorm run`` / ``demo`` flags are made from :data:`OPTIONS` (``flatnorm_dask.cli``).

A run's settings come in layers, each overriding the one before:

1. the schema defaults;
2. for the ``cluster`` section, dask's own config under ``flatnorm.cluster``, i.e. ``DASK_FLATNORM__CLUSTER__*``
   environment variables or ``~/.config/dask/*.yaml`` (read here, never written back);
3. the user's YAML file;
4. ``overrides``: dotted keys such as ``{"solve.level": "AMP"}``, e.g. from command-line flags.

This module imports only the standard library and ``flatnorm_dask.schema``/``cluster`` at load time, so that
``flatnorm --help`` stays quick; PyYAML and dask are imported where they are used.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .bounded import MAX_FILE_BYTES, AliasRefused, RefusedFile, read_text, without_aliases
from .cluster import (
    JOBQUEUE_KINDS,
    MEMORY_FLOOR_REASON,
    MIN_WORKER_MEMORY,
    QUIET_DASK,
    SCHEDULER_NAMES,
    memory_limit_problem,
    scheduler_kind,
)
from .schema import (
    LEGACY_SCALES_DATASET_TYPE,
    LEGACY_STATISTICS_DATASET_TYPE,
    LEVELS,
    ON_ERROR,
    SCALES_DATASET_TYPE,
    SELECT_FIELDS,
    STATISTICS_DATASET_TYPE,
    butler_file_pattern,
    parse_selection,
)

__all__ = [
    "OPTIONS",
    "SECTIONS",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "EXCLUSIVE_FLAGS",
    "InputConfig",
    "Option",
    "OutputConfig",
    "SolveConfig",
    "load_config",
    "render_default_yaml",
]


def _settings_text(settings: Mapping[str, Any]) -> str:
    """dask settings as a documentation's text: ``key value, key value`` (booleans as YAML writes them)."""
    return ", ".join(f"{key} {str(value).lower() if isinstance(value, bool) else value}"
                     for key, value in settings.items())


class ConfigError(ValueError):
    """A bad setting: one line naming the source (a file, ``overrides`` or dask config) and the dotted key."""

    def __init__(self, source: str, key: str | None, problem: str):
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}" if key else source
        super().__init__(" ".join(f"{where}: {problem}".split()))


#: How a value of each kind is shown on the command line when an option names no metavar.
_METAVARS = {"str": "TEXT", "path": "PATH", "strlist": "A[,B]", "int": "N", "float": "X", "bool": None,
             "memory": "SIZE", "scheduler": "ADDRESS", "selection": "FIELD=VALUE"}


@dataclass(frozen=True)
class Option:
    """One option of the schema: its rule, its documentation and its command-line flag.

    ``summary`` is one sentence (the flag's help, and the first sentence of the option's comment in
    ``configs/default.yaml``); ``details`` follow it in the YAML only.  In either text a line starting with
    spaces is an example, kept as written.  ``key``, ``default`` and ``flag`` are filled in from the field
    (see :data:`OPTIONS`): the flag is ``--`` and the option's name with ``-`` for ``_`` unless ``flag`` says
    otherwise.
    """

    kind: str  # str, path, strlist, choice, bool, int, float, memory, scheduler, selection
    summary: str
    details: str = ""
    nullable: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    positive: bool = False
    flag: str | None = None
    metavar: str | None = None
    key: str = ""
    default: Any = None

    @property
    def doc(self) -> str:
        """The whole documentation: summary, then details."""
        return f"{self.summary} {self.details}" if self.details else self.summary

    @property
    def help(self) -> str:
        """The flag's help text: the summary and, when there is one, the default."""
        text = " ".join(self.summary.split())
        if self.default is None or self.default is False:
            return text
        return f"{text} (default: {'true' if self.default is True else self.default})"

    @property
    def cli_metavar(self) -> str | None:
        """How the flag's value is shown in ``--help``: the choices for a choice, else a short word."""
        if self.metavar:
            return self.metavar
        if self.kind == "choice":
            return "{" + ",".join(self.choices) + "}"
        return _METAVARS[self.kind]

    def from_text(self, text: str) -> Any:
        """A flag's text as the value it stands for (``"5"`` -> 5 for an int); validation is :func:`_check`'s.

        Text that is not a number is passed on as it is, so the error names the option and the text.
        """
        if self.kind == "int":
            try:
                return int(text)
            except ValueError:
                return text
        if self.kind == "memory":
            for number in (int, float):
                try:
                    return number(text)
                except ValueError:
                    pass
        return text  # float (a string is accepted as a number), choice, str, path, strlist, scheduler, selection


def _option(default: Any, kind: str, summary: str, details: str = "", **rule: Any) -> Any:
    """A dataclass field holding its :class:`Option` in ``metadata``."""
    return field(default=default, metadata={"option": Option(kind, summary, details, **rule)})


@dataclass(frozen=True)
class InputConfig:
    """Where the statistics files are and how to read them."""

    root: str | None = _option(
        None, "path", "Directory holding the statistics files.",
        "The pattern is matched below it, and relative manifest paths start here (default for a manifest: the "
        "manifest's own directory).",
        nullable=True, flag="--input", metavar="DIR")
    pattern: str | None = _option(
        None, "str", "Where the files are below root, with named fields in braces.",
        "The fields are {exposure}, {detector}, {physical_filter}, or the butler's {obs_id}, {day_obs}, {seq_num}, "
        "{detector_name}; any other {name} matches one path part ({run} may span several directories).  "
        "Exposure ids follow LSST's rule, exposure = day_obs x 100000 + seq_num, with day_obs and seq_num read "
        "from an obs_id such as MC_C_20251120_000042 (-> 2025112000042); a {detector_name} such as R22_S11 "
        "becomes the detector id through the camera below.  So a butler repository's own files are read "
        f"without its registry, e.g. LSSTCam's {STATISTICS_DATASET_TYPE} (see configs/lsstcam.yaml):\n"
        f"  {butler_file_pattern()}\n"
        f"(a repository of older pipelines has {LEGACY_STATISTICS_DATASET_TYPE} in both places instead of "
        f"{STATISTICS_DATASET_TYPE}).  Give pattern or manifest (or butler), not two of them.",
        nullable=True, metavar="PATTERN")
    manifest: str | None = _option(
        None, "path", "CSV or Parquet table listing the files instead of a pattern.",
        "Its columns are path, exposure, detector, optionally physical_filter and, with select, a column "
        "named after its field.",
        nullable=True, metavar="FILE")
    camera: str | None = _option(
        "lsstcam", "str", "Camera geometry: a built-in name (lsstcam, testcam) or the path of a camera CSV.",
        "Needed to map a pattern's {detector_name} to detector ids, and for the focal-plane plots; amplifier "
        "names always come from the files.  null = no camera.",
        nullable=True, metavar="NAME|CSV")
    on_error: str = _option(
        "raise", "choice", "A file that cannot be read or lacks a statistic: raise stops the run with a message "
        "naming the file, mask leaves its cells out of the fit and records it.",
        "Masked files are listed in the store's problems attribute.",
        choices=ON_ERROR)
    batch_size: int = _option(
        4000, "int", "Files parsed per Dask task.",
        "A task reads all the detectors of a run of exposures (batch_size // detectors of them), and its block "
        "is a chunk of the store's inputs.  Each task costs about 30 ms of CPU besides parsing its files (making, "
        "writing and checking its block, and scheduling it), measured on LSSTCam files of about 125 us each: "
        "6% of a task of 4,000 files, 25% of one of 1,000.  Smaller batches balance better when a run has few "
        "tasks for its workers, and hold less memory per task.",
        minimum=1)
    max_file_bytes: int = _option(
        MAX_FILE_BYTES, "int", "Largest statistics file read, in bytes; a larger one is a bad file.",
        "A flatStats file of a 16-amplifier detector is about 4 KB; the limit bounds the memory and time a "
        "corrupt or hostile input can take.  Only regular files are read (a FIFO or a device is a bad file).",
        minimum=1, metavar="BYTES")
    butler: str | None = _option(
        None, "path", "LSST butler repository whose registry lists the inputs, instead of root + pattern / "
        "manifest.",
        "A root directory, butler.yaml or alias.  Exposure, detector and physical_filter come from the data "
        "ids, and the files are read by our own parser in the same Dask tasks (s3:// through obstore, the s3 "
        "extra; WebDAV/https through lsst.resources).  Needs the butler extra: pip install "
        "'flatnorm-dask[butler]'.",
        nullable=True, metavar="REPO")
    collections: list[str] | None = _option(
        None, "strlist", "Butler collections searched in order, a list or one comma-separated string; "
        "required with butler.",
        "RUN or CHAINED, no wildcards.  A data id found in several (or in several runs of a chain) is taken "
        "from the first one only.",
        nullable=True, metavar="C[,C2]")
    dataset_type: str = _option(
        STATISTICS_DATASET_TYPE, "str", "Dataset type of the statistics in the butler.",
        f"{STATISTICS_DATASET_TYPE} is the stock cp_pipe pipelines' name; a repository written by older "
        f"pipelines holds {LEGACY_STATISTICS_DATASET_TYPE}.  Its dimensions include exposure and detector and "
        "its storage class is PropertyList.",
        metavar="NAME")
    select: str | None = _option(
        None, "selection", "Down-select the exposures as cp_pipe's normalisation task does (doDownSelection): "
        "keep those whose exposure record FIELD equals VALUE, ignoring case.",
        f"FIELD is one of {', '.join(SELECT_FIELDS)}.  With butler the exposure records give it; with a "
        "manifest, the column of that name (a pattern gives no such field).  A physical_filter left without "
        "exposures is not solved; no exposure left at all is an error.  null = every exposure.",
        nullable=True)
    where: str | None = _option(
        None, "str", "Butler query expression restricting the datasets.",
        'For example "exposure.day_obs = 20251120 AND detector < 9"; null = every dataset of the collections.',
        nullable=True, metavar="EXPR")
    instrument: str | None = _option(
        None, "str", "Instrument name, such as LSSTCam.",
        "With butler: only its datasets are used (needed when the collections hold several instruments); "
        "otherwise taken from the data ids.  With file inputs and output.butler: required, the instrument of "
        "the output data ids.",
        nullable=True, metavar="NAME")


@dataclass(frozen=True)
class SolveConfig:
    """How the decomposition is fitted."""

    level: str = _option(
        "DETECTOR", "choice", "Scaling level: DETECTOR fits one G per detector, AMP one per amplifier (what "
        "cp_pipe's flat combination uses).",
        "Case-insensitive.",
        choices=LEVELS)
    iterations: int = _option(
        10, "int", "Fixed number of alternating iterations (the reference task uses 10).",
        "Ignored when tol is set.",
        minimum=1)
    tol: float | None = _option(
        None, "float", "Convergence mode: iterate until the largest change of log G is below tol (e.g. 1.0e-10).",
        "null = fixed iterations.",
        nullable=True, positive=True, metavar="T")
    max_iter: int = _option(
        1000, "int", "Most iterations allowed in convergence mode.",
        "The store records whether the fit converged.",
        minimum=1)
    clip_sigma: float | None = _option(
        None, "float", "Outlier rejection: after each fit, leave out cells more than clip_sigma robust standard "
        "deviations from the median residual, and fit again.",
        "The residual is the log residual scaled by sqrt(weight / mean weight), and the robust standard "
        "deviation 1.4826 x MAD; clipped cells are used=false in the store.  null = the plain fit (the "
        "reference's).",
        nullable=True, positive=True, metavar="K")
    clip_rounds: int = _option(
        5, "int", "Most rejection rounds when clip_sigma is set (each round refits once).",
        minimum=1)
    persist_max_mb: int = _option(
        2048, "int", "Largest size (MB) of one filter's solver inputs held in the workers' memory for the "
        "iterations.",
        "Their size is flatnorm_dask.solver.memory_bytes(shape): 17 bytes a cell, 34 with clip_sigma.  A larger "
        "filter is read "
        "from the store's chunks at every pass instead (about 3x slower, but worker memory is then bounded by "
        "the chunk size, not the campaign).  0 = always from the store.",
        minimum=0, metavar="MB")
    one_task_max_mb: int = _option(
        256, "int", "Largest size (MB) of one filter's solver inputs solved in a single task, with numpy, "
        "rather than across the workers.",
        "The size is that of persist_max_mb (flatnorm_dask.solver.memory_bytes).  A single task needs no round "
        "trip between the workers at each iteration, which is what a solve across them waits for, but it holds "
        "the filter in one worker's memory (about four times this size while it iterates).  A filter of 189 "
        "LSSTCam detectors x 16 amplifiers x 1,000 exposures is 51 MB.  0 = always across the workers.",
        minimum=0, metavar="MB")


@dataclass(frozen=True)
class OutputConfig:
    """What a run writes."""

    store: str | None = _option(
        None, "path", "Zarr store to write (a directory, e.g. scales.zarr); required to run, unless output.append "
        "names the store to append to.",
        "One group per physical_filter.",
        nullable=True, flag="--output", metavar="STORE.zarr")
    overwrite: bool = _option(
        False, "bool", "Replace an existing store.",
        "The new store is written beside it and swapped in only once complete; something that is not a "
        "flatnorm store is never replaced.")
    append: str | None = _option(
        None, "path", "Append to this existing store instead of writing a new one: read only the input files it "
        "does not hold yet, and solve again, warm-started from its scales.",
        "The inputs are found as any run finds them.  A file is read when its (physical_filter, exposure, "
        "detector) cell is new, when the store holds the cell from another path (the cell is replaced), or "
        "when its size or modification time differs from what the store recorded when it read it; files the "
        "store holds that are no longer among the inputs are reported and their cells kept.  The new version "
        "is committed only if the store is still the version the append started from.  Exclusive with "
        "output.store and output.overwrite: the store appended to is the output (a flag replaces the config "
        "file's choice between them).  The solve level must be the store's.",
        nullable=True, metavar="STORE.zarr")
    keep_versions: int = _option(
        1, "int", "Previous versions of the store kept when a run replaces it.",
        "A reader that opened the store (flatnorm_dask.open_store, e.g. in a notebook) keeps reading the version "
        "it opened; once that version is deleted its reads fail with an error naming the store (never a mix of "
        "two versions).  1 keeps the store readable through one overwrite; 0 deletes the old version at once.",
        minimum=0, metavar="N")
    lock_timeout: float = _option(
        60.0, "float", "Seconds a run waits for another run's commit to the same store to finish.",
        "A commit holds the store's lock file (.NAME.lock) only to check the store again and swap it in, a "
        "moment; a longer wait means a run hung there.",
        positive=True, metavar="SECONDS")
    scales_yaml: str | None = _option(
        None, "path", "Also write each physical_filter's scales as the YAML file the flat combination reads: "
        "a directory that gets PHYSICAL_FILTER.yaml per filter, or one .yaml file when the run has exactly one "
        "filter.",
        "Each file holds exactly what one scales dataset holds, {expScale: {detector: {amp: {exposure: E}}}, "
        "detScale: ...}, as flatnorm export writes it.  A path ending in .yaml or .yml is a file, anything else "
        "a directory; a .yaml path for a run of several filters is refused before any work.  Exposures without a "
        "usable cell are left out of expScale (the store lists them).  null = do not.",
        nullable=True, metavar="DIR|FILE.yaml")
    butler: str | None = _option(
        None, "path", "Also put the scales into this LSST butler repository once the store is written: one "
        "dataset per physical_filter.",
        "Dimensions instrument, physical_filter; storage class StructuredDataDict, the dataset type registered "
        "if absent; each holds what scales_yaml writes for that filter.  The physical filters must be known to "
        "its registry.  null = do not.  Needs the butler extra.",
        nullable=True, flag="--output-butler", metavar="REPO")
    dataset_type: str = _option(
        SCALES_DATASET_TYPE, "str", "Dataset type of the scales put into output.butler.",
        f"{SCALES_DATASET_TYPE} is what the stock cp_pipe pipelines' flat combination reads; older pipelines "
        f"read {LEGACY_SCALES_DATASET_TYPE}.",
        flag="--output-dataset-type", metavar="NAME")
    run: str | None = _option(
        None, "str", "RUN collection the scales datasets go into (required with output.butler; "
        "created if absent).",
        "Datasets in a run are never replaced: a run that already holds scales of a filter is refused.",
        nullable=True, flag="--output-run", metavar="RUN")


@dataclass(frozen=True)
class ClusterConfig:
    """Which Dask cluster runs the job.  Each option can also be set in dask's own config, e.g.
    DASK_FLATNORM__CLUSTER__N_WORKERS=4 in the environment, or flatnorm: cluster: n_workers: 4 in
    ~/.config/dask/flatnorm.yaml; a config file or a flag wins over it."""

    scheduler: str | None = _option(
        None, "scheduler", "Which Dask cluster: null or local starts a LocalCluster on this machine; an address "
        "(tcp://host:8786) or a scheduler JSON file joins a running scheduler; "
        f"{', '.join(JOBQUEUE_KINDS[:-1])} start a dask-jobqueue cluster.",
        "A job-queue cluster is shaped by the jobqueue.<kind> keys of the dask section (see "
        f"configs/slurm.yaml); {JOBQUEUE_KINDS[-1]} runs its jobs as processes on this machine (the same code "
        "path, without a batch system).",
        nullable=True)
    n_workers: int | None = _option(
        None, "int", "Worker processes of a LocalCluster, or the number of jobs of a job-queue cluster.",
        "null = one per core (LocalCluster), one job (job queue).",
        nullable=True, minimum=1, flag="--workers")
    threads_per_worker: int | None = _option(
        None, "int", "Threads per LocalCluster worker.",
        "null = 1 (parsing holds the GIL), with one worker per core unless n_workers is set.",
        nullable=True, minimum=1)
    memory_limit: str | int | float | None = _option(
        "auto", "memory", 'Memory per LocalCluster worker: "auto" (the machine\'s memory shared out), a size '
        'such as "4GiB", a number of bytes, or a fraction of the machine\'s memory in (0, 1].',
        f"At least {MIN_WORKER_MEMORY // 2**20} MiB (checked here for a size, when the cluster starts for a "
        f"fraction or auto): {MEMORY_FLOOR_REASON}.  A worker that still runs out (a "
        "task killing its workers, or all of them paused or restarting for worker_timeout) ends the run with "
        "an error saying so.  null = distributed's default (auto).",
        nullable=True)
    wait_timeout: float = _option(
        600.0, "float", "Seconds to wait for the first worker of a job-queue cluster before giving up.",
        positive=True, metavar="SECONDS")
    connect_timeout: float = _option(
        30.0, "float", "Seconds a running scheduler (an address or a scheduler file) has to answer.",
        "A scheduler file that does not exist yet is waited for as long.  An address where nothing listens, "
        "a server that never answers and one that is not a Dask scheduler (such as the dashboard's web port) "
        "end the run within this time (and a second), with the reason.",
        positive=True, metavar="SECONDS")
    worker_timeout: float = _option(
        120.0, "float", "Seconds a run goes on while no worker is able to run tasks, before it stops with an "
        "error.",
        "Unable: none connected, all paused for lack of memory, or each one dying and being restarted (a worker "
        "counts once it has stayed up, unpaused, for a few seconds).  Ends a run that would otherwise wait for "
        "ever, e.g. with a memory_limit too small for the tasks.",
        positive=True, metavar="SECONDS")
    diagnostics: bool = _option(
        False, "bool", "Keep distributed's fine-grained diagnostics on a LocalCluster: the workers' statistical "
        "profiler, a 20 ms event-loop tick and a 0.5 s system monitor in every server.",
        f"Off, a LocalCluster starts with {_settings_text(QUIET_DASK)}, "
        "unless the dask section or dask's own config sets one of them: the dashboard then has no Profile page "
        "and coarser System plots, and the cores keep for reading what the samplers took (measured on 2 cores, "
        "an idle 2-worker cluster used 0.11 of a core with distributed's defaults, 0.02 without, and a "
        "56,700-file run about 2 s less of its 15 s of CPU).  Only for a LocalCluster: a running scheduler or a job queue keeps its own "
        "settings.")
    local_min_files: int = _option(
        100_000, "int", "Fewest input files for which a run starts a LocalCluster; a smaller run reads and solves "
        "in its own process, without one.",
        "Starting a LocalCluster costs seconds (its worker processes start and import their libraries), while "
        "this process reads a file in about 75 us; n workers read n times faster, so the cluster wins back its "
        "start-up only above about start-up / (75 us x (1 - 1/n)) files (benchmarks/bench_workflow.py measures "
        "both ways).  Only for a LocalCluster (scheduler null or local): a running scheduler or a job queue is "
        "always used.  0 = always start the cluster.",
        minimum=0, metavar="N")


#: Section name -> its dataclass (``dask`` is free-form and not listed).
SECTIONS: dict[str, type] = {
    "input": InputConfig,
    "solve": SolveConfig,
    "output": OutputConfig,
    "cluster": ClusterConfig,
}
_DASK_SECTION = "dask"


def _options() -> dict[str, Option]:
    table = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            opt = f.metadata["option"]
            table[f"{section}.{f.name}"] = dataclasses.replace(
                opt, key=f"{section}.{f.name}", default=f.default,
                flag=opt.flag or "--" + f.name.replace("_", "-"))
    return table


#: Every option by dotted key (``"solve.level"``), with its default, rule, documentation and flag.
OPTIONS: dict[str, Option] = _options()

#: Options whose flags cannot be given together (the fixed count or the tolerance: say one).
EXCLUSIVE_FLAGS = (("solve.iterations", "solve.tol"),)


@dataclass(frozen=True)
class Config:
    """All settings of a run; build it with :func:`load_config` or :meth:`from_dict` (which validate).

    ``dask`` holds the user's dask config keys, flattened to dotted names
    (``{"distributed.worker.memory.target": 0.7}``); treat it as read-only.
    """

    input: InputConfig = field(default_factory=InputConfig)
    solve: SolveConfig = field(default_factory=SolveConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dask: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (JSON/YAML-ready) that :meth:`from_dict` turns back into an equal Config."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out[_DASK_SECTION] = dict(self.dask)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config mapping") -> Config:
        """Validate a nested mapping shaped like ``configs/default.yaml``, e.g. the ``config`` attribute a run
        stored; ``source`` (say, the store's path) starts every error message.

        Only ``data`` and the schema defaults count: unlike :func:`load_config`, dask's config (the
        environment) is not read, so a stored config reads back as it was written.
        """
        return _build(source, data, {}, None)

    def dask_settings(self) -> dict[str, Any]:
        """The user's ``dask`` section, for ``dask.config.set`` during the run (dask-jobqueue and distributed
        read their own keys from there); flatnorm's own settings are passed explicitly instead."""
        return dict(self.dask)


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, object] | None = None, *,
                overrides_source: str = "overrides") -> Config:
    """Read, merge and validate a run's settings.

    Parameters
    ----------
    path : path-like, optional
        YAML file with any of the sections of ``configs/default.yaml``; defaults only when omitted.
    overrides : mapping, optional
        Dotted keys that win over the file, e.g. ``{"solve.level": "AMP", "input.root": "/data"}``;
        ``"dask.<key>"`` sets a dask config key.  Setting one of ``input.pattern`` / ``input.manifest``
        drops the other from the file, and ``solve.iterations`` without ``solve.tol`` drops the file's
        ``tol``, so that a flag always means what it says.
    overrides_source : str
        How errors in ``overrides`` name their source (the CLI says ``command line``).

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        Unreadable file, YAML syntax error (with its line), unknown section or option (with the closest
        valid name), wrong type, value out of range, or conflicting options.
    """
    import yaml

    data: Any = {}
    source = "defaults"
    if path is not None:
        source = os.fspath(path)
        try:
            text = read_text(path, CONFIG_MAX_BYTES)
        except OSError as err:
            raise ConfigError(source, None, f"cannot read config file: {err.strerror or err}") from None
        except RefusedFile as err:
            raise ConfigError(source, None, f"not a YAML config file: {err}") from None
        try:
            data = yaml.load(text, Loader=without_aliases(yaml.SafeLoader))
        except yaml.YAMLError as err:
            raise ConfigError(source, None, _yaml_problem(err)) from None
        except AliasRefused as err:
            raise ConfigError(source, None, str(err)) from None
        if data is None:  # an empty file (or only comments): all defaults
            data = {}
    return _build(source, data, _dask_cluster_layer(), overrides, overrides_source)


def _dask_cluster_layer() -> Mapping[str, Any]:
    """What dask's config (``DASK_FLATNORM__CLUSTER__*`` variables, dask YAML files) says of ``flatnorm.cluster``.

    Only what the user set is there: the package registers no defaults of its own in dask's config.
    """
    from dask import config as dask_config

    cluster = dask_config.get("flatnorm.cluster", default=None) or {}
    if not isinstance(cluster, Mapping):
        raise ConfigError(_DASK_CONFIG, "flatnorm.cluster", f"must be a mapping, got {_kind(cluster)}")
    return cluster


_DASK_CONFIG = "dask config (DASK_FLATNORM__* environment or dask YAML)"
#: Largest config file read: a config is a few KB; this bounds what a wrong path (a data file, a device) costs.
CONFIG_MAX_BYTES = 1024 * 1024


def _yaml_problem(err) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
        # e.g. an unclosed [ is only noticed at the end of the file: say where it started
        problem += f" ({context} started on line {context_mark.line + 1})"
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {problem}"
    return f"YAML syntax error: {problem}"


def _build(source: str, data: Any, dask_cluster: Mapping[str, Any], overrides: Mapping[str, object] | None,
           overrides_source: str = "overrides") -> Config:
    """Layer defaults, ``dask_cluster``, ``data`` (from ``source``) and ``overrides``; validate."""
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    origin: dict[str, str] = {}  # dotted key -> where its current value came from
    dask_keys: dict[str, Any] = {}

    def put(section: str, option: str, value: Any, where: str, prefix: str = "") -> None:
        key = f"{section}.{option}"
        if key not in OPTIONS:
            hint = _suggest(section, option).replace("did you mean ", f"did you mean {prefix}")
            raise ConfigError(where, prefix + key, f"unknown option{hint}")
        values[section][option] = _check(value, OPTIONS[key], prefix + key, where)
        origin[key] = where

    # Layer 2: dask config, read here only (user dask YAML, DASK_FLATNORM__CLUSTER__* variables).
    for option, value in dask_cluster.items():
        # dask treats - and _ alike
        put("cluster", str(option).replace("-", "_"), value, _DASK_CONFIG, prefix="flatnorm.")

    # Layer 3: the file (or mapping).
    if not isinstance(data, Mapping):
        raise ConfigError(source, None, f"a config must be a mapping of sections, got {_kind(data)}")
    for section, body in data.items():
        section = str(section)
        if section == _DASK_SECTION:
            dask_keys.update(_dask_section(body, source))
            continue
        if section not in SECTIONS:
            raise ConfigError(source, section, f"unknown section{_closest(section, [*SECTIONS, _DASK_SECTION])}")
        if body is None:  # "solve:" with nothing under it
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(source, section, f"a section must be a mapping of options, got {_kind(body)}")
        for option, value in body.items():
            put(section, str(option), value, source)
    _check_exclusive(values, origin)

    # Layer 4: overrides; a flag replaces what the file says about the same choice.
    given: set[str] = set()
    for key, value in (overrides or {}).items():
        key = str(key)
        section, _, option = key.partition(".")
        if section == _DASK_SECTION and option:
            dask_keys.update(_dask_section({option: value}, overrides_source))
            continue
        if section not in SECTIONS or not option:
            raise ConfigError(overrides_source, key, f"unknown option{_closest(key, list(OPTIONS))}")
        put(section, option, value, overrides_source)
        given.add(key)
    for chosen, dropped in _FLAG_WINS:
        if chosen in given and dropped not in given and _get(values, chosen) is not None:
            section, option = dropped.split(".")
            values[section].pop(option, None)  # back to its default (None)
            origin.pop(dropped, None)
    _check_exclusive(values, origin)
    _check_complete(values, origin)

    return Config(**{name: SECTIONS[name](**values[name]) for name in SECTIONS}, dask=dask_keys)


# The two ways of finding inputs: files below a directory (pattern or manifest), or a butler registry.
_FILE_KEYS = ("input.root", "input.pattern", "input.manifest")
_BUTLER_KEYS = ("input.butler", "input.collections", "input.where")

#: (set by an override, reset to its default unless also overridden): a flag replaces the file's choice.
_FLAG_WINS = (("input.pattern", "input.manifest"), ("input.manifest", "input.pattern"),
              ("solve.iterations", "solve.tol"),
              ("output.append", "output.store"), ("output.store", "output.append"),
              ("output.append", "output.overwrite"),
              *(("input.butler", key) for key in _FILE_KEYS),
              *((key, other) for key in _FILE_KEYS for other in _BUTLER_KEYS))


def _get(values: dict[str, dict[str, Any]], key: str) -> Any:
    section, option = key.split(".")
    return values[section].get(option)


def _check_exclusive(values: dict[str, dict[str, Any]], origin: dict[str, str]) -> None:
    inp = values["input"]
    if inp.get("pattern") is not None and inp.get("manifest") is not None:
        raise ConfigError(origin["input.manifest"], "input.manifest",
                          f"cannot be combined with input.pattern (set in {origin['input.pattern']}); "
                          f"give one way of finding the files")
    out = values["output"]
    if out.get("append") is not None:
        for key in ("output.store", "output.overwrite"):
            if _get(values, key):
                raise ConfigError(origin[key], key, f"cannot be combined with output.append (set in "
                                  f"{origin['output.append']}): an append writes to the store it appends to")
    if inp.get("butler") is not None:
        for key in _FILE_KEYS:
            if _get(values, key) is not None:
                raise ConfigError(origin[key], key, f"cannot be combined with input.butler (set in "
                                  f"{origin['input.butler']}); give one way of finding the files")


def _check_complete(values: dict[str, dict[str, Any]], origin: dict[str, str]) -> None:
    """Options that need one another, checked once every layer is applied."""
    inp, out = values["input"], values["output"]
    if inp.get("butler") is not None and not inp.get("collections"):
        raise ConfigError(origin["input.butler"], "input.collections",
                          f"required with input.butler: the collections to search "
                          f"({OPTIONS['input.collections'].flag})")
    if inp.get("butler") is None:
        for key in ("input.collections", "input.where"):
            if _get(values, key) is not None:
                raise ConfigError(origin[key], key, "only applies to a butler repository (input.butler)")
    if (out.get("butler") is None) != (out.get("run") is None):
        given, missing = ("output.butler", "output.run") if out.get("butler") is not None else \
            ("output.run", "output.butler")
        raise ConfigError(origin[given], missing, f"required with {given}: output.butler is the repository "
                          "and output.run the new RUN collection the scales are put into")
    if inp.get("select") is not None and inp.get("butler") is None and inp.get("manifest") is None:
        raise ConfigError(origin["input.select"], "input.select",
                          "needs the exposures' records: a butler (input.butler) or a manifest with a column of "
                          "that name (input.manifest); a pattern gives no such field")
    if out.get("butler") is None and out.get("dataset_type", SCALES_DATASET_TYPE) != SCALES_DATASET_TYPE:
        raise ConfigError(origin["output.dataset_type"], "output.dataset_type",
                          "only applies to a butler repository (output.butler)")
    if out.get("butler") is not None and inp.get("butler") is None and inp.get("instrument") is None:
        raise ConfigError(origin["output.butler"], "input.instrument",
                          "required with output.butler when the inputs are files, not a butler: the "
                          "instrument of the output data ids (e.g. LSSTCam)")


def _dask_section(body: Any, source: str) -> dict[str, Any]:
    """Flatten a ``dask`` section to dotted leaf keys, so ``dask.config.set`` merges instead of replacing."""
    if body is None:
        return {}
    if not isinstance(body, Mapping):
        raise ConfigError(source, _DASK_SECTION, f"must be a mapping of dask config keys, got {_kind(body)}")
    flat: dict[str, Any] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) and value:
                walk(value, dotted)
            else:
                flat[dotted] = value

    walk(body, "")
    for dotted in flat:
        if dotted.split(".")[0] == "flatnorm":
            raise ConfigError(source, f"{_DASK_SECTION}.{dotted}",
                              "flatnorm's own settings belong in their sections (e.g. cluster:), not under dask:")
    return flat


def _names(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def _suggest(section: str, option: str) -> str:
    """Hint for an unknown option: the same name in another section, else the closest name in this one."""
    for other in SECTIONS:
        if other != section and f"{other}.{option}" in OPTIONS:
            return f"; did you mean {other}.{option}?"
    hint = difflib.get_close_matches(option, _names(section), n=1, cutoff=0.6)
    if hint:
        return f"; did you mean {section}.{hint[0]}?"
    return f" (valid: {', '.join(_names(section))})"


def _closest(name: str, valid: list[str]) -> str:
    hint = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean {hint[0]}?" if hint else f" (valid: {', '.join(valid)})"


def _kind(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _check(value: Any, rule: Option, key: str, where: str) -> Any:
    """Validate and normalise one value against its rule; raise ConfigError naming ``key`` and ``where``."""
    kind = rule.kind
    if value is None:
        if rule.nullable:
            return None
        raise ConfigError(where, key, "must not be null")
    if kind in ("str", "path", "scheduler"):
        if kind == "path" and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value:
            raise ConfigError(where, key, f"expected a non-empty string, got {_kind(value)} {value!r}")
        if kind == "scheduler":
            return _scheduler(value, key, where)
        return os.path.expanduser(value) if kind == "path" else value
    if kind == "selection":
        if not isinstance(value, str):
            raise ConfigError(where, key, f"expected FIELD=VALUE, got {_kind(value)} {value!r}")
        try:
            field_name, wanted = parse_selection(value)
        except ValueError as err:
            raise ConfigError(where, key, str(err)) from None
        return f"{field_name}={wanted}"
    if kind == "strlist":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ConfigError(where, key, f"expected a list of names (or one comma-separated string), got "
                              f"{_kind(value)} {value!r}")
        items = [v.strip() for v in items if v.strip()]
        if not items:
            raise ConfigError(where, key, f"expected at least one name, got {value!r}")
        return items
    if kind == "choice":
        if isinstance(value, str):
            for choice in rule.choices:
                if value.lower() == choice.lower():
                    return choice  # canonical spelling: DETECTOR/AMP upper, raise/mask lower
        raise ConfigError(where, key, f"must be one of {', '.join(rule.choices)}, got {value!r}")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(where, key, f"expected true or false, got {_kind(value)} {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, key, f"expected an integer, got {_kind(value)} {value!r}")
        if rule.minimum is not None and value < rule.minimum:
            raise ConfigError(where, key, f"must be >= {rule.minimum}, got {value}")
        return int(value)
    if kind == "float":
        number = _number(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(where, key, f"expected a finite number, got {_kind(value)} {value!r}")
        if rule.positive and not number > 0:
            raise ConfigError(where, key, f"must be > 0, got {value!r}")
        return number
    if kind == "memory":
        return _memory(value, key, where)
    raise AssertionError(f"no rule for kind {kind!r}")  # a schema bug, not a user error


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # PyYAML reads 1e-10 (no dot) as a string: accept it as the number it plainly is.
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _scheduler(value: str, key: str, where: str) -> str:
    """A cluster.scheduler value in its canonical spelling (kind names lower case), checked by cluster.py."""
    if value.lower() in SCHEDULER_NAMES:
        value = value.lower()
    try:
        scheduler_kind(value)
    except ValueError as err:
        raise ConfigError(where, key, str(err)) from None
    return value


def _memory(value: Any, key: str, where: str) -> str | int | float:
    """Like distributed's ``memory_limit``: "auto", a size such as "4GiB", bytes, or a fraction in (0, 1]."""
    if isinstance(value, str):
        if value.lower() == "auto":
            return "auto"
        from dask.utils import parse_bytes

        try:
            nbytes = parse_bytes(value)
        except ValueError:
            nbytes = 0
        if nbytes <= 0:
            raise ConfigError(where, key, f"expected 'auto' or a size such as '4GiB', got {value!r}")
        problem = memory_limit_problem(nbytes)
        if problem:
            raise ConfigError(where, key, f"{value}: {problem}")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value):
        if isinstance(value, float) and value > 1:
            raise ConfigError(where, key, f"a float is a fraction of the machine's memory in (0, 1], got {value}")
        problem = memory_limit_problem(value) if isinstance(value, int) and value > 1 else None
        if problem:
            raise ConfigError(where, key, f"{value} bytes: {problem}")
        return value
    raise ConfigError(where, key, f"expected 'auto', a size such as '4GiB' or a positive number, got {value!r}")


# ------------------------------------------------------------------------------ configs/default.yaml

_HEADER = """\
flatnorm-dask: every option, with its default.  This file is the documentation of the options.

Generated from the schema in flatnorm_dask/config.py: edit the schema there, then regenerate it with
  python -m flatnorm_dask.config > configs/default.yaml

A config file may hold any subset of these sections and options; command-line flags override it (flatnorm run \
CONFIG.yaml --level AMP ...).  Unknown names, wrong types and bad values are refused with a one-line message \
naming the file and the option.  Relative paths are relative to the working directory; a leading ~ is \
expanded.  Write numbers with a dot or as plain digits (1.0e-10 or 1e-10 both work)."""

_DASK_DOC = """\
Any dask config keys, set (with dask.config.set) for the duration of the run, nested or dotted, e.g.
  dask:
    distributed.worker.memory.target: 0.7
    array:
      chunk-size: 256MiB"""

_WIDTH = 110


def _comment(text: str, indent: str = "") -> list[str]:
    """``text`` as YAML comment lines: prose wrapped, lines that start with spaces (examples) kept."""
    lines = []
    for paragraph in text.split("\n"):
        if not paragraph:
            lines.append(f"{indent}#")
        elif paragraph.startswith(" "):
            lines.append(f"{indent}# {paragraph}")
        else:
            lines += textwrap.wrap(" ".join(paragraph.split()), _WIDTH - len(indent) - 2,
                                   initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ",
                                   break_long_words=False, break_on_hyphens=False)
    return lines


def render_default_yaml() -> str:
    """The text of ``configs/default.yaml``: every section and option, its documentation and its default."""
    import yaml

    lines = _comment(_HEADER)
    for section, cls in SECTIONS.items():
        lines += ["", *_comment(" ".join((cls.__doc__ or "").split())), f"{section}:"]
        for name in _names(section):
            opt = OPTIONS[f"{section}.{name}"]
            value = yaml.safe_dump({name: opt.default}, default_flow_style=False, width=1000).rstrip("\n")
            lines += [*_comment(opt.doc, "  "), f"  {value}"]
    lines += ["", *_comment(_DASK_DOC), f"{_DASK_SECTION}: {{}}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_default_yaml(), end="")
