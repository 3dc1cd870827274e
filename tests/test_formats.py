"""Statistics files: the fast PropertyList parser against PyYAML, plain mappings, and every error path."""

import json
import math
import os
import pickle
import time

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flatnorm_dask import propertylist as pl
from flatnorm_dask.formats import (
    StatsFormatError,
    StatsReader,
    parse_record,
    parse_record_slow,
    read_record,
    read_stats_file,
)
from flatnorm_dask.propertylist import LayoutCache, format_propertylist
from flatnorm_dask.schema import extract_stats
from helpers import DATA, TAG, DateTime, Items, PropertyListDumper, PropertyListLoader

SAMPLE_FILES = sorted(DATA.glob("flatStats_*.yaml"))
HEADER = f"!<{TAG}>\n"
NAN, INF = math.nan, math.inf


# --- Independent reference: plain PyYAML with our own tag constructor, and our own extraction -------------


def dump(items, style="block", explicit_start=False, width=None, allow_unicode=False):
    return yaml.dump(Items([list(i) for i in items]), Dumper=PropertyListDumper,
                     default_flow_style=False if style == "block" else None, explicit_start=explicit_start,
                     width=width, allow_unicode=allow_unicode, sort_keys=False)


def independent_record(text):
    """Name -> value through yaml.load with our own constructor; a list value's last element wins (an empty
    list, which daf_base never writes, gives no value)."""
    items = yaml.load(text, Loader=PropertyListLoader)
    return {i[0]: (i[2][-1] if isinstance(i[2], list) else i[2]) for i in items if i[2] != []}


def expected_row(record):
    """(det, names, amp) computed here from a record, independently of extract_stats."""
    get = lambda k: float(record[k]) if k in record else NAN  # noqa: E731
    det = np.array([record["DETECTOR_MEDIAN"], record["DETECTOR_N"], get("DETECTOR_SIGMA")], dtype=float)
    names = []
    while f"AMP_NAME_{len(names)}" in record:
        names.append(record[f"AMP_NAME_{len(names)}"])
    amp = np.array([[record[f"AMP_MEDIAN_{i}"] for i in range(len(names))],
                    [record[f"AMP_N_{i}"] for i in range(len(names))],
                    [get(f"AMP_SIGMA_{i}") for i in range(len(names))]], dtype=float).reshape(3, len(names))
    return det, tuple(names), amp


def assert_row(row, det, names, amp):
    np.testing.assert_array_equal(row.det, det)  # NaN == NaN here
    assert row.amp_names == names
    assert row.amp.shape == (3, len(names))
    np.testing.assert_array_equal(row.amp, amp)


