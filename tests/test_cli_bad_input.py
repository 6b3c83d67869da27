"""Every command, given bad input, ends with exit code 2 and one line on stderr, before any
work, with no traceback and without creating, changing or leaving any file.

The commands run as a user runs them (`python -m qes_edge`, a fresh process each time), in a
scratch folder that holds the inputs; the test compares every file of that folder before and
after.  The inputs that need the real model only hash it; none loads llama.cpp."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import fill_disk

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(args, cwd):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "qes_edge", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)


def _ledger(path: Path, base_sha: str, n_steps: int, base_name="SmolLM2-135M-Instruct.Q4_1.gguf"):
    from qes_edge.ledger.store import Ledger, StepRecord
    from qes_edge.training.config import TrainConfig
    lg = Ledger(path)
    run = lg.create_run(base_sha, base_name, TrainConfig(population=2).record(), 1)
    rng = np.random.default_rng(0)
    for i in range(n_steps):
        lg.append_step(run.run_id, StepRecord(i, 34268880, np.array([5, -5]), np.array([3, -3], np.int32),
                                              rng.random(2), f"{i:064x}"))
    lg.close()
    return path


def stale_wal(path: Path, base_sha: str) -> Path:
    """A 4-step ledger with, beside it, the -wal of an earlier state of the same run (after its
    step 1): what copying a ledger and a -wal taken at different moments leaves.  SQLite would
    apply that -wal as the file is opened for writing, taking steps 2 and 3 away."""
    from qes_edge.ledger.store import Ledger, StepRecord
    from qes_edge.training.config import TrainConfig
    lg = Ledger(path)
    lg.checkpoint = lambda: None  # keep every write in the -wal
    lg.db.execute("PRAGMA wal_autocheckpoint=0")
    run = lg.create_run(base_sha, "SmolLM2-135M-Instruct.Q4_1.gguf", TrainConfig(population=2).record(), 1)
    rng = np.random.default_rng(0)
    wal = Path(str(path) + "-wal")
    for i in range(4):
        lg.append_step(run.run_id, StepRecord(i, 34268880, np.array([5, -5]), np.array([3, -3], np.int32),
                                              rng.random(2), f"{i:064x}"))
        if i == 1:
            old = wal.read_bytes()
    lg.close()  # the -wal is folded in and removed
    wal.write_bytes(old)
    return path


def patch_token_id(model: Path, out: Path, key: str, value: int) -> None:
    """A copy of model with the u32 value of metadata key set to value."""
    import shutil
    import struct
    shutil.copyfile(model, out)
    with open(model, "rb") as f:
        head = f.read(16 << 20)
    name = key.encode()
    at = head.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert struct.unpack_from("<I", head, at)[0] == 4  # a u32
    with open(out, "r+b") as f:
        f.seek(at + 4)
        f.write(struct.pack("<I", value))


def sql(path: Path, statement: str) -> None:
    """One statement, committed, and the connection closed (so SQLite folds its -wal back in)."""
    c = sqlite3.connect(path)
    try:
        with c:
            c.execute(statement)
    finally:
        c.close()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, default_model):
    """A folder of bad (and a few good) inputs, made once."""
    from qes_edge.gguf.model import file_sha256
    d = tmp_path_factory.mktemp("bad")
    sha = file_sha256(default_model)
    (d / "adir").mkdir()
    (d / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    (d / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (d / "latin1.jsonl").write_bytes("\n".join(json.dumps({"prompt": "x"}, ensure_ascii=False) + " \xe9"
                                              for _ in range(5)).encode("latin-1"))
    (d / "badregex.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "pattern": "([a-z"}) for i in range(5)))
    (d / "few.jsonl").write_text(json.dumps({"prompt": "only one"}) + "\n")
    (d / "noprompt.jsonl").write_text("\n".join([json.dumps({"foo": 1})] + [json.dumps({"prompt": "p"})] * 4))
    (d / "emptyfile.jsonl").write_text("")
    (d / "dupchoices.jsonl").write_text("\n".join([json.dumps({"prompt": "q", "choices": ["A", "A"], "answer": 0})] * 5))
    (d / "empty.qes").write_bytes(b"")
    (d / "junk.qes").write_bytes(b"this is not sqlite" * 100)
    sql(d / "foreign.db", "create table t (x)")
    _ledger(d / "good.qes", sha, 2)
    tail = _ledger(d / "tail.qes", sha, 3)
    sql(tail, "delete from steps where step = 2")
    null = _ledger(d / "null.qes", sha, 2)
    sql(null, "update steps set seeds = NULL where step = 1")
    _ledger(d / "other-base.qes", "00" * 32, 1, base_name="other.gguf")
    for key, value in (("bos", 2**32 - 1), ("eos", 2**31 - 1)):  # these aborted `train` (SIGABRT)
        patch_token_id(default_model, d / f"bad{key}.gguf", f"tokenizer.ggml.{key}_token_id", value)
    nosteps = _ledger(d / "nosteps.qes", sha, 2)
    sql(nosteps, "drop table members")
    sql(nosteps, "drop table steps")
    # one line of 3 MB: longer than any prompt of a 512-token context of this model can be
    (d / "bigline.jsonl").write_text("\n".join([json.dumps({"prompt": "word " * 600_000})] +
                                               [json.dumps({"prompt": f"p{i}"}) for i in range(4)]))
    assert not list(d.glob("*-wal")) and not list(d.glob("*-shm"))  # every connection was closed
    stale_wal(d / "stale.qes", sha)  # the one -wal: left there on purpose
    return d


M = ["--model"]
CASES = [
    # train: options, checked before any work
    ("train --beta nan", "beta must be in [0, 1]"),
    ("train --beta 2", "beta must be in [0, 1], got 2.0"),
    ("train --threads -1", "'--threads': -1 is not in the range x>=0"),
    ("train --n-ctx 0", "n_ctx must be in [64"),
    ("train --n-ctx 1", "n_ctx must be in [64"),
    ("train --population 3", "population must be an even number"),
    ("train --population 16 --alpha 20", "above the engine's bound of 2^30"),
    ("train --sigma 0.7", "sigma 0.7 is not usable"),
    ("train --sigma nan", "sigma nan is not usable"),
    ("train --alpha -1", "alpha must be finite and > 0"),
    ("train --steps 0", "'--steps': 0 is not in the range x>=1"),
    ("train --window -2", "'--window': -2 is not in the range x>=0"),
    ("train --residual disk", "residual must be 'replay' or 'stored'"),
    ("train --choice-norm max", "choice_norm must be 'mean' or 'sum'"),
    ("eval --choice-norm max", "choice_norm must be 'mean' or 'sum'"),
    ("train --coef-scheme ranks", "coefficient scheme must be one of pairs, pairs-rank, zscore, rank"),
    ("queue add --coef-scheme ranks", "coefficient scheme must be one of pairs, pairs-rank, zscore, rank"),
    ("train --bogus", "No such option: --bogus"),
    ("train --population many", "'--population': 'many' is not a valid int"),
    # train: files
    ("train --task jsonl --data missing.jsonl", "data file not found"),
    ("train --task jsonl --data adir", "adir: a data folder needs train.jsonl"),
    ("train --task jsonl --data binary.jsonl", "binary.jsonl: is a binary file"),
    ("train --task jsonl --data latin1.jsonl", "latin1.jsonl: is not UTF-8 text"),
    ("train --task jsonl --data badregex.jsonl", "badregex.jsonl:1: 'pattern' is not a valid regular expression"),
    ("train --task jsonl --data few.jsonl", "few.jsonl: needs at least 4 examples"),
    ("train --task jsonl", "--task jsonl needs --data"),
    ("train --task jsonl --data noprompt.jsonl", "noprompt.jsonl:1: each line needs a string 'prompt' or a list of 'messages'"),
    ("train --task jsonl --data emptyfile.jsonl", "emptyfile.jsonl: is empty"),
    ("train --task choice --data dupchoices.jsonl", "dupchoices.jsonl:1: 'choices' lists 'A' more than once"),
    ("train --task nosuch", "unknown task 'nosuch'"),
    ("train --task nomodule:fn --data few.jsonl", "cannot load reward 'nomodule:fn'"),
    ("train --model missing.gguf", "model file not found: missing.gguf"),
    ("train --model junk.gguf", "not a GGUF file"),
    ("train --model adir", "adir: is a directory, not a GGUF file"),
    ("train --model nothere:7b", "ollama model nothere:7b is not in the local store"),
    ("train --model hf:org/repo:f.gguf", "is not in the Hugging Face cache"),
    ("train --ledger adir", "adir: is a directory, not a ledger file"),
    ("train --model /dev/zero", "/dev/zero: is not a regular file"),
    ("train --model badbos.gguf", "tokenizer.ggml.bos_token_id = 4294967295, but the vocabulary holds tokens 0..49151"),
    ("train --model badeos.gguf", "tokenizer.ggml.eos_token_id = 2147483647, but the vocabulary holds tokens 0..49151"),
    ("info --model badbos.gguf", "tokenizer.ggml.bos_token_id = 4294967295, but the vocabulary"),
    ("eval --model badeos.gguf", "tokenizer.ggml.eos_token_id = 2147483647, but the vocabulary"),
    ("train --task jsonl --data bigline.jsonl", "bigline.jsonl:1: the line is longer than"),
    ("eval --task jsonl --data bigline.jsonl", "bigline.jsonl:1: the line is longer than"),
    # a ledger with a -wal of another state beside it: refused before anything applies the -wal
    ("train --ledger stale.qes", "the -wal file beside it does not continue the ledger: the file alone holds 4 "
                                 "verified steps of run"),
    ("verify --ledger stale.qes", "read with the -wal it holds 2. If the -wal was copied from another state"),
    ("replay --ledger stale.qes --out r.gguf", "the -wal file beside it does not continue the ledger"),
    ("sync --ledger stale.qes --peer socket://127.0.0.1:1", "the -wal file beside it does not continue"),
    ("train --ledger nosteps.qes", "the ledger's steps table is missing (the file was damaged)"),
    ("verify --ledger nosteps.qes", "the ledger's steps table is missing"),
    ("train --ledger empty.qes", "empty.qes: is an empty file, not a ledger"),
    ("train --ledger junk.qes", "junk.qes: not a usable ledger"),
    ("train --ledger foreign.db", "foreign.db: an SQLite file, but not a qes-edge ledger"),
    ("train --ledger tail.qes", "the last 1 step(s) were lost"),
    ("train --ledger null.qes", "step 1 cannot be decoded: seeds is NULL"),
    ("train --ledger other-base.qes --steps 5", "refusing to mix them"),
    # eval
    ("eval --task jsonl --data missing.jsonl", "data file not found"),
    ("eval --task jsonl --data adir", "adir: a data folder needs train.jsonl"),
    ("eval --task choice --data binary.jsonl", "binary.jsonl: is a binary file"),
    ("eval --n-ctx 1", "n_ctx must be in [64"),
    ("eval --model junk.gguf", "not a GGUF file"),
    ("eval --threads -3", "'--threads': -3 is not in the range x>=0"),
    # replay
    ("replay --ledger missing.qes --out o.gguf", "ledger not found: missing.qes"),
    ("replay --ledger adir --out o.gguf", "adir: is a directory, not a ledger file"),
    ("replay --ledger good.qes --out nofolder/o.gguf", "the folder nofolder does not exist"),
    ("replay --ledger good.qes --out adir", "adir: is a directory"),
    ("replay --ledger good.qes --out good.qes", "is the ledger; refusing to overwrite an input"),
    ("replay --ledger good.qes --base junk.gguf --out junk.gguf", "is the base model; refusing to overwrite"),
    ("replay --ledger empty.qes --out o.gguf", "empty.qes: not a qes-edge ledger"),
    ("replay --ledger junk.qes --out o.gguf", "not a usable ledger"),
    ("replay --ledger foreign.db --out o.gguf", "not a qes-edge ledger"),
    ("replay --ledger tail.qes --out o.gguf", "ends at step 1 but its head records 3 steps"),
    ("replay --ledger null.qes --out o.gguf", "step 1 cannot be decoded: seeds is NULL"),
    ("replay --ledger other-base.qes --out o.gguf", "the run's base model is other.gguf: pass it with --base"),
    ("replay --ledger good.qes --base junk.gguf --out o.gguf", "not this run's base model"),
    # verify and dump
    ("branch --ledger missing.qes", "ledger not found"),
    ("branch --ledger adir", "adir: is a directory, not a ledger file"),
    ("branch --ledger foreign.db", "not a qes-edge ledger"),
    ("branch --ledger empty.qes", "not a qes-edge ledger"),
    ("branch --ledger junk.qes", "not a usable ledger"),
    ("branch --ledger tail.qes", "the last 1 step(s) were lost"),
    ("branch --ledger good.qes --steps 3", "cannot branch after 3 steps (it has 2)"),
    ("branch --ledger good.qes --steps -1", "'--steps': -1 is not in the range x>=0"),
    ("branch --ledger good.qes --run-id abc", "--run-id 'abc' is not a run id"),
    ("branch --ledger good.qes --run-id " + "0" * 32, "no run '" + "0" * 32 + "'"),
    ("verify --ledger missing.qes", "ledger not found"),
    ("verify --ledger tail.qes", "the last 1 step(s) were lost"),
    ("verify --ledger foreign.db", "not a qes-edge ledger"),
    ("verify --ledger empty.qes", "not a qes-edge ledger"),
    ("dump --ledger good.qes --out nofolder/x.jsonl", "the folder nofolder does not exist"),
    ("dump --ledger good.qes --out good.qes", "is the ledger; refusing to overwrite an input"),
    ("dump --ledger tail.qes --out x.jsonl", "were lost"),
    ("dump --ledger good.qes --out adir", "adir: is a directory"),
    # export
    ("export --ledger missing.qes", "ledger not found"),
    ("export --ledger good.qes --out nofolder/x.gguf", "the folder nofolder does not exist"),
    ("export --ledger good.qes --out good.qes", "is the ledger; refusing to overwrite an input"),
    ("export --ledger tail.qes --out x.gguf", "were lost"),
    ("export --ledger other-base.qes --out x.gguf", "pass it with --base"),
    # runs
    ("runs --dir junk.gguf", "junk.gguf: is not a folder"),
    ("train --resume --new-run", "give one of them"),
    ("train --ledger good.qes --population 4", "recorded with other options: population 4 (the run has 2)"),
    # log and report
    ("log missing.qes", "missing.qes: no such ledger file, and not a run id"),
    ("log abcd", "no run abcd in the ledgers in"),
    ("log tail.qes", "were lost"),
    ("log foreign.db", "not a qes-edge ledger"),
    ("report good.qes --out good.qes", "is the ledger; refusing to overwrite an input"),
    ("report good.qes --out nofolder/r.html", "the folder nofolder does not exist"),
    ("report tail.qes --out r.html", "were lost"),
    # the overnight agent
    ("queue add --population 3", "population must be an even number"),
    ("queue add --model junk.gguf", "not a GGUF file"),
    ("queue add --task jsonl --data missing.jsonl", "data file not found"),
    ("queue add --ledger good.qes --population 4", "recorded with other options: population 4 (the run has 2)"),
    ("queue add --json", "--json is for the foreground train"),
    ("queue remove 9", "no job 9 in the queue"),
    ("daemon run --max-wall 8x", "cannot read the duration '8x'"),
    ("daemon start --stop-at 7am", "cannot read the clock time '7am'"),
    ("daemon run --ionice fast", "ionice"),
    ("status --bogus", "No such option: --bogus"),
    # sync: checked before the link is opened; a peer that cannot be reached is one line too
    ("sync --ledger good.qes", "sync needs --peer"),
    ("sync --peer socket://127.0.0.1:9", "--ledger is needed"),
    ("sync --ledger adir --peer socket://127.0.0.1:9", "adir: is a directory, not a ledger file"),
    ("sync --ledger nofolder/x.qes --peer loop://", "the folder nofolder does not exist"),
    ("sync --ledger tail.qes --peer loop://", "the last 1 step(s) were lost"),
    ("sync --ledger foreign.db --peer loop://", "not a qes-edge ledger"),
    ("sync --ledger good.qes --peer nosuch://x", "protocol 'nosuch' not known"),
    ("sync --ledger good.qes --peer socket://127.0.0.1:1", "Connection refused"),
    ("sync --ledger good.qes --peer /dev/ttyNOPE", "could not open port /dev/ttyNOPE"),
    ("sync --ledger new.qes --peer loop://", "the link echoes this side's own frames back"),
    ("sync --ledger good.qes --peer loop:// --run-id xyz", "--run-id 'xyz' is not a run id"),
    ("sync --ledger good.qes --peer loop:// --baud 0", "'--baud': 0 is not in the range x>=1"),
    ("sync serve --ledger adir --on socket://127.0.0.1:0", "adir: is a directory, not a ledger file"),
    ("sync serve --ledger good.qes --on socket://127.0.0.1", "no port"),
    ("sync serve --ledger good.qes --on /dev/ttyNOPE", "could not open port /dev/ttyNOPE"),
    ("sync serve --ledger null.qes --on socket://127.0.0.1:0", "step 1 cannot be decoded: seeds is NULL"),
    ("sync serve --ledger good.qes", "Missing option '--on'"),
    # follow: checked before the link is opened; nothing is written until a run arrives
    ("follow --out f.gguf", "follow needs --peer"),
    ("follow --peer socket://127.0.0.1:9", "follow needs --out"),
    ("follow --peer loop:// --out adir", "adir: is a directory"),
    ("follow --peer loop:// --out nofolder/f.gguf", "the folder nofolder does not exist"),
    ("follow --peer loop:// --out f.gguf --ledger tail.qes", "the last 1 step(s) were lost"),
    ("follow --peer loop:// --out f.gguf --ledger foreign.db", "not a qes-edge ledger"),
    ("follow --peer loop:// --out f.gguf --ledger f.gguf", "is the ledger"),
    ("follow --peer loop:// --out good.qes", "give a .gguf file name"),
    ("follow --peer socket://127.0.0.1:1 --out f.gguf --once", "Connection refused"),
    ("follow --peer nosuch://x --out f.gguf --once", "protocol 'nosuch' not known"),
    ("follow --peer loop:// --out f.gguf", "the link echoes this side's own frames back"),
    ("follow --peer loop:// --out f.gguf --run-id xyz", "--run-id 'xyz' is not a run id"),
    ("follow --peer loop:// --out f.gguf --interval 0", "'--interval': 0.0 is not in the range x>=0.05"),
    ("daemon run --serve socket://127.0.0.1", "no port"),
    # the shared population: a worker checks its inputs before it listens; train --peers reaches
    # every peer before anything is written
    ("worker --ledger w.qes", "Missing option '--on'"),
    ("worker --on socket://127.0.0.1 --ledger w.qes", "no port"),
    ("worker --on socket://127.0.0.1:0 --ledger adir", "adir: is a directory, not a ledger file"),
    ("worker --on socket://127.0.0.1:0 --ledger nofolder/w.qes", "the folder nofolder does not exist"),
    ("worker --on socket://127.0.0.1:0 --ledger foreign.db", "not a qes-edge ledger"),
    ("worker --on socket://127.0.0.1:0 --ledger tail.qes", "the last 1 step(s) were lost"),
    ("worker --on /dev/ttyNOPE --ledger w.qes", "could not open port /dev/ttyNOPE"),
    ("worker --on socket://127.0.0.1:0 --ledger w.qes --model missing.gguf", "model file not found"),
    ("worker --on socket://127.0.0.1:0 --ledger w.qes --threads -1", "'--threads': -1 is not in the range x>=0"),
    ("train --ledger t.qes --peers socket://127.0.0.1:1", "Connection refused"),
    ("train --ledger t.qes --peers nosuch://x", "protocol 'nosuch' not known"),
    ("train --ledger t.qes --peers socket://127.0.0.1:1,", "an empty URL"),
    ("train --ledger t.qes --peers socket://127.0.0.1:1 --ray 2", "--peers and --ray each take the members"),
    ("train --ledger t.qes --ray 0", "'--ray': 0 is not in the range x>=1"),
    ("queue add --peers socket://127.0.0.1:1,", "an empty URL"),
    ("queue add --peers socket://127.0.0.1", "no port"),
    ("queue add --peers socket://127.0.0.1:1 --ray 2", "--peers and --ray each take the members"),
    ("queue add --ray 0", "'--ray': 0 is not in the range x>=1"),
    # the others
    ("info --model missing.gguf", "model file not found"),
    ("info --model junk.gguf", "not a GGUF file"),
    ("demo --population 3", "population must be even"),
    ("demo --out nofolder/x.gguf", "the folder nofolder does not exist"),
    ("calibrate --sigmas 0.01,x", "--sigmas must be comma-separated numbers, got '0.01,x'"),
    ("calibrate --sigmas 0.7", "sigma 0.7 is not usable"),
    ("calibrate --pairs 1", "'--pairs': 1 is not in the range x>=2"),
    ("calibrate --task jsonl --data bigline.jsonl", "bigline.jsonl:1: the line is longer than"),
    ("noise --tensor t --n 64 --seed 0", "seed 0 is outside the supported range"),
    ("noise --tensor t --n 33 --seed 1", "n must be a multiple of 32"),
    ("noise --tensor t --n 64 --seed 1 --sigma nan", "sigma nan is not usable"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line(scratch, args, message):
    before = snapshot(scratch)
    r = run_cli(args.split(), scratch)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert snapshot(scratch) == before, "files were created, changed or left behind"


def test_the_table_covers_every_command():
    from typer.main import get_command

    from qes_edge.cli.main import app
    covered = {args.split()[0] for args, _ in CASES}
    assert covered >= set(get_command(app).commands)


def test_replay_onto_a_full_disk_leaves_no_temporary_file(scratch, small_disk, tmp_path):
    """The model (98 MB) cannot fit on a 4 MiB disk: one line, exit 2, nothing left there."""
    ledger = tmp_path / "zero.qes"
    from qes_edge.gguf.model import file_sha256
    from qes_edge.gguf.models import default_model_path
    from qes_edge.ledger.store import Ledger
    from qes_edge.training.config import TrainConfig
    lg = Ledger(ledger)
    lg.create_run(file_sha256(default_model_path()), "SmolLM2-135M-Instruct.Q4_1.gguf", TrainConfig().record(), 1)
    lg.close()
    before = ledger.read_bytes()
    r = run_cli(["replay", "--ledger", str(ledger), "--out", str(small_disk / "trained.gguf")], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().count("\n") == 0 and "No space left on device" in r.stderr, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert list(small_disk.iterdir()) == [] and ledger.read_bytes() == before


@pytest.mark.slow
def test_train_onto_a_full_disk_creates_no_ledger(small_disk, tmp_path):
    """A full disk where the ledger goes: refused when the run is created, nothing left."""
    fill_disk(small_disk)
    r = run_cli(["train", "--steps", "1", "--population", "2", "--batch", "1", "--n-ctx", "128",
                 "--ledger", str(small_disk / "run.qes")], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "run.qes" in line and ("full" in line or "No space" in line), line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.slow
def test_an_f16_model_is_refused_before_it_is_loaded(model_of_type, tmp_path):
    """A model with no integer codes (F16 throughout): one line naming the file and its types,
    not a traceback after hashing and loading it."""
    f16 = model_of_type("F16")
    r = run_cli(["train", "--model", str(f16), "--steps", "1"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and str(f16) in line and "no tensor qes-edge can train" in line and "F16" in line
    assert list(tmp_path.iterdir()) == []
    r = run_cli(["eval", "--model", str(f16)], tmp_path)
    assert r.returncode == 2 and "no tensor qes-edge can train" in r.stderr


def test_train_with_ray_where_ray_is_not_installed_names_the_extra(tmp_path):
    code = ("import sys, runpy; sys.modules['ray'] = None; "
            f"sys.argv = ['qes-edge', 'train', '--ray', '2', '--ledger', {str(tmp_path / 'r.qes')!r}]; "
            "runpy.run_module('qes_edge', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == \
        "error: --ray needs Ray, which is not installed: pip install 'qes-edge[ray]'", r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value, message", [
    ("metal", "error: QES_EDGE_BACKEND=metal: backend 'metal' is not compiled into this libqes"),
    ("gpu", "error: QES_EDGE_BACKEND=gpu: unknown backend 'gpu': choose auto, portable, avx2, neon, cuda, metal"),
])
def test_a_backend_this_machine_lacks_is_one_line(tmp_path, value, message):
    r = subprocess.run([sys.executable, "-m", "qes_edge", "info"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "QES_EDGE_BACKEND": value}, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr
