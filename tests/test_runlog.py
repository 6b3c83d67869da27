"""`qes-edge log RUN`: one line per step (and per evaluation, at its step), --json, --tail,
--run-id; RUN found by ledger path, run id or prefix in <home>/runs and the daemon's jobs;
ledgers opened read-only and verified, a bad one a one-line error."""

import json
import shutil
import sqlite3

import numpy as np
import pytest
from typer.testing import CliRunner

from qes_edge.cli.main import app
from qes_edge.ledger.store import MIGRATIONS, Ledger, StepRecord

runner = CliRunner()
SHA = "cd" * 32


def step(i, rng, n=4, nan_at=(), rss=None):
    base = rng.integers(1, 2**31 - 1, n // 2)
    rewards = 0.3 + 0.02 * i + 0.05 * rng.random(n)
    rewards[list(nan_at)] = np.nan
    t = {"perturb_s": 0.25, "eval_s": 4.5 + i, "restore_s": 0.125, "update_s": 0.5, "digest_s": 0.0625,
         "changed": 1000 + i}
    if rss is not None:
        t["rss_mb"] = rss
    return StepRecord(i, 34268880, np.stack([base, -base], 1).reshape(-1),
                      rng.integers(-70000, 70000, n).astype(np.int32), rewards, f"{i + 1:064x}", t,
                      failures=len(nan_at))


def make_ledger(path, n_steps=6, runs=1, evals=(0, 3, 6), **cfg):
    lg = Ledger(path)
    rng = np.random.default_rng(11)
    ids = []
    for r in range(runs):
        run = lg.create_run(SHA, "tiny.gguf", {"task": "choice", "seed": r, **cfg}, 1)
        for i in range(n_steps):
            lg.append_step(run.run_id, step(i, rng, nan_at=(1,) if i == 2 else ()))
            if i + 1 in evals:
                lg.record_eval(run.run_id, i + 1, "heldout", {"accuracy": 0.25 + 0.1 * i, "reward": 0.3})
        if 0 in evals:
            lg.record_eval(run.run_id, 0, "heldout", {"accuracy": 0.2, "reward": 0.25})
        ids.append(run.run_id)
    lg.close()
    return ids


def strict_json(line):
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(line, parse_constant=bad)


def log(*args):
    return runner.invoke(app, ["log", *map(str, args)])


def test_one_line_per_step_with_the_evaluations_at_their_steps(tmp_path):
    (run_id,) = make_ledger(tmp_path / "r.qes")
    res = log(tmp_path / "r.qes")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"run {run_id} in {tmp_path / 'r.qes'}: tiny.gguf") and "6 steps" in lines[0]
    assert lines[1].split()[:5] == ["step", "reward", "min", "max", "fail"]
    body = lines[2:]
    kinds = ["E" if ln.lstrip().startswith("held-out") else int(ln.split()[0]) for ln in body]
    assert kinds == ["E", 0, 1, 2, "E", 3, 4, 5, "E"]  # an evaluation at step k comes before step k
    assert body[0].strip() == "held-out at the start: accuracy 0.200, reward 0.250"
    assert body[4].strip().startswith("held-out after 3 steps: accuracy 0.450")
    lg = Ledger(tmp_path / "r.qes", readonly=True)
    recs = list(lg.steps(run_id))
    for ln in body:
        if ln.lstrip().startswith("held-out"):
            continue
        rec = recs[int(ln.split()[0])]
        cols = ln.split()
        ok = rec.rewards[~np.isnan(rec.rewards)]
        assert cols[1:4] == [f"{ok.mean():.3f}", f"{ok.min():.3f}", f"{ok.max():.3f}"]
        assert cols[4] == str(rec.failures)
        assert cols[5] == f"{rec.coefs_q16.min():+d}..{rec.coefs_q16.max():+d}"
        assert cols[6:11] == [f"{rec.timings[k]:.2f}s" for k in ("perturb_s", "eval_s", "restore_s", "update_s",
                                                                  "digest_s")]
        assert cols[11] == f"{rec.timings['changed']:,}"
    assert body[3].split()[4] == "1"  # step 2 had a failed member


