"""The statistics schema: what a flat-statistics record holds and how the package names it.

One home for the key names of a statistics record (``DETECTOR_MEDIAN``, ``AMP_NAME_i``, ...), the
:class:`StatsRow` a record becomes and the checks on the way (:func:`extract_stats`), the packed channels
the reading tasks fill (:class:`PackedChannels`), the variables of the Datasets built from them, the LSST
exposure-id rule (``exposure = day_obs * 100000 + seq_num``, obs_ids such as ``MC_C_20251120_000042``), the
names the LSST pipelines give the statistics and the scales (dataset types, the butler's file layout, the
exposure record fields a run can down-select on), the scaling levels and what a bad file does to a run.
Everything else imports these names.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from ._text import short_repr

__all__ = [
    "AMP_NAME_PREFIX",
    "AMP_VARIABLES",
    "COUNT_STAT",
    "DAY_OBS_PATTERN",
    "DET_VARIABLES",
    "EXPOSURE_MULTIPLIER",
    "LEVELS",
    "MAX_PIXEL_COUNT",
    "OBS_ID_PATTERN",
    "ON_ERROR",
    "LEGACY_SCALES_DATASET_TYPE",
    "LEGACY_STATISTICS_DATASET_TYPE",
    "OPTIONAL_STATS",
    "PackedChannels",
    "SCALES_DATASET_TYPE",
    "SELECT_FIELDS",
    "STATISTICS_DATASET_TYPE",
    "STAT_INDEX",
    "STAT_NAMES",
    "StatsFormatError",
    "StatsRow",
    "VALUE_STAT",
    "amp_key",
    "amp_name_key",
    "amplifier_names",
    "butler_file_pattern",
    "check_level",
    "detector_key",
    "exposure_from_obs_id",
    "exposure_id",
    "extract_stats",
    "format_obs_id",
    "parse_selection",
    "row_keys",
    "split_exposure",
    "written_keys",
]

# --- Scaling levels and bad files -------------------------------------------------------------------------

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


# --- Keys of a statistics record --------------------------------------------------------------------------

#: The statistics of the detector and of each amplifier, in the order of :class:`StatsRow`'s arrays:
#: clipped mean (named "median" upstream), pixel count, clipped standard deviation.
STAT_NAMES = ("MEDIAN", "N", "SIGMA")
#: Position of each statistic in :attr:`StatsRow.det` and along the first axis of :attr:`StatsRow.amp`.
STAT_INDEX = {stat: i for i, stat in enumerate(STAT_NAMES)}
#: The statistic that is scaled (B = G x E).
VALUE_STAT = "MEDIAN"
#: The pixel count: the solver's weight, so it may be NaN (no data) but never negative.
COUNT_STAT = "N"
#: The largest pixel count a record may hold: 2**53, the largest integer a float64 holds exactly, and far
#: more pixels than any camera has (LSSTCam: 3.2e9). A larger count (1e+200, 1e+308, inf) is a corrupt
#: file, and as a weight it would overflow the solver's sums and spoil a whole filter.
MAX_PIXEL_COUNT = 2**53
#: Statistics a record may lack (they read as NaN); the others are required.
OPTIONAL_STATS = frozenset({"SIGMA"})
#: The order in which cp_pipe writes a record's statistics, with their PropertyList element types.
_WRITTEN = (("MEDIAN", "Double"), ("SIGMA", "Double"), ("N", "Int"))
AMP_NAME_PREFIX = "AMP_NAME_"

#: Dataset variables that hold each statistic, per detector and per amplifier.
DET_VARIABLES = {"MEDIAN": "det_value", "N": "det_count", "SIGMA": "det_sigma"}
AMP_VARIABLES = {"MEDIAN": "amp_value", "N": "amp_count", "SIGMA": "amp_sigma"}


def detector_key(stat: str) -> str:
    """Key of a detector statistic: ``DETECTOR_MEDIAN``, ``DETECTOR_N``, ``DETECTOR_SIGMA``."""
    return f"DETECTOR_{stat}"


def amp_key(stat: str, i: int) -> str:
    """Key of amplifier ``i``'s statistic: ``AMP_MEDIAN_3``, ``AMP_N_3``, ``AMP_SIGMA_3``."""
    return f"AMP_{stat}_{i}"


def amp_name_key(i: int) -> str:
    """Key of amplifier ``i``'s name: ``AMP_NAME_3``."""
    return f"{AMP_NAME_PREFIX}{i}"


def row_keys(n_amp: int) -> list[tuple[str, str]]:
    """(key, statistic) of each value of a :class:`StatsRow` with ``n_amp`` amplifiers, flattened.

    The detector's statistics in :data:`STAT_NAMES` order, then each statistic over the amplifiers: the
    order of ``np.concatenate([row.det, row.amp.ravel()])``.
    """
    keys = [(detector_key(stat), stat) for stat in STAT_NAMES]
    keys += [(amp_key(stat, i), stat) for stat in STAT_NAMES for i in range(n_amp)]
    return keys


