"""Countdown scoring: every completion scores in bounded time, whatever the model writes, and
whitespace inside an answer is legal.

Regressions: ``<answer>(.*?)</answer>`` rescanned the text from every unclosed tag (16000 tags:
28-52 s, 200000 tags: over ten minutes, 1 MB of mixed tags and junk: 9-12 s), and an answer
on its own line (newlines inside the tags) scored 0."""

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qes_edge.tasks.countdown import MAX_COMPLETION_CHARS, extract_answer, score
from qes_edge.tasks.safe_arith import UnsafeExpression, evaluate

# The contract is that any completion scores in well under 10 ms (it reads at most
# MAX_COMPLETION_CHARS characters; microseconds on this machine).  A test must not depend on how
# busy the machine is, so the bound asserted is 100x that: loose enough for any load a CI machine
# sees, and still 28x below the fastest regression it guards (16000 unclosed tags took 28-52 s;
# 200000 of them, over ten minutes).
BUDGET_S = 1.0


def timed_score(completion, nums=(44, 19, 35), target=98, tries=3):
    """The score and its time, best of a few calls: the cost of scoring, not the scheduler's
    pauses on a busy machine (the cost being measured is microseconds, the bound 10 ms)."""
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        r = score(completion, list(nums), target)
        best = min(best, time.perf_counter() - t0)
    return r, best


def junk_megabyte(seed=0):
    rng = random.Random(seed)
    parts = ["<answer>", "</answer>", "<answer", "answer>", "</", "<", ">", "44", "+", "(", ")", "=",
             " ", "\n", "junk", "é", "*", "/"]
    out, n = [], 0
    while n < 1_000_000:
        p = rng.choice(parts)
        out.append(p)
        n += len(p)
    return "".join(out)


@pytest.mark.parametrize("completion", [
    "<answer>" * 16000, "<answer>" * 200000, junk_megabyte(0), junk_megabyte(1),
    "<answer>" * 200000 + "(44 + 19) + 35</answer>", "x" * 5_000_000, "</answer>" * 200000,
    "<answer>" + "(" * 100000 + "1" + ")" * 100000 + "</answer>",
], ids=["16000-open", "200000-open", "junk-1MB-a", "junk-1MB-b", "200000-open-then-answer", "5MB-text",
        "200000-close", "deep-parens"])
def test_pathological_completions_score_fast(completion):
    r, dt = timed_score(completion)
    assert r in (0.0, 0.1, 1.0)
    assert dt < BUDGET_S, f"{dt * 1e3:.1f} ms"


def test_whitespace_and_newlines_inside_the_answer_are_legal():
    assert score("<answer>\n(44 + 19) + 35\n</answer>", [44, 19, 35], 98) == 1.0
    assert score("<answer>\r\n(44 +\n19)\t+ 35\r\n</answer>", [44, 19, 35], 98) == 1.0
    assert score("<answer>\n44 +\n19 +\n35\n= 98\n</answer>", [44, 19, 35], 98) == 1.0
    assert score("<answer>\n44 + 19\n</answer>", [44, 19, 35], 98) == 0.1
    v, used = evaluate("\n 7 *\n(3 + 5)\r\n")
    assert v == 56 and used == [7, 3, 5]


@pytest.mark.parametrize("expr", ["2\n**3", "2 *\n* 3", "\n-1\n", "1\n2", "1 +\x0b2", "1 +\x0c2",
                                  "\n" * 200 + "1" * 8 + "\n" * 200, "1 +\n" * 60 + "1"])
def test_whitespace_keeps_every_other_protection(expr):
    with pytest.raises(UnsafeExpression):
        evaluate(expr)


def test_first_closed_answer_counts():
    nums, target = [3, 5, 7], 56
    # the first </answer> and the last <answer> before it
    assert score("<answer>(3+5)*7</answer> <answer>1</answer>", nums, target) == 1.0
    assert score("<answer>1</answer> <answer>(3+5)*7</answer>", nums, target) == 0.1
    assert score("<answer> draft <answer>(3+5)*7</answer>", nums, target) == 1.0
    assert score("<answer>(3+5)*7", nums, target) == 0.0                   # never closed
    assert score("(3+5)*7</answer>", nums, target) == 0.0                  # never opened
    assert score("</answer><answer>(3+5)*7</answer>", nums, target) == 0.0  # first close has no open
    assert extract_answer("a <answer> x </answer> b") == " x "
    assert extract_answer(None) is None


def test_only_the_capped_prefix_is_looked_at():
    ok = "<answer>(3+5)*7</answer>"
    pad = " " * (MAX_COMPLETION_CHARS - len(ok))
    assert score(pad + ok, [3, 5, 7], 56) == 1.0
    assert score(pad + " " + ok, [3, 5, 7], 56) == 0.0


_FRAGMENTS = st.sampled_from(["<answer>", "</answer>", "<answer", "</answ", "er>", "<", ">", "/", "=",
                              "(", ")", "+", "-", "*", "/", "**", " ", "\n", "\t", "\r", ".", "_", "x",
                              "é", "\x00", "44", "19", "35", "98", "0", "9999999", "12345678"])
_PIECE = st.one_of(_FRAGMENTS, st.text(max_size=8), st.integers(0, 10**9).map(str))


_times: dict[str, list[float]] = {"mix": [], "arith": []}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(_PIECE, max_size=300), repeat=st.sampled_from([1, 1, 1, 50, 2000]))
def test_any_mix_of_tags_digits_and_junk_scores_fast(pieces, repeat):
    completion = "".join(pieces) * repeat
    r, dt = timed_score(completion)
    assert type(r) is float and r in (0.0, 0.1, 1.0)
    _times["mix"].append(dt)
    assert max(_times["mix"]) < BUDGET_S, f"{dt * 1e3:.1f} ms on {len(completion)} chars"


@settings(max_examples=300, deadline=None)
@given(body=st.lists(st.sampled_from(["44", "19", "35", "+", "-", "*", "/", "(", ")", " ", "\n", "\t"]),
                     max_size=40))
def test_answers_made_of_arithmetic_tokens_score_fast(body):
    completion = "think... <answer>" + "".join(body) + "</answer>"
    r, dt = timed_score(completion)
    assert type(r) is float and r in (0.0, 0.1, 1.0)
    _times["arith"].append(dt)
    assert max(_times["arith"]) < BUDGET_S, f"{dt * 1e3:.1f} ms on {completion!r}"
