"""The ledger's methods for received rows: a run and its steps are imported by checking the
hashes they carry, never by computing new ones; the existing behaviour is unchanged."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from qes_edge.ledger.store import Ledger, LedgerError, StepRecord
from qes_edge.sync.testing import synthetic_ledger


@pytest.fixture
def pair(tmp_path):
    run_id = synthetic_ledger(tmp_path / "a.qes", 5, population=4)
    a, b = Ledger(tmp_path / "a.qes"), Ledger(tmp_path / "b.qes")
    yield a, b, run_id
    a.close()
    b.close()


def copy_steps(a, b, run_id, start=0):
    times = a.step_times(run_id)
    for rec in a.steps(run_id, start):
        rec = StepRecord(rec.step, rec.threshold, rec.seeds, rec.coefs_q16, rec.rewards, rec.weights_sha256,
                         rec.timings, rec.failures, rec.hash)
        b.append_received(run_id, rec, times[rec.step])


def test_import_and_append_give_the_same_ledger(pair):
    a, b, run_id = pair
    info = a.export_run(run_id)
    assert set(info) == {"run_id", "created", "base_sha256", "base_name", "config", "noise_spec", "hash"}
    run = b.import_run(info)
    assert run == a.run(run_id) and b.head(run_id) == (0, run.hash)
    assert b.import_run(info) == run  # importing twice is harmless
    copy_steps(a, b, run_id)
    assert b.verify(run_id) == 5 and b.head(run_id) == a.head(run_id)
    assert b.step_times(run_id) == a.step_times(run_id)  # the sender's times, not the time of receipt
    assert b.members(run_id) == a.members(run_id)
    cols = "step, threshold, seeds, coefs_q16, rewards, failures, timings, weights_sha256, prev_hash, hash, created"
    assert b.db.execute(f"select {cols} from steps").fetchall() == a.db.execute(f"select {cols} from steps").fetchall()
    hashes = [rec.hash for rec in a.steps(run_id)]
    assert b.step_hashes(run_id, [0, 4, 9]) == {0: hashes[0], 4: hashes[4]}  # step 9 is not held


def test_a_run_whose_fields_do_not_hash_is_refused(pair):
    a, b, run_id = pair
    for key, value in (("config", '{"population":6,"seed":0}'), ("base_name", "other.gguf"), ("noise_spec", 2),
                       ("base_sha256", "cd" * 32)):
        info = dict(a.export_run(run_id), **{key: value})
        with pytest.raises(LedgerError, match="does not hash to the value it carries"):
            b.import_run(info)
    with pytest.raises(LedgerError, match="not canonical JSON"):
        b.import_run(dict(a.export_run(run_id), config='{"seed": 0, "population": 4}'))
    with pytest.raises(LedgerError, match="cannot be decoded"):
        b.import_run(dict(a.export_run(run_id), run_id="XYZ"))
    assert b.runs() == []


def test_same_run_id_with_another_hash_is_refused(pair, tmp_path):
    a, b, run_id = pair
    b.import_run(a.export_run(run_id))
    sql = sqlite3.connect(tmp_path / "b.qes")
    sql.execute("update runs set hash = ?", ["00" * 32])
    sql.commit()
    sql.close()
    with pytest.raises(LedgerError, match="holds that run with another hash"):
        b.import_run(a.export_run(run_id))


def test_a_step_that_does_not_chain_is_refused_and_nothing_written(pair):
    a, b, run_id = pair
    b.import_run(a.export_run(run_id))
    recs = list(a.steps(run_id))
    with pytest.raises(LedgerError, match="out of order"):
        b.append_received(run_id, recs[1])
    bad = recs[0]
    bad.rewards = bad.rewards.copy()
    bad.rewards[0] += 2**-40  # one reward changed by a hair: the hash it carries no longer fits
    with pytest.raises(LedgerError, match="does not chain to step -1"):
        b.append_received(run_id, bad)
    other = synthetic_ledger(a.path.parent / "c.qes", 2, population=4, seed=9)
    c = Ledger(a.path.parent / "c.qes")
    foreign = list(c.steps(other))[0]  # a step of another run: chains to another run hash
    c.close()
    with pytest.raises(LedgerError, match="does not chain"):
        b.append_received(run_id, foreign)
    assert b.head(run_id)[0] == 0 and b.db.execute("select count(*) from steps").fetchone()[0] == 0
    assert b.db.execute("select count(*) from members").fetchone()[0] == 0


def test_received_members_must_match(pair):
    a, b, run_id = pair
    b.import_run(a.export_run(run_id))
    rec = list(a.steps(run_id))[0]
    rec.coefs_q16 = rec.coefs_q16[:2]
    with pytest.raises(LedgerError, match="has 4 seeds, 2 coefficients"):
        b.append_received(run_id, rec)


def test_append_step_is_unchanged(tmp_path):
    """The sender's own path still computes the hashes it records."""
    lg = Ledger(tmp_path / "x.qes")
    run = lg.create_run("ab" * 32, "m.gguf", {"p": 2}, 1)
    rec = lg.append_step(run.run_id, StepRecord(0, 5, np.array([3, -3]), np.array([1, -1], np.int32),
                                                np.array([0.5, 0.25]), "00" * 32))
    assert rec.prev_hash == run.hash and lg.verify(run.run_id) == 1
    lg.close()