def same(a, b):
    """Exactly equal, NaN-aware, with the same types (int stays int, bool stays bool, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def outcome(fn, *args, **kwargs):
    try:
        return ("ok", fn(*args, **kwargs))
    except StatsFormatError as err:
        return ("error", err)


def assert_paths_agree(text):
    """A reader, the C and the pure loader give the same values (or all fail); returns the record.

    One reader parses the text three times: item by item, item by item again (which learns a layout from
    the document), then through the layout when one was learnt.
    """
    reader = StatsReader()
    results = [outcome(reader.parse, text), outcome(reader.parse, text), outcome(reader.parse, text),
               outcome(parse_record_slow, text, loader="c"), outcome(parse_record_slow, text, loader="pure")]
    kinds = [r[0] for r in results]
    assert kinds in (["ok"] * 5, ["error"] * 5), (kinds, results, text)
    if kinds[0] == "ok":
        for r in results[1:]:
            assert same(results[0][1], r[1]), (results, text)
    return results[0][1] if kinds[0] == "ok" else None


def takes_fast_path(text):
    try:
        pl.parse_items(text)
    except pl.Fallback:
        return False
    return True


def write(tmp_path, text, name="stats.yaml"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def sample_items(n_amp=4):
    """[name, type, value, comment] items of a small flat-statistics record."""
    items = [["DETECTOR_MEDIAN", "Double", 20512.25, ""], ["DETECTOR_SIGMA", "Double", 212.5, ""],
             ["DETECTOR_N", "Int", 15872011, ""]]
    for i in range(n_amp):
        items += [[f"AMP_NAME_{i}", "String", f"C1{i}", ""], [f"AMP_MEDIAN_{i}", "Double", 20000.0 + i, ""],
                  [f"AMP_SIGMA_{i}", "Double", 200.0 + i, ""], [f"AMP_N_{i}", "Int", 992000 + i, ""]]
    return items


def without(items, *names):
    return [i for i in items if i[0] not in names]


def replaced(items, name, value, typ=None):
    return [[n, typ or t, value, c] if n == name else [n, t, v, c] for n, t, v, c in items]


# --- The shared samples -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_samples_fast_path_equals_both_loaders(path):
    text = path.read_text()
    fast = pl.parse_items(text)  # the samples are PyYAML's own layout: no fallback
    assert same(fast, parse_record_slow(text, loader="c"))
    assert same(fast, parse_record_slow(text, loader="pure"))
    assert same(fast, independent_record(text))
    assert same(parse_record(text), fast)
    assert len(fast) == 3 + 4 * 16


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_samples_read_stats_file(path):
    assert len(SAMPLE_FILES) == 2
    record = independent_record(path.read_text())
    row = read_stats_file(path)
    assert_row(row, *expected_row(record))
    assert row.det.shape == (3,) and row.amp.shape == (3, 16)
    assert row.amp_names[:8] == tuple(f"C1{i}" for i in range(8))
    assert row.amp_names[8:] == tuple(f"C0{i}" for i in range(7, -1, -1))
    # Amplifier 5 is fully masked: NaN value, zero count; the others are finite with counts.
    assert math.isnan(row.amp[0, 5]) and row.amp[1, 5] == 0
    others = np.delete(row.amp, 5, axis=1)
    assert np.isfinite(others).all() and (others[1] > 0).all()
    assert row.det[1] == record["DETECTOR_N"] and isinstance(record["DETECTOR_N"], int)
    # The same through str paths, file: URIs and read_record.
    assert_row(read_stats_file(str(path)), row.det, row.amp_names, row.amp)
    assert_row(read_stats_file(path.as_uri()), row.det, row.amp_names, row.amp)
    assert same(read_record(path), record)


# --- Property test: PyYAML-written documents of every kind ------------------------------------------------

TRICKY = ["C10", "ON", "on", "Off", "yes", "null", "NULL", "~", "00", "07", "0x1F", "1e5", "1.5", ".nan", "-.5",
          "a b", "it's", 'say "hi"', "k: v", "a:b", "x#y", "# z", "- x", "[a]", "{b}", "!tag", "&a", "*a", "",
          " lead", "trail ", "ünï", "true", "1:30", "2001-12-14", "=", "<<", "...", "---", "\\", "\t", "a,b"]
SPECIAL_FLOATS = [NAN, INF, -INF, 1e308, -1.7976931348623157e308, 5e-324, -0.0, 0.0, 1e16, 1e-7, -12.5, 1e22,
                  123456789.123456789]

floats = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(allow_nan=True, allow_infinity=True))
numbers = st.one_of(floats, st.integers(-(2**63), 2**64 - 1), st.integers(-5, 5))
counts = st.one_of(st.integers(0, 2**40), st.floats(0, 1e12), st.just(NAN), st.just(0))
texts = st.one_of(st.sampled_from(TRICKY), st.text(max_size=15))
long_text = st.lists(st.sampled_from(["flat", "clipped", "mean", "it's", '"q"', "#", "k:", "ü", "x" * 30]),
                     min_size=15, max_size=40).map(" ".join)  # PyYAML wraps these over several lines
comments = st.one_of(st.just(""), texts, st.text(max_size=60), long_text)


def maybe_repeated(values):
    """A value, or sometimes a repeated key (a list whose last element is the value)."""
    return st.one_of(values, values, st.lists(values, min_size=2, max_size=3))


@st.composite
def records(draw):
    """(items, expected record) of a random flat-statistics PropertyList."""
    n_amp = draw(st.integers(0, 5))
    specs = [("DETECTOR_MEDIAN", numbers), ("DETECTOR_N", counts)]
    if draw(st.booleans()):
        specs.append(("DETECTOR_SIGMA", numbers))
    for i in range(n_amp):
        specs += [(f"AMP_NAME_{i}", texts), (f"AMP_MEDIAN_{i}", numbers), (f"AMP_N_{i}", counts)]
        if draw(st.booleans()):
            specs.append((f"AMP_SIGMA_{i}", numbers))
    items = []
    for name, values in specs:
        value = draw(maybe_repeated(values) if not name.startswith("AMP_NAME") else values)
        typ = {str: "String", int: "Int", float: "Double"}[type(value[-1] if isinstance(value, list) else value)]
        items.append([name, typ, value, draw(comments)])
    extras = draw(st.lists(st.tuples(st.one_of(st.sampled_from(TRICKY), st.text(min_size=1, max_size=10)),
                                     st.sampled_from(["Bool", "String", "Undef"]), st.integers(0, 100),
                                     comments), max_size=3))
    for key, typ, where, comment in extras:
        key = f"X_{key}" if draw(st.booleans()) else key
        if key in {i[0] for i in items} or key.startswith("AMP_NAME_"):
            continue
        value = draw({"Bool": st.booleans(), "String": texts, "Undef": st.none()}[typ])
        items.insert(where % (len(items) + 1), [key, typ, value, comment])
    expected = {n: (v[-1] if isinstance(v, list) else v) for n, _, v, _ in items}
    return items, expected


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records(), st.sampled_from(["block", "flow"]), st.booleans(), st.sampled_from([None, 40, 200]),
       st.booleans())
def test_fast_path_equals_pyyaml_on_random_documents(rec, style, explicit_start, width, allow_unicode):
    items, expected = rec
    text = dump(items, style, explicit_start, width, allow_unicode)
    record = assert_paths_agree(text)
    # PyYAML round-trips what it wrote, so the fast path must too; except that with allow_unicode its
    # emitter writes NEL, LS and PS raw inside single quotes, where its own loader folds them.
    strings = [x for item in items for x in (item[0], item[2], item[3]) if isinstance(x, str)]
    if not (allow_unicode and any(c in x for x in strings for c in "\x85\u2028\u2029")):
        assert same(record, expected)
    reference = independent_record(text)
    assert same(record, reference)
    ok, row = outcome(extract_stats, record)
    if ok == "ok":
        assert_row(row, *expected_row(reference))
    else:  # only a string or other non-number where a number is needed, or a negative count
        assert row.key is not None


simple_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True).filter(
    lambda s: s.lower() not in ("yes", "no", "true", "false", "on", "off", "null", "y", "n"))
plain_numbers = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(allow_nan=False),
                          st.integers(-(2**63), 2**63 - 1))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(simple_names, st.one_of(plain_numbers, simple_names, st.booleans(), st.none())),
                min_size=1, max_size=20, unique_by=lambda t: t[0]),
       st.sampled_from(["block", "flow"]), st.booleans())
def test_fast_path_is_taken_on_pyyaml_layout(pairs, style, explicit_start):
    assume(all(name not in pl.YAML11_WORDS for name, _ in pairs))  # PyYAML would quote 'ON' as a name
    expected = dict(pairs)
    items = [[n, type(v).__name__, v, ""] for n, v in pairs]
    texts = [dump(items, style, explicit_start)]
    if not explicit_start:
        texts.append(format_propertylist(expected, style))
    for text in texts:
        fast = pl.parse_items(text)  # must not raise Fallback
        assert same(fast, expected)
        assert same(fast, parse_record_slow(text, loader="c"))
        assert same(fast, parse_record_slow(text, loader="pure"))


def test_simulated_campaign_files_take_the_fast_path():
    rng = np.random.default_rng(5)
    for style in ("block", "flow"):
        record = {"DETECTOR_MEDIAN": float(rng.normal(2e4, 100)), "DETECTOR_SIGMA": NAN, "DETECTOR_N": 15872011}
        for i, name in enumerate(["C10", "C11", "ON", "00"]):
            record |= {f"AMP_NAME_{i}": name, f"AMP_MEDIAN_{i}": float(rng.normal(2e4, 100)),
                       f"AMP_SIGMA_{i}": -INF, f"AMP_N_{i}": i * 1000}
        text = format_propertylist(record, style)
        assert takes_fast_path(text)
        assert same(parse_record(text), record)
        assert_row(extract_stats(parse_record(text)), *expected_row(record))


# --- Hand-edited YAML ---------------------------------------------------------------------------------

# (text of DETECTOR_MEDIAN's value, what YAML 1.1 / PyYAML reads)
SCALARS = [
    ("1e5", "1e5"),  # no dot: a string in YAML 1.1
    ("1.0e+5", 100000.0),
    ("1.0E-5", 1e-5),
    ("1.0e5", "1.0e5"),  # the exponent needs a sign in YAML 1.1
    (".5", 0.5),
    ("-.5", "-.5"),  # PyYAML's float pattern has no sign before a leading dot
    ("+.5", "+.5"),
    ("+5", 5),
    ("-0", 0),
    ("0o7", "0o7"),  # YAML 1.2 octal: a string in 1.1
    ("07", 7),
    ("010", 8),  # YAML 1.1 octal
    ("0x1F", 31),
    ("0b101", 5),
    ("1_000", 1000),
    ("1_000.5", 1000.5),
    ("1:30", 90),  # sexagesimal
    ("~", None),
    ("null", None),
    ("", None),
    ("1.", 1.0),
    (".NaN", NAN),
    (".Inf", INF),
    ("-.INF", -INF),
    ("+.inf", INF),
    ("nan", "nan"),
    ("inf", "inf"),
    ("Yes", True),
    ("off", False),
    ("y", "y"),
    ("'1.5'", "1.5"),
    ('"2.5"', "2.5"),
    ("!!float 3", 3.0),
    ("!!str 3", "3"),
    ("'it''s'", "it's"),
    ('"a\\tb"', "a\tb"),  # an escape in double quotes
    ('"\\x41\\u00e9"', "A\u00e9"),
    ("'a\\tb'", "a\\tb"),  # none in single quotes
]


@pytest.mark.parametrize("style", ["block", "flow"])
@pytest.mark.parametrize("token, value", SCALARS, ids=[s[0] or "empty" for s in SCALARS])
def test_yaml_11_scalars(token, value, style, tmp_path):
    base = dump(sample_items(2), style)
    old = "20512.25"
    assert base.count(old) == 1
    text = base.replace(old, token)
    record = assert_paths_agree(text)
    if token == "" and style == "flow":  # an empty entry in a flow sequence is a syntax error
        assert record is None
        return
    assert same(record["DETECTOR_MEDIAN"], value)
    assert same({k: v for k, v in record.items() if k != "DETECTOR_MEDIAN"},
                {k: v for k, v in independent_record(base).items() if k != "DETECTOR_MEDIAN"})
    path = write(tmp_path, text)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert read_stats_file(path).det[0] == value or (math.isnan(value) and math.isnan(read_stats_file(path).det[0]))
    else:
        with pytest.raises(StatsFormatError) as info:
            read_stats_file(path)
        assert info.value.key == "DETECTOR_MEDIAN" and info.value.reason.startswith("not a number")
        assert str(path) in str(info.value)


YAML11_WORDS = {**{w: True for w in "yes Yes YES true True TRUE on On ON".split()},
                 **{w: False for w in "no No NO false False FALSE off Off OFF".split()},
                 **{w: None for w in "null Null NULL".split()},
                 **{w: w for w in "y Y n N yES tRUE oN nULL NaN Inf nan none None".split()}}


@pytest.mark.parametrize("style", ["block", "flow"])
@pytest.mark.parametrize("word", list(YAML11_WORDS))
def test_plain_words_as_values_and_names(word, style):
    """Unquoted words, as a hand-written file may have them: PyYAML's dumper always quotes the special ones."""
    value = YAML11_WORDS[word]
    if style == "block":
        as_value = HEADER + f"- - EXTRA\n  - Bool\n  - {word}\n  - ''\n"
        as_name = HEADER + f"- - {word}\n  - Bool\n  - 1\n  - ''\n"
    else:
        as_value = HEADER + f"- [EXTRA, Bool, {word}, '']\n"
        as_name = HEADER + f"- [{word}, Bool, 1, '']\n"
    assert same(assert_paths_agree(as_value), {"EXTRA": value})
    assert same(assert_paths_agree(as_name), {value: 1})


