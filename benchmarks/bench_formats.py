"""Reading flat-statistics files: our parser against a raw read, PyYAML's loaders and a 2-worker cluster.

Usage::

    python benchmarks/bench_formats.py [--files 20000] [--dir DIR] [--sample 500] [--batch 1000] [--repeat 3]
                                       [--shape-files 2000] [--only-shapes]

Writes ``--files`` PropertyList YAML files (block style, as the butler writes them) of a simulated LSSTCam
campaign (189 detectors x 16 amplifiers, as many exposures as needed) under ``--dir`` (default: a fresh
directory in ``/dev/shm`` when it exists, so that the disk does not dominate; removed afterwards unless
``--keep``), then times, per file and in one process:

- raw read: ``open`` + ``read`` of the bytes;
- ``yaml.safe_load`` with a constructor for the PropertyList tag (pure-Python loader, what the butler does),
  on a sample of ``--sample`` files, extrapolated per file;
- PyYAML's ``CSafeLoader`` (libyaml) with the same constructor, on a sample;
- ``flatnorm_dask.formats.StatsReader.read``, one reader serially over all files (as a reading task does:
  the first two files item by item, the rest through the layout it learns from them);
- the same on a 2-worker ``distributed.LocalCluster`` (processes, one thread each) over all files in
  batches of ``--batch`` files per task, one reader per task (cluster start-up timed apart), and the same
  batches on a plain ``multiprocessing.Pool`` of as many processes: the parallel speed-up this machine allows.

Then the shapes of issue 14 (every valid PropertyList the butler can write takes the fast path): ``--shape-files``
files of each shape, the same LSSTCam record plus names with spaces and dots, list values of repeated keys,
one item of every element type (DateTime, Undef, Bool, the integer types, Float, quoted strings), wrapped long
comments, flow style, and a campaign mixing block and flow files; each shape's cost per file through one
StatsReader (CPU time of the process, the best of ``--repeat`` passes interleaved over the shapes, so that a
shared machine's load falls on all alike; wall time beside it) is printed beside the plain file's, measured in
the same run (goal: at most 1.5x), with PyYAML's C loader on the same shape for scale.

Diagnostics: a reader whose layout cache does not learn (``LayoutCache(max_layouts=0)``: the item-by-item
parser, what a first file or files of all-different layouts cost) on the sample, ``read_stats_file`` (a
new reader per file), and ``float()`` of each file's numbers alone, the part of the parse that exactness
makes irreducible in Python.

Serial timings are the best of ``--repeat`` passes (the files are in the page cache / tmpfs after writing).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

TAG = "lsst.daf.base.PropertyList"
DATETIME_TAG = "lsst.daf.base.DateTime"


class _ButlerLoader(yaml.SafeLoader):
    """``yaml.safe_load`` plus the PropertyList tag (the butler registers one on the safe loader)."""


class _CLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """The same on libyaml."""


for _loader in (_ButlerLoader, _CLoader):
    _loader.add_constructor(TAG, lambda loader, node: loader.construct_sequence(node, deep=True))
    _loader.add_constructor(DATETIME_TAG, lambda loader, node: loader.construct_scalar(node))


class _Dumper(yaml.SafeDumper):
    """PyYAML writing a PropertyList as daf_base's representers do."""


class _Items(list):
    pass


class _DateTime(str):
    pass


_Dumper.add_representer(_Items, lambda dumper, data: dumper.represent_sequence(TAG, list(data)))
_Dumper.add_representer(_DateTime, lambda dumper, data: dumper.represent_scalar(DATETIME_TAG, str(data)))


def read_batch(paths: list[str]) -> np.ndarray:
    """Statistics of a batch of files, read by one reader: array (n, 3, 1 + nAmp), detector then amplifiers."""
    from flatnorm_dask.formats import StatsReader

    reader = StatsReader()
    rows = [reader.read(p) for p in paths]
    out = np.empty((len(rows), 3, 1 + (rows[0].amp.shape[1] if rows else 0)))
    for i, row in enumerate(rows):
        out[i, :, 0] = row.det
        out[i, :, 1:] = row.amp
    return out


