"""Campaign scale: parallel efficiency and where the time goes as a campaign grows; filters sharing a cluster.

Usage::

    python benchmarks/bench_campaign.py [--exposures 100 300 1000] [--filter-exposures 100] [--dir DIR]
                                        [--set KEY=VALUE ...]

Part 1 writes 189 detectors x 16 amplifiers x N exposures (one filter, one LSST PropertyList file per
detector and exposure, found by a pattern) and runs ``flatnorm_dask.workflow.run`` on it on a fresh 2-worker
``LocalCluster``, started as ``flatnorm run`` starts one (:func:`flatnorm_dask.cluster.connect`, with the run's
settings: the defaults, or those ``--set`` gives, e.g. ``--set input.batch_size=1000``).  Beside the run's wall
time it prints the ideal, measured in the same process just before: files x the serial per-file read cost (one
``StatsReader`` over a sample of the same files) / workers, and the ratio of the two (goal: at most 2 at 189,000
files).  It also prints where the run's time goes, from
its log: listing the files (discovery), building the reading graph, reading them (with writing the inputs
into the store, which overlaps), checking what was read, solving (with writing the scales and diagnostics)
and the commit; and the cluster's start-up, which is not part of the run.  The CPU columns are the run's CPU
seconds (workers and client, which hosts the scheduler) and their ratio to files x the serial CPU cost per
file: the cost of the machinery whatever else the machine runs (on a shared machine the wall-time ratio also
counts the cores other processes take).

Part 2 runs five filters of M exposures each in one invocation, against the same five filters run one
after the other (each on its own fresh cluster, as five separate commands would), and prints the ratio.

Each measurement runs in a fresh Python process so that peak memory figures are its own. Files are written
under ``--dir`` (default ``/dev/shm`` when it exists, so that the disk does not dominate) and removed after.
Timings on a shared machine vary from run to run: compare the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fresh  # noqa: E402

FILTERS = ("u_24", "g_6", "r_57", "i_39", "z_20")
WORKERS = 2
SAMPLE = 5000  # files read serially to measure the per-file cost
WARM = 100  # files read before, untimed (see _serial_cost)

# Log lines that end each phase of a run (logger, start of the message), in order.
PHASES = (
    ("discovery", "flatnorm_dask.ingest", "listed"),
    ("graph", "flatnorm_dask.workflow", "found"),
    ("reading", "flatnorm_dask.workflow", "checked the reading"),
    ("solving", "flatnorm_dask.workflow", "solved and written"),
    ("commit", None, None),  # until run() returns
)


class _Marks(logging.Handler):
    """Keeps the time of every log record, to cut a run into phases."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.perf_counter(), record.name, record.getMessage()))


def _phases(marks: _Marks, start: float, end: float) -> dict[str, float]:
    out, last = {}, start
    for name, logger, prefix in PHASES:
        if logger is None:
            at = end
        else:
            at = next(t for t, n, m in marks.records if n == logger and m.startswith(prefix))
        out[name], last = at - last, at
    return out


