"""Commits of concurrent runs and readers: a committed store is never lost or mixed.

Runs are driven step by step in a chosen order (every interleaving of two and three runs, with and without
overwrite, on a fresh path and on an existing store), or paused inside a commit with the transaction's test
hook (``transaction._pause_at``) while another run or a reader acts.  The expected outcome of an
interleaving comes from the rule itself (a run without overwrite never replaces a store), applied event by
event by :func:`expected_outcome`.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr

from flatnorm_dask.store import (
    LEGACY_VERSION,
    MANIFEST_FILE,
    StoreChangedError,
    StoreError,
    StoreExistsError,
    abort_store,
    commit_store,
    current_version,
    is_complete,
    open_store,
    prepare_store,
    read_commit,
    remove_store,
    store_transaction,
    transaction,
    verify_store,
    write_groups,
    write_store,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A small staged store (one group) that each run copies as what it wrote."""
    staging = prepare_store(tmp_path_factory.mktemp("template") / "t.zarr")
    ds = xr.Dataset({"det_scale": ("detector", np.linspace(0.9, 1.1, 4)), "exp_scale": ("exposure", np.ones(3))},
                    coords={"detector": [0, 1, 2, 3], "exposure": [7, 8, 9]})
    dask.compute(*write_groups(staging, {"r_57": ds}), scheduler="sync")
    return staging


def stage(template: Path, staging: Path, label: str) -> None:
    """What run ``label`` writes: the template, its root attributes saying which run wrote it."""
    shutil.copytree(template, staging, dirs_exist_ok=True)
    meta = json.loads((staging / "zarr.json").read_text())
    meta["attributes"]["run"] = label
    (staging / "zarr.json").write_text(json.dumps(meta))


def label(path: Path) -> str | None:
    """Which run wrote the store at ``path`` (None: no complete store there)."""
    if read_commit(path) is None:
        return None
    return json.loads((path / "zarr.json").read_text())["attributes"]["run"]


def versions(path: Path) -> list[str]:
    """Names in the store's versions directory, sorted."""
    where = path.with_name(f".{path.name}.versions")
    return sorted(os.listdir(where)) if where.is_dir() else []


def unfinished(path: Path) -> list[str]:
    """Staging directories, versions being deleted, temporary pointers: what a finished run must not leave."""
    beside = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.pointer-")]
    return beside + [v for v in versions(path) if ".partial-" in v or ".deleting-" in v]


# ------------------------------------------------------------------------------------------ interleavings

def orders(n_runs: int) -> list[tuple[tuple[str, int], ...]]:
    """Every interleaving of the runs' two events, prepare ("P", i) before commit ("C", i), up to naming the
    runs (run i is the i-th to prepare)."""
    events = [(kind, i) for i in range(n_runs) for kind in "PC"]
    found = set()
    for perm in itertools.permutations(events):
        if all(perm.index(("P", i)) < perm.index(("C", i)) for i in range(n_runs)) and \
                [i for kind, i in perm if kind == "P"] == list(range(n_runs)):
            found.add(perm)
    return sorted(found)


def expected_outcome(order, overwrite, initial: bool) -> tuple[str | None, dict[int, str]]:
    """The rule, event by event: a run is refused at its start, or loses at its commit, when a store exists
    and it has no overwrite; otherwise its commit makes its store the current one."""
    current = "initial" if initial else None
    outcome: dict[int, str] = {}
    for kind, i in order:
        if kind == "P":
            if current is not None and not overwrite[i]:
                outcome[i] = "refused"
        elif i not in outcome:
            if current is not None and not overwrite[i]:
                outcome[i] = "lost"
            else:
                outcome[i] = "won"
                current = f"run{i}"
    return current, outcome


