"""Prompts through the model's own chat template; the data formats; whole-answer choice scoring.

Fast tests need no llama.cpp; those marked slow load the default model (SmolLM2-135M-Instruct Q4_1)."""

import json

import numpy as np
import pytest

from qes_edge.llama.chat import ChatTemplate, ChatTemplateError, load_template
from qes_edge.gguf.check import check_gguf
from qes_edge.tasks import load_task, task_from_config
from qes_edge.tasks.base import Example
from qes_edge.training.config import TrainConfig

# what the sentiment task wrote by hand before chat templates (the README's learning results used it)
OLD_SENTIMENT_PREFIX = ("<|im_start|>system\nYou classify the sentiment of single words.<|im_end|>\n"
                        "<|im_start|>user\nPositive or negative?\nWord:")
OLD_SENTIMENT_SUFFIX = " {word}<|im_end|>\n<|im_start|>assistant\nAnswer:"

CAPITALS = [
    {"prompt": "What is the capital of France?", "choices": ["Paris", "Lyon", "Marseille"], "answer": 0},
    {"prompt": "What is the capital of Japan?", "choices": ["Osaka", "Tokyo", "Kyoto"], "answer": 1},
    {"prompt": "What is the capital of Italy?", "choices": ["Milan", "Naples", "Rome"], "answer": 2},
    {"prompt": "What is the capital of Germany?", "choices": ["Berlin", "Munich", "Hamburg"], "answer": 0},
    {"prompt": "What is the capital of the United States?",
     "choices": ["New York", "Washington, D.C.", "New Delhi"], "answer": 1},
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


# -- templates, no llama.cpp ------------------------------------------------------------------

def test_template_renders_like_the_formatters():
    t = ChatTemplate("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | tojson }}\n"
                     "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}", bos_token="<s>")
    assert t.render([{"role": "user", "content": "a<b"}]) == '<s><user>"a<b"\n<assistant>'
    assert t.render([{"role": "user", "content": "x"}], add_generation_prompt=False) == '<s><user>"x"\n'


@pytest.mark.parametrize("source, match", [
    ("{% for m in messages %}", "does not parse"),
    ("{{ raise_exception('only user and assistant roles are supported') }}", "failed to render.*only user"),
    ("{{ messages[0].content.__class__.__mro__ }}", "failed to render"),   # the sandbox refuses
    ("{{ 1 / 0 }}", "failed to render.*ZeroDivisionError"),
    ("   ", "is empty"),
])
def test_template_errors_are_one_line_and_name_the_model(source, match):
    with pytest.raises(ChatTemplateError, match=match) as e:
        ChatTemplate(source, model="tiny.gguf").render([{"role": "user", "content": "hi"}])
    assert "tiny.gguf" in str(e.value) and "\n" not in str(e.value)


def test_template_is_read_from_the_gguf(default_model):
    meta = check_gguf(default_model).metadata
    t = load_template(default_model, meta, token_text={1: "<|im_start|>", 2: "<|im_end|>"}.get)
    assert "SmolLM2-135M-Instruct" in t.model and t.eos_token == "<|im_end|>"
    assert t.render([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert load_template(default_model, {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}) is None


# -- data formats -------------------------------------------------------------------------------

def test_the_three_data_formats(tmp_path):
    rows = [{"prompt": "p0", "answer": "a0"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "p1"},
                          {"role": "assistant", "content": "a1"}]},
            {"messages": [{"role": "user", "content": "p2"}], "pattern": "x+"},
            {"prompt": "p3", "completion": "a3"}] * 2
    t = load_task("jsonl", write_jsonl(tmp_path / "d.jsonl", rows))
    ex = {e.prompt: e for e in list(t.train_examples()) + list(t.heldout_examples())}
    assert ex["p0"].chat() == ({"role": "user", "content": "p0"},) and ex["p0"].answer == "a0" and not ex["p0"].raw
    # the last assistant turn is the target, not part of the prompt
    assert ex["p1"].chat() == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "p1"})
    assert ex["p1"].answer == "a1" and ex["p1"].where.endswith("d.jsonl:2")
    assert ex["p2"].answer is None and ex["p3"].answer == "a3"
    raw = load_task("jsonl", write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Q: 2+2\nA:", "answer": "4"}] * 4),
                    raw_prompt=True)
    assert all(e.raw and e.prompt == "Q: 2+2\nA:" for e in raw.train_examples())


