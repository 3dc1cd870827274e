"""The statistics schema: keys, StatsRow order, packed channels, the exposure-id rule."""

import numpy as np
import pytest
import yaml

from flatnorm_dask.schema import (
    AMP_VARIABLES,
    DET_VARIABLES,
    STAT_NAMES,
    PackedChannels,
    StatsFormatError,
    exposure_from_obs_id,
    exposure_id,
    extract_stats,
    format_obs_id,
    row_keys,
    split_exposure,
    written_keys,
)
from helpers import DATA, PropertyListLoader


def numbered_record(n_amp):
    """A record whose every statistic is a distinct number, so positions can be traced."""
    record = {f"DETECTOR_{s}": float(k + 1) for k, s in enumerate(STAT_NAMES)}
    for i in range(n_amp):
        record[f"AMP_NAME_{i}"] = f"A{i}"
        record |= {f"AMP_{s}_{i}": float(100 * (k + 1) + i) for k, s in enumerate(STAT_NAMES)}
    return record


@pytest.mark.parametrize("n_amp", [0, 1, 5])
def test_row_keys_are_the_flattened_stats_row(n_amp):
    record = numbered_record(n_amp)
    row = extract_stats(record)
    flat = np.concatenate([row.det, row.amp.ravel()])
    np.testing.assert_array_equal(flat, [record[key] for key, _ in row_keys(n_amp)])
    assert [stat for _, stat in row_keys(n_amp)][:3] == list(STAT_NAMES)
    assert row.amp_names == tuple(f"A{i}" for i in range(n_amp))


def test_written_keys_are_the_order_and_types_cp_pipe_writes():
    for style in ("block", "flow"):
        items = yaml.load((DATA / f"flatStats_{style}.yaml").read_text(), Loader=PropertyListLoader)
        keys = written_keys(16)
        assert [(name, typ) for name, typ, _, _ in items] == [(key, typ) for key, _, _, typ in keys]
        record = {name: value for name, _, value, _ in items}
        for key, stat, amp, _ in keys:  # the statistic and amplifier each key stands for
            if stat is None:
                assert key == f"AMP_NAME_{amp}" and isinstance(record[key], str)
            elif amp is None:
                assert key == f"DETECTOR_{stat}"
            else:
                assert key == f"AMP_{stat}_{amp}"


def test_extract_stats_takes_numpy_numbers_and_refuses_numpy_bools():
    record = numbered_record(2)
    counts = [k for k in record if k == "DETECTOR_N" or k.startswith("AMP_N_")]
    as_numpy = record | {k: np.int64(record[k]) for k in counts} | {"AMP_SIGMA_1": np.float32(record["AMP_SIGMA_1"])}
    for a, b in zip(extract_stats(record), extract_stats(as_numpy)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(StatsFormatError, match="AMP_N_1: not a number: np.True_"):
        extract_stats(record | {"AMP_N_1": np.bool_(True)})
    with pytest.raises(StatsFormatError, match="DETECTOR_N: negative pixel count -1"):
        extract_stats(record | {"DETECTOR_N": np.int64(-1)})


@pytest.mark.parametrize("n_amp", [0, 1, 4])
def test_packed_channels_round_trip_a_stats_row(n_amp):
    channels = PackedChannels(n_amp)
    row = extract_stats(numbered_record(n_amp))
    block = np.full((2, channels.size, 3), -1.0)
    block[1, channels.status, 2] = 7
    block[1, channels.det, 2] = row.det
    block[1, channels.amp, 2] = row.amp.reshape(-1)
    assert (block[1, :, 2] != -1).all()  # every channel filled once
    got = {name: block[1, index, 2] for name, _, index in channels.variables()}
    for k, stat in enumerate(STAT_NAMES):
        assert got[DET_VARIABLES[stat]] == row.det[k]
        np.testing.assert_array_equal(got[AMP_VARIABLES[stat]], row.amp[k])
        assert block[1, channels.det_channel(stat), 2] == row.det[k]
    per_amp = {name: flag for name, flag, _ in channels.variables()}
    assert per_amp == {**{v: False for v in DET_VARIABLES.values()}, **{v: True for v in AMP_VARIABLES.values()}}
    assert channels.size == 1 + 3 * (1 + n_amp) and block[1, channels.status, 2] == 7


def test_exposure_ids():
    assert exposure_id(20251120, 42) == 2025112000042
    np.testing.assert_array_equal(exposure_id(20251120, np.array([0, 99999])), [2025112000000, 2025112099999])
    assert split_exposure(2025112000042) == (20251120, 42)
    assert format_obs_id(20251120, 42) == "MC_C_20251120_000042"
    assert exposure_from_obs_id("MC_C_20251120_000042") == 2025112000042
    assert exposure_from_obs_id(format_obs_id(20260101, 99999, prefix="MC_O")) == exposure_id(20260101, 99999)
    for day, seq, match in [(20251120, 100_000, "seq_num 100000"), (20251120, -1, "seq_num -1"),
                            (123456789, 1, "day_obs 123456789")]:
        with pytest.raises(ValueError, match=match):
            exposure_id(day, seq)
        with pytest.raises(ValueError, match=match):
            format_obs_id(day, seq)
    with pytest.raises(ValueError, match="seq_num 1234567"):
        exposure_id(20251120, np.array([1, 1234567]))
    for bad in ("20251120_42", "MC_C_2025112_000042", "MC_20251120_000042", "MC_C_20251120_"):
        with pytest.raises(ValueError, match="not an LSST obs_id"):
            exposure_from_obs_id(bad)
    with pytest.raises(ValueError, match="obs_id 'MC_C_20251120_123456': seq_num 123456"):
        exposure_from_obs_id("MC_C_20251120_123456")
