"""Campaign scale: wall time, files per second and peak memory as a campaign grows, and filters sharing a cluster.

Usage::

    python benchmarks/bench_campaign.py [--exposures 100 300 1000] [--filter-exposures 100] [--dir DIR]

Part 1 runs 189 detectors x 16 amplifiers x N exposures (N files per detector, one filter) through
``flatnorm_dask.workflow.run`` on a fresh 2-worker ``LocalCluster`` for each N, and records wall time of the
run (cluster start-up apart), files per second, and the peak resident memory of the client process and of
each worker process. Time should grow linearly with N and worker memory stay flat (bounded by chunks).

Part 2 runs five filters of M exposures each in one invocation, against the same five filters run one
after the other (each on its own fresh cluster, as five separate commands would), and prints the ratio.

Each measurement runs in a fresh Python process so that peak memory figures are its own. Files are written
under ``--dir`` (default ``/dev/shm`` when it exists, so that the disk does not dominate) and removed after.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

FILTERS = ("u_24", "g_6", "r_57", "i_39", "z_20")


def _child(spec: dict) -> dict:
    """Runs in a fresh process: one workflow run on a fresh 2-worker cluster; returns the figures."""
    from distributed import Client, LocalCluster

    from flatnorm_dask.config import load_config
    from flatnorm_dask.workflow import run

    start = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        startup = time.perf_counter() - start
        cfg = load_config(None, {"input.manifest": spec["manifest"], "output.store": spec["store"],
                                 "solve.level": "AMP", "output.overwrite": True, **spec["overrides"]})
        t0 = time.perf_counter()
        summary = run(cfg, show_progress=False)
        wall = time.perf_counter() - t0
        workers = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return {"wall": wall, "startup": startup, "filters": len(summary.filters),
            "client_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mb": max(workers.values()) / 1024}


def measure(manifest: Path, store: Path, **overrides) -> dict:
    spec = json.dumps({"manifest": str(manifest), "store": str(store), "overrides": overrides})
    out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{out.stderr[-3000:]}")
    from flatnorm_dask.store import remove_store

    remove_store(store)  # the store is a link to its version: rmtree would leave the data
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_inputs(root: Path, n_exposures: int, filters: tuple[str, ...], seed: int) -> tuple[Path, int]:
    from flatnorm_dask.simulate import simulate_campaign, write_campaign

    tree = simulate_campaign("lsstcam", n_exposures=n_exposures, filters=filters, seed=seed)
    manifest = write_campaign(tree, root, layout="simple")
    return manifest, len(pd.read_csv(manifest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--filter-exposures", type=int, default=100, help="exposures per filter in part 2")
    parser.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    work = Path(tempfile.mkdtemp(prefix="flatnorm-bench-", dir=args.dir))
    try:
        print(f"files under {work}; 2-worker LocalCluster, 1 thread each, fresh per run; level AMP")
        print("\nPart 1: one filter, 189 detectors x 16 amps x N exposures; solver inputs held in worker memory "
              "(default, persist_max_mb 2048) or streamed from the store at every pass (persist_max_mb 0)")
        print(f"{'exposures':>9} {'files':>8} {'mode':>9} {'wall s':>8} {'files/s':>9} {'client MB':>10} "
              f"{'worker MB':>10} {'time/first':>11} {'N/first':>8}")
        first = {}
        for n in args.exposures:
            inputs = work / f"n{n}"
            t0 = time.perf_counter()
            manifest, n_files = write_inputs(inputs, n, ("r_57",), seed=n)
            written = time.perf_counter() - t0
            for mode, limit in (("held", 2048), ("streamed", 0)):
                r = measure(manifest, work / "store.zarr", **{"solve.persist_max_mb": limit})
                first.setdefault(mode, (r["wall"], n))
                print(f"{n:>9} {n_files:>8} {mode:>9} {r['wall']:>8.1f} {n_files / r['wall']:>9.0f} "
                      f"{r['client_peak_mb']:>10.0f} {r['worker_peak_mb']:>10.0f} "
                      f"{r['wall'] / first[mode][0]:>11.2f} {n / first[mode][1]:>8.2f}"
                      f"   (cluster start {r['startup']:.1f} s)")
            print(f"{'':>9} writing the {n_files} files took {written:.0f} s")
            shutil.rmtree(inputs)

        m = args.filter_exposures
        print(f"\nPart 2: {len(FILTERS)} filters x {m} exposures x 189 detectors in one run vs one by one")
        inputs = work / "filters"
        manifest, n_files = write_inputs(inputs, m, FILTERS, seed=1)
        together = measure(manifest, work / "store.zarr")
        table = pd.read_csv(manifest)
        alone = []
        for name in FILTERS:
            sub = inputs / f"manifest_{name}.csv"
            table[table["physical_filter"] == name].to_csv(sub, index=False)
            alone.append(measure(sub, work / "store.zarr"))
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
