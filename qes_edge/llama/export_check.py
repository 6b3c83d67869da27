"""What `qes-edge export` checks before it says done (`--no-check` skips it), because the most common
complaint about exported fine-tunes is a file that loads and then answers gibberish or never stops
(a wrong template, a wrong stop token, a damaged tensor):

1. the Modelfile: its TEMPLATE and stop tokens are those of the chat-template family the exported
   GGUF declares (ChatML, Llama 3, Gemma), or a plain prompt where it declares none;
2. the bytes: every trained tensor in the file is the replayed codes, byte for byte;
3. the logits: the file loaded as training loads a model gives, on a fixed prompt, the logits of
   the base model with the trained codes written into it, bit for bit;
4. stock llama-cpp-python loads the file with its default options, each Modelfile stop is one token
   of its vocabulary, and one reply through the model's own chat template ends at an
   end-of-generation token within REPLY_TOKENS (skipped, and said, where the GGUF has no template).

Each check that fails is named in ExportCheckFailed, all of them at once."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

PROMPT = b"The quick brown fox jumps over the lazy dog. The capital of France is"
REPLY_MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]
REPLY_TOKENS = 96


class ExportCheckFailed(RuntimeError):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def modelfile_stops(text: str) -> list[str]:
    """The stop tokens a Modelfile sets."""
    return re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)


def check_modelfile(text: str, template: str | None) -> list[str]:
    """Problems of a Modelfile against the chat template the GGUF declares ([] when none)."""
    from qes_edge.gguf.export import FAMILIES, chat_family
    got_template = re.findall(r'^TEMPLATE """(.*?)"""$', text, flags=re.M | re.S)
    got_stops = modelfile_stops(text)
    family = chat_family(template)
    problems = []
    if family:
        _, go, stops = FAMILIES[family]
        if got_template != [go]:
            problems.append(f"the Modelfile's TEMPLATE is not the {family} template the GGUF declares")
        if sorted(got_stops) != sorted(stops):
            problems.append(f"the Modelfile's stop tokens {got_stops} are not the {family} template's {stops}")
    elif not template:
        if got_template != ["{{ .Prompt }}"] or got_stops:
            problems.append("the GGUF has no chat template, the Modelfile sets one (or stop tokens)")
    elif got_template or got_stops:
        problems.append("the GGUF's chat template is of no family qes-edge knows, yet the Modelfile sets a TEMPLATE "
                        "or stop tokens for it")
    return problems


def check_bytes(out: Path, trained) -> list[str]:
    """Problems: a trained tensor whose bytes in `out` are not the replayed ones."""
    from qes_edge.gguf.model import GGUFModel
    m = GGUFModel(out)
    infos = {t.name: t for t in m.header.tensors}
    bad = []
    for t in trained:
        info = infos.get(t.name)
        if info is None or info.n_bytes != t.n_bytes or bytes(m.tensor_bytes(info)) != t.read_bytes():
            bad.append(t.name)
    return [f"{len(bad)} trained tensor(s) differ from the replayed codes in the file ({bad[0]}…)"] if bad else []


def _logits_of(llm) -> np.ndarray:
    from qes_edge.llama.runtime import forward, last_logits
    forward(llm, llm.tokenize(PROMPT, add_bos=True))
    return last_logits(llm)


def check_logits(out: Path, base: Path, trained, threads: int) -> list[str]:
    """Problems: the export's logits on PROMPT against the base's with the trained codes written in."""
    import gc
    from qes_edge.llama.driver import ModelDriver
    from qes_edge.llama.runtime import load_llama
    from qes_edge.native.binding import ffi
    d = ModelDriver(base, n_ctx=128, n_threads=threads, self_check=False)
    by_name = {t.name: t for t in trained}
    for live in d.tensors:
        src = by_name.get(live.name)
        if src is not None:
            ffi.memmove(live._ptr, src.read_bytes(), live.n_bytes)
    want = _logits_of(d.llm)
    del d
    gc.collect()
    llm = load_llama(out, n_ctx=128, n_threads=threads)
    got = _logits_of(llm)
    del llm
    gc.collect()
    if not np.array_equal(got, want):
        n = int(np.count_nonzero(got != want))
        return [f"the file's logits on a fixed prompt differ from the trained weights' ({n} of {got.size}, "
                f"largest by {float(np.nanmax(np.abs(got - want))):.3g})"]
    return []


def check_stock(out: Path, stops: list[str], has_template: bool, threads: int) -> tuple[list[str], str]:
    """Problems, and what the reply check saw: the file in stock llama-cpp-python (default
    options), its stop tokens, one reply through its own chat template."""
    import llama_cpp
    try:
        llm = llama_cpp.Llama(model_path=str(out), verbose=False, n_threads=threads)
    except Exception as e:  # noqa: BLE001 - whatever llama.cpp says, it is the check's answer
        return [f"stock llama-cpp-python cannot load the file ({e})"], "not loaded"
    problems = []
    for s in stops:
        toks = llm.tokenize(s.encode(), add_bos=False, special=True)
        if len(toks) != 1:
            problems.append(f"the Modelfile's stop {s!r} is not one token of the model's vocabulary ({len(toks)})")
    if not has_template:
        return problems, "no chat template: the reply check does not apply (a base model)"
    r = llm.create_chat_completion(messages=REPLY_MESSAGES, max_tokens=REPLY_TOKENS, temperature=0.0)
    choice = r["choices"][0]
    n = r.get("usage", {}).get("completion_tokens")
    if choice.get("finish_reason") != "stop":
        problems.append(f"a reply through the model's chat template did not end at an end-of-generation token within "
                        f"{REPLY_TOKENS} tokens (the template or the stop token is wrong, or the weights are broken)")
    text = (choice.get("message") or {}).get("content") or ""
    return problems, f"a reply ended after {n} tokens: {' '.join(text.split())[:60]!r}"


def check_export(out: Path, modelfile: Path, base: Path, trained, threads: int) -> list[str]:
    """Every check above; the lines saying what passed, or ExportCheckFailed naming every failure."""
    from qes_edge.gguf.check import check_gguf
    template = check_gguf(out).metadata.get("tokenizer.chat_template")
    text = modelfile.read_text()
    problems = check_modelfile(text, template)
    problems += check_bytes(out, trained)
    problems += check_logits(out, base, trained, threads)
    stops = modelfile_stops(text)
    stock, reply = check_stock(out, stops, bool(template), threads)
    problems += stock
    if problems:
        raise ExportCheckFailed(problems)
    return [f"checked: the Modelfile matches the GGUF's {'chat template' if template else 'lack of a chat template'}; "
            f"{len(trained)} trained tensors byte for byte; the logits on a fixed prompt bit for bit; stock "
            f"llama-cpp-python loads it; {reply}"]