def _quirks():
    block = dump(sample_items(3), "block")
    flow = dump(sample_items(3), "flow")
    b_lines = block.splitlines(keepends=True)
    f_lines = flow.splitlines(keepends=True)
    return {
        "comment lines block": "# written by hand\n" + "".join(b_lines[:5]) + "# a note: with 'quotes'\n"
                               + "".join(b_lines[5:]) + "# end\n",
        "comment lines flow": "# top\n" + "".join(f_lines[:3]) + "   # indented note\n" + "".join(f_lines[3:]),
        "trailing comments": block.replace("  - 20512.25\n", "  - 20512.25  # the clipped mean\n"),
        "trailing comment flow": flow.replace(", '']\n", ", '']  # x\n", 1),
        "CRLF block": block.replace("\n", "\r\n"),
        "CRLF flow": flow.replace("\n", "\r\n"),
        "trailing ... block": block + "...\n",
        "trailing ... flow": flow + "...\n",
        "no final newline block": block.rstrip("\n"),
        "no final newline flow": flow.rstrip("\n"),
        "explicit start": "--- " + block,
        "directive": "%YAML 1.1\n--- " + flow,
        "BOM": "\ufeff" + block,
        "quoted names block": block.replace("- - DETECTOR_MEDIAN", "- - 'DETECTOR_MEDIAN'")
                                   .replace("- - AMP_NAME_0", '- - "AMP_NAME_0"'),
        "quoted names flow": flow.replace("[DETECTOR_N,", "['DETECTOR_N',").replace("[AMP_N_1,", '["AMP_N_1",'),
        "quoted values": flow.replace("C10", "'C10'").replace("C11", '"C11"'),
        "spaced flow": flow.replace("[", "[  ").replace(", ", " ,  ").replace("]", "  ]"),
        "tight flow": flow.replace(", ", ","),
        "flow spanning lines": flow.replace("[DETECTOR_N, Int,", "[DETECTOR_N,\n  Int,"),
        "wider block indent": block.replace("- - ", "-   - ").replace("\n  - ", "\n    - "),
        "indented block": "".join(("  " + line) if line.startswith(("-", " ")) else line for line in b_lines),
        "plain comments": block.replace("  - ''\n", "  - clipped mean (ADU)\n"),
        "digit comments": flow.replace(", '']", ", 2025-01-31]"),
        "repeated key": flow.replace("[AMP_N_2, Int, 992002,", "[AMP_N_2, Int, [5, 6, 992002],"),
        "json-ish flow": flow.replace("- [", '- ["', 1).replace("DETECTOR_MEDIAN,", 'DETECTOR_MEDIAN",', 1),
        "all flow": HEADER.rstrip("\n") + " [" + ", ".join(line[2:].strip() for line in f_lines[1:]) + "]\n",
    }


QUIRKS = _quirks()


@pytest.mark.parametrize("name", list(QUIRKS))
def test_hand_edited_documents_read_the_same(name, tmp_path):
    text = QUIRKS[name]
    assert text != dump(sample_items(3), "block") and text != dump(sample_items(3), "flow")
    record = assert_paths_agree(text)
    reference = independent_record(dump(sample_items(3), "block"))
    assert same(record, reference)
    assert_row(read_stats_file(write(tmp_path, text)), *expected_row(reference))


@pytest.mark.parametrize("name", ["comment lines block", "CRLF block", "CRLF flow", "trailing ... flow",
                                  "directive", "BOM", "wider block indent",
                                  "repeated key"])  # a list in a flow item: PyYAML writes such an item in block style
def test_layouts_the_fast_parser_does_not_know_fall_back(name):
    assert not takes_fast_path(QUIRKS[name])


@pytest.mark.parametrize("name", ["no final newline block", "no final newline flow", "explicit start",
                                  "quoted values", "spaced flow", "tight flow", "plain comments",
                                  "flow spanning lines", "quoted names block", "quoted names flow"])
def test_harmless_variants_stay_on_the_fast_path(name):
    assert takes_fast_path(QUIRKS[name])


def test_tabs_in_flow_style(tmp_path):
    flow = dump(sample_items(2), "flow")
    for text in (flow.replace(", ", ",\t"), flow.replace("[", "[\t"), flow.replace("]\n", "]\t\n")):
        # libyaml accepts tabs as separators here, PyYAML's pure loader does not: the fast parser stays
        # out of it, and read_stats_file reads what the C loader reads.
        assert not takes_fast_path(text)
        record = parse_record(text)
        assert same(record, parse_record_slow(text, loader="c"))
        assert same(record, independent_record(flow))
        pure = outcome(parse_record_slow, text, loader="pure")
        assert pure[0] == "error" or same(pure[1], record)
        assert_row(read_stats_file(write(tmp_path, text)), *expected_row(record))


