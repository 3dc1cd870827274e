"""Reading statistics files from S3: serial reads against StatsReader.read_many, at a given latency a request.

Usage::

    python benchmarks/bench_s3.py [--files 2000] [--delay 0.02] [--sample 100] [--requests 8,16,32,64]
                                  [--processes 2]

Writes ``--files`` files of a simulated LSSTCam campaign (block style), serves them from moto's S3 server
(``tests/s3server.py``: 127.0.0.1, ``--delay`` seconds added to every request, ``--processes`` server
processes), then times, in one process:

- serial: ``StatsReader.read`` of one URI after another, on ``--sample`` files, extrapolated to all (the
  baseline: one task reading its files one after another);
- ``StatsReader(max_requests=R).read_many`` of all the URIs, for each R of ``--requests``;
- the same files read from local disk by ``read_many``, for scale.

Prints each figure and its ratio to the serial baseline, measured in the same run (goal: at most a tenth of
the serial time at 20 ms a request). The server's own CPU (moto: a few ms a request) shares this machine.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the S3 test server, shared with tests/test_s3.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--delay", type=float, default=0.020, help="seconds added to every request")
    parser.add_argument("--sample", type=int, default=100, help="files read serially (extrapolated)")
    parser.add_argument("--requests", default="8,16,32,64", help="max_requests values to time")
    parser.add_argument("--processes", type=int, default=2, help="S3 server processes")
    args = parser.parse_args()

    from flatnorm_dask.formats import StatsReader
    from flatnorm_dask.simulate import simulate_campaign, write_campaign
    from s3server import serve

    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="bench_s3_", dir=base))
    try:
        tree = simulate_campaign("lsstcam", n_exposures=max(1, math.ceil(args.files / 189)), filters=("r_57",),
                                 seed=1)
        manifest = write_campaign(tree, root, layout="simple", style="block")
        with open(manifest, newline="") as f:
            keys = [row["path"] for row in csv.DictReader(f)][: args.files]
        uris = [f"s3://flatstats/{key}" for key in keys]
        local = [str(root / key) for key in keys]
        start = time.perf_counter()
        with serve(root, "flatstats", delay=args.delay, processes=args.processes):
            print(f"{len(uris)} files served by moto on 127.0.0.1 ({args.processes} processes, "
                  f"{args.delay * 1e3:.0f} ms a request), up in {time.perf_counter() - start:.1f} s")
            reader = StatsReader()
            reader.read(uris[0])  # connection and layout warm, as in a task after its first files
            sample = uris[1: args.sample + 1]
            t0 = time.perf_counter()
            for uri in sample:
                reader.read(uri)
            serial = (time.perf_counter() - t0) / len(sample) * len(uris)
            print(f"\n  serial StatsReader.read                 {serial:8.2f} s   "
                  f"({serial / len(uris) * 1e3:.1f} ms a file, from {len(sample)} files)")
            for requests in (int(r) for r in args.requests.split(",")):
                t0 = time.perf_counter()
                rows = list(StatsReader(max_requests=requests).read_many(uris))
                elapsed = time.perf_counter() - t0
                assert not any(isinstance(row, Exception) for row in rows), "a read failed"
                print(f"  read_many, max_requests={requests:<4d}          {elapsed:8.2f} s   "
                      f"{serial / elapsed:6.1f}x faster (goal at 20 ms: >= 10x)")
        t0 = time.perf_counter()
        list(StatsReader().read_many(local))
        print(f"  read_many of the same files on local disk {time.perf_counter() - t0:6.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