def written_keys(n_amp: int) -> list[tuple[str, str | None, int | None, str]]:
    """(key, statistic, amplifier, PropertyList element type) of a full record, in the order cp_pipe writes.

    ``DETECTOR_MEDIAN``, ``DETECTOR_SIGMA``, ``DETECTOR_N`` (amplifier None), then for each amplifier ``i``
    ``AMP_NAME_i`` (statistic None, a String), ``AMP_MEDIAN_i``, ``AMP_SIGMA_i``, ``AMP_N_i``.
    """
    keys: list[tuple[str, str | None, int | None, str]] = [(detector_key(stat), stat, None, typ)
                                                           for stat, typ in _WRITTEN]
    for i in range(n_amp):
        keys.append((amp_name_key(i), None, i, "String"))
        keys += [(amp_key(stat, i), stat, i, typ) for stat, typ in _WRITTEN]
    return keys


# --- From a record to numbers -----------------------------------------------------------------------------

class StatsFormatError(ValueError):
    """A statistics file or record that cannot be used: where it is, the key (if one is to blame), the reason.

    ``path`` is the file, or for records given in memory a description such as ``record 3 (exposure ...,
    detector ...)``; None for text without a name.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str, key: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        self.key = key
        where = self.path if self.path is not None else "<text>"
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")

    def __reduce__(self):  # keep path/key/reason when a worker sends the error back
        return type(self), (self.path, self.reason, self.key)


class StatsRow(NamedTuple):
    """The statistics of one (detector, exposure) record.

    Attributes
    ----------
    det : ndarray, shape (3,)
        Detector ``MEDIAN`` (clipped mean), ``N`` (pixel count) and ``SIGMA``, in :data:`STAT_NAMES` order.
    amp_names : tuple of str
        Amplifier names in the record's order (``AMP_NAME_0``, ``AMP_NAME_1``, ...).
    amp : ndarray, shape (3, nAmp)
        The same three statistics per amplifier.
    """

    det: np.ndarray
    amp_names: tuple[str, ...]
    amp: np.ndarray


# Numbers as a parser or a caller may hand them over; bool (an int subclass) is refused apart.
_NUMBER_TYPES = (int, float, np.integer, np.floating)


def _statistic(record: Mapping[str, Any], key: str, stat: str, path) -> float:
    """One statistic as a float, with the checks its kind needs (see :func:`extract_stats`)."""
    try:
        value = record[key]
    except KeyError:
        if stat in OPTIONAL_STATS:
            return math.nan
        raise StatsFormatError(path, "missing", key=key) from None
    if type(value) is float:  # what parsers hand over nearly always: no further checks
        number = value
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, _NUMBER_TYPES):
        raise StatsFormatError(path, f"not a number: {short_repr(value)}", key=key)
    else:
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            raise StatsFormatError(path, f"number out of range: {short_repr(value)}", key=key) from None
    if stat == COUNT_STAT and (not 0 <= number <= MAX_PIXEL_COUNT or type(value) is not float
                               and value > MAX_PIXEL_COUNT) and number == number:  # NaN: no data
        if number < 0:
            raise StatsFormatError(path, f"negative pixel count {number:g}", key=key)
        raise StatsFormatError(path, f"pixel count {number:g} beyond 2**53 (more pixels than any camera has)",
                               key=key)
    return number


_DETECTOR_KEYS = tuple((detector_key(stat), stat) for stat in STAT_NAMES)


@lru_cache(maxsize=64)
def _amp_keys(n_amp: int) -> tuple[tuple[str, str], ...]:
    """(key, statistic) of the amplifiers' statistics, one amplifier after another."""
    return tuple((amp_key(stat, i), stat) for i in range(n_amp) for stat in STAT_NAMES)


