"""``flatnorm``: thin commands over the workflow, the store and the simulator.

Every failure ends in one line on stderr (``flatnorm: error: ...``) and a non-zero exit status; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ._text import one_line
from .schema import LEVELS, ON_ERROR

__all__ = ["main"]

log = logging.getLogger("flatnorm_dask")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (see configs/default.yaml); flags override it")
    src = parser.add_argument_group("input")
    src.add_argument("--input", dest="input.root", metavar="DIR", help="directory holding the statistics files")
    src.add_argument("--pattern", dest="input.pattern", help="file pattern below DIR with {fields}")
    src.add_argument("--manifest", dest="input.manifest", metavar="FILE", help="CSV/Parquet: path,exposure,detector[,physical_filter]")
    src.add_argument("--camera", dest="input.camera", help="camera name (lsstcam, testcam) or camera CSV")
    src.add_argument("--on-error", dest="input.on_error", choices=ON_ERROR, help="bad input: stop, or mask and record")
    src.add_argument("--batch-size", dest="input.batch_size", type=int, metavar="N", help="files per Dask task")
    src.add_argument("--butler", dest="input.butler", metavar="REPO",
                     help="LSST butler repository whose registry lists the inputs (instead of --input/--manifest)")
    src.add_argument("--collections", dest="input.collections", metavar="C[,C2]",
                     help="butler collections searched in order (first dataset of a data id wins)")
    src.add_argument("--dataset-type", dest="input.dataset_type", metavar="NAME", help="default flatStats")
    src.add_argument("--where", dest="input.where", metavar="EXPR", help="butler query expression")
    src.add_argument("--instrument", dest="input.instrument", metavar="NAME",
                     help="instrument (e.g. LSSTCam): restricts --butler; needed for --output-butler with files")
    fit = parser.add_argument_group("solve")
    fit.add_argument("--level", dest="solve.level", type=str.upper, choices=LEVELS)
    how = fit.add_mutually_exclusive_group()
    how.add_argument("--iterations", dest="solve.iterations", type=int, metavar="N", help="fixed iteration count")
    how.add_argument("--tol", dest="solve.tol", type=float, metavar="T", help="iterate until max |change of log G| < T")
    fit.add_argument("--max-iter", dest="solve.max_iter", type=int, metavar="N", help="iteration limit with --tol")
    fit.add_argument("--clip-sigma", dest="solve.clip_sigma", type=float, metavar="K",
                     help="robust fit: reject cells beyond K robust sigmas and refit")
    fit.add_argument("--clip-rounds", dest="solve.clip_rounds", type=int, metavar="N", help="most rejection rounds")
    out = parser.add_argument_group("output")
    out.add_argument("--output", dest="output.store", metavar="STORE.zarr", help="Zarr store to write")
    out.add_argument("--scales-yaml", dest="output.scales_yaml", metavar="FILE", help="also export cpFlatNormScales YAML")
    out.add_argument("--overwrite", dest="output.overwrite", action="store_true", default=None, help="replace an existing store")
    out.add_argument("--output-butler", dest="output.butler", metavar="REPO",
                     help="also put cpFlatNormScales per physical_filter into this butler repository")
    out.add_argument("--output-run", dest="output.run", metavar="RUN", help="RUN collection for --output-butler")
    clu = parser.add_argument_group("cluster")
    clu.add_argument("--scheduler", dest="cluster.scheduler", metavar="ADDRESS",
                     help="running scheduler address, scheduler file, or slurm/pbs/... (dask-jobqueue); default: local")
    clu.add_argument("--workers", dest="cluster.n_workers", type=int, metavar="N", help="worker processes (or jobs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if "." in k and v is not None}


def _quieten(debug: bool) -> None:
    """Keep Dask's own INFO chatter (worker start/stop, comm closing at shutdown) out of the user's log."""
    import distributed  # noqa: F401  its import sets its loggers' levels: adjust them afterwards

    for noisy in ("distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(logging.INFO if debug else logging.ERROR)


def _execute(cfg, show_progress: bool):
    import dask

    from .cluster import connect
    from .workflow import run

    _quieten(log.isEnabledFor(logging.DEBUG))
    with dask.config.set(cfg.dask_settings()):
        return run(cfg, show_progress=show_progress, cluster=connect)


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, _overrides(args))
    summary = _execute(cfg, not args.no_progress)
    print(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import load_config
    from .simulate import BUTLER_PATTERN, simulate_campaign, write_campaign

    workdir = Path(args.workdir)
    inputs = workdir / "inputs"
    if not (inputs / "manifest.csv").exists() or args.fresh:
        log.info("simulating %d detectors x %d exposures x %d filters in %s", args.detectors, args.exposures,
                 len(args.filters), inputs)
        tree = simulate_campaign("lsstcam", n_detectors=args.detectors, n_exposures=args.exposures,
                                 filters=args.filters, seed=args.seed)
        write_campaign(tree, inputs, layout="butler")
    cfg = load_config(args.config, {
        "input.root": str(inputs), "input.pattern": BUTLER_PATTERN, "input.camera": "lsstcam",
        "output.store": str(workdir / "scales.zarr"), "output.overwrite": True,
        "output.scales_yaml": str(workdir / "cpFlatNormScales.yaml"), **_overrides(args)})
    summary = _execute(cfg, not args.no_progress)
    print(summary)
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

    print(write_scales_yaml(args.store, args.output))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_store

    for path in plot_store(args.store, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .simulate import LSSTCAM_FILTERS

    parser = argparse.ArgumentParser(prog="flatnorm", description="Flat-field normalisation scales on Dask.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="statistics files -> Zarr store of scales")
    _add_run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="simulate a small LSSTCam campaign, run it, print a summary")
    _add_run_options(p)
    p.add_argument("--workdir", default="flatnorm-demo", help="where inputs and outputs go (default ./flatnorm-demo)")
    p.add_argument("--detectors", type=int, default=189)
    p.add_argument("--exposures", type=int, default=10)
    p.add_argument("--filters", nargs="+", default=["g_6", "r_57"], choices=LSSTCAM_FILTERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="simulate again even if inputs exist")
    p.set_defaults(func=cmd_demo, **{"solve.level": "AMP"})

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

    p = sub.add_parser("export", help="store -> cpFlatNormScales YAML")
    p.add_argument("store")
    p.add_argument("--output", "-o", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="store -> PNG figures for every filter")
    p.add_argument("store")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    if args.debug:
        log.setLevel(logging.DEBUG)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("flatnorm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback only on request
        if args.debug:
            raise
        print(f"flatnorm: error: {one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
