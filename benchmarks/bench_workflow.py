"""End to end: files -> Zarr store on a 2-worker LocalCluster, against the serial reference way, in one run.

Usage::

    python benchmarks/bench_workflow.py [--exposures 100] [--detectors 189] [--baseline-files 2000]

The campaign is 189 detectors x 16 amplifiers x N exposures, one LSST PropertyList file per (detector,
exposure).  The baseline reads each file with ``yaml.safe_load`` (as the butler does) and solves with the
reference's per-row ``np.average`` loop.  Reading every file the slow way takes minutes, so by default it reads
``--baseline-files`` of them and scales the time per file (``--baseline-files 0``: all of them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_solver import loop_baseline  # noqa: E402

from flatnorm_dask.config import load_config  # noqa: E402
from flatnorm_dask.simulate import SIMPLE_PATTERN, simulate_campaign, write_campaign  # noqa: E402


class _PropertyListLoader(yaml.SafeLoader):
    """yaml.safe_load with the PropertyList tag registered, as the LSST butler reads these files."""


_PropertyListLoader.add_constructor(
    "lsst.daf.base.PropertyList", lambda loader, node: loader.construct_sequence(node, deep=True))


def baseline(paths: list[Path], sample: int) -> tuple[float, int]:
    """Seconds for the serial slow way over ``paths`` (read + solve), and how many files were really read."""
    chosen = paths if not sample or sample >= len(paths) else paths[:: max(1, len(paths) // sample)][:sample]
    start = time.perf_counter()
    for path in chosen:
        with open(path) as f:
            items = yaml.load(f, Loader=_PropertyListLoader)
        {name: value for name, _, value, _ in items}
    per_file = (time.perf_counter() - start) / len(chosen)
    return per_file * len(paths), len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=100)
    parser.add_argument("--detectors", type=int, default=189)
    parser.add_argument("--baseline-files", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import dask
    from distributed import Client, LocalCluster

    from flatnorm_dask.workflow import run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = simulate_campaign("lsstcam", n_detectors=args.detectors, n_exposures=args.exposures,
                                 filters=("r_57",), seed=0)
        start = time.perf_counter()
        write_campaign(tree, tmp / "in", layout="simple")
        paths = sorted((tmp / "in").rglob("*.yaml"))
        print(f"campaign: {len(paths)} files written in {time.perf_counter() - start:.1f} s")

        read_s, n_read = baseline(paths, args.baseline_files)
        ds = tree["r_57"].to_dataset()
        b = ds.amp_value.values.reshape(-1, ds.sizes["exposure"])
        w = ds.amp_count.values.reshape(b.shape)
        start = time.perf_counter()
        loop_baseline(np.where(w > 0, b, np.nan), np.where(w > 0, w, 1.0))
        solve_s = time.perf_counter() - start
        base_s = read_s + solve_s
        print(f"baseline (serial yaml.safe_load + per-row loop): {base_s:.1f} s "
              f"(read {read_s:.1f} s{' extrapolated from ' + str(n_read) + ' files' if n_read < len(paths) else ''}, "
              f"solve {solve_s:.2f} s)")

        cfg = load_config(None, {"input.root": str(tmp / "in"), "input.pattern": SIMPLE_PATTERN,
                                 "solve.level": "AMP", "output.store": str(tmp / "out.zarr")})
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster, \
                Client(cluster), dask.config.set(cfg.dask_settings()):
            start = time.perf_counter()
            run(cfg, show_progress=False)
            ours = time.perf_counter() - start
        print(f"flatnorm-dask on a {args.workers}-worker LocalCluster (read + solve + write store): {ours:.1f} s "
              f"= {len(paths) / ours:,.0f} files/s")
        print(f"speed-up: {base_s / ours:.0f}x")


if __name__ == "__main__":
    main()