# Documents on which the fast parser once disagreed with PyYAML: each must fall back, and all paths agree.
REGRESSIONS = {
    "control char in quotes": ("String", "'a\x01b'", "''"),
    "CR in quotes": ("String", "'a\rb'", "''"),
    "NEL in quotes": ("String", "'a\x85b'", "''"),
    "line separator in quotes": ("String", '"a\u2028b"', "''"),
    "noncharacter in quotes": ("String", "'a\ufffeb'", "''"),
    "DEL in comment": ("Double", "1.5", "x\x7fy"),
    "CR in comment": ("Double", "1.5", "x\ry"),
    "invalid date comment": ("Double", "1.5", "2001-13-45"),
    "bad hex comment": ("Double", "1.5", "0x_"),
    "question mark in flow comment": ("Double", "1.5", "a?b"),  # fine in block style
    "tab in comment": ("Double", "1.5", "a\tb"),
    "colons in comment": ("Double", "1.5", "a: b: c"),  # mapping values are not allowed here
    "unicode comment": ("Double", "1.5", "ünïcode ✓"),
}


@pytest.mark.parametrize("style", ["block", "flow"])
@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_fast_parser_regressions(name, style):
    typ, value, comment = REGRESSIONS[name]
    if style == "block":
        text = HEADER + f"- - DETECTOR_MEDIAN\n  - {typ}\n  - {value}\n  - {comment}\n"
    else:
        text = HEADER + f"- [DETECTOR_MEDIAN, {typ}, {value}, {comment}]\n"
    assert takes_fast_path(text) == (name == "question mark in flow comment" and style == "block")
    results = [outcome(parse_record_slow, text, loader="c"), outcome(parse_record_slow, text, loader="pure")]
    fast = outcome(parse_record, text)
    assert fast[0] == results[0][0]
    if fast[0] == "ok":
        assert same(fast[1], results[0][1])
    if results[1][0] == "ok" and results[0][0] == "ok":
        assert same(results[0][1], results[1][1])


def test_integer_beyond_python_digit_limit_is_a_format_error():
    text = HEADER + f"- [DETECTOR_N, Int, {'9' * 5000}, '']\n"
    with pytest.raises(StatsFormatError, match="not valid YAML"):
        parse_record(text, "big.yaml")


def test_integer_beyond_float_range_is_a_format_error(tmp_path):
    items = replaced(sample_items(1), "DETECTOR_N", 10**400)
    path = write(tmp_path, dump(items, "flow"))
    assert read_record(path)["DETECTOR_N"] == 10**400
    with pytest.raises(StatsFormatError) as info:
        read_stats_file(path)
    assert info.value.key == "DETECTOR_N" and "out of range" in info.value.reason


def test_unhashable_name_is_a_format_error():
    text = HEADER + "- [[a, b], Double, 1.0, '']\n"
    for loader in ("c", "pure"):
        with pytest.raises(StatsFormatError, match="unhashable"):
            parse_record_slow(text, "x.yaml", loader=loader)


def test_deeply_nested_json_is_a_format_error():
    text = '{"DETECTOR_MEDIAN": ' + "[" * 50_000 + "]" * 50_000 + "}"
    with pytest.raises(StatsFormatError):
        parse_record(text, "deep.json")


# --- Format 2: plain mappings -------------------------------------------------------------------------

def _mapping():
    record = {"DETECTOR_MEDIAN": 20512.25, "DETECTOR_SIGMA": NAN, "DETECTOR_N": 15872011}
    for i, name in enumerate(["C10", "ON", "00", "a b"]):
        record |= {f"AMP_NAME_{i}": name, f"AMP_MEDIAN_{i}": NAN if i == 2 else 2e4 + i / 3,
                   f"AMP_SIGMA_{i}": INF if i == 1 else 200.0 + i, f"AMP_N_{i}": 0 if i == 2 else 992000 + i}
    return record


@pytest.mark.parametrize("flow", [False, True])
def test_plain_yaml_mapping(flow, tmp_path):
    record = _mapping()
    text = yaml.safe_dump(record, default_flow_style=flow, sort_keys=False)
    assert not takes_fast_path(text)
    assert same(assert_paths_agree(text), record)
    path = write(tmp_path, text)
    assert same(read_record(path), record)
    assert_row(read_stats_file(path), *expected_row(record))


def test_json_object_with_nan(tmp_path):
    record = _mapping()
    text = json.dumps(record, indent=1)
    assert "NaN" in text and "Infinity" in text
    path = write(tmp_path, text, "stats.json")
    assert same(read_record(path), record)
    row = read_stats_file(path)
    assert_row(row, *expected_row(record))
    assert math.isnan(row.amp[0, 2]) and row.amp[1, 2] == 0 and row.amp[2, 1] == INF


def test_json_reads_json_numbers_and_repeated_values():
    text = '{"DETECTOR_MEDIAN": 1e5, "DETECTOR_N": [1, 2, 30], "AMP_NAME_0": "C10", "AMP_MEDIAN_0": -Infinity,' \
           ' "AMP_N_0": 0}'
    record = parse_record(text)
    assert same(record, {"DETECTOR_MEDIAN": 100000.0, "DETECTOR_N": 30, "AMP_NAME_0": "C10",
                         "AMP_MEDIAN_0": -INF, "AMP_N_0": 0})
    # YAML 1.1 would read 1e5 as a string: JSON objects are read as JSON.
    assert parse_record_slow(text)["DETECTOR_MEDIAN"] == "1e5"


# --- Errors -------------------------------------------------------------------------------------------

BASE = sample_items(5)
FIELD_ERRORS = {
    "missing DETECTOR_MEDIAN": (without(BASE, "DETECTOR_MEDIAN"), "DETECTOR_MEDIAN", "missing"),
    "missing DETECTOR_N": (without(BASE, "DETECTOR_N"), "DETECTOR_N", "missing"),
    "missing AMP_N_3": (without(BASE, "AMP_N_3"), "AMP_N_3", "missing"),
    "missing AMP_MEDIAN_0": (without(BASE, "AMP_MEDIAN_0"), "AMP_MEDIAN_0", "missing"),
    "string for a number": (replaced(BASE, "AMP_MEDIAN_2", "abc", "String"), "AMP_MEDIAN_2", "not a number"),
    "bool for a number": (replaced(BASE, "DETECTOR_MEDIAN", True, "Bool"), "DETECTOR_MEDIAN", "not a number"),
    "null for a count": (replaced(BASE, "AMP_N_1", None, "Undef"), "AMP_N_1", "not a number"),
    "negative count": (replaced(BASE, "DETECTOR_N", -5), "DETECTOR_N", "negative pixel count"),
    "negative amp count": (replaced(BASE, "AMP_N_4", -0.5, "Double"), "AMP_N_4", "negative pixel count"),
    "gap in AMP_NAME": (without(BASE, "AMP_NAME_3"), "AMP_NAME_3", "missing while higher-numbered"),
    "non-string amp name": (replaced(BASE, "AMP_NAME_2", 12, "Int"), "AMP_NAME_2", "not a string"),
    "null amp name": (replaced(BASE, "AMP_NAME_0", None, "Undef"), "AMP_NAME_0", "not a string"),
}


