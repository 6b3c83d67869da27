"""export: the trained model as a named GGUF (every base key and tensor, the trained codes, a new
general.name and qes.* keys) that stock llama-cpp-python loads with the trained weights' logits,
and an ollama Modelfile beside it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qes_edge.gguf.export import chat_family, modelfile_text


def test_modelfile_by_chat_family():
    text = modelfile_text("m.gguf", "{% for m in messages %}<|im_start|>{{ m.role }}...{% endfor %}")
    lines = text.splitlines()
    assert "FROM ./m.gguf" in lines and any(x.startswith('TEMPLATE """') for x in lines)
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert chat_family("<|start_header_id|>x") == "llama3" and chat_family("<start_of_turn>") == "gemma"
    unknown = modelfile_text("m.gguf", "[INST] {{ x }} [/INST]")
    assert not any(x.startswith("TEMPLATE") for x in unknown.splitlines()) and "FROM ./m.gguf" in unknown
    none = modelfile_text("m.gguf", None)  # a base model: prompts as written, and the file says so
    assert 'TEMPLATE """{{ .Prompt }}"""' in none.splitlines() and "has no chat template" in none
    assert "not one qes-edge can translate" not in none


def cli(args, cwd):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "qes_edge", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.slow
def test_export_loads_in_stock_llama_cpp_with_the_trained_logits(tmp_path, default_model):
    import llama_cpp
    from gguf import GGUFReader

    from qes_edge.llama.driver import ModelDriver
    from qes_edge.gguf.model import GGUFModel
    from qes_edge.ledger.store import Ledger
    ledger = tmp_path / "r.qes"
    data = tmp_path / "q.jsonl"  # a tiny task: its held-out evaluations cost one question
    data.write_text("\n".join(json.dumps({"prompt": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2})
                              for i in range(6)) + "\n")
    r = cli(["train", "--task", "choice", "--data", str(data), "--steps", "2", "--population", "4", "--batch", "4",
             "--n-ctx", "128", "--alpha", "0.003", "--ledger", str(ledger)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lg = Ledger(ledger, readonly=True)
    run = lg.run()
    last = lg.last_step(run.run_id)
    lg.close()
    out = tmp_path / "exported.gguf"
    r = cli(["export", "--ledger", str(ledger), "--out", str(out), "--name", "smol-trained"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"head {last.hash}" in r.stdout and (tmp_path / "exported.gguf.Modelfile").is_file()
    assert "checked: the Modelfile matches the GGUF's chat template" in r.stdout and "a reply ended after" in r.stdout
    # the keys: every base key kept, general.name and qes.* new
    base, exp = GGUFReader(default_model), GGUFReader(out)
    meta = {k: exp.fields[k].contents() for k in exp.fields}
    assert meta["general.name"] == "smol-trained"
    assert meta["qes.run_id"] == run.run_id and meta["qes.ledger_head"] == last.hash and meta["qes.steps"] == 2
    assert meta["qes.base_sha256"] == run.base_sha256
    for k in base.fields:
        if not k.startswith("GGUF.") and k != "general.name":
            assert str(base.fields[k].contents()) == str(meta[k]), k
    # the tensors: the trained codes (the ledger's weights hash), every other tensor the base's
    m = GGUFModel(out)
    assert m.weights_digest(m.code_tensors()) == last.weights_sha256
    changed = [t.name for t, u in zip(base.tensors, exp.tensors) if t.data.tobytes() != u.data.tobytes()]
    assert changed and all(n not in ("token_embd.weight",) and not n.endswith("norm.weight") for n in changed)
    # stock llama-cpp-python (mmap, its default buffers) gives the logits of the trained weights
    replayed = tmp_path / "replayed.gguf"
    assert cli(["replay", "--ledger", str(ledger), "--out", str(replayed)], tmp_path).returncode == 0
    trained = ModelDriver(replayed, n_ctx=128, self_check=False)
    tokens = trained.tokenize("The capital of France is")
    want = trained.logits(tokens)
    stock = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=2, n_threads_batch=2, verbose=False)
    stock.reset()
    stock.eval(tokens)
    got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(stock.ctx, -1), shape=(stock.n_vocab(),)).copy()
    assert np.array_equal(got, want)
    del stock, trained
    # the check catches a broken export: bytes changed in a trained tensor, a wrong stop token
    from qes_edge.llama.export_check import ExportCheckFailed, check_export
    truth = GGUFModel(out).code_tensors()
    bad = tmp_path / "bad.gguf"
    raw = bytearray(out.read_bytes())
    q = next(t for t in m.header.tensors if t.name == "blk.3.attn_q.weight")
    for k in range(0, 4096, 64):  # 64 code bytes of one tensor
        raw[q.offset + 1000 + k] ^= 0x77
    bad.write_bytes(bytes(raw))
    modelfile = tmp_path / "exported.gguf.Modelfile"
    with pytest.raises(ExportCheckFailed) as e:
        check_export(bad, modelfile, default_model, truth, 2)
    assert any("differ from the replayed codes in the file (blk.3.attn_q.weight" in p for p in e.value.problems)
    assert any("logits on a fixed prompt differ from the trained weights'" in p for p in e.value.problems)
    wrong = tmp_path / "wrong.Modelfile"
    wrong.write_text(modelfile.read_text().replace('PARAMETER stop "<|im_end|>"', 'PARAMETER stop "</s>"'))
    with pytest.raises(ExportCheckFailed) as e:
        check_export(out, wrong, default_model, truth, 2)
    assert e.value.problems == ["the Modelfile's stop tokens ['<|im_start|>', '</s>'] are not the chatml template's "
                                "['<|im_start|>', '<|im_end|>']",
                                "the Modelfile's stop '</s>' is not one token of the model's vocabulary (3)"]
    assert check_export(out, modelfile, default_model, truth, 2)[0].startswith("checked:")
    _served_through_the_openai_api(out, tmp_path)


def _served_through_the_openai_api(out, tmp_path):
    """The export served by llama-cpp-python's OpenAI-compatible server answers one chat question
    asked with the OpenAI client, and the answer ends (finish_reason stop)."""
    import importlib.util
    import socket
    import time
    if importlib.util.find_spec("openai") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("the OpenAI client or llama-cpp-python's server extras are not installed (pip install '.[test]')")
    import openai
    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        port = s_.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(out), "--host", "127.0.0.1",
                               "--port", str(port), "--n_ctx", "512", "--n_threads", "2"], stdout=log, stderr=log,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for _ in range(600):  # until it listens (or it exits): not a time limit on the answer
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        r = client.chat.completions.create(model=str(out), max_tokens=96, temperature=0,
                                           messages=[{"role": "user", "content": "Say hello in one short sentence."}])
        assert r.choices[0].message.content.strip() and r.choices[0].finish_reason == "stop", r
    finally:
        server.terminate()
        server.wait(60)
        log.close()


def test_the_modelfile_check_names_what_does_not_match():
    from qes_edge.llama.export_check import check_modelfile
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}...{% endfor %}"
    good = modelfile_text("m.gguf", chatml)
    assert check_modelfile(good, chatml) == []
    assert check_modelfile(good.replace("<|im_end|>\"", "</s>\""), chatml)[0].startswith("the Modelfile's stop tokens")
    assert "not the chatml template" in check_modelfile(good.replace("assistant", "bot"), chatml)[0]
    assert check_modelfile(good, None) == ["the GGUF has no chat template, the Modelfile sets one (or stop tokens)"]
    assert check_modelfile(modelfile_text("m.gguf", None), None) == []
    assert check_modelfile(modelfile_text("m.gguf", "[INST]"), "[INST]") == []


