"""Statistics files on S3: read through a real S3 API server (moto's server mode on 127.0.0.1, started here),
exactly as the same files on disk, many requests in flight (issue 14, goal 4)."""

import numpy as np
import pytest

from flatnorm_dask.formats import StatsFormatError, StatsReader
from flatnorm_dask.remote import _s3_settings
from s3server import ACCESS_KEY, SECRET_KEY, peak_in_flight, serve

BUCKET = "flatstats"


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """A simulated LSSTCam campaign of 2,079 files on disk, plus an empty and an oversized file."""
    from flatnorm_dask.simulate import simulate_campaign, write_campaign

    root = tmp_path_factory.mktemp("s3campaign")
    tree = simulate_campaign("lsstcam", n_exposures=11, filters=("r_57",), seed=3, nan_amp_fraction=0.02)
    manifest = write_campaign(tree, root / "data", layout="simple", style="block")
    keys = [line.split(",")[0] for line in manifest.read_text().splitlines()[1:]]
    (root / "data" / "empty.yaml").write_bytes(b"")
    (root / "data" / "big.yaml").write_bytes(b"#" * 5000 + b"\n" + (root / "data" / keys[0]).read_bytes())
    return root / "data", keys


@pytest.fixture(scope="module")
def s3(campaign):
    root, _ = campaign
    with serve(root, BUCKET, delay=0.0) as endpoint:
        yield endpoint


def _rows_equal(a, b):
    assert a.amp_names == b.amp_names
    np.testing.assert_array_equal(a.det, b.det)
    np.testing.assert_array_equal(a.amp, b.amp)


def test_s3_files_read_as_on_disk_in_input_order(campaign, s3):
    root, keys = campaign
    sample = keys[:150]
    uris = [f"s3://{BUCKET}/{key}" for key in sample]
    local = [root / key for key in sample]
    reader = StatsReader(max_requests=8)
    # Mixed with local files and missing objects, in input order.
    paths = [uris[0], local[1], f"s3://{BUCKET}/no/such.yaml", *uris[3:], f"s3://{BUCKET}/empty.yaml"]
    results = list(reader.read_many(paths))
    assert len(results) == len(paths)
    on_disk = [StatsReader().read(path) for path in local]
    _rows_equal(results[0], on_disk[0])
    _rows_equal(results[1], on_disk[1])
    for got, expected in zip(results[3:-1], on_disk[3:]):
        _rows_equal(got, expected)
    missing, empty = results[2], results[-1]
    assert isinstance(missing, StatsFormatError) and missing.path == paths[2]
    assert missing.reason == f"cannot read: no such object: s3://{BUCKET}/no/such.yaml"
    assert isinstance(empty, StatsFormatError) and empty.reason == "empty file"
    # One at a time too, and the size limit without reading the body.
    _rows_equal(reader.read(uris[5]), on_disk[5])
    with pytest.raises(StatsFormatError) as info:
        StatsReader(max_bytes=4000).read(f"s3://{BUCKET}/big.yaml")
    size = (root / "big.yaml").stat().st_size
    assert info.value.reason == f"{size:,} bytes, larger than the limit of 4,000 bytes"


def test_stopping_early_leaves_no_request_behind(campaign, s3):
    _, keys = campaign
    reader = StatsReader(max_requests=4)
    results = reader.read_many(f"s3://{BUCKET}/{key}" for key in keys[:50])
    first = next(results)
    assert first.amp.shape == (3, 16)
    results.close()  # cancels what has not started and waits for what has: no thread left reading
    assert reader.remote.max_requests == 4


def test_lsst_endpoint_variable_and_profiles(campaign, s3, monkeypatch):
    root, keys = campaign
    expected = StatsReader().read(root / keys[7])
    # S3_ENDPOINT_URL (what the LSST butler reads), with the credentials in it, when AWS_ENDPOINT_URL is unset.
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    host = s3.removeprefix("http://")
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://{ACCESS_KEY}:{SECRET_KEY}@{host}")
    _rows_equal(StatsReader().read(f"s3://{BUCKET}/{keys[7]}"), expected)
    # An LSST profile (s3://profile@bucket/...) goes through lsst.resources (on boto3), as the butler reads it.
    monkeypatch.setenv("LSST_RESOURCES_S3_PROFILE_testprofile", f"http://{ACCESS_KEY}:{SECRET_KEY}@{host}")
    _rows_equal(StatsReader().read(f"s3://testprofile@{BUCKET}/{keys[7]}"), expected)
    with pytest.raises(StatsFormatError, match=r"cannot read: .*"):
        StatsReader().read(f"s3://testprofile@{BUCKET}/no/such.yaml")


def test_s3_settings_come_from_the_environment_only():
    assert _s3_settings({"AWS_ENDPOINT_URL": "http://h:9000", "AWS_REGION": "x"}) == ({}, {"allow_http": True})
    assert _s3_settings({"AWS_REGION": "x"}) == ({}, {})
    config, client = _s3_settings({"S3_ENDPOINT_URL": "https://k%2F1:s@store.example:443/base",
                                   "AWS_DEFAULT_REGION": "x"})
    assert config == {"aws_access_key_id": "k/1", "aws_secret_access_key": "s",
                      "aws_endpoint": "https://store.example:443/base"} and client == {}
    assert _s3_settings({})[0] == {"aws_region": "us-east-1"}


@pytest.mark.parametrize("max_requests", [1, 24])
def test_requests_in_flight_are_many_and_bounded(campaign, max_requests):
    """read_many keeps up to ``max_requests`` GETs in flight, never more (the speed-up itself is measured by
    benchmarks/bench_s3.py: 2,000 files at 20 ms a request against the serial time)."""
    root, keys = campaign
    keys = keys[:60 if max_requests == 1 else 300]  # one at a time: 20 ms each
    uris = [f"s3://{BUCKET}/{key}" for key in keys]
    with serve(root, BUCKET, delay=0.020, processes=1) as endpoint:
        reader = StatsReader(max_requests=max_requests)
        reader.read(uris[0])
        peak_in_flight(endpoint)  # reset
        rows = list(reader.read_many(uris))
        peak = peak_in_flight(endpoint)
    for got, key in zip(rows, keys):
        _rows_equal(got, StatsReader().read(root / key))
    # A bounded pool: at most max_requests at once, and nearly all of them busy (20 ms each).
    assert max_requests // 2 <= peak <= max_requests, peak