@pytest.mark.parametrize("style", ["block", "flow"])
@pytest.mark.parametrize("name", list(FIELD_ERRORS))
def test_field_errors_name_file_and_key(name, style, tmp_path):
    items, key, reason = FIELD_ERRORS[name]
    path = write(tmp_path, dump(items, style), "bad file.yaml")
    record = read_record(path)  # the document itself is fine
    assert same(record, independent_record(path.read_text()))
    with pytest.raises(StatsFormatError) as info:
        read_stats_file(path)
    err = info.value
    assert err.path == str(path) and err.key == key and reason in err.reason, err.reason
    assert str(path) in str(err) and key in str(err)
    assert isinstance(err, ValueError)
    # The good file reads fine: the error is this field's.
    read_stats_file(write(tmp_path, dump(BASE, style), "good.yaml"))


def _truncated():
    text = dump(sample_items(3), "block")
    cut = text.index("- ''", len(text) // 2) + 3  # inside a quoted comment: "  - '"
    return text[:cut]


FILE_ERRORS = {
    "empty": (b"", "empty file"),
    "whitespace only": (b"  \n\n\t\n", "empty file"),
    "binary garbage": (bytes(range(256)) * 4, "NUL byte at byte 0: a binary file"),
    "png header": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", "NUL byte at byte 8: a binary file"),
    "not UTF-8": (b"DETECTOR_MEDIAN: 1.5\n\xff\xfe", "not UTF-8 text (byte 21): a binary or corrupt file"),
    "NUL bytes": (b"abc\x00\x00\x00", "NUL byte at byte 3"),
    "truncated": (_truncated().encode(), "not valid YAML"),
    "unbalanced flow": (dump(sample_items(1), "flow").replace("]\n", "\n", 1).encode(), "not valid YAML"),
    "wrong tag": (dump(sample_items(1)).replace(TAG, "lsst.daf.base.PropertySet").encode(),
                  "unexpected YAML tag"),
    "python tag": (b"!!python/object:os.system\n- a\n", "unexpected YAML tag"),
    "tag on a mapping": (f"!<{TAG}>\n{{DETECTOR_MEDIAN: 1.0}}\n".encode(), "tag is on a mapping"),
    "scalar document": (b"42\n", "not a PropertyList or a mapping"),
    "string document": (b"hello world\n", "not a PropertyList or a mapping"),
    "list document": (b"- 1\n- 2\n", "not a PropertyList or a mapping"),
    "JSON list": (b"[1, 2, 3]", "not a PropertyList or a mapping"),
    "short items": (f"{HEADER}- [DETECTOR_MEDIAN, Double]\n".encode(), "PropertyList item 0"),
    "scalar items": (f"{HEADER}- DETECTOR_MEDIAN\n".encode(), "PropertyList item 0"),
    "two documents": ((("--- " + dump(sample_items(1))) * 2).encode(), "another document"),
}


@pytest.mark.parametrize("name", list(FILE_ERRORS))
def test_file_errors(name, tmp_path):
    data, reason = FILE_ERRORS[name]
    path = write(tmp_path, data)
    with pytest.raises(StatsFormatError) as info:
        read_stats_file(path)
    err = info.value
    assert err.path == str(path) and err.key is None
    assert reason in err.reason, err.reason
    assert str(err).startswith(f"{path}: ")
    if name not in ("empty", "whitespace only", "binary garbage", "png header", "not UTF-8", "NUL bytes"):
        text = data.decode()
        assert outcome(parse_record, text)[0] == "error"
        assert outcome(parse_record_slow, text, loader="pure")[0] == "error"


def test_truncated_anywhere_is_a_format_error_or_a_subset(tmp_path):
    text = dump(sample_items(2), "block")
    full = independent_record(text)
    for cut in range(1, len(text), 7):
        part = text[:cut]
        result = outcome(parse_record, part, "cut.yaml")
        assert result[0] == outcome(parse_record_slow, part, loader="pure")[0]
        if result[0] == "ok":  # a cut on a line end is still valid YAML: fewer keys, the last maybe shorter
            assert set(result[1]) <= set(full)
        else:
            assert result[1].path == "cut.yaml"


def test_nonexistent_file(tmp_path):
    path = tmp_path / "missing" / "stats.yaml"
    with pytest.raises(StatsFormatError) as info:
        read_stats_file(path)
    assert info.value.path == str(path) and info.value.reason.startswith("cannot read")
    assert str(path) in str(info.value)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(StatsFormatError, match="cannot read"):
        read_stats_file(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, dump(sample_items(1)))
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the open fail as it would for anyone else
        def denied(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(os, "open", denied)
    try:
        with pytest.raises(StatsFormatError) as info:
            read_stats_file(path)
    finally:
        path.chmod(0o644)
        monkeypatch.undo()
    assert info.value.path == str(path) and info.value.reason.startswith("cannot read")
    assert "ermission" in info.value.reason
    read_stats_file(path)  # and once readable again it is fine


@pytest.mark.parametrize("key", [None, "AMP_N_3"])
def test_error_pickles(key, tmp_path):
    err = StatsFormatError(tmp_path / "x.yaml", "negative pixel count -1", key=key)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StatsFormatError
    assert (back.path, back.key, back.reason, str(back), back.args) == (err.path, err.key, err.reason, str(err),
                                                                          err.args)
    # And one raised by read_stats_file.
    path = write(tmp_path, dump(without(sample_items(4), "AMP_N_3")))
    with pytest.raises(StatsFormatError) as info:
        read_stats_file(path)
    back = pickle.loads(pickle.dumps(info.value))
    assert (back.path, back.key, back.reason, str(back)) == (str(path), "AMP_N_3", "missing", str(info.value))


def test_text_errors_without_a_path():
    with pytest.raises(StatsFormatError) as info:
        extract_stats({"DETECTOR_N": 1})
    assert info.value.path is None and str(info.value) == "<text>: DETECTOR_MEDIAN: missing"


# --- Optional SIGMA ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["block", "flow"])
def test_sigma_keys_are_optional(style, tmp_path):
    items = sample_items(4)
    full = read_stats_file(write(tmp_path, dump(items, style), "full.yaml"))
    items = [i for i in items if "SIGMA" not in i[0]]
    items = [i for i in items if i[0] != "AMP_SIGMA_2"]
    row = read_stats_file(write(tmp_path, dump(items, style), "nosigma.yaml"))
    assert np.isnan(row.det[2]) and np.isnan(row.amp[2]).all()
    np.testing.assert_array_equal(row.det[:2], full.det[:2])
    np.testing.assert_array_equal(row.amp[:2], full.amp[:2])
    assert row.amp_names == full.amp_names == ("C10", "C11", "C12", "C13")
    assert np.isfinite(full.amp[2]).all() and full.det[2] == 212.5
    # Only some amplifiers with a sigma.
    some = without(sample_items(4), "AMP_SIGMA_1")
    row = read_stats_file(write(tmp_path, dump(some, style), "some.yaml"))
    assert math.isnan(row.amp[2, 1]) and row.amp[2, 0] == 200.0 and row.amp[2, 3] == 203.0


def test_no_amplifiers():
    row = extract_stats({"DETECTOR_MEDIAN": 1.5, "DETECTOR_N": 10})
    assert row.amp_names == () and row.amp.shape == (3, 0)
    np.testing.assert_array_equal(row.det, [1.5, 10.0, NAN])


# --- Layouts: files of one campaign after the first two ---------------------------------------------------

def _row_same(a, b):
    """Rows equal exactly: NaN where NaN, the same sign of zero, the same names."""
    assert a.amp_names == b.amp_names
    for x, y in ((a.det, b.det), (a.amp, b.amp)):
        assert x.shape == y.shape and x.dtype == y.dtype == np.float64
        np.testing.assert_array_equal(x, y)
        finite = ~np.isnan(x)
        np.testing.assert_array_equal(np.signbit(x[finite]), np.signbit(y[finite]))


def _reference_row(text):
    return outcome(lambda: extract_stats(parse_record_slow(text, loader="c"), "f.yaml"))


def _value_spans(text):
    """(start, end) of each item's value in a document the item parser reads (from its own regex)."""
    return [match.span("value") for _, match in pl._items(text)]


@pytest.mark.parametrize("style", ["block", "flow"])
def test_campaign_files_take_a_layout_and_read_exactly(style, tmp_path):
    from flatnorm_dask.simulate import simulate_campaign, write_campaign

    tree = simulate_campaign("testcam", n_exposures=4, filters=("g_6",), seed=2, nan_amp_fraction=0.05)
    manifest = write_campaign(tree, tmp_path, layout="simple", style=style)
    paths = [tmp_path / line.split(",")[0] for line in manifest.read_text().splitlines()[1:]]
    reader = StatsReader()
    assert len(paths) == 36 and not reader.layouts.layouts
    rows = [reader.read(p) for p in paths]
    assert len(reader.layouts) == 1  # learnt from the second file
    layout = reader.layouts.layouts[0]
    assert layout.plan is not None and layout.plan.n_amp == 8
    ds = tree["g_6"].to_dataset()
    for path, row in zip(paths, rows):
        text = path.read_text()
        found = reader.layouts.match(text)
        assert found is not None and found[0] is layout
        kind, reference = _reference_row(text)
        assert kind == "ok"
        _row_same(row, reference)
        _row_same(read_stats_file(path), reference)  # a reader of its own: the item parser
        assert same(found[0].record(found[1]), parse_record_slow(text, loader="pure"))
        assert same(reader.parse(text), pl.parse_items(text))
    # And the values are the simulated ones.
    exposure, detector = int(paths[-1].parent.name), int(paths[-1].stem.split("_")[1])
    cell = ds.sel(exposure=exposure, detector=detector)
    np.testing.assert_array_equal(rows[-1].amp[0], cell["amp_value"].values)
    np.testing.assert_array_equal(rows[-1].amp[1], cell["amp_count"].values)


def test_readers_own_their_layouts(tmp_path):
    text = dump(sample_items(3), "block")
    paths = [write(tmp_path, text, f"{i}.yaml") for i in range(3)]
    first, second = StatsReader(), StatsReader()
    rows = [first.read(p) for p in paths]
    assert len(first.layouts) == 1 and len(second.layouts) == 0  # nothing learnt is shared
    for path, row in zip(paths, rows):
        _row_same(second.read(path), row)
        _row_same(read_stats_file(path), row)
    assert len(second.layouts) == 1
    # A cache that does not learn reads every file item by item, to the same rows.
    no_layouts = StatsReader(LayoutCache(max_layouts=0))
    for path, row in zip(paths, rows):
        _row_same(no_layouts.read(path), row)
    assert len(no_layouts.layouts) == 0
    # And the reader's planner is set on a cache given without one.
    assert no_layouts.layouts.planner is not None


LAYOUT_TOKENS = ["1.5", "-1.5", "0.0", "-0.0", "1.0e+17", "5.0e-324", "1.0E+400", "-1.0e-400", ".nan", ".inf",
                 "-.inf", "+.inf", ".NaN", "0", "-0", "7", "-7", "+5", "07", "010", "0x1F", "1_000", "1e5", "1.0e5",
                 ".5", "-.5", "1.", "00.5", "9" * 299, "9" * 300, "9" * 320, "-" + "9" * 320, "C10", "ON", "true",
                 "null", "y", "_x", "'q'", "'ON'", "''", '"d"', "~", "nan", "1:30", "a b", "-", "[1, 2]",
                 "1.5 # c", "1.5 ", "12345678901234567890.5", "0.1", "-2", "9007199254740993", "9007199254740993.0"]


def _layout_base(style, quoted_name=False):
    items = [["DETECTOR_MEDIAN", "Double", 1.5, ""], ["DETECTOR_N", "Int", 10, ""],
             ["AMP_NAME_0", "String", "C10", ""], ["AMP_MEDIAN_0", "Double", NAN, ""],
             ["AMP_N_0", "Int", 0, ""], ["AMP_SIGMA_0", "Double", 2.5, ""],
             ["AMP_NAME_1", "String", "ON" if quoted_name else "C11", ""], ["AMP_MEDIAN_1", "Double", -INF, ""],
             ["AMP_N_1", "Double", 3.0, ""], ["EXTRA", "Bool", True, ""]]
    return dump(items, style)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["block", "flow"]), st.booleans(),
       st.lists(st.tuples(st.integers(0, 9), st.sampled_from(LAYOUT_TOKENS)), min_size=1, max_size=4))
