"""`qes-edge report RUN --out F.html`: one self-contained HTML file (figure inlined, inline CSS,
every text escaped) and the figure as a PNG beside it, written atomically; the summary numbers;
refusals as one line."""

import base64
import json
import re
import struct
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from qes_edge.cli.main import app
from qes_edge.ledger.store import Ledger, StepRecord

pytest.importorskip("matplotlib")
runner = CliRunner()
SHA = "ef" * 32
PHASES = ("perturb_s", "eval_s", "restore_s", "update_s", "digest_s")


def make_ledger(path, n_steps=8, memory=True, rss=True, config=None):
    lg = Ledger(path)
    run = lg.create_run(SHA, "tiny<b>.gguf", config or {"task": "choice", "data": "/d/<script>x</script>.jsonl",
                                                         "population": 4, "frozen": ["a", "b"]}, 1)
    rng = np.random.default_rng(5)
    lg.record_eval(run.run_id, 0, "heldout", {"accuracy": 0.2, "reward": 0.25})
    if memory:
        lg.record_eval(run.run_id, 0, "memory", {"inference_rss_mb": 200.0, "loaded_rss_mb": 180.0})
    for i in range(n_steps):
        base = rng.integers(1, 2**31 - 1, 2)
        rewards = np.array([0.3, 0.4, 0.35, 0.45]) + 0.01 * i
        if i == 1:
            rewards[2] = np.nan
        t = {"perturb_s": 0.5, "eval_s": 10.0 + i, "restore_s": 0.25, "update_s": 1.0 + (i == 3), "digest_s": 0.5,
             "changed": 100 * i}
        if rss:
            t["rss_mb"] = 210.0 + i
        lg.append_step(run.run_id, StepRecord(i, 34268880, np.stack([base, -base], 1).reshape(-1),
                                              np.array([-5000 - i, 5000, 7, -7], np.int32), rewards,
                                              f"{i + 1:064x}", t, failures=int(i == 1)))
        if (i + 1) % 4 == 0:
            lg.record_eval(run.run_id, i + 1, "heldout", {"accuracy": 0.2 + 0.05 * (i + 1), "reward": 0.3})
    head = lg.head_hash(run.run_id)
    lg.close()
    return run.run_id, head


