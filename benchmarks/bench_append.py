"""An append of a few exposures to a large store against a full run over the same files, measured in one run.

Usage::

    python benchmarks/bench_append.py [--exposures 1000] [--new 10] [--workers 2] [--repeat 1] [--dir DIR]

The campaign is LSSTCam-sized: 189 detectors x 16 amplifiers, one LSST PropertyList file per (detector,
exposure), one physical filter.  Steps, each ``flatnorm run`` a fresh process joining the same 2-worker
LocalCluster (``--scheduler``), so that the cluster's start-up counts in neither:

1. a run over the first ``--exposures`` exposures writes the store;
2. the files of ``--new`` more exposures are written; ``flatnorm run --append`` adds them (timed);
3. ``flatnorm run`` over all the files writes a second store from nothing (timed): the full run the append
   replaces.

With ``--repeat N``, steps 2 (on the store as step 1 left it) and 3 alternate N times; the median times and
phases are printed, the ratio of each repetition (an append and the full run just after it) and their median.

Printed: both wall times and their ratio, each run's phases (:data:`PHASES`, from its log), the iterations of
each solve (``--tol``), and the largest relative difference between the two stores' scales.  Files go under
``--dir`` (default ``/dev/shm``) and are removed after.  Timings on a shared machine vary from run to run:
compare the ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).parent))
import fresh  # noqa: E402

from flatnorm_dask.simulate import SIMPLE_PATTERN, simulate_campaign, write_campaign  # noqa: E402
from flatnorm_dask.store import open_store, remove_store, store_history  # noqa: E402

TOL = 1e-10
#: The command as ``python -m flatnorm_dask.cli`` runs it, with its DEBUG lines, which mark the ends of the
#: phases, each stamped with the machine's monotonic clock (the command's own log says seconds, by the wall
#: clock, which the system may step during a run).
TIMED = """
import logging, sys, time
stamp = logging.getLogRecordFactory()
def stamped(*args, **kwargs):
    record = stamp(*args, **kwargs)
    record.monotonic = time.monotonic()
    return record
logging.setLogRecordFactory(stamped)
logging.basicConfig(level=logging.INFO, format="%(monotonic).3f %(name)s %(levelname)s: %(message)s")
logging.getLogger("flatnorm_dask").setLevel(logging.DEBUG)
from flatnorm_dask.cli import console
console()
"""
#: A run's phases, each ending at the first log line whose message starts with its marker (the last one at the
#: process's end).
PHASES = (("start, imports, cluster", "Dask dashboard"), ("listing (append: and comparison)", "listed "),
          ("layout (append: and links)", "reading "), ("reading (append: and merging)", "solving "),
          ("solve", "solved and written"), ("commit, exit", None))
_LINE = re.compile(r"^(\d+\.\d+) \S+ \w+: (.*)$")


def flatnorm(*args: str) -> tuple[float, list[float]]:
    """Wall seconds of ``flatnorm ARGS`` in a fresh process (which must succeed), and of each of its
    :data:`PHASES`."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", TIMED, *args], capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if out.returncode != 0:
        raise SystemExit(f"flatnorm {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    lines = [(float(m[1]) - start, m[2]) for m in map(_LINE.match, out.stderr.splitlines()) if m]
    ends = [next((t for t, message in lines if message.startswith(marker)), np.nan) if marker else elapsed
            for _, marker in PHASES]
    return elapsed, list(np.diff([0.0, *ends]))


def copy_store(store: Path, into: Path) -> None:
    """Copy a store (its pointer, versions and lock file) into a directory."""
    into.mkdir(exist_ok=True)
    for entry in store.parent.iterdir():
        if entry.name in (store.name, f".{store.name}.versions", f".{store.name}.lock"):
            if entry.is_symlink():
                os.symlink(os.readlink(entry), into / entry.name)
            elif entry.is_dir():
                shutil.copytree(entry, into / entry.name, symlinks=True)
            else:
                shutil.copy(entry, into / entry.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=1000, help="exposures in the store appended to")
    parser.add_argument("--new", type=int, default=10, help="exposures appended")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="append and full run this many times, alternately (medians are printed)")
    fresh.add_arguments(parser)
    args = parser.parse_args()
    from distributed import LocalCluster

    work = fresh.workdir(args.dir)
    try:
        n, new = args.exposures, args.new
        start = time.perf_counter()
        tree = simulate_campaign("lsstcam", n_detectors=189, n_exposures=n + new, filters=("r_57",), seed=1)
        ds = tree["r_57"].to_dataset()
        root = work / "inputs"
        write_campaign(xr.DataTree.from_dict({"r_57": ds.isel(exposure=slice(0, n))}), root, layout="simple")
        print(f"wrote {189 * n:,} files of {n} exposures in {time.perf_counter() - start:.0f} s")
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster:
            common = ["--input", str(root), "--pattern", SIMPLE_PATTERN, "--level", "AMP", "--tol", str(TOL),
                      "--no-progress", "--scheduler", cluster.scheduler_address]
            store, full = work / "appended.zarr", work / "full.zarr"
            first, _ = flatnorm("run", *common, "--output", str(store))
            print(f"first run over {189 * n:,} files: {first:.1f} s")
            write_campaign(xr.DataTree.from_dict({"r_57": ds.isel(exposure=slice(n, n + new))}), root,
                           layout="simple")
            kept = work / "kept"  # the store as the first run left it, to append to again at each repetition
            copy_store(store, kept)
            t_append, p_append, t_full, p_full = [], [], [], []
            for i in range(args.repeat):
                if i:  # the store as it was, the full run's removed
                    remove_store(store)
                    remove_store(full)
                    copy_store(kept / store.name, work)
                for times, phases, target in ((t_append, p_append, ("--append", str(store))),
                                              (t_full, p_full, ("--output", str(full)))):
                    elapsed, each = flatnorm("run", *common, *target)
                    times.append(elapsed)
                    phases.append(each)
        a, f = open_store(store)["r_57"], open_store(full)["r_57"]
        diff = max(float(np.nanmax(np.abs(a[v].values / f[v].values - 1))) for v in ("det_scale", "exp_scale"))
        files = store_history(store)[-1]["files"]
        t_a, t_f = float(np.median(t_append)), float(np.median(t_full))
        print(f"\n{'':34} {'files read':>10} {'wall (s)':>9} {'iterations':>10}")
        print(f"{'append ' + str(new) + ' to ' + str(n) + ' exposures':34} {files['read']:>10,} {t_a:>9.1f} "
              f"{a.attrs['iterations']:>10}")
        print(f"{'full run over ' + str(n + new) + ' exposures':34} {189 * (n + new):>10,} {t_f:>9.1f} "
              f"{f.attrs['iterations']:>10}")
        print(f"\n{'phase (s)':34} {'append':>9} {'full run':>9}")
        for k, (phase, _) in enumerate(PHASES):
            print(f"{phase:34} {np.median([p[k] for p in p_append]):>9.1f} {np.median([p[k] for p in p_full]):>9.1f}")
        ratios = [x / y for x, y in zip(t_append, t_full)]  # each of an append and the full run just after it
        if args.repeat > 1:
            print(f"\nappend / full run, each repetition: {', '.join(f'{r:.2f}' for r in ratios)}")
        ratio = float(np.median(ratios))
        print(f"\nappend / full run: {ratio:.2f} ({1 / ratio:.1f}x faster); largest relative "
              f"difference of G and E between the two stores: {diff:.1e} (tol {TOL:g})")
        print("(wall times of fresh processes on the same cluster; on a shared machine compare the ratio)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