def test_layout_agrees_with_the_item_parser_and_pyyaml(tmp_path_factory, style, quoted_name, edits):
    reader = StatsReader()
    base = _layout_base(style, quoted_name)
    reader.parse(base)
    reader.parse(base)
    assert len(reader.layouts) == 1
    layout = reader.layouts.layouts[0]
    assert (layout.plan is None) == quoted_name  # a quoted amplifier name is fixed text, not a group
    spans = _value_spans(base)
    text = base
    for index, token in sorted(dict(edits).items(), reverse=True):
        start, end = spans[index]
        text = text[:start] + token + text[end:]
    general = outcome(pl.parse_items, text) if takes_fast_path(text) else None
    record = assert_paths_agree(text)
    found = reader.layouts.match(text)
    if found is not None:  # the layout reads what the item parser reads, and leaves to PyYAML what it leaves
        try:
            through_layout = found[0].record(found[1])
        except pl.Fallback:
            assert general is None
        else:
            assert general is not None and same(through_layout, general[1]) and same(through_layout, record)
    row = outcome(reader.read, write(tmp_path_factory.getbasetemp(), text, "layout.yaml"))
    reference = _reference_row(text)
    assert row[0] == reference[0]
    if row[0] == "ok":
        _row_same(row[1], reference[1])
    else:
        assert (row[1].key, row[1].reason) == (reference[1].key, reference[1].reason)


