"""The statistics schema: what a flat-statistics record holds and how the package names it.

One home for the key names of a statistics file, the scaling levels that select among them, what a bad
file does to a run, and the LSST exposure-id rule.  Everything else imports these names.
"""

from __future__ import annotations

__all__ = ["LEVELS", "ON_ERROR", "check_level"]

#: Scaling levels: one G per detector (the ``DETECTOR_*`` statistics) or per amplifier (``AMP_*_i``).
LEVELS = ("DETECTOR", "AMP")

#: What a file that cannot be used does: stop the run naming it, or mask its cells and record why.
ON_ERROR = ("raise", "mask")


def check_level(level: str) -> str:
    """Normalise a scaling level name (case-insensitive), refusing unknown ones."""
    upper = str(level).upper()
    if upper not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    return upper
