"""The README's Python examples run as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_every_python_block_runs(capsys):
    blocks = python_blocks()
    assert blocks, "the README has no Python example"
    namespaces = []
    for block in blocks:
        namespace: dict = {"__name__": "readme"}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
        namespaces.append(namespace)
    assert capsys.readouterr().out.strip()
    # The campaign example: its scales are the simulated truth (G is normalised the same way), within noise.
    example = next(ns for ns in namespaces if "fit" in ns)
    fit, truth = example["fit"], example["truth"]["r_57"].to_dataset()
    assert fit.converged
    np.testing.assert_allclose(fit.vectorE.values, truth["true_exp_scale"].values, rtol=2e-3)
    g, true_g = fit.vectorG.values, truth["true_det_scale"].transpose(*fit.vectorG.dims).values
    dead = ~np.isfinite(truth["amp_value"].values).any(axis=-1)  # rows without data get a filled G
    np.testing.assert_allclose(g[~dead], true_g[~dead], rtol=2e-3)
    # The comparison example: exactly the amplifier whose gain was planted 2 % higher is flagged.
    example = next(ns for ns in namespaces if "comparison" in ns)
    flagged = example["flagged"]
    assert flagged[flagged].index.tolist() == [(4, "C13")] and len(flagged) == 9 * 16
    # The append example: the second night's files only were read, and the store holds both nights.
    example = next(ns for ns in namespaces if "history" in ns)
    assert [(entry["kind"], entry["files"]["read"], entry["files"]["added"]) for entry in example["history"]] == [
        ("run", 54, 54), ("append", 18, 18)]
    assert example["summary"].append.files["kept"] == 54 and example["summary"].filters[0].n_exposures == 8