@pytest.mark.parametrize("style", ["block", "flow"])
def test_layout_hands_errors_to_extract_stats(style, tmp_path):
    base = dump(sample_items(3), style)
    reader = StatsReader()
    for _ in range(2):
        reader.read(write(tmp_path, base))
    assert reader.layouts.layouts and reader.layouts.layouts[0].plan is not None
    cases = {"992001": ("-5", "AMP_N_1", "negative pixel count"),
             "C12": ("true", "AMP_NAME_2", "not a string"),
             "15872011": ("-" + "9" * 299, "DETECTOR_N", "negative pixel count")}
    for old, (new, key, reason) in cases.items():
        text = base.replace(old, new, 1)
        assert reader.layouts.match(text) is not None  # the layout matches, extract_stats decides
        with pytest.raises(StatsFormatError) as info:
            reader.read(write(tmp_path, text))
        assert info.value.key == key and reason in info.value.reason
    # A count that only looks negative.
    text = base.replace("992001", "0").replace("200.0", "-0.0")
    assert reader.layouts.match(text) is not None
    row = reader.read(write(tmp_path, text))
    assert row.amp[1, 1] == 0 and math.copysign(1, row.amp[2, 0]) == -1
    # "-0" is not a layout int: the item parser reads it, as 0.
    text = base.replace("15872011", "-0")
    assert reader.layouts.match(text) is None
    row = reader.read(write(tmp_path, text))
    assert row.det[1] == 0 and not np.signbit(row.det[1])
    # Too big for a float: the item parser and extract_stats report it.
    with pytest.raises(StatsFormatError, match="out of range"):
        reader.read(write(tmp_path, base.replace("15872011", "9" * 400)))


def test_layouts_are_bounded_and_skip_repeated_names():
    texts = [dump([[f"K{i}_{j}", "Double", float(j), ""] for j in range(3)]) for i in range(12)]
    reader = StatsReader()
    for text in texts:
        for _ in range(3):
            assert same(reader.parse(text), parse_record_slow(text))
    assert len(reader.layouts) == reader.layouts.max_layouts == 8
    assert reader.layouts.match(texts[-1]) is not None and reader.layouts.match(texts[0]) is None
    reader.layouts.clear()
    repeated = dump([["A", "Double", 1.0, ""], ["B", "Double", 2.0, ""], ["A", "Double", 3.0, ""]])
    for _ in range(3):
        assert same(reader.parse(repeated), {"A": 3.0, "B": 2.0})
    assert not reader.layouts.layouts
    cache = LayoutCache(max_layouts=2, max_chars=len(texts[0]) - 1, max_names=10)
    for i in range(1100):
        cache.learn("x", {f"N{i}": 1})
    assert len(cache._seen) <= 10
    for text in texts[:3]:  # too long for this cache
        cache.learn(text, pl.parse_items(text))
        cache.learn(text, pl.parse_items(text))
    assert len(cache) == 0
    cache.max_chars = 200_000
    for text in texts[:3]:
        cache.learn(text, pl.parse_items(text))
        cache.learn(text, pl.parse_items(text))
    assert len(cache) == 2 and cache.match(texts[2]) is not None and cache.match(texts[0]) is None


def test_layout_matches_only_its_names_types_and_value_forms():
    base = dump(sample_items(2), "flow")
    reader = StatsReader()
    reader.parse(base)
    reader.parse(base)
    assert reader.layouts.match(base) is not None
    layout = reader.layouts.layouts[0]
    # Other names, types, value forms or document ends: not this layout (read by the item parser or PyYAML).
    for other in (base.replace("Double", "Float", 1), base.replace("C10", "'C10'"),
                  base.replace("20512.25", "20512"), base.replace("992000", "992000.0"), base + "\n", base[:-1],
                  base.replace("lsst.daf", "lsst_daf"), base.replace("[DETECTOR_N,", "[DETECTOR(N,"),
                  base.replace("20512.25", "-.5"), base.replace("20512.25", "+.5"), base.replace("20512.25", "1e5"),
                  base.replace("992001", "-0"), base.replace("20512.25,", "&a 20512.25,")):
        assert layout.regex.fullmatch(other) is None
        ours, pure = outcome(reader.parse, other), outcome(parse_record_slow, other, loader="pure")
        assert ours[0] == pure[0] and (ours[0] == "error" or same(ours[1], pure[1]))
    # Comments and the spacing or wrapping of a flow item are the item parser's patterns in a layout too:
    # they may differ from file to file (a longer value moves a wrap) and read the same.
    for other in (base.replace("''", "'x'", 1), base.replace("''", "plain words (ADU)", 1),
                  base.replace("[DETECTOR_N,", "[DETECTOR_N ,"), base.replace("Double, 20512.25", "Double,\n  20512.25"),
                  base.replace(", '']", ", 'a long comment',\n  ]", 1).replace(",\n  ]", "]")):
        assert layout.regex.fullmatch(other) is not None, other
        assert same(reader.parse(other), parse_record_slow(other, loader="pure"))
        assert same(reader.parse(other), parse_record_slow(other, loader="c"))


@pytest.mark.parametrize("style", ["block", "flow"])
@pytest.mark.parametrize("change, key, reason", [
    (lambda items: without(items, "AMP_NAME_1"), "AMP_NAME_1", "missing while higher-numbered"),
    (lambda items: replaced(items, "DETECTOR_SIGMA", "1.5", "String"), "DETECTOR_SIGMA", "not a number"),
    (lambda items: replaced(items, "AMP_SIGMA_2", None, "Undef"), "AMP_SIGMA_2", "not a number"),
    (lambda items: replaced(items, "AMP_MEDIAN_0", "x", "String"), "AMP_MEDIAN_0", "not a number"),
    (lambda items: replaced(items, "AMP_NAME_0", 5, "Int"), "AMP_NAME_0", "not a string"),
    (lambda items: without(items, "AMP_N_2"), "AMP_N_2", "missing"),
    (lambda items: items + [["AMP_NAME_x", "String", "C99", ""]], "AMP_NAME_3", "missing while higher-numbered"),
], ids=["gap", "string sigma", "null sigma", "string median", "int name", "missing count", "odd name"])
def test_layouts_of_bad_files_keep_their_errors(change, key, reason, style, tmp_path):
    text = dump(change(sample_items(3)), style)
    reader = StatsReader()
    for name in ("a.yaml", "b.yaml", "c.yaml"):
        with pytest.raises(StatsFormatError) as info:
            reader.read(write(tmp_path, text, name))
        assert info.value.key == key and reason in info.value.reason
    assert reader.layouts.match(text) is not None and reader.layouts.layouts[0].plan is None


# --- Every shape the butler writes takes the fast path ----------------------------------------------------
#
# daf_base writes a PropertyList item as [name, element type, value, comment]; a key with several values
# has a list as its value; a DateTime value is a !<lsst.daf.base.DateTime> string. Names may hold spaces,
# dots and dashes (LSST ISR ..., DATE-OBS), strings and comments any printable text, long ones wrapped.

PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
butler_names = st.one_of(
    st.sampled_from(["LSST ISR OVERSCAN MEDIAN C10", "DATE-OBS", "a.b.c", "LSST.ISR.FLAT", "_x", "T 1 2",
                     "LSST ISR " + "LONG " * 16 + "NAME", "ON", "1.5", "x: y", "/path/to", "-dash", "(p)"]),
    st.text(PRINTABLE, min_size=1, max_size=30))