def report(*args):
    return runner.invoke(app, ["report", *map(str, args)])


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_is_one_self_contained_file_and_a_png(tmp_path):
    run_id, head = make_ledger(tmp_path / "r.qes")
    before = (tmp_path / "r.qes").read_bytes()
    res = report(tmp_path / "r.qes", "--out", tmp_path / "out" / "x.html")
    assert res.exit_code == 2 and "does not exist" in res.output  # the folder is checked first
    res = report(tmp_path / "r.qes", "--out", tmp_path / "rep.html")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.qes", "rep.html", "rep.png"]  # no temporary left
    assert (tmp_path / "r.qes").read_bytes() == before
    text = (tmp_path / "rep.html").read_text()
    png = (tmp_path / "rep.png").read_bytes()
    w, h = png_size(png)
    assert w >= 800 and h >= 800
    # self-contained: the PNG inlined, no URL to fetch, no script
    (inline,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert base64.b64decode(inline) == png
    assert not re.search(r"(?i)(https?:|//[a-z]|<link|<script|@import|url\()", text.replace(inline, ""))
    # escaped: the model name and the config's text
    assert "tiny&lt;b&gt;.gguf" in text and "<b>" not in text
    assert "/d/&lt;script&gt;x&lt;/script&gt;.jsonl" in text
    # header: run id, base sha prefix, steps, head hash, config
    assert run_id in text and SHA[:16] in text and head in text and "<td>population</td><td>4</td>" in text
    assert '<td>frozen</td><td>[&quot;a&quot;, &quot;b&quot;]</td>' in text
    # summary numbers
    summary = dict(re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td></tr>", text.split("<h2>Summary</h2>")[1]
                              .split("<h2>")[0]))
    assert summary["first training reward"] == "0.375" and summary["last training reward"] == "0.445"
    assert summary["best training reward"] == "0.445 (step 7)"
    assert summary["first held-out (at the start)"] == "accuracy 0.200, reward 0.250"
    assert summary["last held-out (after 8 steps)"] == "accuracy 0.600, reward 0.300"
    assert summary["best held-out"] == "accuracy 0.600 (after 8 steps)"  # the last: nothing to say
    steps = [sum([0.5, 10.0 + i, 0.25, 1.0 + (i == 3), 0.5]) for i in range(8)]
    assert summary["median step time"] == f"{np.median(steps):.2f} s"
    overhead = (8 * 0.5 + 8 * 0.25 + 9.0) / sum(10.0 + i for i in range(8))
    assert summary["QES overhead (perturb + restore + update) / eval"] == f"{overhead:.1%}"
    assert summary["peak RSS / inference RSS"] == "1.085× (217.0 MB peak / 200.0 MB inference)"
    # the per-step table: a row per step, the evaluations between them
    table = text.split("<h2>Steps</h2>")[1]
    assert len(re.findall(r"<tr><td class=n>\d+</td>", table)) == 8
    assert table.index("held-out after 4 steps") < table.index("<tr><td class=n>4</td>")
    assert "memory at the start: inference_rss_mb 200.0, loaded_rss_mb 180.0" in table
    # a second report over the first: replaced whole
    res = report(tmp_path / "r.qes", "--out", tmp_path / "rep.html", "--png", tmp_path / "fig.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "fig.png").read_bytes()[:8] == png[:8] and "wrote" in res.stdout


def test_memory_not_recorded_and_numbers_absent(tmp_path):
    make_ledger(tmp_path / "r.qes", memory=False, rss=False)
    res = report(tmp_path / "r.qes", "--out", tmp_path / "a.html")
    assert res.exit_code == 0, res.output
    text = (tmp_path / "a.html").read_text()
    assert "<td>peak RSS / inference RSS</td><td>not recorded</td>" in text


def test_summary_numbers_from_a_record():
    from qes_edge.agent.report import summary
    from qes_edge.ledger.runlog import RunRecord
    from qes_edge.ledger.store import Run
    run = Run("0" * 32, SHA, "m.gguf", {"task": "t"}, 1, "1" * 64)
    rows = [{"event": "step", "step": i, "reward": r, "min_reward": r, "max_reward": r, "failures": 0,
             "timings": {"perturb_s": 1.0, "eval_s": 4.0, "restore_s": 1.0, "update_s": 2.0, "digest_s": 0.5,
                         **({"rss_mb": 300.0 + i} if i != 1 else {})}}
            for i, r in enumerate([0.1, None, 0.5, 0.3])]
    evals = [{"event": "eval", "step": 0, "split": "memory", "inference_rss_mb": 250.0},
             {"event": "eval", "step": 4, "split": "heldout", "accuracy": 0.5}]
    s = summary(RunRecord(None, run, 4, "1" * 64, rows, evals))
    assert (s["first_reward"], s["last_reward"], s["best_reward"], s["best_step"]) == (0.1, 0.3, 0.5, 2)
    assert s["qes_overhead"] == 1.0 and s["median_step_s"] == 8.5
    assert s["peak_rss_mb"] == 303.0 and s["peak_vs_inference"] == 303.0 / 250.0
    assert s["first_heldout"] == s["last_heldout"] == {"accuracy": 0.5} and s["last_heldout_step"] == 4
    assert s["best_heldout"] == (4, "accuracy", 0.5)
    evals[1:1] = [{"event": "eval", "step": 2, "split": "heldout", "accuracy": 0.75}]
    s = summary(RunRecord(None, run, 4, "1" * 64, rows, evals))
    assert s["best_heldout"] == (2, "accuracy", 0.75) and s["last_heldout"] == {"accuracy": 0.5}


def test_a_run_that_scored_best_midway_says_how_to_export_that_point(tmp_path):
    from qes_edge.ledger.store import Ledger
    run_id, _ = make_ledger(tmp_path / "r.qes")
    lg = Ledger(tmp_path / "r.qes")
    lg.record_eval(run_id, 2, "heldout", {"accuracy": 0.9, "reward": 0.3})
    lg.close()
    res = report(tmp_path / "r.qes", "--out", tmp_path / "rep.html")
    assert res.exit_code == 0, res.output
    assert ("<tr><td>best held-out</td><td>accuracy 0.900 (after 2 steps); the run scored less since: "
            "qes-edge export --step best exports this point</td></tr>") in (tmp_path / "rep.html").read_text()


def test_a_long_run_and_odd_records_still_draw(tmp_path):
    """Hundreds of steps (the time panel becomes areas), a metric outside [0, 1] (a second axis),
    steps without timings: the figure is drawn, not refused."""
    from qes_edge.ledger.store import Run
    from qes_edge.agent.report import figure_png
    from qes_edge.ledger.runlog import RunRecord
    run = Run("0" * 32, SHA, "m.gguf", {"task": "t"}, 1, "1" * 64)
    rng = np.random.default_rng(0)
    rows = [{"event": "step", "step": i, "reward": float(r), "min_reward": float(r) - 0.1, "max_reward": float(r) + 0.1,
             "failures": 0, "timings": {} if i % 7 == 0 else {k: float(rng.random()) for k in PHASES}}
            for i, r in enumerate(rng.random(400))]
    evals = [{"event": "eval", "step": i, "split": "heldout", "loss": 3.0 - i / 200, "accuracy": i / 400}
             for i in range(0, 401, 50)]
    w, h = png_size(figure_png(RunRecord(None, run, 400, "1" * 64, rows, evals)))
    assert w > 0 and h > 0
    png_size(figure_png(RunRecord(None, run, 0, "1" * 64, [], [])))  # a run with no step yet


def test_refusals_are_one_line(tmp_path, monkeypatch):
    make_ledger(tmp_path / "r.qes", n_steps=2)
    before = (tmp_path / "r.qes").read_bytes()
    for args in (["--out", tmp_path / "r.qes"], ["--out", tmp_path / "a.html", "--png", tmp_path / "r.qes"],
                 ["--out", tmp_path / "same.x", "--png", tmp_path / "same.x"], ["--out", tmp_path]):
        res = report(tmp_path / "r.qes", *args)
        assert res.exit_code == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.output
    assert "is the ledger; refusing to overwrite an input" in report(tmp_path / "r.qes", "--out",
                                                                      tmp_path / "r.qes").stderr
    assert (tmp_path / "r.qes").read_bytes() == before
    res = report(tmp_path / "nope.qes", "--out", tmp_path / "a.html")
    assert res.exit_code == 2 and "no such ledger file" in res.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    res = report(tmp_path / "r.qes", "--out", tmp_path / "a.html")
    assert res.exit_code == 2
    assert res.stderr == "error: the report needs matplotlib: pip install 'qes-edge[report]'\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.qes"]


