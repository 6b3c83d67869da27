"""The batched evaluation (llama/batched.py): its plan as properties, and on the real model its
results: the same bits for the same layout (run after run, driver after driver), close to one at
a time, one at a time again bit for bit after it, generation that stops where it must."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qes_edge.llama.batched import (EvalLayout, cut_decodes, plan_rounds, round_cells, round_tokens,
                                    shared_prefix)
from qes_edge.training.config import TrainConfig

# -- the plan, without llama.cpp ---------------------------------------------------------------

prompts_st = st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=12), min_size=1, max_size=20)


def _branches(prompts, k):
    return [[[9] * (1 + (i + j) % 3) for j in range(k if i % 2 else 0)] for i in range(len(prompts))]


@settings(max_examples=200, deadline=None)
@given(prompts_st, st.integers(1, 8), st.integers(0, 3), st.integers(20, 80))
def test_rounds_cover_every_prompt_in_order_within_every_bound(prompts, seqs, k, cells):
    lay = EvalLayout(sequences=seqs)
    branches = _branches(prompts, k)
    try:
        rounds = plan_rounds(prompts, branches, lay, cells)
    except ValueError as e:  # only when one prompt alone cannot fit
        assert "do not fit" in str(e)
        assert any(1 + len(b) > lay.n_seq_max or round_cells([p], [b], 0) > cells for p, b in zip(prompts, branches))
        return
    assert [i for r in rounds for i in r] == list(range(len(prompts)))
    for r in rounds:
        assert len(r) <= seqs
        assert sum(1 + len(branches[i]) for i in r) <= lay.n_seq_max
        ps = [prompts[i] for i in r]
        assert round_cells(ps, [branches[i] for i in r], shared_prefix(ps)) <= cells
    assert plan_rounds(prompts, branches, lay, cells) == rounds  # a function of its arguments


@settings(max_examples=200, deadline=None)
@given(prompts_st, st.integers(0, 3), st.integers(2, 16), st.integers(1, 6))
def test_round_tokens_are_a_valid_tree_and_decodes_keep_their_bounds(prompts, k, n_batch, rows):
    branches = _branches(prompts, k)
    members = list(range(len(prompts)))
    toks = round_tokens(prompts, branches, members)
    # every sequence's positions run 0, 1, 2... in decode order, and its tokens spell its text
    by_seq: dict[int, list] = {}
    for t in toks:
        for s in t.seqs:
            by_seq.setdefault(s, []).append(t)
    s = 0
    for i in members:
        want = [prompts[i]] + [prompts[i] + b for b in branches[i]]
        for w in want:
            got = by_seq[s]
            assert [t.pos for t in got] == list(range(len(w)))
            assert [t.token for t in got] == w
            s += 1
    # one logit row per prompt (its last token) and per branch token
    outs = [t.out for t in toks if t.out is not None]
    assert sum(o[0] == "prompt" for o in outs) == len(prompts)
    assert sum(o[0] == "branch" for o in outs) == sum(len(b) for bs in branches for b in bs)
    pieces = cut_decodes(toks, n_batch, max(rows, 1))
    assert [t for p in pieces for t in p] == toks
    for p in pieces:
        assert 1 <= len(p) <= n_batch
        assert sum(t.out is not None for t in p) <= rows


def test_layout_checks_and_the_config_records_it():
    with pytest.raises(ValueError, match="eval_batch"):
        EvalLayout(sequences=0).check()
    with pytest.raises(ValueError, match="n_ubatch"):
        EvalLayout(sequences=4, n_batch=64, n_ubatch=128).check()
    with pytest.raises(ValueError, match="kv_type"):
        EvalLayout(kv_type="q4").check()
    rec = TrainConfig(eval_batch=8).record()
    assert (rec["eval_batch"], rec["n_batch"], rec["n_ubatch"], rec["kv_type"]) == (8, 512, 512, "f16")
    assert TrainConfig().record()["eval_batch"] == 1 and TrainConfig(task="countdown").eval_batch == 8
    # a run recorded before the layout existed resumes one prompt a decode
    old = {k: v for k, v in rec.items() if k not in ("eval_batch", "n_batch", "n_ubatch", "kv_type")}
    assert TrainConfig.from_record(old).eval_batch == 1
    assert TrainConfig.from_record(rec).eval_batch == 8
    # the command line's default is by task: batched where it generates, one at a time where it scores
    assert TrainConfig.from_options({"task": "sentiment", "eval_batch": None}).eval_batch == 1
    assert TrainConfig.from_options({"task": "choice"}).eval_batch == 1
    assert TrainConfig.from_options({"task": "countdown", "eval_batch": None}).eval_batch == 8
    assert TrainConfig.from_options({"task": "mymod:fn"}).eval_batch == 8
    assert TrainConfig.from_options({"rewards": ["m:f"]}).eval_batch == 8
    assert TrainConfig.from_options({"task": "countdown", "eval_batch": 2}).eval_batch == 2


# -- on the real model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def driver(default_model):
    from qes_edge.llama.driver import ModelDriver
    return ModelDriver(default_model, n_threads=2)


@pytest.fixture(scope="module")
def choice_task(tmp_path_factory):
    """15 questions of benchmarks/data/continents.jsonl: five choices, "Oceania" of two tokens
    (a branch sequence per prompt)."""
    from pathlib import Path

    from qes_edge.tasks.jsonl import ChoiceTask
    src = Path(__file__).parent.parent / "benchmarks" / "data" / "continents.jsonl"
    path = tmp_path_factory.mktemp("continents") / "c.jsonl"
    path.write_text("".join(src.read_text().splitlines(keepends=True)[:15]))
    return ChoiceTask(path)


def _scores(driver, task, examples):
    conts = lambda i: [task.tokens_of(driver, c) for c in examples[i].meta["choices"]]  # noqa: E731
    return [(i, lg.copy(), [x.copy() for x in lps]) for i, lg, lps in driver.score(examples, conts)]


def _same(a, b):
    return all(i == j and np.array_equal(x, y) and all(np.array_equal(p, q) for p, q in zip(u, v))
               for (i, x, u), (j, y, v) in zip(a, b)) and len(a) == len(b)


def test_batched_scores_are_the_same_bits_every_time_and_close_to_one_at_a_time(driver, choice_task,
                                                                                default_model):
    from qes_edge.llama.driver import ModelDriver
    ex = list(choice_task.train_examples()) + list(choice_task.heldout_examples())
    driver.use_layout(EvalLayout())
    one = _scores(driver, choice_task, ex)
    lay = EvalLayout(sequences=4)
    cells = driver.use_layout(lay, ex)
    assert cells >= driver.n_ctx and driver.kv_bytes == cells * driver.kv_bytes_for(1)
    first = _scores(driver, choice_task, ex)
    assert _same(first, _scores(driver, choice_task, ex))       # run after run
    other = ModelDriver(default_model, n_threads=1)              # another driver, other threads
    other.use_layout(lay, ex)
    assert _same(first, _scores(other, choice_task, ex))
    # close to one at a time: the same choice ranked first, log-probabilities within a few tenths
    for (_, lg1, lp1), (_, lgb, lpb) in zip(one, first):
        assert [float(x.mean()) for x in lp1] == pytest.approx([float(x.mean()) for x in lpb], abs=0.5)
    agree = sum(int(np.argmax([x.mean() for x in a[2]]) == np.argmax([x.mean() for x in b[2]]))
                for a, b in zip(one, first))
    assert agree >= len(ex) - 1
    # and back to one at a time: the bits of before
    driver.use_layout(EvalLayout())
    assert driver.kv_cells == 0
    assert _same(one, _scores(driver, choice_task, ex))


def test_another_layout_is_other_bits_so_it_is_part_of_the_run(driver, choice_task):
    ex = list(choice_task.train_examples())
    driver.use_layout(EvalLayout(sequences=4), ex)
    four = _scores(driver, choice_task, ex)
    driver.use_layout(EvalLayout(sequences=2), ex)
    two = _scores(driver, choice_task, ex)
    driver.use_layout(EvalLayout())
    assert [i for i, *_ in four] == [i for i, *_ in two]
    assert not _same(four, two)


def test_batched_generation_is_deterministic_and_stops_where_it_must(driver):
    from qes_edge.tasks.countdown import CountdownTask
    ex = list(CountdownTask(n_train=10, n_heldout=2).train_examples())
    prompts = [driver.prompt_tokens(e) for e in ex]
    driver.use_layout(EvalLayout())
    one = driver.generate_many(prompts, 12)
    driver.use_layout(EvalLayout(sequences=4), ex)
    a = driver.generate_many(prompts, 12)
    assert a == driver.generate_many(prompts, 12)
    for p, text in zip(prompts, a):
        n = len(driver.tokenize(text, add_bos=False, special=False)) if text else 0
        assert n <= 12 + 2  # max_tokens (re-tokenizing may merge or split a token)
    # the same first words as one at a time (greedy from logits that are close)
    assert sum(x.split()[:1] == y.split()[:1] for x, y in zip(one, a)) >= len(a) - 2
    # a completion that ends at the model's end-of-generation token stops there: 200 tokens
    # allowed, the chat model ends its short answer long before
    short = driver.generate_many(prompts[:4], 200)
    assert all(len(t) < 2000 for t in short)
    driver.use_layout(EvalLayout())


def test_the_cache_is_sized_from_the_prompts_and_their_completions(driver, choice_task):
    ex = list(choice_task.train_examples())
    lay = EvalLayout(sequences=8)
    longest = sorted(len(driver.prompt_tokens(e)) for e in ex)[-8:]
    pad = lambda n: -(-n // 256) * 256  # noqa: E731  (llama.cpp pads its cache to 256 cells)
    assert driver.use_layout(lay, ex) == pad(max(driver.n_ctx, -(-sum(longest) * 5 // 4)))
    cells = driver.use_layout(lay, ex, generated=300)  # a generation task: room for its completions
    assert cells >= sum(n + 300 for n in longest) and cells == driver.kv_cells
    assert driver.kv_bytes == cells * driver.kv_bytes_for(1)
    assert "8 prompts a decode" in driver.describe_layout() and f"KV cache {cells} tokens" in driver.describe_layout()
    driver.use_layout(EvalLayout())
    assert "one prompt a decode" in driver.describe_layout()


@pytest.mark.slow
def test_a_task_without_branches_takes_one_sequence_a_prompt_with_the_same_bits(default_model):
    """llama.cpp's output buffer holds n_seq_max rows of the vocabulary (1 MiB a row for Gemma's):
    a task whose prompts have no branch sequences (sentiment, generation) is laid out with one
    sequence a prompt, and its rewards and completions are those of the 4-a-prompt layout, bit
    for bit; a choice task keeps its branches."""
    import dataclasses
    from qes_edge.llama.driver import ModelDriver
    from qes_edge.tasks.sentiment import SentimentTask
    from qes_edge.training.opening import prepare_driver
    task = SentimentTask(seed=0)
    ex = list(task.heldout_examples())[:24]
    got = {}
    for spp in (4, 1):
        d = ModelDriver(default_model, n_ctx=512, n_threads=1)
        d.use_layout(dataclasses.replace(TrainConfig(eval_batch=8).eval_layout(), seqs_per_prompt=spp), ex)
        got[spp] = (task.rewards(d, ex).tobytes(), d.generate_many([d.prompt_tokens(e) for e in ex[:6]], 8))
        if spp == 1:
            prepare_driver(d, task, TrainConfig(eval_batch=8))
            assert d.layout.n_seq_max == 8  # what a run of the task at --eval-batch 8 gets
        del d
    assert got[4] == got[1]
    from qes_edge.llama.batched import SEQS_PER_PROMPT
    from qes_edge.tasks.jsonl import ChoiceTask
    assert ChoiceTask.branches_per_prompt(type("T", (), {"choice_norm": "mean"})()) == SEQS_PER_PROMPT - 1
