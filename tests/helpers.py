"""Shared by the tests: their data, PyYAML with the PropertyList tag (an independent reader/writer), the CLI
run in the test's process and its error line."""

import contextlib
import io
import subprocess
from pathlib import Path

import yaml

#: Files the tests read (see data/README.md for their sources).
DATA = Path(__file__).parent / "data"

# Spelled here, not imported: the tests check flatnorm_dask.propertylist against LSST's tags, not against itself.
TAG = "lsst.daf.base.PropertyList"
DATETIME_TAG = "lsst.daf.base.DateTime"  # daf_base writes a DateTime value as this tag on its ISO-8601 string


class PropertyListLoader(yaml.SafeLoader):
    """safe_load plus the PropertyList tag, as the butler reads these files (pure-Python loader)."""


PropertyListLoader.add_constructor(TAG, lambda loader, node: loader.construct_sequence(node, deep=True))
PropertyListLoader.add_constructor(DATETIME_TAG, lambda loader, node: loader.construct_scalar(node))


class PropertyListDumper(yaml.SafeDumper):
    """PyYAML writing a PropertyList with the same representer shape as LSST's."""


class Items(list):
    """A list that PropertyListDumper writes as a tagged PropertyList sequence."""


class DateTime(str):
    """An ISO-8601 TAI time that PropertyListDumper writes as daf_base writes a DateTime element's value."""


PropertyListDumper.add_representer(Items, lambda dumper, data: dumper.represent_sequence(TAG, list(data)))
PropertyListDumper.add_representer(DateTime, lambda dumper, data: dumper.represent_scalar(DATETIME_TAG, str(data)))


def in_process(*args) -> subprocess.CompletedProcess:
    """``flatnorm ARGS`` in the test's process, as a CompletedProcess: what the command prints and returns
    without the seconds a fresh interpreter spends importing (tests of the process itself run a subprocess)."""
    from flatnorm_dask.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def error_line(result) -> str:
    """The one error line of a failed run: last on stderr, alone, no traceback (log lines may precede it)."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("flatnorm: error:")] == lines[-1:]
    return lines[-1]


def combination_lookup(scales: dict, detector: int, amp_names, exposures) -> dict | None:
    """What LSST's flat combination (``exposureScaling: InputList``) takes from one scales dataset for one
    detector's input flats, written here from its documented behaviour (see the project's FORMATS.md), not
    from its code:

    - a detector that is not a key of ``expScale`` has no work: None;
    - of the input flats, it combines those whose exposure is listed under the detector's first amplifier;
    - it divides each of those, amplifier by amplifier (the camera's amplifiers, by name), by
      ``expScale[detector][amp][exposure]`` (a missing key is an error, as it is there).

    Returns ``{exposure: [scale of each amplifier]}`` for the flats combined, in input order.
    """
    per_amp = scales["expScale"].get(detector)
    if per_amp is None:
        return None
    listed = per_amp[next(iter(per_amp))]
    return {exposure: [per_amp[amp][exposure] for amp in amp_names] for exposure in exposures
            if exposure in listed}