butler_texts = st.one_of(st.sampled_from([t for t in TRICKY if t.isascii() and t.isprintable()]),
                         st.text(PRINTABLE, max_size=30),
                         st.lists(st.sampled_from(["flat", "it's", '"q"', "#", "k:", "a-b", "- x", "a,b", "[c]",
                                                   "x" * 30, "/p", "(1)", "5", "&a", "*b", "!t", "%"]),
                                  min_size=1, max_size=30).map(" ".join))
ELEMENT_VALUES = {
    "Bool": st.booleans(),
    "Short": st.integers(-(2**15), 2**15 - 1),
    "Int": st.integers(-(2**31), 2**31 - 1),
    "Long": st.integers(-(2**31), 2**31 - 1),
    "LongLong": st.integers(-(2**63), 2**63 - 1),
    "UnsignedLongLong": st.integers(0, 2**64 - 1),
    "Float": st.floats(width=32).map(float),
    "Double": floats,
    "String": butler_texts,
    "DateTime": st.datetimes().map(lambda t: DateTime(t.strftime("%Y-%m-%dT%H:%M:%S.%f000Z"))),
    "Undef": st.none(),
}


@st.composite
def butler_items(draw):
    typ = draw(st.sampled_from(sorted(ELEMENT_VALUES)))
    values = ELEMENT_VALUES[typ]
    value = draw(st.lists(values, min_size=2, max_size=6) if draw(st.integers(0, 3)) == 0 else values)
    return [draw(butler_names), typ, value, draw(st.one_of(st.just(""), butler_texts))]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(butler_items(), min_size=1, max_size=12), st.sampled_from(["block", "flow"]), st.booleans())
def test_every_shape_the_butler_writes_takes_the_fast_path(items, style, explicit_start):
    text = dump(items, style, explicit_start)
    record = assert_paths_agree(text)  # item parser, its layout and both PyYAML loaders agree
    reference = independent_record(text)
    assert same(record, reference)
    expected = {}
    for name, _, value, _ in items:
        expected[name] = value[-1] if isinstance(value, list) else value
    if all(isinstance(k, str) for k in reference):  # PyYAML quotes a name such as "1.5"
        assert same(record, {k: (str(v) if isinstance(v, DateTime) else v) for k, v in expected.items()})
        assert takes_fast_path(text), text


# Hand-edited variants of the new shapes: the fast path takes exactly those it reads as PyYAML does.
_BLOCK_ITEM = HEADER + "- - {name}\n  - {typ}\n  - {value}\n  - {comment}\n"
_FLOW_ITEM = HEADER + "- [{name}, {typ}, {value}, {comment}]\n"
SHAPE_EDGES = {  # name -> (document, takes the fast path)
    "wrap at 5 spaces": (_BLOCK_ITEM.format(name="A", typ="String", value="a b\n     c", comment="''"), False),
    "wrap at 3 spaces": (_BLOCK_ITEM.format(name="A", typ="String", value="a b\n   c", comment="''"), False),
    "space before a wrap": (_BLOCK_ITEM.format(name="A", typ="String", value="a \n    c", comment="''"), False),
    "wrapped quoted": (_BLOCK_ITEM.format(name="A", typ="String", value="'a\n    c'", comment="''"), True),
    "quoted wrap after a space": (_BLOCK_ITEM.format(name="A", typ="String", value="'a \n    c'", comment="''"),
                                  False),
    "plain DateTime": (_BLOCK_ITEM.format(name="D", typ="DateTime", value="!<lsst.daf.base.DateTime> 2025-01-01",
                                          comment="''"), False),
    "DateTime": (_FLOW_ITEM.format(name="D", typ="DateTime", value="!<lsst.daf.base.DateTime> '2025-01-01'",
                                   comment="TAI"), True),
    "other tag": (_FLOW_ITEM.format(name="D", typ="DateTime", value="!<lsst.daf.base.Other> '2025-01-01'",
                                    comment="''"), False),
    "name 1.5": (_FLOW_ITEM.format(name="1.5", typ="Double", value="1.0", comment="''"), False),
    "name '1.5'": (_FLOW_ITEM.format(name="'1.5'", typ="Double", value="1.0", comment="''"), True),
    "name with spaces": (_FLOW_ITEM.format(name="LSST ISR  GAIN", typ="Double", value="1.0", comment="''"), True),
    "octal value": (_FLOW_ITEM.format(name="A", typ="Int", value="0755", comment="''"), False),
    "date value": (_FLOW_ITEM.format(name="A", typ="String", value="2025-01-01", comment="''"), False),
    "path value": (_FLOW_ITEM.format(name="A", typ="String", value="/repo/a b/c.fits", comment="''"), True),
    "dash value": (_FLOW_ITEM.format(name="A", typ="String", value="-x", comment="''"), True),
    "hash inside": (_BLOCK_ITEM.format(name="A", typ="String", value="a#b", comment="c#d"), True),
    "space hash": (_BLOCK_ITEM.format(name="A", typ="String", value="a #b", comment="''"), False),
    "block colon": (_BLOCK_ITEM.format(name="A", typ="String", value="a:b", comment="''"), True),
    "flow colon": (_FLOW_ITEM.format(name="A", typ="String", value="a:b", comment="''"), False),
    "block word from a colon": (_BLOCK_ITEM.format(name="0 :0", typ="String", value="a :b", comment="''"), True),
    "block colon space": (_BLOCK_ITEM.format(name="A", typ="String", value="a :: b", comment="''"), False),
    "block list": (_BLOCK_ITEM.format(name="A", typ="Int", value="- 1\n    - 2", comment="''"), True),
    "block list at 6": (_BLOCK_ITEM.format(name="A", typ="Int", value="- 1\n      - 2", comment="''"),
                        True),  # one element, "1 - 2": its second line continues the first, as YAML reads it
    "flow list wrapped": (_BLOCK_ITEM.format(name="A", typ="Int", value="[1, 2,\n    3]", comment="''"), True),
    "empty list": (_BLOCK_ITEM.format(name="A", typ="Int", value="[]", comment="''"), False),
    "list of lists": (_BLOCK_ITEM.format(name="A", typ="Int", value="[[1], 2]", comment="''"), False),
    "digit comment": (_FLOW_ITEM.format(name="A", typ="Double", value="1.5", comment="2 amplifiers"), True),
    "bad date comment": (_FLOW_ITEM.format(name="A", typ="Double", value="1.5", comment="2001-13-45"), False),
}


@pytest.mark.parametrize("name", list(SHAPE_EDGES))
def test_new_shapes_hand_edited(name):
    text, fast = SHAPE_EDGES[name]
    assert takes_fast_path(text) == fast
    record = assert_paths_agree(text)
    if record is not None:
        assert same(record, independent_record(text))


def test_matching_is_linear_on_hostile_documents():
    # Many item starts that each fail late: matching item by item from the last one's end, never searching.
    cases = [HEADER + "- [A, Double, 'x" * 200_000, HEADER + "- - A\n  - Double\n  - 1.5\n  - x y" * 100_000 + "#",
             HEADER + "- [" + "a " * 1_000_000 + ":"]
    for text in cases:
        start = time.perf_counter()
        with pytest.raises(pl.Fallback):
            pl.parse_items(text)
        assert time.perf_counter() - start < 5
