"""``flatnorm``: thin commands over the workflow, the store and the simulator.

Every failure ends in one line on stderr (``flatnorm: error: ...``) and a non-zero exit status; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from ._text import one_line

__all__ = ["console", "main"]

log = logging.getLogger("flatnorm_dask")


def _add_run_options(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """The config argument and one flag per option of the schema (name, help, metavar from its Option).

    Flags store their text; :func:`_overrides` turns it into values and :func:`load_config` validates them,
    so a bad value is one line naming the option.  ``defaults`` are this command's own (shown in the help).
    """
    from .config import EXCLUSIVE_FLAGS, OPTIONS, SECTIONS

    parser.add_argument("config", nargs="?", help="YAML config (see configs/default.yaml); flags override it")
    groups = {section: parser.add_argument_group(section, " ".join((cls.__doc__ or "").split(".")[0].split()))
              for section, cls in SECTIONS.items()}
    exclusive = {}
    for keys in EXCLUSIVE_FLAGS:
        group = groups[keys[0].split(".")[0]].add_mutually_exclusive_group()
        exclusive.update(dict.fromkeys(keys, group))
    for key, opt in OPTIONS.items():
        if key in defaults:
            opt = dataclasses.replace(opt, default=defaults[key])
        group = exclusive.get(key) or groups[key.split(".")[0]]
        help_text = opt.help.replace("%", "%%")  # argparse formats help with %
        if opt.kind == "bool":
            group.add_argument(opt.flag, dest=key, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(opt.flag, dest=key, metavar=opt.cli_metavar, help=help_text)
    parser.set_defaults(**defaults)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(args: argparse.Namespace) -> dict:
    """The flags given (and the command's own defaults), as dotted config keys and values."""
    from .config import OPTIONS

    return {key: OPTIONS[key].from_text(value) if isinstance(value, str) else value
            for key, value in vars(args).items() if key in OPTIONS and value is not None}


def config_from_args(args: argparse.Namespace, base: dict | None = None):
    """The run's :class:`~flatnorm_dask.config.Config`: the config file, then ``base``, then the flags."""
    from .config import load_config

    return load_config(args.config, {**(base or {}), **_overrides(args)}, overrides_source="command line")


def _quieten(debug: bool) -> None:
    """Keep Dask's own INFO chatter (worker start/stop, comm closing at shutdown) out of the user's log."""
    import distributed  # noqa: F401  its import sets its loggers' levels: adjust them afterwards

    for noisy in ("distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(logging.INFO if debug else logging.ERROR)


@contextlib.contextmanager
def _connect(cfg) -> Iterator[Any]:
    """The run's cluster (:func:`flatnorm_dask.cluster.connect`), once the workflow decides it needs one:
    a small run never imports distributed."""
    import dask

    from .cluster import connect

    _quieten(log.isEnabledFor(logging.DEBUG))
    # Set once distributed is imported: a key set under "distributed" before its import would take the whole
    # section, defaults included, away again when the setting ends, should anything import it meanwhile
    # (dask's rechunk does).  The worker processes of a cluster started here leave Ctrl-C to this process
    # (see dask_setup).
    preload = dask.config.get("distributed.worker.preload", default=None) or []
    with dask.config.set({"distributed.worker.preload": [*preload, _WORKER_PRELOAD]}), connect(cfg.cluster) as client:
        yield client


def _execute(cfg, show_progress: bool):
    import dask

    from .workflow import run

    with dask.config.set(cfg.dask_settings()):  # the user's dask keys (jobqueue.*, distributed.*) for the run
        return run(cfg, show_progress=show_progress, cluster=lambda: _connect(cfg))


#: This module, as the worker preload of the clusters the command starts (its name even under ``python -m``).
_WORKER_PRELOAD = "flatnorm_dask.cli"


def dask_setup(worker: Any) -> None:
    """Worker preload (``distributed.worker.preload``) of the clusters a command starts: ignore SIGINT.

    Ctrl-C in a terminal reaches every process of the foreground group.  The command handles it: it removes
    its staging directory and closes the cluster, workers included.  A worker that handled it too would end
    with a KeyboardInterrupt traceback of its own.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = _execute(cfg, not args.no_progress)
    print(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .schema import SCALES_DATASET_TYPE
    from .simulate import BUTLER_PATTERN, simulate_campaign, write_campaign

    workdir = Path(args.workdir)
    inputs = workdir / "inputs"
    if not (inputs / "manifest.csv").exists() or args.fresh:
        log.info("simulating %d detectors x %d exposures x %d filters in %s", args.detectors, args.exposures,
                 len(args.filters), inputs)
        tree = simulate_campaign("lsstcam", n_detectors=args.detectors, n_exposures=args.exposures,
                                 filters=args.filters, seed=args.seed)
        write_campaign(tree, inputs, layout="butler")
    cfg = config_from_args(args, {
        "input.root": str(inputs), "input.pattern": BUTLER_PATTERN, "input.camera": "lsstcam",
        "output.store": str(workdir / "scales.zarr"), "output.overwrite": True,
        "output.scales_yaml": str(workdir / SCALES_DATASET_TYPE)})
    summary = _execute(cfg, not args.no_progress)
    print(summary)
    return 0


def cmd_job_script(args: argparse.Namespace) -> int:
    import dask

    from .cluster import job_script

    cfg = config_from_args(args)
    _quieten(log.isEnabledFor(logging.DEBUG))
    with dask.config.set(cfg.dask_settings()):
        print(job_script(cfg.cluster))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import simulate_campaign, write_campaign

    tree = simulate_campaign(args.camera, n_detectors=args.detectors, n_exposures=args.exposures,
                             filters=args.filters, seed=args.seed)
    manifest = write_campaign(tree, args.outdir, layout=args.layout, style=args.style)
    print(f"wrote {sum(1 for _ in open(manifest)) - 1} files; manifest {manifest}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .store import store_summary

    print(store_summary(args.store))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .store import write_scales_yaml

    for path in write_scales_yaml(args.store, args.output, args.filter):
        print(path)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_store

    for path in plot_store(args.store, args.out):
        print(path)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, comparison_summary

    stores = [args.reference, *args.others]
    tree = compare(*stores, threshold=args.threshold)
    print(comparison_summary(tree))
    if not tree.children:
        raise ValueError(f"{', '.join(map(str, stores))}: these stores share no physical filter at the same level: "
                         f"nothing to compare")
    if args.out:
        from .plot import plot_comparison
        from .store import write_store

        out = Path(args.out)
        target = out / "comparison.zarr"
        if any(target.resolve() == Path(store).resolve() for store in stores):
            raise ValueError(f"{target}: is one of the stores compared; choose another --out")
        print(write_store(target, tree, root_attrs=tree.attrs, overwrite=True))
        for path in plot_comparison(tree, out):
            print(path)
    return 0


def _lsstcam_filter(name: str) -> str:
    # Checked when given, not listed as argparse choices: listing them would import the simulator (xarray,
    # pandas) for every command, --help included.
    from .simulate import LSSTCAM_FILTERS

    if name not in LSSTCAM_FILTERS:
        raise argparse.ArgumentTypeError(f"unknown LSSTCam filter {name!r} (choose from {', '.join(LSSTCAM_FILTERS)})")
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatnorm", description="Flat-field normalisation scales on Dask.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="statistics files -> Zarr store of scales")
    _add_run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="simulate a small LSSTCam campaign, run it, print a summary",
                       description="Inputs, store and scales YAML go below --workdir unless flags say otherwise.")
    _add_run_options(p, **{"solve.level": "AMP"})
    p.add_argument("--workdir", default="flatnorm-demo", help="where inputs and outputs go (default ./flatnorm-demo)")
    p.add_argument("--detectors", type=int, default=189)
    p.add_argument("--exposures", type=int, default=10)
    p.add_argument("--filters", nargs="+", default=["g_6", "r_57"], type=_lsstcam_filter, metavar="FILTER",
                   help="LSSTCam physical filters (default: g_6 r_57)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="simulate again even if inputs exist")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("job-script", help="print the batch script a job-queue run (--scheduler slurm, pbs, "
                       "...) would submit, from the same config and flags")
    _add_run_options(p)
    p.set_defaults(func=cmd_job_script)

    p = sub.add_parser("simulate", help="write a simulated campaign of statistics files")
    p.add_argument("outdir")
    p.add_argument("--camera", default="lsstcam")
    p.add_argument("--detectors", type=int, default=None, help="first N detectors (default all)")
    p.add_argument("--exposures", type=int, default=20)
    p.add_argument("--filters", nargs="+", default=["g_6", "r_57"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["butler", "simple"], default="butler")
    p.add_argument("--style", choices=["block", "flow"], default="block")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("info", help="what is in a store")
    p.add_argument("store")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="store -> one scales YAML file per physical_filter, as the flat "
                       "combination reads it",
                       description="Each file holds exactly what one scales dataset of the stock LSST pipelines "
                       "holds (expScale, detScale); exposures without a usable cell are left out of expScale "
                       "(flatnorm info lists them).")
    p.add_argument("store")
    p.add_argument("--output", "-o", required=True, metavar="DIR|FILE.yaml",
                   help="a directory that gets PHYSICAL_FILTER.yaml per filter, or a .yaml file for one filter "
                   "(--filter, or a store of one filter)")
    p.add_argument("--filter", action="append", metavar="PHYSICAL_FILTER",
                   help="only this filter (repeatable); default every filter of the store")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="store -> PNG figures for every filter")
    p.add_argument("store")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.set_defaults(func=cmd_plot)

    from .compare import DEFAULT_THRESHOLD

    p = sub.add_parser("compare", help="which detectors' or amplifiers' G moved between stores",
                       description="Compare the scales G of two or more stores (the first is the reference), per "
                       "physical filter and row. Exposure scales are not compared: each campaign's E is its own "
                       "lamp level.")
    p.add_argument("reference", metavar="A", help="the reference store")
    p.add_argument("others", nargs="+", metavar="B", help="stores compared with it")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="K",
                   help=f"flag rows whose G moved by more than K sigma (default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--out", metavar="DIR", help="write the comparison (DIR/comparison.zarr) and its figures here")
    p.set_defaults(func=cmd_compare)
    return parser


def _choose_scheduler(args: argparse.Namespace, scheduler: str) -> None:
    from .config import OPTIONS

    flag = OPTIONS["cluster.scheduler"].flag
    if not hasattr(args, "cluster.scheduler"):
        raise ValueError(f"the {args.command} command runs no cluster")
    if getattr(args, "cluster.scheduler") is not None:
        raise ValueError(f"{flag} {getattr(args, 'cluster.scheduler')}: this script runs on {scheduler} and "
                         f"chooses the cluster itself; leave out {flag} (or use flatnorm run {flag} ...)")
    setattr(args, "cluster.scheduler", scheduler)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt, so that every clean-up that runs for one runs for both."""


#: Exit status and message of a run stopped by a signal (128 + the signal's number, as a shell reports it).
_STOPPED = {signal.SIGINT: (128 + signal.SIGINT, "interrupted (SIGINT)"),
            signal.SIGTERM: (128 + signal.SIGTERM, "terminated (SIGTERM)")}


def _stop(signum: int, frame: Any) -> None:
    """First SIGINT or SIGTERM: stop the run with an exception, so that the store's staging directory is removed
    and the cluster closed on the way out.  Later ones are ignored while that clean-up runs (it is bounded)."""
    for sig in _STOPPED:
        signal.signal(sig, signal.SIG_IGN)
    # distributed's cancelled gathers and closing comms report themselves through these loggers: not news.
    for noisy in ("asyncio", "distributed", "tornado"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _signals_stop_the_run() -> Iterator[None]:
    """SIGINT and SIGTERM raise in the main thread while the command runs (not in a thread, where Python
    cannot install handlers; an ignored SIGINT, as for a background job, stays ignored)."""
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread
        for sig in _STOPPED:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None, *, scheduler: str | None = None) -> int:
    """The ``flatnorm`` command; returns its exit status.

    ``scheduler`` is for the ``workflows/`` scripts, which choose the cluster themselves: it becomes
    ``cluster.scheduler``, and a ``--scheduler`` flag in ``argv`` is refused rather than silently replaced.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    if args.debug:
        log.setLevel(logging.DEBUG)
    try:
        with _signals_stop_the_run():
            if scheduler is not None:
                _choose_scheduler(args, scheduler)
            return args.func(args)
    except KeyboardInterrupt as err:
        status, what = _STOPPED[signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT]
        print(f"flatnorm: {what}", file=sys.stderr)
        return status
    except Exception as err:  # one line for the user; the traceback only on request
        if args.debug:
            raise
        print(f"flatnorm: error: {_error_text(err)}", file=sys.stderr)
        return 1


def _error_text(err: Exception) -> str:
    """The error line's text: the message, or, for an error without a sentence to say (an ``AssertionError``
    from a library, a bare ``KeyError('x')``), its type and where to look."""
    text = one_line(err)
    if " " in text:
        return text
    name = type(err).__name__
    detail = f"{name}: {text}" if text != name else name
    return f"{detail} (unexpected, without an explanation: --debug shows where it happened)"


def console(argv: list[str] | None = None, *, scheduler: str | None = None) -> NoReturn:
    """The ``flatnorm`` console script, ``python -m flatnorm_dask.cli`` and the ``workflows/`` scripts:
    :func:`main` (on the process's command line unless ``argv`` is given), then the process ends with its
    status.

    Before it ends, every object is frozen out of the garbage collector (``gc.freeze``): the interpreter's
    last collection would otherwise walk all the objects of the libraries a run imports (xarray, zarr, dask,
    distributed), about 0.3 s of every command, to free memory the process is giving back anyway.  Exit
    handlers still run and the standard streams are still flushed; the command's own files are closed by then.
    """
    status = main(argv, scheduler=scheduler)
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    console()