def _serial_cost(spec: dict) -> tuple[float, float]:
    """Seconds per file, wall and CPU, read one after another by one reader, on about SAMPLE of the campaign's
    files (whole exposure directories spread over the campaign: no list of every file is made).

    The reader first reads WARM other files, untimed: what a process pays once (compiling the regex of the
    files' layout, about 50 ms) is no part of the cost per file, and would add 10 us a file to SAMPLE files."""
    from flatnorm_dask.formats import StatsReader

    exposures = sorted(Path(spec["root"], "r_57").iterdir())
    take = exposures[:: max(1, len(exposures) * 189 // SAMPLE)]
    sample = [path for directory in take for path in sorted(directory.iterdir())][:SAMPLE]
    reader = StatsReader()
    timed = set(sample)
    for path in [path for path in sorted(exposures[-1].iterdir()) if path not in timed][:WARM]:
        reader.read(path)
    wall, cpu = time.perf_counter(), time.process_time()
    for path in sample:
        reader.read(path)
    return (time.perf_counter() - wall) / len(sample), (time.process_time() - cpu) / len(sample)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(spec: dict) -> dict:
    """Runs in a fresh process: one workflow run on a fresh 2-worker cluster, started as ``flatnorm run`` starts
    its LocalCluster (:func:`flatnorm_dask.cluster.connect`); returns the figures."""
    import dask
    import distributed  # noqa: F401  its config defaults, before a key of its section is set

    from flatnorm_dask.cluster import connect
    from flatnorm_dask.config import load_config
    from flatnorm_dask.workflow import run

    per_file, cpu_per_file = _serial_cost(spec) if spec.get("root") else (None, None)
    marks = _Marks()
    for name in ("flatnorm_dask.ingest", "flatnorm_dask.workflow"):
        logging.getLogger(name).addHandler(marks)
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    where = ({"input.root": spec["root"], "input.pattern": spec["pattern"]} if spec.get("root")
             else {"input.manifest": spec["manifest"]})
    cfg = load_config(None, {**where, "output.store": spec["store"], "solve.level": "AMP", "output.overwrite": True,
                             "cluster.n_workers": WORKERS, "cluster.threads_per_worker": 1, **spec["overrides"]})
    start = time.perf_counter()
    # The run's dask section for the run, as flatnorm run sets it.
    settings = {"distributed.scheduler.dashboard.address": ":0", **cfg.dask_settings()}
    with dask.config.set(settings), connect(cfg.cluster) as client:
        startup = time.perf_counter() - start
        cpu0 = sum(client.run(_cpu_seconds).values()) + _cpu_seconds()
        t0 = time.perf_counter()
        summary = run(cfg, show_progress=False)
        t1 = time.perf_counter()
        cpu = sum(client.run(_cpu_seconds).values()) + _cpu_seconds() - cpu0
        workers = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return {"wall": t1 - t0, "startup": startup, "filters": len(summary.filters), "per_file": per_file,
            "cpu_per_file": cpu_per_file, "cpu": cpu, "phases": _phases(marks, t0, t1),
            "client_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mb": max(workers.values()) / 1024}


def _overrides(pairs: list[str]) -> dict:
    """``KEY=VALUE`` texts as config overrides (values read as YAML), checked now rather than in every child."""
    import yaml

    from flatnorm_dask.config import load_config

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    load_config(None, overrides)
    return overrides


def measure(store: Path, overrides: dict, **spec) -> dict:
    result = fresh.measure(__file__, {"store": str(store), "overrides": overrides, **spec})
    from flatnorm_dask.store import remove_store

    remove_store(store)  # the store is a link to its version: rmtree would leave the data
    return result


def write_inputs(root: Path, n_exposures: int, filters: tuple[str, ...], seed: int) -> tuple[Path, int]:
    from flatnorm_dask.simulate import simulate_campaign, write_campaign

    tree = simulate_campaign("lsstcam", n_exposures=n_exposures, filters=filters, seed=seed)
    manifest = write_campaign(tree, root, layout="simple")
    with open(manifest) as f:
        return manifest, sum(1 for _ in f) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--filter-exposures", type=int, default=100, help="exposures per filter in part 2 (0: skip)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run setting for every measurement, as a flag of flatnorm run would set it (e.g. "
                             "input.batch_size=1000, cluster.diagnostics=true: YAML values)")
    fresh.add_arguments(parser)
    args = parser.parse_args()
    if fresh.serve(args.child, _child):
        return

    from flatnorm_dask.simulate import SIMPLE_PATTERN

    overrides = _overrides(args.set)
    work = fresh.workdir(args.dir)
    try:
        print(f"files under {work}; {WORKERS}-worker LocalCluster (as flatnorm run starts it), 1 thread each, fresh "
              f"per run; level AMP; files found by a pattern scan; settings {overrides or 'the defaults'}")
        print("\nPart 1: one filter, 189 detectors x 16 amps x N exposures.  ideal = files x serial read cost per "
              f"file / {WORKERS} workers; ratio = run / ideal (goal <= 2 at 189,000 files)")
        print(f"{'files':>8} {'us/file':>8} {'ideal s':>8} {'run s':>7} {'ratio':>6} | {'listing':>7} {'graph':>6} "
              f"{'reading':>7} {'solving':>7} {'commit':>6} | {'CPU s':>6} {'CPU ratio':>9} | {'start s':>7} "
              f"{'client MB':>9} {'worker MB':>9}")
        for n in args.exposures:
            inputs = work / f"n{n}"
            _, n_files = write_inputs(inputs, n, ("r_57",), seed=n)
            r = measure(work / "store.zarr", overrides, root=str(inputs), pattern=SIMPLE_PATTERN)
            ideal = n_files * r["per_file"] / WORKERS
            p = r["phases"]
            print(f"{n_files:>8} {r['per_file'] * 1e6:>8.1f} {ideal:>8.2f} {r['wall']:>7.2f} "
                  f"{r['wall'] / ideal:>6.2f} | "
                  f"{p['discovery']:>7.2f} {p['graph']:>6.2f} {p['reading']:>7.2f} {p['solving']:>7.2f} "
                  f"{p['commit']:>6.2f} | {r['cpu']:>6.1f} {r['cpu'] / (n_files * r['cpu_per_file']):>9.2f} | "
                  f"{r['startup']:>7.2f} {r['client_peak_mb']:>9.0f} {r['worker_peak_mb']:>9.0f}", flush=True)
            shutil.rmtree(inputs)

        m = args.filter_exposures
        if not m:
            return
        import pandas as pd

        print(f"\nPart 2: {len(FILTERS)} filters x {m} exposures x 189 detectors in one run vs one by one")
        inputs = work / "filters"
        manifest, n_files = write_inputs(inputs, m, FILTERS, seed=1)
        together = measure(work / "store.zarr", overrides, manifest=str(manifest))
        table = pd.read_csv(manifest)
        alone = []
        for name in FILTERS:
            sub = inputs / f"manifest_{name}.csv"
            table[table["physical_filter"] == name].to_csv(sub, index=False)
            alone.append(measure(work / "store.zarr", overrides, manifest=str(sub)))
        serial = sum(r["wall"] for r in alone)
        serial_with_startup = sum(r["wall"] + r["startup"] for r in alone)
        print(f"  together: {together['wall']:.1f} s for {n_files} files ({n_files / together['wall']:.0f} files/s), "
              f"worker peak {together['worker_peak_mb']:.0f} MB")
        print(f"  one by one: {serial:.1f} s (+ {serial_with_startup - serial:.1f} s of cluster start-ups)")
        print(f"  ratio one-by-one / together: {serial / together['wall']:.2f}x "
              f"({serial_with_startup / (together['wall'] + together['startup']):.2f}x counting start-ups)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
