"""``normalize``: the reference task's run() shape, with its defects fixed."""

import numpy as np
import pytest
import yaml

from flatnorm_dask import measure_scales, normalize, records_to_matrices
from flatnorm_dask.formats import read_stats_file
from flatnorm_dask.schema import StatsFormatError
from helpers import Items, PropertyListDumper

AMPS = ["C10", "C11", "C01", "C00"]


def make_records(n_det=3, n_exp=4, seed=0):
    rng = np.random.default_rng(seed)
    dets = [5, 2, 9][:n_det]
    exps = [2025112000010 + 3 * i for i in range(n_exp)]
    level = rng.uniform(1e4, 3e4, n_exp)
    gain = rng.uniform(0.8, 1.2, (n_det, len(AMPS)))
    records, dims, truth = [], [], {}
    for j, exp in enumerate(exps):
        for i, det in enumerate(dets):
            amp_values = gain[i] * level[j] * np.exp(rng.normal(0, 0.01, len(AMPS)))
            amp_counts = rng.integers(900_000, 1_000_000, len(AMPS))
            rec = {"DETECTOR_MEDIAN": float(np.average(amp_values, weights=amp_counts)),
                   "DETECTOR_N": int(amp_counts.sum()), "DETECTOR_SIGMA": 10.0}
            for a, name in enumerate(AMPS):
                rec[f"AMP_NAME_{a}"] = name
                rec[f"AMP_MEDIAN_{a}"] = float(amp_values[a])
                rec[f"AMP_N_{a}"] = int(amp_counts[a])
                truth[det, name, exp] = (amp_values[a], amp_counts[a])
            records.append(rec)
            dims.append({"exposure": exp, "detector": det, "physical_filter": "r_57"})
    return records, dims, sorted(dets), exps, truth


def test_detector_level_output_structure_and_numbers():
    records, dims, dets, exps, _ = make_records()
    out = normalize(records, dims, level="DETECTOR")
    b = np.array([[next(r["DETECTOR_MEDIAN"] for r, d in zip(records, dims)
                        if d["detector"] == det and d["exposure"] == exp) for exp in exps] for det in dets])
    w = np.array([[next(r["DETECTOR_N"] for r, d in zip(records, dims)
                        if d["detector"] == det and d["exposure"] == exp) for exp in exps] for det in dets])
    fit = measure_scales(b, w)
    assert sorted(out) == ["detScale", "expScale"]
    assert list(out["detScale"]) == dets
    assert out["detScale"][9] == pytest.approx(fit.vectorG[2], rel=1e-13)
    assert set(out["expScale"]) == set(dets)
    for det in dets:
        assert list(out["expScale"][det]) == AMPS
        for amp in AMPS:
            assert list(out["expScale"][det][amp]) == exps
            assert [out["expScale"][det][amp][e] for e in exps] == pytest.approx(fit.vectorE, rel=1e-13)
    assert all(type(v) is float for v in out["detScale"].values())


def test_amp_level_rows_are_det_times_namp_plus_amp():
    records, dims, dets, exps, truth = make_records(seed=1)
    out = normalize(records, dims, level="amp")
    b = np.array([[truth[det, amp, exp][0] for exp in exps] for det in dets for amp in AMPS])
    w = np.array([[truth[det, amp, exp][1] for exp in exps] for det in dets for amp in AMPS], dtype=float)
    fit = measure_scales(b, w)
    for i, det in enumerate(dets):
        for a, amp in enumerate(AMPS):
            assert out["detScale"][det][amp] == pytest.approx(fit.vectorG[i * len(AMPS) + a], rel=1e-13)
    # The defect would give detector 9 / amp C00 the G of row 2 + 3 = 5 (detector 5's C01).
    assert out["detScale"][9]["C00"] != pytest.approx(fit.vectorG[2 + 3], rel=1e-6)


def test_nan_amplifier_is_masked_not_weighted():
    records, dims, dets, exps, truth = make_records(seed=2)
    records[0]["AMP_MEDIAN_1"] = float("nan")
    records[0]["AMP_N_1"] = 0
    values, counts, *_ = records_to_matrices(records, dims, "AMP")
    det0 = dets.index(dims[0]["detector"])
    row = det0 * len(AMPS) + 1
    assert np.isnan(values[row, 0]) and counts[row, 0] == 0
    out = normalize(records, dims, level="AMP")
    assert np.isfinite(out["detScale"][dims[0]["detector"]]["C11"])


def test_missing_cells_are_masked():
    records, dims, dets, exps, _ = make_records(seed=3)
    del records[4], dims[4]
    values, counts, e_ids, d_ids, names = records_to_matrices(records, dims, "DETECTOR")
    assert (e_ids, d_ids, names) == (exps, dets, AMPS)
    assert np.isnan(values).sum() == 1 and (counts == 0).sum() == 1


def test_camera_supplies_amp_names():
    class Cam:
        amp_names = ("A", "B", "C", "D")

    records, dims, *_ = make_records(seed=4)
    out = normalize(records, dims, level="DETECTOR", camera=Cam())
    assert list(out["expScale"][2]) == ["A", "B", "C", "D"]


def test_missing_dimension_names_the_data_id():
    records, dims, *_ = make_records()
    del dims[3]["exposure"]
    with pytest.raises(KeyError, match=r"data id 3 .*'exposure' missing"):
        normalize(records, dims)


