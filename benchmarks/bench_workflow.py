"""Small runs start fast: ``flatnorm run`` end to end against the serial butler-style way, and where a cluster pays.

Usage::

    python benchmarks/bench_workflow.py [--exposures 100] [--sweep 100 300 600] [--baseline-files 2000] [--dir DIR]

The campaign is 189 detectors x 16 amplifiers x N exposures, one LSST PropertyList file per (detector,
exposure).  Printed, each measured in this run:

1. The baseline: each file read with ``yaml.safe_load`` and the PropertyList constructor (as the butler reads
   them), then the reference's per-row ``np.average`` loop.  Reading every file that way takes minutes, so
   it reads ``--baseline-files`` of them and scales the time per file (``0``: all of them).
2. ``flatnorm run`` as a user runs it, in a fresh process: wall time from start to exit (interpreter start,
   imports, listing, reading, solving, writing, commit), with the default policy (a run this small works in
   its own process), and the speed-up over the baseline (goal: at least 50x at 18,900 files).  The median of
   three runs, after a first that fills Python's bytecode cache as installing a package does (the runs
   ignore PYTHONDONTWRITEBYTECODE).
3. What the command imports: ``python -X importtime`` of ``flatnorm --help`` and of the run.
4. The sweep that chose ``cluster.local_min_files``: for each size, the command in its own process against the
   command starting a 2-worker LocalCluster (``--local-min-files 0``), both end to end.

Files go under ``--dir`` (default ``/dev/shm`` when it exists) and are removed after.  Timings on a shared
machine vary from run to run: compare the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import fresh  # noqa: E402
from bench_solver import loop_baseline  # noqa: E402

from flatnorm_dask.simulate import SIMPLE_PATTERN, simulate_campaign, write_campaign  # noqa: E402


class _PropertyListLoader(yaml.SafeLoader):
    """yaml.safe_load with the PropertyList tag registered, as the LSST butler reads these files."""


_PropertyListLoader.add_constructor(
    "lsst.daf.base.PropertyList", lambda loader, node: loader.construct_sequence(node, deep=True))


def baseline(paths: list[Path], sample: int) -> tuple[float, int]:
    """Seconds for the serial slow way over ``paths`` (reading only), and how many files were really read."""
    chosen = paths if not sample or sample >= len(paths) else paths[:: max(1, len(paths) // sample)][:sample]
    start = time.perf_counter()
    for path in chosen:
        with open(path) as f:
            items = yaml.load(f, Loader=_PropertyListLoader)
        {name: value for name, _, value, _ in items}
    per_file = (time.perf_counter() - start) / len(chosen)
    return per_file * len(paths), len(chosen)


#: Timed runs of the command (the median is reported).
REPEAT = 3

#: The environment of the measured commands: Python's bytecode cache on, as for an installed package (pip
#: compiles it at install), whatever this shell says (PYTHONDONTWRITEBYTECODE would make every run compile
#: the package from source).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def command(root: Path, store: Path, *extra: str, python: tuple[str, ...] = ()) -> tuple[float, str]:
    """Wall time of ``flatnorm run`` in a fresh process, and its stderr."""
    args = [sys.executable, *python, "-m", "flatnorm_dask.cli", "run", "--input", str(root), "--pattern",
            SIMPLE_PATTERN, "--level", "AMP", "--output", str(store), "--overwrite", "--no-progress", *extra]
    start = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, check=False, env=ENV)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"flatnorm run failed:\n{out.stderr[-3000:]}")
    return wall, out.stderr


def imports(stderr: str) -> tuple[float, list[tuple[float, str]]]:
    """Total import time (s) from ``-X importtime`` output, and the slowest top-level imports."""
    top = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if not name.startswith("  ") and cumulative.strip().isdigit():  # a top-level import
                top.append((int(cumulative) / 1e6, name.strip()))
    return sum(t for t, _ in top), sorted(top, reverse=True)[:6]


def write(root: Path, n_exposures: int):
    tree = simulate_campaign("lsstcam", n_detectors=189, n_exposures=n_exposures, filters=("r_57",), seed=0)
    write_campaign(tree, root, layout="simple")
    return tree, sorted(root.rglob("*.yaml"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=100)
    parser.add_argument("--sweep", type=int, nargs="*", default=[100, 300, 600],
                        help="exposures of the campaigns run with and without a cluster (none: skip)")
    parser.add_argument("--baseline-files", type=int, default=2000)
    parser.add_argument("--dir", default=fresh.DEFAULT_DIR)
    args = parser.parse_args()

    work = fresh.workdir(args.dir)
    try:
        tree, paths = write(work / "in", args.exposures)
        print(f"campaign: {len(paths)} files (189 detectors x 16 amps x {args.exposures} exposures) under {work}")
        read_s, n_read = baseline(paths, args.baseline_files)
        ds = tree["r_57"].to_dataset()
        b = ds.amp_value.values.reshape(-1, ds.sizes["exposure"])
        w = ds.amp_count.values.reshape(b.shape)
        start = time.perf_counter()
        loop_baseline(np.where(w > 0, b, np.nan), np.where(w > 0, w, 1.0))
        solve_s = time.perf_counter() - start
        base_s = read_s + solve_s
        print(f"baseline (serial yaml.safe_load + per-row loop): {base_s:.1f} s (read {read_s:.1f} s"
              f"{' extrapolated from ' + str(n_read) + ' files' if n_read < len(paths) else ''}, "
              f"solve {solve_s:.2f} s)")

        # The median of three runs, after one that fills the bytecode cache; imports measured in a run of their
        # own (-X importtime slows the run it reports on).
        command(work / "in", work / "out.zarr")
        walls = sorted(command(work / "in", work / "out.zarr")[0] for _ in range(REPEAT))
        wall = walls[REPEAT // 2]
        _, stderr = command(work / "in", work / "out.zarr", python=("-X", "importtime"))
        total, slowest = imports(stderr)
        path = "in its own process" if "working in this process" in stderr else "on a LocalCluster"
        print(f"flatnorm run end to end ({path}, imports included): {wall:.2f} s (median of "
              f"{', '.join(f'{w:.2f}' for w in walls)}) = {len(paths) / wall:,.0f} files/s"
              f"  -> {base_s / wall:.0f}x the baseline (goal >= 50x)")
        print(f"  imports (a run under -X importtime) {total:.2f} s; slowest: "
              + ", ".join(f"{n} {t:.2f}" for t, n in slowest))
        light = subprocess.run([sys.executable, "-X", "importtime", "-m", "flatnorm_dask.cli", "--help"],
                               capture_output=True, text=True, check=True, env=ENV)
        print(f"  flatnorm --help imports {imports(light.stderr)[0]:.2f} s")
        shutil.rmtree(work / "in")

        if args.sweep:
            print("\nIn its own process or on a fresh 2-worker LocalCluster (--local-min-files 0), end to end:")
            print(f"{'files':>8} {'own process s':>14} {'LocalCluster s':>15} {'cluster / own':>14}")
            for n in args.sweep:
                _, sweep_paths = write(work / f"n{n}", n)
                own, _ = command(work / f"n{n}", work / "own.zarr", "--local-min-files", str(10**9))
                on_cluster, _ = command(work / f"n{n}", work / "cluster.zarr", "--local-min-files", "0",
                                        "--workers", "2")
                print(f"{len(sweep_paths):>8} {own:>14.2f} {on_cluster:>15.2f} {on_cluster / own:>14.2f}", flush=True)
                shutil.rmtree(work / f"n{n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