def play(tmp_path: Path, template: Path, order, overwrite, initial: bool) -> None:
    path = tmp_path / "s.zarr"
    if initial:
        staging = prepare_store(path)
        stage(template, staging, "initial")
        commit_store(staging, path)
    want_final, want = expected_outcome(order, overwrite, initial)
    staged: dict[int, Path] = {}
    got: dict[int, str] = {}
    current = "initial" if initial else None
    for kind, i in order:
        if kind == "P":
            try:
                staged[i] = prepare_store(path, overwrite=overwrite[i])
            except StoreExistsError as err:
                assert str(err) == f"{path} exists; pass --overwrite to replace it"
                got[i] = "refused"
                continue
            stage(template, staged[i], f"run{i}")
        elif i in staged:
            try:
                commit_store(staged[i], path, overwrite=overwrite[i])
            except StoreExistsError as err:
                assert str(err) == f"{path} exists; pass --overwrite to replace it"
                abort_store(staged[i])
                got[i] = "lost"
            else:
                got[i] = "won"
                current = f"run{i}"
        # After every event: the store is the last winner's, complete; nothing replaced it otherwise.
        assert label(path) == current, (order, overwrite, kind, i)
    case = (order, overwrite, initial)
    assert got == want, case
    files = sum(1 for p in template.rglob("*") if p.is_file()) - 1  # all but the root's zarr.json (the record)
    assert label(path) == want_final and (want_final is None or verify_store(path) == files), case
    assert not unfinished(path), case
    committed = [v for v in versions(path) if transaction._VERSION_RE.match(v)]
    # The current version and at most one previous one (output.keep_versions = 1).
    assert len(committed) <= 2 and (want_final is None or os.readlink(path).endswith(committed[-1])), case


def test_a_commit_flushes_every_file_and_directory_before_its_marker_and_the_pointer(tmp_path, template, fsyncs):
    """What fsync is for (a power cut) is not testable here; that it is asked for, of the right paths in the right
    order, is: every file and directory of the new version, then its root record, then the directory of the
    pointer that makes it visible."""
    path = tmp_path / "s.zarr"
    staging = prepare_store(path)
    stage(template, staging, "run0")
    version = commit_store(staging, path)
    written = {str(p).replace(str(staging), str(version.path)) for p in fsyncs}  # flushed before the rename
    every = {str(p) for p in version.path.rglob("*")} | {str(version.path)}
    assert every <= written, sorted(every - written)
    order = [str(p) for p in fsyncs]
    marker = order.index(str(staging / "zarr.json"), order.index(str(staging / MANIFEST_FILE)))
    chunks = [i for i, p in enumerate(order) if "/r_57/" in p]
    assert chunks and max(chunks) < marker  # the record last: a store that says it is complete is
    assert order[-1] == str(path.parent)  # the pointer, once it is in place


def test_orders_are_every_interleaving():
    # 4! / 2^2 orderings of two runs' events with P before C, /2 for the naming; 6! / 2^3 / 3! for three.
    assert len(orders(2)) == 3 and len(orders(3)) == 15
    assert orders(2) == [(("P", 0), ("C", 0), ("P", 1), ("C", 1)), (("P", 0), ("P", 1), ("C", 0), ("C", 1)),
                         (("P", 0), ("P", 1), ("C", 1), ("C", 0))]


@pytest.mark.parametrize("initial", [False, True], ids=["fresh", "existing"])
@pytest.mark.parametrize("overwrite", [flags for n_runs in (2, 3) for flags in itertools.product([False, True],
                                                                                                repeat=n_runs)],
                         ids=lambda o: "".join("o" if x else "-" for x in o))
def test_every_interleaving(tmp_path, template, overwrite, initial):
    """Two or three runs (``o``: with overwrite), on a fresh path or an existing store, in every order."""
    for n, order in enumerate(orders(len(overwrite))):
        play(tmp_path / f"case{n}", template, order, overwrite, initial)


def test_expected_outcome_is_the_rule():
    """The oracle on the issue's case: two runs without overwrite, both started before either committed."""
    both_started = (("P", 0), ("P", 1), ("C", 0), ("C", 1))
    assert expected_outcome(both_started, (False, False), False) == ("run0", {0: "won", 1: "lost"})
    assert expected_outcome(both_started, (False, True), False) == ("run1", {0: "won", 1: "won"})
    assert expected_outcome(both_started, (True, False), True) == ("run0", {0: "won", 1: "refused"})


# ------------------------------------------------------------------------------- inside the commit: the lock