@pytest.mark.parametrize("rows, raw, match", [
    ([{"text": "no prompt"}], False, r"x.jsonl:1: each line needs a string 'prompt' or a list of 'messages'"),
    ([{"prompt": 3}], False, r"x.jsonl:1: .*'prompt' is not a string"),
    ([{"prompt": "  "}], False, r"x.jsonl:1: 'prompt' is empty"),
    ([{"messages": "hi"}], False, r"x.jsonl:1: 'messages' must be a non-empty list"),
    ([{"messages": []}], False, r"x.jsonl:1: 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "user"}]}], False, r"x.jsonl:1: 'messages'\[0\] must be an object with string"),
    ([{"messages": [{"role": "user", "content": 5}]}], False, r"'messages'\[0\] must be an object"),
    ([{"messages": [{"role": "assistant", "content": "a"}]}], False, r"x.jsonl:1: .*only the assistant's answer"),
    ([{"messages": [{"role": "user", "content": "q"}], "prompt": "q"}], False, r"x.jsonl:1: give either"),
    ([{"messages": [{"role": "user", "content": "q"}]}], True, r"x.jsonl:1: 'messages' needs the model's chat"),
    ([[1, 2]], False, r"x.jsonl:1: each line must be a JSON object"),
])
def test_bad_data_lines_name_file_and_line(tmp_path, rows, raw, match):
    with pytest.raises(ValueError, match=match):
        load_task("jsonl", write_jsonl(tmp_path / "x.jsonl", rows + [{"prompt": "ok"}] * 4), raw_prompt=raw)


def test_empty_file_and_bad_choices(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"e.jsonl: is empty"):
        load_task("jsonl", str(tmp_path / "e.jsonl"))
    ok = {"prompt": "q", "choices": ["a", "b"], "answer": 0}
    for bad, match in (({**ok, "choices": ["Paris", "Lyon", "Paris"]}, r"c.jsonl:3: 'choices' lists 'Paris' more than once"),
                       ({**ok, "answer": True}, r"c.jsonl:3: 'answer' must be the index"),
                       ({**ok, "choices": ["a"]}, r"c.jsonl:3: every line needs 'choices'")):
        with pytest.raises(ValueError, match=match):
            load_task("choice", write_jsonl(tmp_path / "c.jsonl", [ok, ok, bad, ok, ok]))
    with pytest.raises(ValueError, match="choice_norm must be one of"):
        load_task("choice", write_jsonl(tmp_path / "c.jsonl", [ok] * 5), choice_norm="max")
    # chat format: the assistant's answer names the right choice
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}], "choices": ["a", "b"]}
    t = load_task("choice", write_jsonl(tmp_path / "m.jsonl", [chat] * 5))
    assert t.strata() == [1] * len(t.train_examples())


