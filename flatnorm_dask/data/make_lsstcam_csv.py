"""Regenerate ``lsstcam.csv`` and ``testcam.csv`` (run once by hand; the CSVs are the committed data).

Usage::

    python flatnorm_dask/data/make_lsstcam_csv.py /work/shared/data/lsstcam_amplifiers.csv

The amplifier table's own fields are copied through as text, so gains keep their exact decimal form.
Geometry is the nominal grid described in ``CAMERAS.md``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

RAFT_PITCH_MM = 127.0
CCD_PITCH_MM = 42.25
EXTRA = ["raft", "sensor", "x_mm", "y_mm", "amp_col", "amp_row"]


def position(detector_name: str) -> tuple[float, float]:
    """Nominal centre (x, y) in mm of ``R{r}{c}_S{s}{t}``; first digit is the row (y), second the column (x)."""
    raft, sensor = detector_name.split("_")
    r, c, s, t = int(raft[1]), int(raft[2]), int(sensor[1]), int(sensor[2])
    return ((c - 2) * RAFT_PITCH_MM + (t - 1) * CCD_PITCH_MM, (r - 2) * RAFT_PITCH_MM + (s - 1) * CCD_PITCH_MM)


def with_geometry(row: dict[str, str]) -> dict[str, str]:
    raft, sensor = row["detector_name"].split("_")
    x, y = position(row["detector_name"])
    amp = row["amp_name"]  # C{row}{col}: C1x on top (row 1), column from the second digit
    return {**row, "raft": raft, "sensor": sensor, "x_mm": repr(x + 0.0), "y_mm": repr(y + 0.0),
            "amp_col": amp[2], "amp_row": amp[1]}


def write(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def testcam_rows() -> list[dict[str, str]]:
    amps = ["C10", "C11", "C12", "C13", "C03", "C02", "C01", "C00"]
    rows = []
    for det in range(9):
        name = f"R22_S{det // 3}{det % 3}"
        for k, amp in enumerate(amps):
            # Deterministic +-2.5% spread around 1.5 e-/ADU, no two neighbours equal.
            gain = 1.5 + 0.0075 * (((7 * det + 3 * k) % 11) - 5)
            rows.append(with_geometry({
                "detector": str(det), "detector_name": name, "detector_type": "E2V",
                "ccd_serial": f"TEST-{det:03d}", "amp_index": str(k), "amp_name": amp,
                "gain": f"{gain:.5f}", "read_noise": "5.0", "saturation": "150000"}))
    return rows


def main(source: str) -> None:
    here = Path(__file__).parent
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or []) + EXTRA
        rows = [with_geometry(row) for row in reader]
    write(here / "lsstcam.csv", fields, rows)
    write(here / "testcam.csv", fields, testcam_rows())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/lsstcam_amplifiers.csv")