def test_missing_statistic_names_key_and_record():
    for level in ("AMP", "DETECTOR"):  # every statistic is checked at both levels, as the file reader does
        records, dims, *_ = make_records()
        del records[2]["AMP_N_3"]
        det, exp = dims[2]["detector"], dims[2]["exposure"]
        with pytest.raises(StatsFormatError) as info:
            normalize(records, dims, level=level)
        assert str(info.value) == f"record 2 (exposure {exp}, detector {det}): AMP_N_3: missing"
        assert (info.value.key, info.value.reason) == ("AMP_N_3", "missing")
    records, dims, *_ = make_records()
    records[1]["DETECTOR_MEDIAN"] = "abc"
    with pytest.raises(StatsFormatError, match=r"record 1 \(.*\): DETECTOR_MEDIAN: not a number: 'abc'"):
        normalize(records, dims)


# Records the file reader refuses: normalize refuses them too, with the same key and reason.
BAD_RECORDS = {
    "negative DETECTOR_N": lambda r: r.update(DETECTOR_N=-5),
    "negative AMP_N": lambda r: r.update(AMP_N_2=-1.5),
    "gap in AMP_NAME": lambda r: r.pop("AMP_NAME_1"),
    "stray AMP_NAME": lambda r: r.update(AMP_NAME_x="C99"),
    "int amplifier name": lambda r: r.update(AMP_NAME_0=10),
    "bool for a number": lambda r: r.update(DETECTOR_MEDIAN=True),
    "string for a number": lambda r: r.update(AMP_MEDIAN_3="20000.5"),
    "null count": lambda r: r.update(AMP_N_0=None),
    "missing median": lambda r: r.pop("DETECTOR_MEDIAN"),
    "int beyond floats": lambda r: r.update(DETECTOR_N=10**400),
}


@pytest.mark.parametrize("level", ["DETECTOR", "AMP"])
@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_records_are_refused_as_the_file_reader_refuses_them(name, level, tmp_path):
    records, dims, *_ = make_records()
    BAD_RECORDS[name](records[5])
    path = tmp_path / "bad.yaml"
    items = Items([name, type(value).__name__, value, ""] for name, value in records[5].items())
    path.write_text(yaml.dump(items, Dumper=PropertyListDumper))
    with pytest.raises(StatsFormatError) as from_file:
        read_stats_file(path)
    with pytest.raises(StatsFormatError) as from_records:
        normalize(records, dims, level=level)
    assert (from_records.value.key, from_records.value.reason) == (from_file.value.key, from_file.value.reason)
    where = f"record 5 (exposure {dims[5]['exposure']}, detector {dims[5]['detector']})"
    assert from_records.value.path == where
    assert str(from_records.value) == f"{where}: {from_file.value.key}: {from_file.value.reason}"


def test_numpy_numbers_are_numbers():
    records, dims, *_ = make_records(seed=6)
    expected = normalize(records, dims, level="AMP")
    as_numpy = [{k: (np.float32(v) if k == "DETECTOR_SIGMA" else np.int64(v) if isinstance(v, int)
                     else np.float64(v) if isinstance(v, float) else v) for k, v in r.items()} for r in records]
    assert isinstance(as_numpy[0]["AMP_N_0"], np.int64)
    assert normalize(as_numpy, dims, level="AMP") == expected


def test_amplifier_names_must_agree_at_amp_level():
    records, dims, *_ = make_records()
    records[3]["AMP_NAME_2"] = "X99"
    normalize(records, dims, level="DETECTOR")  # the output uses record 0's names; the others are not compared
    with pytest.raises(StatsFormatError, match=r"record 3 \(.*\): AMP_NAME_i: amplifier names .*X99.* differ"):
        normalize(records, dims, level="AMP")


def test_amplifier_names_are_needed():
    records, dims, *_ = make_records()
    for record in records:
        for key in [k for k in record if k.startswith("AMP_")]:
            del record[key]
    with pytest.raises(StatsFormatError, match="record 0 .*: AMP_NAME_0: missing: no amplifier names"):
        normalize(records, dims)

    class Cam:
        amp_names = ("A", "B")

    out = normalize(records, dims, camera=Cam())
    assert list(out["expScale"][2]) == ["A", "B"]


def test_duplicate_and_bad_level_rejected():
    records, dims, *_ = make_records()
    with pytest.raises(ValueError, match="duplicate of record 0"):
        normalize(records + records[:1], dims + dims[:1])
    with pytest.raises(ValueError, match="level must be one of"):
        normalize(records, dims, level="CCD")


@pytest.mark.parametrize("level", ["DETECTOR", "AMP"])
def test_an_exposure_without_a_usable_record_is_left_out_of_exp_scale(level):
    records, dims, dets, exps, _ = make_records(seed=2)
    empty = exps[1]
    for record, dim in zip(records, dims):
        if dim["exposure"] == empty:  # every statistic of the exposure unusable: NaN, or no pixels
            record.update({key: float("nan") for key in record if "_MEDIAN" in key})
            record["AMP_N_0"] = 0
    out = normalize(records, dims, level=level)
    # The others are solved from the same usable records as when the empty exposure is not given at all.
    kept = [(r, d) for r, d in zip(records, dims) if d["exposure"] != empty]
    without = normalize([r for r, _ in kept], [d for _, d in kept], level=level)
    for det in dets:
        for amp in AMPS:
            assert list(out["expScale"][det][amp]) == [e for e in exps if e != empty]  # not a NaN to divide by
            assert out["expScale"][det][amp] == pytest.approx(without["expScale"][det][amp], rel=1e-12)
