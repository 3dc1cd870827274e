"""The exploration notebook runs from top to bottom on a small store and shows what it promises."""

import base64
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from flatnorm_dask.cli import main

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "explore_scales.ipynb"


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)



@pytest.mark.slow
def test_notebook_executes_on_a_demo_store(tmp_path, monkeypatch):
    assert main(["--quiet", "demo", "--workdir", str(tmp_path), "--detectors", "18", "--exposures", "6",
                 "--filters", "i_39", "--workers", "1", "--no-progress"]) == 0
    monkeypatch.setenv("FLATNORM_STORE", str(tmp_path / "scales.zarr"))
    # The kernel's temporary directories (the comparison's campaigns) in the test's, not left in /tmp.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # Focal plane, exposure scales, residual map, residual histogram for i_39; the comparison's ratio map.
    assert len(images) == 5
    assert all(base64.b64decode(o["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n" for o in images)
    text = "".join(o.get("text", "") for o in outputs)
    assert "i_39: level AMP" in text and "worst rows" in text and "converged=True" in text
    # The comparison flags exactly the three amplifiers whose gains were planted 2 % higher.
    assert "  3 row(s) moved beyond 5 sigma:" in text
    moved = [line.split(":")[0].strip() for line in text.splitlines() if " ratio " in line and "sigma)" in line]
    assert sorted(moved) == ["R01_S11 C13", "R02_S11 C02", "R03_S02 C17"]
    table = outputs[-1]["data"]["text/plain"]
    assert all(name in table for name in ("R01_S11", "R02_S11", "R03_S02", "significance"))
