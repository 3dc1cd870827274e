"""No input can exhaust memory or time: special files, huge files, YAML aliases, long quoted strings, binary
config files, pixel counts that would overflow the solver's sums (issue 12, sections 2 and 3)."""

import math
import os
import threading
import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from flatnorm_dask import propertylist as pl
from flatnorm_dask.bounded import MAX_FILE_BYTES, AliasRefused, RefusedFile, read_bytes, without_aliases
from flatnorm_dask.config import CONFIG_MAX_BYTES, ConfigError, load_config
from flatnorm_dask.formats import StatsFormatError, StatsReader, parse_record, read_stats_file
from flatnorm_dask.schema import MAX_PIXEL_COUNT, extract_stats
from helpers import TAG, Items, PropertyListDumper

HEADER = f"!<{TAG}>\n"


def sample_text(style="block", n_amp=2, **values):
    items = [["DETECTOR_MEDIAN", "Double", 20512.25, ""], ["DETECTOR_SIGMA", "Double", 212.5, ""],
             ["DETECTOR_N", "Int", 15872011, ""]]
    for i in range(n_amp):
        items += [[f"AMP_NAME_{i}", "String", f"C1{i}", ""], [f"AMP_MEDIAN_{i}", "Double", 2e4 + i, ""],
                  [f"AMP_SIGMA_{i}", "Double", 200.0, ""], [f"AMP_N_{i}", "Int", 992000 + i, ""]]
    items = [[n, t, values.get(n, v), c] for n, t, v, c in items]
    return yaml.dump(Items(items), Dumper=PropertyListDumper, default_flow_style=False if style == "block" else None,
                     sort_keys=False)


def finishes_within(seconds, fn, *args):
    """fn(*args)'s result or exception, failing the test if it takes longer than ``seconds`` (no hang)."""
    out = {}

    def call():
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} still running after {seconds} s"
    return out


# --- Special and huge files -----------------------------------------------------------------------------

def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "stats.yaml"
    os.mkfifo(fifo)  # no writer: a plain open() would block forever
    out = finishes_within(10, read_stats_file, fifo)
    err = out["error"]
    assert isinstance(err, StatsFormatError) and err.path == str(fifo)
    assert err.reason == "not a regular file (a FIFO): refused, it could block or never end"
    # And through a batch, among good files, in input order.
    good = tmp_path / "good.yaml"
    good.write_text(sample_text())
    results = finishes_within(10, lambda: list(StatsReader().read_many([good, fifo, good])))["value"]
    assert [type(r).__name__ for r in results] == ["StatsRow", "StatsFormatError", "StatsRow"]
    assert results[1].path == str(fifo)


@pytest.mark.parametrize("device, kind", [("/dev/zero", "a character device"), ("/dev/null", "a character device")])
def test_devices_are_refused(device, kind):
    out = finishes_within(10, read_stats_file, device)
    assert out["error"].reason == f"not a regular file ({kind}): refused, it could block or never end"


def test_a_directory_cannot_be_read(tmp_path):
    with pytest.raises(StatsFormatError, match="cannot read: Is a directory"):
        read_stats_file(tmp_path)


def test_size_limit(tmp_path):
    text = sample_text()
    path = tmp_path / "stats.yaml"
    path.write_text(text)
    size = len(text.encode())
    row = StatsReader(max_bytes=size).read(path)  # exactly at the limit: read
    assert row.det[0] == 20512.25
    with pytest.raises(StatsFormatError) as info:
        StatsReader(max_bytes=size - 1).read(path)
    assert info.value.path == str(path)
    assert info.value.reason == f"{size:,} bytes, larger than the limit of {size - 1:,} bytes"
    # The default limit, on a sparse file far beyond it (nothing is read).
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(10 * MAX_FILE_BYTES)
    with pytest.raises(StatsFormatError, match=f"{10 * MAX_FILE_BYTES:,} bytes, larger than the limit of "
                                               f"{MAX_FILE_BYTES:,} bytes"):
        read_stats_file(huge)
    with pytest.raises(ValueError, match="max_bytes must be at least 1"):
        StatsReader(max_bytes=0)


def test_a_file_whose_size_says_nothing_is_read_only_to_the_limit():
    # /proc files say they are empty and then hold more: the read itself stops at limit + 1 bytes.
    status = "/proc/self/status"
    assert os.stat(status).st_size == 0
    with pytest.raises(RefusedFile, match="more than the limit of 10 bytes"):
        read_bytes(status, 10)
    assert b"Name:" in read_bytes(status, 1 << 20)