def test_json_lines_without_nan(tmp_path):
    (run_id,) = make_ledger(tmp_path / "r.qes")
    res = log(tmp_path / "r.qes", "--json")
    assert res.exit_code == 0, res.output
    events = [strict_json(ln) for ln in res.stdout.splitlines()]
    head, *rest = events
    assert head["event"] == "run" and head["run_id"] == run_id and head["steps"] == 6 and len(head["head"]) == 64
    assert head["config"] == {"task": "choice", "seed": 0}
    assert [(e["event"], e["step"]) for e in rest] == [("eval", 0), ("step", 0), ("step", 1), ("step", 2), ("eval", 3),
                                                      ("step", 3), ("step", 4), ("step", 5), ("eval", 6)]
    lg = Ledger(tmp_path / "r.qes", readonly=True)
    for e, rec in zip([e for e in rest if e["event"] == "step"], lg.steps(run_id)):
        assert e["reward"] == pytest.approx(float(np.nanmean(rec.rewards)), rel=1e-15)
        assert e["min_reward"] == float(np.nanmin(rec.rewards)) and e["max_reward"] == float(np.nanmax(rec.rewards))
        assert e["rewards"] == [None if np.isnan(x) else x for x in rec.rewards.tolist()]
        assert e["seeds"] == rec.seeds.tolist() and e["coefs_q16"] == rec.coefs_q16.tolist()
        assert e["timings"] == rec.timings and e["hash"] == rec.hash and e["changed"] == rec.timings["changed"]
    assert rest[3]["rewards"][1] is None and rest[3]["failures"] == 1
    assert rest[-1] == {"event": "eval", "step": 6, "split": "heldout", "accuracy": pytest.approx(0.75),
                        "reward": 0.3}


def test_tail_and_extra_timings(tmp_path):
    lg = Ledger(tmp_path / "t.qes")
    run = lg.create_run(SHA, "tiny.gguf", {"task": "choice"}, 1)
    rng = np.random.default_rng(0)
    for i in range(5):
        rec = step(i, rng, rss=190.25 + i)
        rec.timings["future_key"] = "x"
        lg.append_step(run.run_id, rec)
    lg.record_eval(run.run_id, 3, "heldout", {"accuracy": 0.5})
    lg.record_eval(run.run_id, 0, "memory", {"inference_rss_mb": 188.5, "loaded_rss_mb": 170.0})
    lg.close()
    res = log(tmp_path / "t.qes", "--tail", 2)
    assert res.exit_code == 0, res.output
    body = res.stdout.splitlines()
    assert "last 2 of 5 steps" in body[0]
    # the evaluation at step 3 scored the weights step 3 starts from: shown with it
    assert [ln.split()[0] for ln in body[2:]] == ["held-out", "3", "4"]
    assert body[3].endswith("rss 193.2 MB, future_key x")
    res = log(tmp_path / "t.qes", "--tail", 3)
    assert [ln.split()[0] for ln in res.stdout.splitlines()[2:]] == ["2", "held-out", "3", "4"]
    res = log(tmp_path / "t.qes")
    assert res.stdout.splitlines()[2].strip() == "memory at the start: inference_rss_mb 188.5, loaded_rss_mb 170.0"
    res = log(tmp_path / "t.qes", "--tail", 0)
    assert res.exit_code == 2


def test_run_id_picks_a_run_in_a_ledger(tmp_path):
    ids = make_ledger(tmp_path / "two.qes", runs=2)
    latest = [strict_json(ln) for ln in log(tmp_path / "two.qes", "--json").stdout.splitlines()][0]
    assert latest["run_id"] == ids[1]
    for pick in (ids[0], ids[0][:6]):
        res = log(tmp_path / "two.qes", "--json", "--run-id", pick)
        assert res.exit_code == 0, res.output
        assert strict_json(res.stdout.splitlines()[0])["run_id"] == ids[0]
    res = log(tmp_path / "two.qes", "--run-id", "ffff")
    assert res.exit_code == 2 and "no run with an id starting ffff" in res.output
    res = log(tmp_path / "two.qes", "--run-id", "zz")
    assert res.exit_code == 2 and "not a run id" in res.output