def amplifier_names(record: Mapping[str, Any], path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The amplifier names of a record: ``AMP_NAME_0`` .. ``AMP_NAME_{n-1}``, strings, with no gap.

    Raises
    ------
    StatsFormatError
        A name that is not a string, or an ``AMP_NAME_*`` key beyond the first missing number.
    """
    names = []
    while (key := amp_name_key(len(names))) in record:
        name = record[key]
        if not isinstance(name, str):
            raise StatsFormatError(path, f"amplifier name is not a string: {short_repr(name)}", key=key)
        names.append(name)
    if sum(1 for k in record if isinstance(k, str) and k.startswith(AMP_NAME_PREFIX)) != len(names):
        raise StatsFormatError(path, "missing while higher-numbered amplifier names exist",
                               key=amp_name_key(len(names)))
    return tuple(names)


def extract_stats(record: Mapping[str, Any], path: str | os.PathLike | None = None) -> StatsRow:
    """The statistics the normalisation uses, from a record (a parsed file, or a mapping given in memory).

    ``*_MEDIAN`` and ``*_N`` are required for the detector and every amplifier; ``*_SIGMA`` is optional (NaN
    when absent). Amplifiers are ``AMP_NAME_0`` .. ``AMP_NAME_{n-1}`` with no gap. NaN values are kept (the
    solver leaves such cells out); a count may be NaN but not negative nor beyond :data:`MAX_PIXEL_COUNT`
    (2**53). Python and numpy numbers are
    numbers; bools and strings are not. The first problem found is reported: the detector's statistics,
    then the amplifier names, then each amplifier's statistics in turn.

    Parameters
    ----------
    record : mapping
        Key -> value.
    path : path-like or str, optional
        The file (or a description of the record), named in errors.

    Raises
    ------
    StatsFormatError
        Naming ``path`` and the key: missing, not a number, out of the float range, a negative count or one
        beyond 2**53, a gap
        in the amplifier numbering or a name that is not a string.
    """
    det = np.array([_statistic(record, key, stat, path) for key, stat in _DETECTOR_KEYS])
    names = amplifier_names(record, path)
    values = [_statistic(record, key, stat, path) for key, stat in _amp_keys(len(names))]
    amp = np.empty((len(STAT_NAMES), len(names)))
    amp.T[...] = np.reshape(values, (len(names), len(STAT_NAMES)))
    return StatsRow(det, names, amp)


# --- The packed blocks of the reading tasks ---------------------------------------------------------------

class PackedChannels:
    """Channels of the packed ``(detector, channel, exposure)`` blocks that ingest's reading tasks fill.

    Channel :attr:`status` holds a cell's status code; :attr:`det` the detector's statistics
    (:attr:`StatsRow.det`); :attr:`amp` the amplifiers' (:attr:`StatsRow.amp` flattened: each statistic
    over the amplifiers). The task that fills a block and the code that slices the Dataset out of it both
    take the channels from here.

    Parameters
    ----------
    n_amp : int
        Amplifiers per detector.
    """

    status = 0

    def __init__(self, n_amp: int):
        n_stat = len(STAT_NAMES)
        self.n_amp = n_amp
        self.det = slice(1, 1 + n_stat)
        self.amp = slice(1 + n_stat, 1 + n_stat * (1 + n_amp))
        self.size = 1 + n_stat * (1 + n_amp)

    def det_channel(self, stat: str) -> int:
        """The channel of a detector statistic."""
        return self.det.start + STAT_INDEX[stat]

    def amp_channels(self, stat: str) -> slice:
        """The channels of an amplifier statistic, one per amplifier."""
        start = self.amp.start + STAT_INDEX[stat] * self.n_amp
        return slice(start, start + self.n_amp)

    def variables(self) -> Iterator[tuple[str, bool, int | slice]]:
        """(Dataset variable, per amplifier, channel or channels) of every statistic."""
        for stat in STAT_NAMES:
            yield DET_VARIABLES[stat], False, self.det_channel(stat)
        for stat in STAT_NAMES:
            yield AMP_VARIABLES[stat], True, self.amp_channels(stat)


# --- LSST exposure ids ------------------------------------------------------------------------------------

#: LSST exposure id = day_obs * EXPOSURE_MULTIPLIER + seq_num, so a sequence number is below it.
EXPOSURE_MULTIPLIER = 100_000
_DAY_OBS = r"\d{8}"
_OBS_ID_PREFIX = r"[A-Za-z0-9]+_[A-Za-z0-9]+"
#: An obs_id, INSTRUMENT_CONTROLLER_YYYYMMDD_SEQNUM (a regex without groups, to embed in others).
OBS_ID_PATTERN = rf"{_OBS_ID_PREFIX}_{_DAY_OBS}_\d+"
#: A day_obs, YYYYMMDD.
DAY_OBS_PATTERN = _DAY_OBS
_OBS_ID = re.compile(rf"{_OBS_ID_PREFIX}_({_DAY_OBS})_(\d+)")
#: Instrument and controller of the obs_ids we write (LSSTCam, CCS).
LSSTCAM_OBS_ID_PREFIX = "MC_C"


def exposure_id(day_obs, seq_num):
    """LSST exposure id ``day_obs * 100000 + seq_num``, of ints or of integer arrays alike.

    Raises
    ------
    ValueError
        A sequence number outside 0..99999 (its id would be another day's) or a day_obs outside 8 digits.
    """
    day, seq = np.asarray(day_obs), np.asarray(seq_num)
    for name, values, high in (("seq_num", seq, EXPOSURE_MULTIPLIER), ("day_obs", day, 10**8)):
        bad = (values < 0) | (values >= high)
        if bad.any():
            raise ValueError(f"{name} {values[bad].flat[0]} is outside 0..{high - 1} of an LSST exposure id")
    exposure = day.astype(np.int64) * EXPOSURE_MULTIPLIER + seq.astype(np.int64)
    return int(exposure) if exposure.ndim == 0 else exposure


def split_exposure(exposure: int) -> tuple[int, int]:
    """(day_obs, seq_num) of an exposure id."""
    return divmod(int(exposure), EXPOSURE_MULTIPLIER)


def exposure_from_obs_id(obs_id: str) -> int:
    """Exposure id of an obs_id: ``MC_C_20251120_000042`` -> ``20251120 * 100000 + 42``.

    Raises
    ------
    ValueError
        Not INSTRUMENT_CONTROLLER_YYYYMMDD_SEQNUM, or a sequence number beyond 99999.
    """
    match = _OBS_ID.fullmatch(obs_id)
    if not match:
        raise ValueError(f"not an LSST obs_id (INSTRUMENT_CONTROLLER_YYYYMMDD_SEQNUM): {obs_id!r}")
    try:
        return exposure_id(int(match.group(1)), int(match.group(2)))
    except ValueError as err:
        raise ValueError(f"obs_id {obs_id!r}: {err}") from None


def format_obs_id(day_obs: int, seq_num: int, prefix: str = LSSTCAM_OBS_ID_PREFIX) -> str:
    """The obs_id of (day_obs, seq_num): ``MC_C_20251120_000042``; it reads back as the same exposure."""
    exposure_id(day_obs, seq_num)  # the same range checks
    return f"{prefix}_{int(day_obs):08d}_{int(seq_num):06d}"


# --- LSST pipeline names ----------------------------------------------------------------------------------

#: The statistics' dataset type in the stock cp_pipe pipelines (``pipelines/_ingredients/cpFlat.yaml`` and
#: ``cpFlatLSST.yaml``, since 2024): written by the flat measurement, read by the normalisation.
STATISTICS_DATASET_TYPE = "cpFlatStatistics"
#: The scales' dataset type in the stock pipelines: what the flat combination (``exposureScaling: InputList``)
#: reads.  Dimensions instrument, physical_filter; one dataset per physical_filter.
SCALES_DATASET_TYPE = "cpFlatNormalizeScales"
#: The same two in repositories written by older pipelines (the tasks' own connection names).
LEGACY_STATISTICS_DATASET_TYPE = "flatStats"
LEGACY_SCALES_DATASET_TYPE = "cpFlatNormScales"

_BUTLER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

#: Exposure record fields the normalisation task can down-select its inputs on (``doDownSelection``).
SELECT_FIELDS = ("observation_reason", "observation_type", "science_program", "group")


def butler_file_pattern(dataset_type: str = STATISTICS_DATASET_TYPE, instrument: str = "LSSTCam") -> str:
    """Where a butler's file template puts the per-(exposure, detector) files of ``dataset_type``, as an
    input pattern (:func:`flatnorm_dask.ingest.discover`): read a repository's files without its registry.

    The butler's default template for datasets with (physical_filter, detector, exposure) dimensions is
    ``{run}/{datasetType}/{day_obs}/{obs_id}/{datasetType}_{instrument}_{physical_filter}_{obs_id}_`` then
    ``{detector.full_name}_{run}`` (the run again with '/' as '_'), plus the formatter's extension.

    Raises
    ------
    ValueError
        A name that is not a dataset type or instrument name (letters, digits, ``_``; a letter first).
    """
    for what, name in (("dataset type", dataset_type), ("instrument", instrument)):
        if not _BUTLER_NAME.fullmatch(str(name)):
            raise ValueError(f"not a {what} name: {name!r}")
    return (f"{{run}}/{dataset_type}/{{day_obs}}/{{obs_id}}/{dataset_type}_{instrument}_{{physical_filter}}_"
            "{obs_id}_{detector_name}_{run_name}.yaml")


def parse_selection(text: str) -> tuple[str, str]:
    """A down-selection ``FIELD=VALUE`` as (field, value): keep the exposures whose ``FIELD`` equals ``VALUE``.

    The field is one of :data:`SELECT_FIELDS` (case-insensitive, surrounding spaces ignored); the value is
    everything after the first ``=``, compared with the exposures' values case-insensitively, as the
    normalisation task does.

    Raises
    ------
    ValueError
        No ``=``, an unknown field, or an empty value.
    """
    name, sep, value = str(text).partition("=")
    name = name.strip().lower()
    if not sep:
        raise ValueError(f"expected FIELD=VALUE, got {text!r}")
    if name not in SELECT_FIELDS:
        raise ValueError(f"unknown exposure field {name!r} in {text!r} (choose from {', '.join(SELECT_FIELDS)})")
    if not value:
        raise ValueError(f"no value after '=' in {text!r}")
    return name, value
