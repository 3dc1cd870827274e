"""``normalize``: the reference task's run() shape, with its defects fixed."""

import numpy as np
import pytest

from flatnorm_dask import measure_scales, normalize, records_to_matrices

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
    records, dims, *_ = make_records()
    del records[2]["AMP_N_3"]
    det, exp = dims[2]["detector"], dims[2]["exposure"]
    with pytest.raises(KeyError, match=rf"record 2 \(exposure {exp}, detector {det}\): statistic AMP_N_3 missing"):
        normalize(records, dims, level="AMP")
    records, dims, *_ = make_records()
    records[1]["DETECTOR_MEDIAN"] = "abc"
    with pytest.raises(KeyError, match="DETECTOR_MEDIAN is not a number"):
        normalize(records, dims)


def test_duplicate_and_bad_level_rejected():
    records, dims, *_ = make_records()
    with pytest.raises(ValueError, match="duplicate of record 0"):
        normalize(records + records[:1], dims + dims[:1])
    with pytest.raises(ValueError, match="level must be one of"):
        normalize(records, dims, level="CCD")