def test_a_run_id_is_found_in_home_and_in_the_daemons_jobs(tmp_path, qes_edge_home):
    runs = qes_edge_home / "runs"
    runs.mkdir()
    (a,) = make_ledger(runs / "a.qes")
    (runs / "junk.qes").write_bytes(b"junk" * 100)  # skipped, not an error
    elsewhere = tmp_path / "job.qes"
    (b,) = make_ledger(elsewhere)
    head = lambda res: strict_json(res.stdout.splitlines()[0])  # noqa: E731
    for spec in (a, a[:4], a[:10].upper()):
        res = log(spec, "--json")
        assert res.exit_code == 0, res.output
        assert head(res)["run_id"] == a and head(res)["ledger"] == str(runs / "a.qes")
    res = log(b[:8])
    assert res.exit_code == 2 and f"no run {b[:8]} in the ledgers in {runs}" in res.output
    # the daemon's jobs: a table of its own, which may not be there yet
    daemon = qes_edge_home / "daemon.db"
    with sqlite3.connect(daemon) as c:
        c.execute("create table other (x)")
    assert log(b[:8]).exit_code == 2
    with sqlite3.connect(daemon) as c:
        c.execute("create table jobs (id integer primary key, ledger text, state text)")
        c.execute("insert into jobs (ledger, state) values (?, 'done'), (NULL, 'queued'), (?, 'failed')",
                  [str(elsewhere), str(tmp_path / "gone.qes")])
    res = log(b[:8], "--json")
    assert res.exit_code == 0, res.output
    assert head(res)["run_id"] == b and head(res)["ledger"] == str(elsewhere)
    daemon.write_bytes(b"not sqlite" * 50)
    assert log(a[:4]).exit_code == 0
    # ambiguity and bad ids
    shutil.copy(runs / "a.qes", runs / "copy.qes")
    res = log(a)
    assert res.exit_code == 2 and f"run {a} is in 2 ledgers" in res.output and "give the ledger's path" in res.output
    (runs / "copy.qes").unlink()
    c_ids = make_ledger(runs / "c.qes", runs=3)
    common = c_ids[0][:1]
    res = log(common + "zzz")
    assert res.exit_code == 2 and "no such ledger file, and not a run id" in res.output
    res = log("abc")
    assert res.exit_code == 2 and "not a run id (4 to 32 hex digits)" in res.output
    res = log(str(tmp_path / "missing.qes"))
    assert res.exit_code == 2 and "no such ledger file" in res.output
    res = log(tmp_path)
    assert res.exit_code == 2 and "is a directory" in res.output
    res = log(a[:4], "--run-id", c_ids[0])
    assert res.exit_code == 2 and "--run-id picks a run in a ledger file" in res.output


def test_an_ambiguous_prefix_lists_the_runs(qes_edge_home, monkeypatch):
    import uuid
    (qes_edge_home / "runs").mkdir()
    ids = iter(["abcd" + "1" * 28, "abcd" + "2" * 28])
    monkeypatch.setattr(uuid, "uuid4", lambda: type("U", (), {"hex": next(ids)})())
    make_ledger(qes_edge_home / "runs" / "x.qes", runs=2)
    res = log("abcd")
    assert res.exit_code == 2 and "abcd matches 2 runs: abcd11111111 (x.qes), abcd22222222 (x.qes)" in res.output
    assert log("abcd2").exit_code == 0


@pytest.mark.parametrize("damage, what", [
    ("""update steps set timings = replace(timings, '"eval_s":6.5', '"eval_s":1') where step = 2""",
     "step 2 was edited"),
    ("delete from steps where step = 5", "the last 1 step(s) were lost"),
    ("update members set reward = 0.5 where step = 4 and member = 0", "step 4: its rows in the members table"),
])
def test_a_bad_ledger_is_one_error_line(tmp_path, damage, what):
    make_ledger(tmp_path / "b.qes")
    with sqlite3.connect(tmp_path / "b.qes") as c:
        assert c.execute(damage).rowcount == 1
    before = (tmp_path / "b.qes").read_bytes()
    for args in ([], ["--json"]):
        res = log(tmp_path / "b.qes", *args)
        assert res.exit_code == 2 and res.stdout == ""
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and what in res.stderr, res.stderr
    assert (tmp_path / "b.qes").read_bytes() == before