def test_train_config_options_reach_the_task(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", CAPITALS)
    cfg = TrainConfig(task="choice", data=data, raw_prompt=True, choice_norm="sum")
    cfg.validate()
    t = task_from_config(cfg)
    assert t.choice_norm == "sum" and all(e.raw for e in t.train_examples())
    rec = cfg.record()
    assert rec["raw_prompt"] is True and rec["choice_norm"] == "sum"
    assert TrainConfig.from_record(rec) == cfg
    for bad in (dict(choice_norm="max"), dict(raw_prompt="yes")):
        with pytest.raises(ValueError, match="choice_norm|raw_prompt"):
            TrainConfig(**bad).validate()
    # ledgers from before chat templates resume with the prompts and scoring they were recorded with
    old = {k: v for k, v in rec.items() if k not in ("raw_prompt", "choice_norm")}
    assert (TrainConfig.from_record(old).raw_prompt, TrainConfig.from_record(old).choice_norm) == (True, "first")
    for task, raw in (("jsonl", True), ("mod:fn", True), ("sentiment", False), ("countdown", False)):
        back = TrainConfig.from_record({**old, "task": task})
        assert (back.raw_prompt, back.choice_norm) == (raw, "mean"), task
    assert not task_from_config(TrainConfig(task="countdown")).train_examples()[0].raw


# -- on the real model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def driver(default_model):
    from qes_edge.llama.driver import ModelDriver
    return ModelDriver(default_model, n_ctx=256, self_check=False)


@pytest.mark.slow
def test_sentiment_renders_byte_identical_to_its_old_prompt(driver):
    """Through SmolLM2's template the sentiment prompts are the hand-written ChatML of before,
    byte for byte and token for token, so the README's learning results hold."""
    from qes_edge.tasks.sentiment import SentimentTask
    task = SentimentTask()
    for ex in list(task.train_examples()) + list(task.heldout_examples()):
        suffix = OLD_SENTIMENT_SUFFIX.format(word=ex.meta["word"])
        assert driver.render(ex) == OLD_SENTIMENT_PREFIX + suffix
        assert driver.prompt_tokens(ex) == driver.tokenize(OLD_SENTIMENT_PREFIX) + driver.tokenize(suffix, add_bos=False)


@pytest.mark.slow
def test_shared_prefix_logits_are_bit_identical_to_full_evaluation(driver, tmp_path):
    from qes_edge.tasks.sentiment import SentimentTask
    from qes_edge.llama.driver import shared_prefix_len
    batches = [list(SentimentTask().train_examples()[:5]),
               [Example(r["prompt"]) for r in CAPITALS],                                  # the template's system turn
               [Example("Q: 1+1\nA:", raw=True), Example("Q: 2+2\nA:", raw=True)]]        # raw: "Q:" shared
    for batch in batches:
        toks = [driver.prompt_tokens(ex) for ex in batch]
        assert shared_prefix_len(toks) > 0
        got = list(driver.prompt_logits(batch))
        for (i, t, lg), ex in zip(got, batch):
            assert t == driver.prompt_tokens(ex)
            assert np.array_equal(lg, driver.logits(t)), ex.prompt
    # the old sentiment split (eval_prefix / logits_suffix) agrees too
    ex = batches[0]
    for (_, _, lg), e in zip(list(driver.prompt_logits(ex)), ex):
        driver.eval_prefix(driver.tokenize(OLD_SENTIMENT_PREFIX))
        old = driver.logits_suffix(driver.tokenize(OLD_SENTIMENT_SUFFIX.format(word=e.meta["word"]), add_bos=False))
        assert np.array_equal(lg, old)


@pytest.mark.slow
def test_bos_rule_and_missing_template(driver):
    from qes_edge.llama.chat import ChatTemplate
    ex = Example("hi")
    # SmolLM2: add_bos_token false, so the tokens are the rendered text's (whose first, <|im_start|>,
    # happens to be the vocabulary's BOS)
    assert not driver.add_bos and driver.prompt_tokens(ex) == driver.tokenize(driver.render(ex), add_bos=False)
    chat, add_bos = driver.chat, driver.add_bos
    bos_text = driver.llm._model.token_get_text(driver.bos)
    try:
        driver.add_bos = True
        for source, n_bos in (("{{ bos_token }}{{ messages[0]['content'] }}", 1),   # the template writes BOS: not twice
                              ("{{ messages[0]['content'] }}", 1)):                  # it does not: added once
            driver.chat = ChatTemplate(source, bos_token=bos_text, model="t")
            driver._prompt_cache.clear()
            toks = driver.prompt_tokens(ex)
            assert toks[0] == driver.bos and toks.count(driver.bos) == n_bos
        driver.chat = None
        driver._prompt_cache.clear()
        with pytest.raises(ChatTemplateError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf: the model has no chat template"):
            driver.prompt_tokens(ex)
        assert driver.prompt_tokens(Example("hi", raw=True))[0] == driver.bos  # raw: tokenized as given, BOS by the rule
    finally:
        driver.chat, driver.add_bos = chat, add_bos
        driver._prompt_cache.clear()
    with pytest.raises(Exception, match="context holds 256"):
        driver.prompt_tokens(Example("word " * 400))


@pytest.mark.slow
def test_whole_answer_logprob_equals_evaluating_each_prefix(driver, tmp_path):
    """continuation_logprobs decodes a choice in one batch with logits at every position; each
    log-probability equals, bit for bit, the log-softmax of the last logits of a separate
    evaluation of prompt + the choice's earlier tokens from a cleared context.  (Feeding the
    choice one token per llm.eval on top of a cached prompt is NOT bit-identical: llama.cpp's
    one-token path rounds differently, up to 0.04 in log-probability here for a 6-token choice.)"""
    from qes_edge.llama.driver import log_softmax
    from qes_edge.llama.runtime import last_logits
    ex = Example("What is the capital of the United States?")
    (_, prompt, logits), = list(driver.prompt_logits([ex]))
    scores = {}
    for choice in ("New York", "New Delhi", "Washington, D.C."):
        toks = driver.tokenize(choice, add_bos=False)
        lp = driver.continuation_logprobs(logits, toks)
        ref = np.array([log_softmax(driver.logits(prompt + toks[:j]))[t] for j, t in enumerate(toks)])
        assert np.array_equal(lp, ref), (choice, lp, ref)
        scores[choice] = lp
        (_, _, logits), = list(driver.prompt_logits([ex]))  # driver.logits above cleared the context
        with pytest.raises(RuntimeError, match="outside prompt_logits"):
            driver.logits(prompt[:5])
            driver.continuation_logprobs(logits, toks)
        (_, _, logits), = list(driver.prompt_logits([ex]))
    assert driver.tokenize("New York", add_bos=False)[0] == driver.tokenize("New Delhi", add_bos=False)[0]
    assert scores["New York"][0] == scores["New Delhi"][0] and scores["New York"][1] != scores["New Delhi"][1]
    # the context is rolled back to the prompt after each choice: scoring twice gives the same bits,
    # and the prompt's logits are those of a fresh evaluation
    (_, _, logits), = list(driver.prompt_logits([ex]))
    first = [driver.continuation_logprobs(logits, driver.tokenize(c, add_bos=False)) for c in scores]
    again = [driver.continuation_logprobs(logits, driver.tokenize(c, add_bos=False)) for c in scores]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # the high-level object is consistent: it holds the prompt but its last token, and eval goes on
    assert driver.llm.n_tokens == len(prompt) - 1
    driver.llm.eval(prompt[-1:] + driver.tokenize("Washington", add_bos=False))
    assert np.array_equal(last_logits(driver.llm), driver.logits(prompt + driver.tokenize("Washington", add_bos=False)))
    assert not driver.llm._logits_all  # no n_ctx x n_vocab logits buffer


@pytest.mark.slow
def test_choice_task_on_the_model_shared_first_token(driver, tmp_path):
    rows = [{"prompt": "What is the capital of India?", "choices": ["New York", "New Delhi"], "answer": 1}] * 5
    data = write_jsonl(tmp_path / "nd.jsonl", rows)
    ex = load_task("choice", data).heldout_examples()
    assert load_task("choice", data, choice_norm="first").evaluate(driver, ex)["reward"] == 0.5
    got = {n: load_task("choice", data, choice_norm=n).evaluate(driver, ex) for n in ("sum", "mean")}
    assert all(m["reward"] != 0.5 for m in got.values())


def capital_scores(driver, path, raw, norm):
    t = load_task("choice", path, raw_prompt=raw, choice_norm=norm)
    return (t.evaluate(driver, list(t.train_examples()) + list(t.heldout_examples())),
            t.evaluate(driver, t.heldout_examples()))


@pytest.mark.slow
def test_capital_questions_score_better_through_the_template(driver, tmp_path):
    """Five plain capital-city questions: through SmolLM2's template the right city gets more of
    the probability than with the question fed raw (DESIGN.md: ~0.05 raw, ~0.5 templated with the
    old first-token scoring on other choices).  Measured 2026-11 with whole-answer scoring, over
    all five: mean 0.328 / acc 0.2 templated vs 0.218 / 0.2 raw; sum 0.517 / 0.6 vs 0.463 / 0.4."""
    path = write_jsonl(tmp_path / "capitals.jsonl", CAPITALS)
    for norm in ("mean", "sum"):
        templ, _ = capital_scores(driver, path, False, norm)
        raw, _ = capital_scores(driver, path, True, norm)
        assert templ["reward"] > raw["reward"] and templ["accuracy"] >= raw["accuracy"], (norm, templ, raw)


@pytest.mark.slow
def test_jsonl_generates_from_the_rendered_tokens(driver, tmp_path):
    """Raw, SmolLM2 answered the plain questions with nothing; through its template it answers."""
    rows = [{"prompt": r["prompt"], "pattern": r["choices"][r["answer"]].split(",")[0]} for r in CAPITALS]
    path = write_jsonl(tmp_path / "gen.jsonl", rows)
    t = load_task("jsonl", path, max_tokens=16)
    ex = list(t.train_examples()) + list(t.heldout_examples())
    outs = [driver.generate(driver.prompt_tokens(e), 16) for e in ex]
    assert all(o.strip() for o in outs), outs
    assert driver.check_prompts(ex) == max(len(driver.prompt_tokens(e)) for e in ex)


def test_token_ids_outside_the_vocabulary_are_never_looked_up(default_model):
    """llama.cpp aborts the process on a vocabulary lookup past its end: the template asks for
    no such id, whatever metadata it is given (the validator refuses such files first)."""
    meta = dict(check_gguf(default_model).metadata)
    meta["tokenizer.ggml.eos_token_id"] = 2**32 - 1
    meta["tokenizer.ggml.bos_token_id"] = 49152
    asked = []
    t = load_template(default_model, meta, token_text=lambda i: asked.append(i) or "x")
    assert asked == [] and t.eos_token == "" and t.bos_token == ""
