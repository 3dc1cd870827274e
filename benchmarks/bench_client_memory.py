"""Flat client memory: bytes of client memory per input file for listing a campaign and building its reading graph.

Usage::

    python benchmarks/bench_client_memory.py [--rows 10000 100000 300000 1000000] [--dir DIR]

A 2-worker LocalCluster runs in this process; for each manifest size a fresh client process connects to it and
measures, with ``tracemalloc`` (every Python and numpy allocation of the process), the peak memory of
``list_campaign`` (the listing tasks run on the workers; the client gets their summaries) followed by the lazy
inputs a run writes (``Campaign.tree`` and ``workflow.level_inputs``: the whole reading graph).  Nothing is
read but the sample of files each listing task reads for their amplifier names.  Beside it, the same client
holding the file table itself (``ingest.discover``, as runs did before), as the baseline.  Printed: the peaks,
and the bytes per file between successive sizes (goal: under 100 bytes per file up to 1,000,000 rows).

The manifests' rows name real files (a small simulated campaign, each file listed under many exposure ids), so
that the listing tasks' samples read.  Files go under ``--dir`` (default ``/dev/shm`` when it exists).
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fresh  # noqa: E402


def _child(spec: dict) -> dict:
    """In a fresh process: connect, then measure the peak memory of listing and graph building."""
    import gc
    import resource
    import tracemalloc

    from distributed import Client

    from flatnorm_dask.ingest import discover, list_campaign
    from flatnorm_dask.workflow import level_inputs

    with Client(spec["scheduler"]):
        gc.collect()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        if spec["way"] == "tasks":
            campaign = list_campaign(manifest=spec["manifest"])
            tree = campaign.tree()
            inputs = {name: level_inputs(tree[name].to_dataset(), "AMP") for name in campaign.filters}
            n = sum(campaign.n_files.values())
        else:
            table = discover(manifest=spec["manifest"])
            n = len(table)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    return {"files": n, "peak": peak, "rss_growth": rss * 1024}


def write_manifest(path: Path, files: list[tuple[str, int]], rows: int) -> None:
    """``rows`` rows over the real files: row k lists file k mod len(files) as detector k mod 189 of exposure
    k // 189 (every (exposure, detector) once)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "exposure", "detector", "physical_filter"])
        for k in range(rows):
            writer.writerow([files[k % len(files)][0], 2026010100000 + k // 189, k % 189, "r_57"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 300_000, 1_000_000])
    fresh.add_arguments(parser)
    args = parser.parse_args()
    if fresh.serve(args.child, _child):
        return

    from distributed import LocalCluster

    from flatnorm_dask.simulate import simulate_campaign, write_campaign

    work = fresh.workdir(args.dir)
    try:
        tree = simulate_campaign("lsstcam", n_detectors=189, n_exposures=10, filters=("r_57",), seed=0)
        manifest = write_campaign(tree, work / "files", layout="simple")
        with open(manifest) as f:
            files = [(str(work / "files" / row["path"]), int(row["detector"])) for row in csv.DictReader(f)]
        print(f"manifests over {len(files)} real files under {work}; a 2-worker LocalCluster; the client measured "
              "in its own process with tracemalloc")
        print(f"{'rows':>9} | {'tasks: peak MB':>14} {'B/file':>7} {'RSS+ MB':>7} | "
              f"{'file table on client: peak MB':>30} {'B/file':>7} {'RSS+ MB':>7}")
        last: dict[str, tuple[int, int]] = {}  # the previous size's (files, peak), per way
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                          silence_logs=logging.ERROR) as cluster:
            for rows in args.rows:
                path = work / f"manifest_{rows}.csv"
                write_manifest(path, files, rows)
                out = {}
                for way in ("tasks", "client"):
                    out[way] = fresh.measure(__file__, {"scheduler": cluster.scheduler_address, "manifest": str(path),
                                                        "way": way})
                slope = {}
                for way, r in out.items():
                    n0, p0 = last.get(way, (0, None))
                    slope[way] = (r["peak"] - p0) / (r["files"] - n0) if p0 is not None else float("nan")
                    last[way] = (r["files"], r["peak"])
                t, c = out["tasks"], out["client"]
                print(f"{rows:>9} | {t['peak'] / 1e6:>14.1f} {slope['tasks']:>7.1f} {t['rss_growth'] / 1e6:>7.0f} | "
                      f"{c['peak'] / 1e6:>30.1f} {slope['client']:>7.1f} {c['rss_growth'] / 1e6:>7.0f}", flush=True)
                path.unlink()
        print("B/file: growth of the tracemalloc peak per added file since the previous size; RSS+: growth of the "
              "process's peak resident memory during the measurement (memory freed after the imports is reused first)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