def test_a_truncated_or_foreign_file_is_one_error_line(tmp_path):
    make_ledger(tmp_path / "t.qes", n_steps=40)
    data = (tmp_path / "t.qes").read_bytes()
    for name, content in (("half.qes", data[: len(data) // 2]), ("head.qes", data[:1000]), ("zero.qes", b""),
                          ("text.qes", b"hello\n" * 100)):
        (tmp_path / name).write_bytes(content)
        res = log(tmp_path / name)
        assert res.exit_code == 2 and res.stdout == "", (name, res.output)
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), (name, res.stderr)
        assert (tmp_path / name).read_bytes() == content
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(name)) == [name]  # no -wal/-shm


def test_a_ledger_older_than_the_members_table_reads_the_same(tmp_path):
    import sqlite_utils
    (run_id,) = make_ledger(tmp_path / "new.qes")
    old = sqlite_utils.Database(tmp_path / "old.qes")
    old["_migrations"].create({"name": str, "applied": float}, pk="name")
    for name, fn in MIGRATIONS[:3]:
        fn(old)
        old["_migrations"].insert({"name": name, "applied": 1.0})
    old["meta"].insert({"key": "format", "value": "qes-edge-ledger"})
    with sqlite3.connect(tmp_path / "new.qes") as c:
        for t in ("runs", "steps", "heads", "evals"):
            rows = c.execute(f"select * from {t}").fetchall()
            old.conn.executemany(f"insert into {t} values ({','.join('?' * len(rows[0]))})", rows)
    old.conn.commit()
    old.conn.close()
    before = (tmp_path / "old.qes").read_bytes()
    new, res = log(tmp_path / "new.qes", "--json"), log(tmp_path / "old.qes", "--json")
    assert res.exit_code == 0, res.output
    strip = lambda out: [{k: v for k, v in strict_json(ln).items() if k != "ledger"} for ln in out.splitlines()]  # noqa
    assert strip(res.stdout) == strip(new.stdout)
    assert (tmp_path / "old.qes").read_bytes() == before


def test_choose_step_for_replay_and_export():
    """--step: every step by default, N steps, or the held-out evaluation with the best score (by
    balanced accuracy where the task records it, else accuracy, else reward; NaN and other splits
    never chosen; the earliest of ties)."""
    from qes_edge.ledger.runlog import choose_step
    evals = [{"step": 0, "split": "heldout", "accuracy": 0.4, "balanced_accuracy": 0.5},
             {"step": 0, "split": "memory", "accuracy": 9.0},
             {"step": 10, "split": "heldout", "accuracy": 0.9, "balanced_accuracy": 0.7},
             {"step": 20, "split": "heldout", "accuracy": 0.6, "balanced_accuracy": 0.8},
             {"step": 30, "split": "test", "balanced_accuracy": 0.99},
             {"step": 40, "split": "heldout", "accuracy": 0.5, "balanced_accuracy": 0.8}]
    assert choose_step(None, 40, evals) == (40, "all 40 steps")
    assert choose_step("12", 40, evals)[0] == 12 and choose_step(0, 40, [])[0] == 0
    assert choose_step("best", 40, evals) == (20, "step 20 of 40, the best held-out balanced_accuracy (0.800)")
    assert choose_step(" BEST ", 15, evals)[0] == 10  # an evaluation after the steps replayed is not a choice
    no_balanced = [{k: v for k, v in e.items() if k != "balanced_accuracy"} for e in evals]
    assert choose_step("best", 40, no_balanced)[0] == 10
    nan = [{"step": 0, "split": "heldout", "reward": 0.2}, {"step": 5, "split": "heldout", "reward": float("nan")},
           {"step": 8, "split": "heldout", "reward": 0.3}]
    assert choose_step("best", 8, nan)[0] == 8
    for spec, says in (("41", "the run has 40 steps"), ("-1", "the run has 40 steps"), ("1.5", "or 'best'"),
                       ("", "or 'best'")):
        with pytest.raises(ValueError, match=says):
            choose_step(spec, 40, evals)
    with pytest.raises(ValueError, match="needs held-out evaluations"):
        choose_step("best", 40, [{"step": 0, "split": "memory", "peak_rss_mb": 100.0}])