class Pauses:
    """The transaction's test hook: a run (a thread) named in ``at`` stops at that step until released."""

    def __init__(self, **at: str):
        self.at = at  # thread name -> step
        self.reached = {name: threading.Event() for name in at}
        self.go = {name: threading.Event() for name in at}

    def __call__(self, step: str, store: Path) -> None:
        name = threading.current_thread().name
        if self.at.get(name) == step:
            self.reached[name].set()
            assert self.go[name].wait(30), f"{name} was never released from {step}"


def run_in_thread(name: str, fn) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            result["error"] = err

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread, result


def writer(path: Path, template: Path, name: str, **commit):
    """A run: prepare, write, commit (or abort) — store_transaction as the workflow uses it."""
    def go():
        with store_transaction(path, **commit) as txn:
            stage(template, txn.staging, name)
        return txn.version
    return go


def test_a_commit_waits_for_the_lock_and_checks_again(tmp_path, template, monkeypatch):
    """The issue's race: both runs checked the path at their start; the second to commit must see the first's
    store, under the lock, and lose without touching it."""
    path = tmp_path / "s.zarr"
    pauses = Pauses(a="locked", b="sealed")
    monkeypatch.setattr(transaction, "_pause_at", pauses)
    a, a_result = run_in_thread("a", writer(path, template, "a"))
    assert pauses.reached["a"].wait(30)
    b, b_result = run_in_thread("b", writer(path, template, "b"))
    assert pauses.reached["b"].wait(30)  # b sealed its store: it too passed the check at its start
    pauses.go["b"].set()
    b.join(0.5)
    assert b.is_alive(), "b committed while a held the lock"
    pauses.go["a"].set()
    a.join(30)
    b.join(30)
    assert "error" not in a_result and a_result["value"].id == os.readlink(path).split("/")[1]
    assert isinstance(b_result["error"], StoreExistsError)
    assert label(path) == "a" and is_complete(path) and not unfinished(path)


def test_an_overwrite_waiting_for_the_lock_replaces_the_store_after_it(tmp_path, template, monkeypatch):
    path = tmp_path / "s.zarr"
    pauses = Pauses(a="published")  # a holds the lock, its store published, clean-up not done
    monkeypatch.setattr(transaction, "_pause_at", pauses)
    a, a_result = run_in_thread("a", writer(path, template, "a"))
    assert pauses.reached["a"].wait(30)
    b, b_result = run_in_thread("b", writer(path, template, "b", overwrite=True, keep_versions=0))
    b.join(0.5)
    assert b.is_alive() and label(path) == "a"
    pauses.go["a"].set()
    a.join(30)
    b.join(30)
    assert "error" not in b_result and label(path) == "b"
    # keep_versions = 0: a's version is deleted once b's is published.
    assert [v for v in versions(path)] == [b_result["value"].id] and not unfinished(path)


def test_lock_timeout_is_one_line_and_the_staging_is_removed(tmp_path, template, monkeypatch):
    path = tmp_path / "s.zarr"
    pauses = Pauses(a="locked")
    monkeypatch.setattr(transaction, "_pause_at", pauses)
    a, a_result = run_in_thread("a", writer(path, template, "a"))
    assert pauses.reached["a"].wait(30)
    b, b_result = run_in_thread("b", writer(path, template, "b", overwrite=True, lock_timeout=0.3))
    b.join(30)
    assert str(b_result["error"]) == (f"{path}: another run has been committing to it for more than 0.3 s; try "
                                      "again later or raise output.lock_timeout (--lock-timeout)")
    assert len([v for v in versions(path) if ".partial-" in v]) == 1  # a's, still committing; b's is gone
    pauses.go["a"].set()
    a.join(30)
    assert label(path) == "a" and not unfinished(path)