def test_export_bad_input(tmp_path):
    r = cli(["export", "--ledger", str(tmp_path / "none.qes")], tmp_path)
    assert r.returncode == 2 and "ledger not found" in r.stderr


@pytest.mark.slow
def test_replay_and_export_an_earlier_step(tmp_path, default_model):
    """--step N rebuilds the weights after the first N steps (their weights hash, their head),
    --step best the step of the highest held-out score: what a user exports when a run peaked
    before its end.  A step the run does not have is a one-line error."""
    from gguf import GGUFReader

    from qes_edge.gguf.model import GGUFModel
    from qes_edge.ledger.store import Ledger
    ledger = tmp_path / "r.qes"
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2})
                              for i in range(6)) + "\n")
    r = cli(["train", "--task", "choice", "--data", str(data), "--steps", "2", "--population", "4", "--batch", "4",
             "--n-ctx", "128", "--alpha", "0.003", "--ledger", str(ledger)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lg = Ledger(ledger)
    run = lg.run()
    recs = list(lg.steps(run.run_id))
    assert [e["step"] for e in lg.evals(run.run_id) if e["split"] == "heldout"] == [0, 2]
    lg.record_eval(run.run_id, 1, "heldout", {"accuracy": 1.0, "reward": 0.9})  # step 1 scored best
    lg.close()

    def digest(path):
        m = GGUFModel(path)
        return m.weights_digest(m.code_tensors())

    r = cli(["replay", "--ledger", str(ledger), "--out", str(tmp_path / "s1.gguf"), "--step", "1", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["steps"] == 1 and info["head"] == recs[0].hash and info["chosen"] == "the first 1 of 2 steps"
    assert digest(tmp_path / "s1.gguf") == recs[0].weights_sha256 != recs[1].weights_sha256
    r = cli(["replay", "--ledger", str(ledger), "--out", str(tmp_path / "s0.gguf"), "--step", "0"], tmp_path)
    assert r.returncode == 0 and f"head {run.hash}" in r.stdout, r.stderr
    assert digest(tmp_path / "s0.gguf") == digest(default_model)
    out = tmp_path / "best.gguf"
    r = cli(["export", "--ledger", str(ledger), "--out", str(out), "--step", "best", "--no-check", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["steps"] == 1 and info["chosen"] == "step 1 of 2, the best held-out accuracy (1.000)"
    meta = {k: f.contents() for k, f in GGUFReader(out).fields.items()}
    assert meta["qes.steps"] == 1 and meta["qes.ledger_head"] == recs[0].hash and meta["general.name"].endswith(", 1 step)")
    assert digest(out) == recs[0].weights_sha256
    # no --out: the default name carries the step exported
    r = cli(["export", "--ledger", str(ledger), "--step", "best", "--no-check", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    default = Path(os.environ["QES_EDGE_HOME"]) / "exports" / f"{Path(run.base_name).stem}.{run.run_id[:8]}.s1.gguf"
    assert info["out"] == str(default) and digest(default) == recs[0].weights_sha256
    for bad, says in (("3", "--step 3: the run has 2 steps (give 0 to 2)"), ("-1", "the run has 2 steps"),
                      ("last", "give a number of steps (0 to 2) or 'best'")):
        r = cli(["export", "--ledger", str(ledger), "--step", bad, "--no-check"], tmp_path)
        assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