@pytest.mark.slow
def test_log_and_report_of_a_real_run(tmp_path, qes_edge_home):
    """A tiny real run through the CLI (as in test_runs), then log --json and report from its id."""
    import subprocess
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2})
                              for i in range(6)) + "\n")
    env = {**__import__("os").environ, "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, "-m", "qes_edge", "train", "--task", "choice", "--data", str(data),
                        "--steps", "2", "--population", "2", "--batch", "2", "--n-ctx", "128", "--eval-every", "1",
                        "--json"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    done = json.loads(r.stdout.splitlines()[-1])
    res = runner.invoke(app, ["log", done["run_id"][:6], "--json"])
    assert res.exit_code == 0, res.output
    events = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert events[0]["head"] == done["head"] and events[0]["ledger"] == done["ledger"]
    held = [(e["event"], e["step"]) for e in events[1:] if e.get("split", "heldout") == "heldout"]
    assert held == [("eval", 0), ("step", 0), ("eval", 1), ("step", 1), ("eval", 2)]
    assert all(e["timings"]["eval_s"] > 0 for e in events if e["event"] == "step")
    res = runner.invoke(app, ["report", done["run_id"], "--out", str(tmp_path / "real.html")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "real.html").read_text()
    assert done["head"] in text and "held-out after 1 step:" in text
    png_size((tmp_path / "real.png").read_bytes())