def test_without_flock_a_run_without_overwrite_still_never_replaces(tmp_path, template, monkeypatch, caplog):
    """On a file system without flock both runs get through the re-check; os.symlink still lets one win."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = tmp_path / "s.zarr"
    pauses = Pauses(a="renamed", b="renamed")
    monkeypatch.setattr(transaction, "_pause_at", pauses)
    with caplog.at_level(logging.WARNING, logger="flatnorm_dask.store"):
        a, a_result = run_in_thread("a", writer(path, template, "a"))
        b, b_result = run_in_thread("b", writer(path, template, "b"))
        assert pauses.reached["a"].wait(30) and pauses.reached["b"].wait(30)  # both renamed into versions
        pauses.go["b"].set()
        b.join(30)
        pauses.go["a"].set()
        a.join(30)
    assert "does not support locks" in caplog.text
    assert "error" not in b_result and isinstance(a_result["error"], StoreExistsError)
    assert label(path) == "b" and versions(path) == [b_result["value"].id] and not unfinished(path)


# ----------------------------------------------------------------------------------- appends build on this

def test_commit_expecting_a_version(tmp_path, template):
    path = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match="no such store"):
        current_version(path)
    first = writer(path, template, "first")()
    assert current_version(path) == first and first.path == path.resolve()
    # An append: built on `first`, committed only if the pointer still names it.
    appended = writer(path, template, "append", expect_version=first.id)()
    assert label(path) == "append" and current_version(path) == appended
    # Another run committed since this one read the store: refused, the other's store kept, staging removed.
    staging = prepare_store(path, expect_version=appended.id)
    stage(template, staging, "late")
    writer(path, template, "other", overwrite=True)()
    with pytest.raises(StoreChangedError) as err:
        commit_store(staging, path, expect_version=appended.id)
    assert str(err.value) == (f"{path}: the store changed while this run was writing (another run committed a "
                              "new version); rerun")
    abort_store(staging)
    assert label(path) == "other" and not unfinished(path)
    with pytest.raises(StoreChangedError):
        prepare_store(path, expect_version=appended.id)
    remove_store(path)
    with pytest.raises(StoreChangedError):  # the store is gone altogether
        prepare_store(path, expect_version=appended.id)


# ------------------------------------------------------------------------------------------------ readers

def numbers(seed: int) -> dict[str, xr.Dataset]:
    rng = np.random.default_rng(seed)
    ds = xr.Dataset({"det_scale": (("detector", "exposure"), rng.uniform(0.5, 1.5, (6, 8)))},
                    coords={"detector": np.arange(6), "exposure": np.arange(8)}).chunk({"detector": 2})
    return {"r_57": ds}


def test_a_reader_keeps_the_version_it_opened(tmp_path):
    path = tmp_path / "s.zarr"
    old, new = numbers(1), numbers(2)
    write_store(path, old)
    tree = open_store(path)  # lazily, as a notebook holds it
    lazy = tree["r_57"]["det_scale"]
    assert lazy.chunks is not None
    write_store(path, new, overwrite=True)  # keep_versions = 1: the old version stays
    np.testing.assert_array_equal(lazy.values, old["r_57"]["det_scale"].values)  # the old numbers, unmixed
    np.testing.assert_array_equal(open_store(path)["r_57"]["det_scale"].values, new["r_57"]["det_scale"].values)
    # xr.open_zarr by path follows the pointer: it reads the new store.
    np.testing.assert_array_equal(xr.open_zarr(path, group="r_57")["det_scale"].values,
                                  new["r_57"]["det_scale"].values)


def test_a_reader_of_a_deleted_version_gets_an_error_naming_the_store(tmp_path):
    path = tmp_path / "s.zarr"
    write_store(path, numbers(1))
    lazy = open_store(path)["r_57"]["det_scale"]
    first = lazy[:2].values  # one chunk read before the overwrite
    write_store(path, numbers(2), overwrite=True, keep_versions=0)
    with pytest.raises(StoreError) as err:
        lazy.values
    assert str(err.value).startswith(f"{path}: the version opened here (") and \
        str(err.value).endswith("was deleted by a later commit (output.keep_versions); open the store again")
    np.testing.assert_array_equal(first, numbers(1)["r_57"]["det_scale"].values[:2])


def test_a_reader_on_dask_workers(tmp_path, dask_client):
    """The store is read on the workers (pickled); the error reaches the client as the same error."""
    path = tmp_path / "s.zarr"
    write_store(path, numbers(3))
    lazy = open_store(path)["r_57"]["det_scale"]
    np.testing.assert_array_equal(lazy.sum("exposure").compute().values,
                                  numbers(3)["r_57"]["det_scale"].values.sum(axis=1))
    write_store(path, numbers(4), overwrite=True, keep_versions=0)
    with pytest.raises(StoreError, match=f"^{path}: the version opened here"):
        lazy.sum("exposure").compute()


def make_legacy(path: Path, data: dict) -> None:
    """A store as written before versions: the committed directory at the path itself."""
    write_store(path, data)
    version = path.resolve()
    path.unlink()
    os.rename(version, path)
    shutil.rmtree(path.with_name(f".{path.name}.versions"))


def test_a_store_from_before_versions_is_read_and_replaced_safely(tmp_path, template):
    path = tmp_path / "s.zarr"
    make_legacy(path, numbers(5))
    assert current_version(path).id == LEGACY_VERSION and is_complete(path)
    lazy = open_store(path)["r_57"]["det_scale"]
    np.testing.assert_array_equal(lazy[:2].values, numbers(5)["r_57"]["det_scale"].values[:2])
    with pytest.raises(StoreExistsError):
        writer(path, template, "new")()
    new = writer(path, template, "new", overwrite=True)()
    assert label(path) == "new" and os.path.islink(path) and current_version(path) == new
    # The old directory is now the previous version: its reader is told, never given the new store's chunks.
    with pytest.raises(StoreError, match=f"^{path}: the store was replaced since it was opened here"):
        lazy.values
    [previous] = [v for v in versions(path) if v != new.id]
    np.testing.assert_array_equal(open_store(path.with_name(f".{path.name}.versions") / previous)
                                  ["r_57"]["det_scale"].values, numbers(5)["r_57"]["det_scale"].values)


# ----------------------------------------------------------------------------------- versions and clean-up

def test_keep_versions_and_leftovers_of_killed_clean_ups(tmp_path, template):
    path = tmp_path / "s.zarr"
    made = [writer(path, template, f"run{i}", overwrite=True, keep_versions=2)() for i in range(5)]
    assert versions(path) == sorted(v.id for v in made[-3:])  # the current one and the two newest before it
    assert [v.id for v in made] == sorted(v.id for v in made)  # ids sort in commit order
    where = path.with_name(f".{path.name}.versions")
    (where / f"{made[-3].id}.deleting-0123456789ab").mkdir()  # a clean-up killed mid-way
    os.symlink("nowhere", path.with_name(f".{path.name}.pointer-0123456789ab"))  # a commit killed mid-swap
    running = prepare_store(path, overwrite=True)  # another run still writing: never touched
    last = writer(path, template, "last", overwrite=True, keep_versions=0)()
    assert versions(path) == sorted([last.id, running.name])
    assert unfinished(path) == [running.name]


def test_remove_store(tmp_path, template):
    path = tmp_path / "s.zarr"
    for i in range(2):
        writer(path, template, f"run{i}", overwrite=True)()
    remove_store(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.zarr.lock"]
    victim = tmp_path / "notes"
    victim.mkdir()
    (victim / "a.txt").write_text("keep")
    with pytest.raises(StoreError, match="is not a flatnorm store; refusing to remove it"):
        remove_store(victim)
    assert (victim / "a.txt").read_text() == "keep"


# ------------------------------------------------------------------------------- killed at any step (SIGKILL)

@pytest.mark.parametrize("step", transaction.STEPS)
def test_killed_at_any_step_leaves_the_old_or_the_new_store(tmp_path, template, step):
    """A process dies (no clean-up at all: os._exit in a forked child) at each step of an overwrite: the path
    holds the complete old store, or the complete new one; the next run commits and cleans up after it."""
    path = tmp_path / "s.zarr"
    writer(path, template, "old")()

    def die(at, store):
        if at == step:
            os._exit(9)

    pid = os.fork()
    if pid == 0:  # the child: an overwriting run that dies at `step`
        try:
            transaction._pause_at = die
            writer(path, template, "new", overwrite=True)()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    assert label(path) == ("new" if step == "published" else "old") and is_complete(path)
    staged = [v for v in versions(path) if ".partial-" in v]
    assert len(staged) == (1 if step in ("prepared", "sealed", "locked") else 0)
    for name in staged:  # a killed run's staging directory is never a store, even sealed
        assert read_commit(path.with_name(f".{path.name}.versions") / name) is None
    after = writer(path, template, "after", overwrite=True, keep_versions=0)()
    assert label(path) == "after" and versions(path) == sorted([after.id, *staged])