def _raw(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            f.read()


def _yaml(paths: list[str], loader: type) -> None:
    for p in paths:
        with open(p, "rb") as f:
            items = yaml.load(f.read().decode(), Loader=loader)
        assert len(items) > 0


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def write_files(n_files: int, outdir: Path) -> list[str]:
    """At least ``n_files`` files of a simulated LSSTCam campaign; returns the first ``n_files`` paths."""
    from flatnorm_dask.simulate import simulate_campaign, write_campaign

    n_det = 189
    tree = simulate_campaign("lsstcam", n_exposures=max(1, math.ceil(n_files / n_det)), filters=("r_57",),
                             seed=1)
    manifest = write_campaign(tree, outdir, layout="simple", style="block")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    return [str(outdir / r["path"]) for r in rows[:n_files]]


SHAPES = ("plain", "names with spaces and dots", "list values", "every element type", "wrapped comments",
          "flow style", "block and flow mixed")


def shape_items(shape: str, i: int, rng: np.random.Generator) -> list[list]:
    """[name, type, value, comment] items of one LSSTCam statistics record of a shape (see the docstring)."""
    from flatnorm_dask.schema import written_keys

    items = []
    for key, stat, amp, typ in written_keys(16):
        if stat is None:
            value = f"C1{amp}" if amp < 8 else f"C0{15 - amp}"
        elif stat == "N":
            value = int(rng.integers(900_000, 1_000_000))
        else:
            value = float(rng.normal(20_000, 100))
        items.append([key, typ, value, ""])
    if shape == "names with spaces and dots":
        items += [[f"LSST ISR OVERSCAN MEDIAN C1{k}", "Double", float(rng.normal(1000, 5)), ""] for k in range(4)]
        items += [[f"LSST.ISR.GAIN.C1{k}", "Double", float(rng.normal(1.5, 0.01)), ""] for k in range(4)]
    elif shape == "list values":
        items += [[f"ISR OVERSCAN ROWS {k}", "Double", [float(x) for x in rng.normal(size=4)], ""] for k in range(4)]
    elif shape == "every element type":
        items += [["FLAG", "Bool", bool(i % 2), ""], ["SHORT", "Short", i % 100, ""], ["INT", "Int", i, ""],
                  ["LONG", "Long", -i, ""], ["LONGLONG", "LongLong", 2**40 + i, ""],
                  ["ULONGLONG", "UnsignedLongLong", 2**63 + i, ""],
                  ["FLOAT", "Float", float(np.float32(rng.normal())), ""], ["DOUBLE", "Double", float(rng.normal()), ""],
                  ["STRING", "String", "it's: quoted" if i % 2 else "plain words", ""],
                  ["DATE-OBS", "DateTime", _DateTime(f"2025-11-{1 + i % 28:02d}T03:04:05.{i:09d}Z"), "TAI"],
                  ["UNDEFINED", "Undef", None, ""]]
    elif shape == "wrapped comments":
        comment = "statistic of the amplifier after ISR, sigma-clipped at 3 sigma; see the task documentation"
        items = [[name, typ, value, comment] for name, typ, value, _ in items]
    return items


def write_shapes(outdir: Path, n_files: int) -> dict[str, list[str]]:
    """``n_files`` files of each shape under ``outdir``."""
    rng = np.random.default_rng(2)
    paths: dict[str, list[str]] = {}
    for shape in SHAPES:
        paths[shape] = []
        for i in range(n_files):
            flow = shape == "flow style" or (shape == "block and flow mixed" and i % 2)
            text = yaml.dump(_Items(shape_items(shape, i, rng)), Dumper=_Dumper,
                             default_flow_style=None if flow else False, sort_keys=False)
            path = outdir / f"shape_{SHAPES.index(shape)}_{i}.yaml"
            path.write_text(text)
            paths[shape].append(str(path))
    return paths


def run_shapes(args, outdir: Path) -> None:
    from flatnorm_dask import propertylist as pl
    from flatnorm_dask.formats import StatsReader

    paths = write_shapes(outdir, args.shape_files)
    for shape in SHAPES:
        for path in paths[shape][:3]:
            pl.parse_items(Path(path).read_text())  # Fallback here would mean the shape misses the fast path
    # Passes interleaved over the shapes, best of --repeat each: load on a shared machine hits them alike.
    # CPU time of this process is the cost compared (wall time is printed beside it).
    wall = {shape: math.inf for shape in SHAPES}
    cpu = dict(wall)
    for _ in range(args.repeat):
        for shape in SHAPES:
            reader = StatsReader()  # a new one each pass, as each reading task has its own
            t0, c0 = time.perf_counter(), time.process_time()
            for path in paths[shape]:
                reader.read(path)
            wall[shape] = min(wall[shape], (time.perf_counter() - t0) / len(paths[shape]))
            cpu[shape] = min(cpu[shape], (time.process_time() - c0) / len(paths[shape]))
            assert reader.layouts.layouts and all(layout.plan for layout in reader.layouts.layouts), shape
    us = 1e6
    print(f"\nshapes ({args.shape_files} files each, one StatsReader serially, best of {args.repeat} interleaved "
          f"passes; PyYAML's C loader on {min(args.sample, args.shape_files)} of them)")
    print(f"  {'shape':28s} {'bytes':>6s} {'CPU (us)':>9s} {'/ plain':>8s} {'wall (us)':>10s} {'/ plain':>8s} "
          f"{'CSafeLoader (us)':>17s}")
    for shape in SHAPES:
        files = paths[shape]
        clib = _best(lambda: _yaml(files[: args.sample], _CLoader), 1) / min(args.sample, len(files))
        size = sum(os.path.getsize(p) for p in files) / len(files)
        print(f"  {shape:28s} {size:6.0f} {cpu[shape] * us:9.1f} {cpu[shape] / cpu['plain']:7.2f}x "
              f"{wall[shape] * us:10.1f} {wall[shape] / wall['plain']:7.2f}x {clib * us:17.1f}")
    worst = max(SHAPES, key=lambda shape: cpu[shape] / cpu["plain"])
    print(f"  worst: {worst}, {cpu[worst] / cpu['plain']:.2f}x the plain file's CPU time (goal: at most 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory in "
                                                    "/dev/shm if it exists, else the system temp dir)")
    parser.add_argument("--sample", type=int, default=500, help="files timed with the PyYAML loaders")
    parser.add_argument("--batch", type=int, default=1000, help="files per cluster task")
    parser.add_argument("--repeat", type=int, default=3, help="passes per serial timing (best is kept)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shape-files", type=int, default=2000, help="files of each shape")
    parser.add_argument("--only-shapes", action="store_true", help="time the shapes only")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()

    base = args.dir if args.dir is not None else ("/dev/shm" if Path("/dev/shm").is_dir() else None)
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
    outdir = Path(tempfile.mkdtemp(prefix="bench_formats_", dir=base))
    try:
        if not args.only_shapes:
            run(args, outdir)
        run_shapes(args, outdir)
    finally:
        if not args.keep:
            shutil.rmtree(outdir, ignore_errors=True)
        else:
            print(f"files kept in {outdir}")


def run(args, outdir: Path) -> None:
    from distributed import Client, LocalCluster

    from flatnorm_dask import propertylist as pl
    from flatnorm_dask.formats import StatsReader, read_stats_file

    t0 = time.perf_counter()
    paths = write_files(args.files, outdir)
    n = len(paths)
    size = sum(os.path.getsize(p) for p in paths)
    print(f"wrote {n} files ({size / n:.0f} bytes each, {size / 1e6:.1f} MB) under {outdir} "
          f"in {time.perf_counter() - t0:.1f} s")
    assert pl.parse_items(Path(paths[0]).read_text())  # the files take the fast path
    sample = paths[:: max(1, n // args.sample)][: args.sample]
    us = 1e6

    raw = _best(lambda: _raw(paths), args.repeat) / n
    pure = _best(lambda: _yaml(sample, _ButlerLoader), 1) / len(sample)
    clib = _best(lambda: _yaml(sample, _CLoader), args.repeat) / len(sample)
    serial_result, readers = [], []

    def serial_pass():
        reader = StatsReader()  # a new one each pass, as each reading task has its own
        serial_result[:] = [reader.read(p) for p in paths]
        readers[:] = [reader]

    serial = _best(serial_pass, args.repeat) / n
    reader = readers[0]
    assert len(reader.layouts) == 1 and reader.layouts.layouts[0].plan is not None, "no usable layout learnt"

    # Diagnostics: the item-by-item parser alone, a new reader per file, and float() of the numbers alone.
    items_only = StatsReader(pl.LayoutCache(max_layouts=0))
    item_parser = _best(lambda: [items_only.read(p) for p in sample], args.repeat) / len(sample)
    assert not items_only.layouts.layouts
    one_by_one = _best(lambda: [read_stats_file(p) for p in sample], args.repeat) / len(sample)
    tokens = []
    for p in paths:
        layout, match = reader.layouts.match(Path(p).read_text())
        tokens.append(layout.plan.values(match.groups() + ("nan",)))
    floats_only = _best(lambda: [pl.layout_floats(t) for t in tokens], args.repeat) / n

    batches = [paths[i:i + args.batch] for i in range(0, n, args.batch)]
    t0 = time.perf_counter()
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("flatnorm_dask.formats"))  # workers up and the module imported
        startup = time.perf_counter() - t0
        cluster_times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            futures = client.map(read_batch, batches, pure=False)
            arrays = client.gather(futures)
            cluster_times.append(time.perf_counter() - t0)
            del futures
        on_cluster = min(cluster_times) / n

    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        pool.map(read_batch, batches[: args.workers], chunksize=1)  # start and import
        pool_times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            pool.map(read_batch, batches, chunksize=1)
            pool_times.append(time.perf_counter() - t0)
        on_pool = min(pool_times) / n

    # The cluster read the same numbers as the serial pass.
    together = np.concatenate(arrays)
    expected = read_batch(paths[: len(together)])
    assert together.shape == (n, 3, 17), together.shape
    np.testing.assert_array_equal(together, expected)
    assert len(serial_result) == n

    print(f"\nper file (microseconds); PyYAML loaders on a sample of {len(sample)} files, extrapolated per file; "
          f"serial figures best of {args.repeat} passes over {n} files")
    print(f"  raw read (open + read)                  {raw * us:10.1f}")
    print(f"  yaml.safe_load + tag (pure, butler)     {pure * us:10.1f}   (sample of {len(sample)})")
    print(f"  PyYAML CSafeLoader + tag (libyaml)      {clib * us:10.1f}   (sample of {len(sample)})")
    print(f"  StatsReader.read, serial (1 core)       {serial * us:10.1f}")
    print(f"  StatsReader.read, {args.workers}-worker LocalCluster, wall {on_cluster * us:8.1f}   "
          f"({len(batches)} tasks of <= {args.batch} files, best of {args.repeat})")
    print(f"  cluster start-up (not included above)   {startup:10.2f} s")
    print(f"  StatsReader.read, {args.workers}-process multiprocessing.Pool {on_pool * us:6.1f}   (same batches)")
    print(f"  without layouts (item parser)           {item_parser * us:10.1f}   (sample of {len(sample)})")
    print(f"  read_stats_file (a new reader a file)   {one_by_one * us:10.1f}   (sample of {len(sample)})")
    print(f"  float() of each file's numbers alone    {floats_only * us:10.1f}   "
          f"({len(tokens[0])} numbers a file)")
    print("\nratios")
    print(f"  safe_load / ours          {pure / serial:8.1f} x   (expected >= 100)")
    print(f"  CSafeLoader / ours        {clib / serial:8.1f} x")
    print(f"  ours / raw read           {serial / raw:8.2f} x   (expected <= 3 per core)")
    print(f"  serial / cluster speed-up {serial / on_cluster:8.2f} x   (expected ~{args.workers} on "
          f"{args.workers} cores; this machine has {os.cpu_count()} CPUs)")
    print(f"  serial / Pool speed-up    {serial / on_pool:8.2f} x   (the machine's own ceiling for this work)")
    print(f"  (raw read + float() alone) / raw read {(raw + floats_only) / raw:6.2f} x")
    print(f"  item parser / layout path {item_parser / serial:8.2f} x")
    print(f"  files per second: serial {1 / serial:,.0f}, cluster {1 / on_cluster:,.0f}")


if __name__ == "__main__":
    main()