@pytest.mark.parametrize("size", [0, 1, 4096, 65536, 65537, 300_001])
def test_files_are_read_whole_with_reads_sized_to_them(tmp_path, size, monkeypatch):
    """Exact bytes whatever the size against the read sizes (the file's size + 1 first, then 64 KiB); no read
    asks for more than the file's size + 1 or 64 KiB (a larger buffer is mapped and unmapped at every read in a
    dask worker)."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    asked = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: asked.append(n) or real_read(fd, n))
    assert read_bytes(path, MAX_FILE_BYTES) == data
    assert asked[0] == size + 1 and max(asked[1:], default=0) <= 65536
    if size:
        with pytest.raises(RefusedFile, match=f"{size:,} bytes, larger than the limit of {size - 1:,} bytes"):
            read_bytes(path, size - 1)


# --- YAML aliases and long quoted strings ---------------------------------------------------------------

def billion_laughs(levels=30):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("loader", ["c", "pure"])
def test_aliases_are_refused_in_statistics_files(loader, tmp_path):
    text = billion_laughs()
    assert len(text) < 4096  # 10**30 "lol"s once expanded
    out = finishes_within(20, parse_record, text, "laughs.yaml")
    assert isinstance(out["error"], StatsFormatError)
    assert str(out["error"]) == ("laughs.yaml: YAML alias (*name) of the anchor on line 1 refused: aliases can "
                                 "expand without bound")
    # A PropertyList with an alias, through a file, and each PyYAML loader.
    flow = sample_text("flow")
    aliased = flow.replace("[DETECTOR_SIGMA, Double, 212.5,", "[DETECTOR_SIGMA, Double, &s 212.5,") \
        + "- [EXTRA, Double, *s, '']\n"
    path = tmp_path / "aliased.yaml"
    path.write_text(aliased)
    with pytest.raises(StatsFormatError, match=r"aliased\.yaml: YAML alias \(\*name\) of the anchor on line 3"):
        read_stats_file(path)
    with pytest.raises(pl.PropertyListError, match="YAML alias"):
        pl.load(aliased, loader)
    # Merge keys expand through aliases too.
    merge = "a: &a {x: 1}\nb: {<<: *a}\n"
    with pytest.raises(pl.PropertyListError, match="YAML alias"):
        pl.load(merge, loader)
    # An anchor alone (no alias) is harmless and reads as before.
    assert pl.load("a: &x 1\n", loader) == {"a": 1}


def test_alias_refusal_works_on_both_pyyaml_loaders():
    for base in (getattr(yaml, "CSafeLoader", yaml.SafeLoader), yaml.SafeLoader):
        loader = without_aliases(base)
        assert yaml.load("a: [1, 2]\nb: x\n", Loader=loader) == {"a": [1, 2], "b": "x"}
        for doc in ("a: &x [1]\nb: *x\n", "&a [*a]\n", "- &s text\n- *s\n"):
            with pytest.raises(AliasRefused):
                yaml.load(doc, Loader=loader)


@pytest.mark.parametrize("quote", ["'", '"'])
def test_a_long_quoted_string_costs_linear_time_and_little_memory(quote, tmp_path):
    # Unterminated, so the fast parser scans it all and fails; it once used gigabytes doing so.
    body = "x" * (MAX_FILE_BYTES - 200)
    text = HEADER + f"- [DETECTOR_MEDIAN, Double, 1.5, {quote}{body}]\n"
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(pl.Fallback):
            pl.parse_items(text)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MB"
    assert elapsed < 5
    path = tmp_path / "long.yaml"
    path.write_text(text)
    err = finishes_within(60, StatsReader().read, path)["error"]
    assert isinstance(err, StatsFormatError) and err.path == str(path)
    assert err.reason.startswith("not valid YAML"), err.reason


def test_error_messages_show_bounded_values():
    nested = [1]
    for _ in range(40):  # 2**40 leaves if printed in full
        nested = [nested, nested]
    with pytest.raises(StatsFormatError) as info:
        extract_stats({"DETECTOR_MEDIAN": nested, "DETECTOR_N": 1})
    assert info.value.key == "DETECTOR_MEDIAN" and len(str(info.value)) < 120
    with pytest.raises(pl.PropertyListError) as info:
        pl.record_from_items([["x" * 10**6, "Double"]])
    assert len(str(info.value)) < 200


# --- Config files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, problem", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a YAML config file: NUL byte at byte 8: a binary file, not text"),
    (b"input:\n  on_error: mask\n\xff\xfe", "not a YAML config file: not UTF-8 text (byte 24): a binary or corrupt "
                                            "file"),
    (billion_laughs().encode(), "YAML alias (*name) of the anchor on line 1 refused: aliases can expand without "
                                "bound"),
    (b"#" * (CONFIG_MAX_BYTES + 1), f"not a YAML config file: {CONFIG_MAX_BYTES + 1:,} bytes, larger than the "
                                    f"limit of {CONFIG_MAX_BYTES:,} bytes"),
], ids=["binary", "not UTF-8", "aliases", "huge"])
def test_bad_config_files_name_file_and_problem(data, problem, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    out = finishes_within(20, load_config, path)
    assert isinstance(out["error"], ConfigError)
    assert str(out["error"]) == f"{path}: {problem}"


def test_config_fifo_and_device_do_not_hang(tmp_path):
    fifo = tmp_path / "run.yaml"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        out = finishes_within(10, load_config, path)
        assert isinstance(out["error"], ConfigError)
        assert "not a regular file" in str(out["error"]) and str(out["error"]).startswith(f"{path}: ")


def test_max_file_bytes_is_a_config_option(tmp_path):
    assert load_config(None).input.max_file_bytes == MAX_FILE_BYTES
    assert load_config(None, {"input.max_file_bytes": 1000}).input.max_file_bytes == 1000
    with pytest.raises(ConfigError, match="input.max_file_bytes"):
        load_config(None, {"input.max_file_bytes": 0})


# --- Pixel counts that would overflow the solver's sums -------------------------------------------------

@pytest.mark.parametrize("count", [1e200, 1e308, math.inf, float(2**53 + 2), 2**53 + 1, 10**30])
@pytest.mark.parametrize("key", ["DETECTOR_N", "AMP_N_1"])
def test_counts_beyond_2_53_name_file_and_key(count, key):
    record = {"DETECTOR_MEDIAN": 1.0, "DETECTOR_N": 10, "AMP_NAME_0": "C10", "AMP_MEDIAN_0": 1.0, "AMP_N_0": 5,
              "AMP_NAME_1": "C11", "AMP_MEDIAN_1": 1.0, "AMP_N_1": 5, key: count}
    with pytest.raises(StatsFormatError) as info:
        extract_stats(record, "f.yaml")
    assert info.value.key == key and info.value.path == "f.yaml"
    assert info.value.reason == f"pixel count {float(count):g} beyond 2**53 (more pixels than any camera has)"
    record[key] = MAX_PIXEL_COUNT  # the bound itself is a count
    assert extract_stats(record).det[1] in (10, MAX_PIXEL_COUNT)


@pytest.mark.parametrize("style", ["block", "flow"])
@pytest.mark.parametrize("token", ["1.0e+200", "1.0e+308", ".inf", "9007199254740994.0", "9007199254740993",
                                   "99999999999999999999"])
def test_counts_beyond_2_53_through_a_learned_layout(style, token, tmp_path):
    # A layout learned from files whose AMP_N_1 is written as the token's kind (a float, or an int).
    learned = "992001.5" if "." in token else "992001"
    base = sample_text(style).replace("992001", learned)
    reader = StatsReader()
    good = tmp_path / "good.yaml"
    good.write_text(base)
    for _ in range(3):
        reader.read(good)
    assert reader.layouts.layouts and reader.layouts.layouts[0].plan is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text(base.replace(learned, token))
    assert reader.layouts.match(bad.read_text()) is not None  # the layout matches; the check still applies
    with pytest.raises(StatsFormatError) as info:
        reader.read(bad)
    assert info.value.key == "AMP_N_1" and "beyond 2**53" in info.value.reason
    # The bound itself, through the same layout.
    fine = tmp_path / "fine.yaml"
    fine.write_text(base.replace(learned, "9007199254740992.0" if "." in token else "9007199254740992"))
    assert reader.read(fine).amp[1, 1] == 2**53


def test_a_masked_overflowing_count_gives_the_numbers_of_a_run_without_its_cell(tmp_path):
    from flatnorm_dask.simulate import simulate_campaign, write_campaign
    from flatnorm_dask.workflow import run

    tree = simulate_campaign("testcam", n_exposures=6, filters=("r_57",), seed=4)
    manifest = write_campaign(tree, tmp_path / "in", layout="simple")
    table = pd.read_csv(manifest)
    victim = tmp_path / "in" / table["path"].iloc[10]
    lines = victim.read_text().splitlines(keepends=True)
    at = lines.index("- - AMP_N_3\n")
    lines[at + 2] = "  - 1.0e+200\n"
    victim.write_text("".join(lines))
    table.drop(index=10).to_csv(tmp_path / "without.csv", index=False)

    def solve(manifest_path, store):
        cfg = load_config(None, {"input.manifest": str(manifest_path), "input.root": str(tmp_path / "in"),
                                 "input.on_error": "mask", "output.store": str(store), "solve.level": "AMP",
                                 "solve.tol": 1e-12, "cluster.n_workers": 1})
        run(cfg, show_progress=False)
        return xr.open_zarr(store, group="r_57").load()

    masked = solve(manifest, tmp_path / "masked.zarr")
    without = solve(tmp_path / "without.csv", tmp_path / "without.zarr")
    problems = masked.attrs["problems"]
    assert [(p["file"], p["reason"]) for p in problems] == [
        (str(victim), "key AMP_N_3: pixel count 1e+200 beyond 2**53 (more pixels than any camera has)")]
    assert np.isfinite(masked["exp_scale"].values).all() and np.isfinite(masked["det_scale"].values).all()
    for name in ("exp_scale", "det_scale", "exp_scale_err", "det_scale_err"):
        np.testing.assert_array_equal(masked[name].values, without[name].values, err_msg=name)
