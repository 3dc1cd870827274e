"""What the store's safety costs: the commit (seal, manifest, swap) and the verification of ``info``/``export``,
against writing the chunks and reading the data, measured in one run.

Usage::

    python benchmarks/bench_store.py [--detectors 189] [--exposures 1000] [--exposure-chunk 5] [--repeat 3]

The store holds one filter shaped like an LSSTCam campaign at amplifier level (detector x 16 amps x exposure,
the workflow's variables), chunked along exposure as the reading tasks write it (1,000 files a task: about 5
exposures), so the number of files grows with the campaign.  Printed: seconds for each step (best of
``--repeat``), the commit also without its fsync of every file (the flush for power cuts, not what concurrent
runs see), and the commit and verification as fractions of the write and of a full read.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from flatnorm_dask.store import (
    commit_store,
    export_scales,
    open_store,
    prepare_store,
    remove_store,
    store_summary,
    transaction,
    verify_store,
    write_groups,
)

CELL_VARIABLES = ("background", "weight", "model", "residual")


def campaign(n_det: int, n_exp: int, exposure_chunk: int) -> dict[str, xr.Dataset]:
    rng = np.random.default_rng(0)
    amps = [f"C{i:02d}" for i in range(16)]
    shape = (n_det, len(amps), n_exp)
    cells = {name: (("detector", "amp", "exposure"), rng.uniform(0.5, 1.5, shape)) for name in CELL_VARIABLES}
    ds = xr.Dataset({**cells, "used": (("detector", "amp", "exposure"), rng.uniform(size=shape) > 0.01),
                     "exp_scale": ("exposure", rng.uniform(1e4, 2e4, n_exp)),
                     "det_scale": (("detector", "amp"), rng.uniform(0.9, 1.1, shape[:2]))},
                    coords={"detector": np.arange(n_det), "amp": amps, "exposure": np.arange(n_exp)})
    return {"r_57": ds.chunk({"exposure": exposure_chunk})}


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", type=int, default=189)
    parser.add_argument("--exposures", type=int, default=1000)
    parser.add_argument("--exposure-chunk", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    data = campaign(args.detectors, args.exposures, args.exposure_chunk)
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads"):
        path = Path(tmp) / "scales.zarr"
        writes, commits, unflushed = [], [], []
        for flush in [True] * args.repeat + [False] * args.repeat:
            staging = prepare_store(path, overwrite=True)
            start = time.perf_counter()
            dask.compute(*write_groups(staging, data))
            writes.append(time.perf_counter() - start)
            fsync = transaction._fsync
            if not flush:
                transaction._fsync = lambda path: None
            start = time.perf_counter()
            try:
                version = commit_store(staging, path, overwrite=True, keep_versions=0)
            finally:
                transaction._fsync = fsync
            (commits if flush else unflushed).append(time.perf_counter() - start)
        write, commit, no_fsync = min(writes), min(commits), min(unflushed)
        verify, n_files = best(lambda: verify_store(path), args.repeat)
        info, _ = best(lambda: store_summary(path), args.repeat)
        export, _ = best(lambda: export_scales(path), args.repeat)
        read, _ = best(lambda: open_store(path).load(), args.repeat)
        remove_store(path)
    cells = args.detectors * 16 * args.exposures
    print(f"store: {args.detectors} detectors x 16 amps x {args.exposures} exposures ({cells:,} cells), "
          f"{n_files} files, version {version.id}")
    print(f"write chunks {write:.3f} s | commit (seal + manifest + swap) {commit:.3f} s = {commit / write:.1%} "
          f"of the write; without the fsync of every file {no_fsync:.3f} s = {no_fsync / write:.1%}")
    print(f"read everything {read:.3f} s | verify (stat every file) {verify:.3f} s = {verify / read:.1%} of the "
          f"read | info {info:.3f} s | export (verify + scales) {export:.3f} s")


if __name__ == "__main__":
    main()
