"""Rewards and coefficients: the safe arithmetic evaluator, Countdown scoring, JSONL tasks,
user callables that fail, and the z-score / rank coefficients."""

import json
import time

import numpy as np
import pytest

from qes_edge.llama.batched import EvalLayout
from qes_edge.tasks.rewards import batch_reward as qes_batch_reward
from qes_edge.llama.driver import ModelDriver
from qes_edge.training.coefficients import coefficients
from qes_edge.tasks import load_task
from qes_edge.tasks.base import RewardFailure
from qes_edge.tasks.countdown import make_problem, score
from qes_edge.tasks.safe_arith import UnsafeExpression, evaluate


@pytest.mark.parametrize("expr, value, used", [
    ("1+2*3", 7, [1, 2, 3]), ("(10-4)/3", 2, [10, 4, 3]), (" 7 * (3 + 5) ", 56, [7, 3, 5]), ("9/2", 4.5, [9, 2]),
])
def test_safe_arith_evaluates_exactly(expr, value, used):
    v, u = evaluate(expr)
    assert v == value and u == used


@pytest.mark.parametrize("expr", [
    "2**3**4", "9**9**9**9", "__import__('os').system('true')", "a+1", "(1).__class__", "1 if 1 else 2",
    "1/0", "(" * 25 + "1" + "+1)" * 25, "1" * 20, "1+" * 80 + "1", "[1,2]", "-1", "lambda: 1", "", "1;2",
])
def test_safe_arith_refuses_everything_else_quickly(expr):
    """Refused before anything is computed: "9**9**9**9" evaluated would never end, so a bound
    of 2 s (microseconds are what it costs; loose for any machine load) catches evaluation."""
    t0 = time.perf_counter()
    with pytest.raises(UnsafeExpression):
        evaluate(expr)
    assert time.perf_counter() - t0 < 2.0


def test_countdown_score():
    assert score("<answer>(3+5)*7</answer>", [3, 5, 7], 56) == 1.0
    assert score("reasoning... <answer>3+5+7 = 15</answer>", [7, 5, 3], 15) == 1.0
    assert score("<answer>3*5*7</answer>", [3, 5, 7], 56) == 0.1      # right format, wrong value
    assert score("<answer>56</answer>", [3, 5, 7], 56) == 0.1          # not using the numbers
    assert score("<answer>3**5</answer>", [3, 5], 243) == 0.0          # refused, no power operator
    assert score("the answer is 56", [3, 5, 7], 56) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(50):
        nums, target = make_problem(rng)
        assert 1 <= target <= 999 and len(nums) == 3


def test_coefficients_zscore_and_rank():
    r = np.array([1.0, 0.0, 0.5, 0.5, 0.2, 0.9])
    z = coefficients(r, "zscore")
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12
    assert np.all(np.abs(coefficients(np.r_[100.0, np.zeros(99)], "zscore")) <= 3.0)
    k = coefficients(r, "rank")
    assert k.min() == -0.5 and k.max() == 0.5 and np.argmax(k) == 0
    assert np.all(coefficients(np.full(6, 0.3)) == 0)


def test_failed_member_zeroes_its_pair():
    r = np.array([0.9, np.nan, 0.1, 0.4, 0.6, 0.2])
    c = coefficients(r)
    assert c[0] == 0 and c[1] == 0 and np.all(c[2:] != 0)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --data"):
        load_task("jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        load_task("jsonl", str(bad))
    with pytest.raises(ValueError, match="string 'prompt'"):
        load_task("jsonl", str(write_jsonl(tmp_path / "p.jsonl", [{"q": 1}] * 5)))
    with pytest.raises(ValueError, match="cannot load reward"):
        load_task("nosuchmodule:fn", str(write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "x"}] * 5)))


class FakeModel:
    """Renders an example as its prompt text and "generates" it in capitals (one at a time, through
    the driver's own generate_many)."""
    layout = EvalLayout()
    on_prompt = None
    generate_many = ModelDriver.generate_many

    def prompt_tokens(self, ex):
        return ex.prompt

    def generate(self, prompt, max_tokens):
        return prompt.upper()


def raising_reward(prompt, completion, example):
    raise KeyError("boom")


def nan_reward(prompt, completion, example):
    return float("nan")


def exact_reward(prompt, completion, example):
    return float(completion == prompt.upper())


def batch_reward(completions, prompts, examples):  # TRL's form: detected from its first parameter's name
    batch_reward.calls += 1
    return [float(c == p.upper()) for p, c in zip(prompts, completions)]


batch_reward.calls = 0


@qes_batch_reward
def short_batch_reward(c, p, e):  # marked by the decorator instead
    return [1.0]


def old_style_reward(prompts, completions, examples):
    return [0.0] * len(prompts)


old_style_reward.batched = True  # the order issue 24 shipped: refused, with the new one named


def length_reward(prompt, completion, example):
    return float(len(completion))


def test_a_batch_reward_is_called_once_per_batch(tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": f"P{i}"} for i in range(10)]))
    t = load_task(f"{__name__}:batch_reward", data)
    batch_reward.calls = 0
    assert t.rewards(FakeModel(), t.train_examples()).tolist() == [1.0] * len(t.train_examples())
    assert batch_reward.calls == 1
    short = load_task(f"{__name__}:short_batch_reward", data)
    with pytest.raises(RewardFailure, match="returned 1 rewards for a batch of 8"):
        short.rewards(FakeModel(), short.train_examples())
    with pytest.raises(ValueError, match=r"replaced by TRL's order: write fn\(completions, prompts, examples\)"):
        load_task(f"{__name__}:old_style_reward", data)


def test_several_rewards_sum_with_their_weights_and_each_mean_is_kept(tmp_path):
    from qes_edge.tasks import task_from_config
    from qes_edge.training.config import TrainConfig
    data = str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": f"P{i}"} for i in range(10)]))
    cfg = TrainConfig.from_options({"data": data, "rewards": [f"{__name__}:batch_reward",
                                                              f"{__name__}:length_reward=0.5"]})
    assert cfg.task == "reward" and cfg.rewards == [[f"{__name__}:batch_reward", 1.0],
                                                    [f"{__name__}:length_reward", 0.5]]
    cfg.validate()
    t = task_from_config(cfg)
    got = t.rewards(FakeModel(), t.train_examples())
    assert got.tolist() == [1.0 + 0.5 * 2] * 8  # "P0".."P9": exact (1) + half the length (2)
    assert t.last_parts == {f"{__name__}:batch_reward": 1.0, f"{__name__}:length_reward": 2.0}
    m = t.evaluate(FakeModel(), t.heldout_examples())
    assert m[f"reward {__name__}:length_reward"] == 2.0 and m["reward"] == 2.0
    bad = TrainConfig.from_options({"data": data, "task": "choice", "rewards": [f"{__name__}:batch_reward"]})
    with pytest.raises(ValueError, match="give it without --task"):
        bad.validate()
    nan = TrainConfig.from_options({"data": data, "rewards": [f"{__name__}:batch_reward", f"{__name__}:nan_reward"]})
    t = task_from_config(nan)
    with pytest.raises(RewardFailure, match="nan_reward: reward is nan"):
        t.rewards(FakeModel(), t.train_examples())


def test_callable_rewards_fail_loudly(tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": f"P{i}"} for i in range(10)]))
    ok = load_task(f"{__name__}:exact_reward", data)
    assert ok.rewards(FakeModel(), ok.train_examples()).tolist() == [1.0] * len(ok.train_examples())
    for fn, msg in (("raising_reward", "raised KeyError"), ("nan_reward", "reward is nan")):
        t = load_task(f"{__name__}:{fn}", data)
        with pytest.raises(RewardFailure, match=msg):
            t.rewards(FakeModel(), t.train_examples())
    exact = load_task("jsonl", data)
    assert exact.rewards(FakeModel(), exact.train_examples()).tolist() == [1.0] * len(exact.train_examples())


class LogitModel:
    """A fake model over a 10-token vocabulary: token 7 ("yes") has logit 2 after the prompt, every
    other 0; after token 4 ("N") the next token is 5 ("Y") or 6 ("D") with log-probabilities
    log 0.9 / log 0.1 ("New York" vs "New Delhi": one shared first token)."""
    VOCAB = {"yes": [7], "no": [3], "NY": [4, 5], "ND": [4, 6], "NYC": [4, 5, 8]}
    layout = EvalLayout()  # one at a time: the driver's own score() over the methods below
    on_prompt = None
    score = ModelDriver.score

    def tokenize(self, text, add_bos=True):
        return list(self.VOCAB[text.strip()])

    def prompt_logits(self, examples):
        for i, ex in enumerate(examples):
            out = np.zeros(10, np.float32)
            out[7] = 2.0
            yield i, [1, 2], out

    def continuation_logprobs(self, logits, tokens):
        from qes_edge.llama.driver import log_softmax
        lp = [log_softmax(logits)[tokens[0]]]
        for prev, t in zip(tokens, tokens[1:]):
            lp.append(np.log({5: 0.9, 6: 0.1}.get(t, 1.0)) if prev == 4 else np.log(0.5))
        return np.array(lp)


def test_choice_task_scores_by_logits(tmp_path):
    rows = [{"prompt": f"q{i}", "choices": [" yes", " no"], "answer": i % 2} for i in range(10)]
    t = load_task("choice", str(write_jsonl(tmp_path / "c.jsonl", rows)))
    p_yes = np.exp(2) / (np.exp(2) + 1)
    r = t.rewards(LogitModel(), t.train_examples())
    want = [p_yes if ex.meta["answer"] == 0 else 1 - p_yes for ex in t.train_examples()]
    assert np.allclose(r, want)
    m = t.evaluate(LogitModel(), t.heldout_examples())
    assert m["accuracy"] == np.mean([ex.meta["answer"] == 0 for ex in t.heldout_examples()])
    with pytest.raises(ValueError, match="c.jsonl|b.jsonl:1: 'answer' must be the index"):
        load_task("choice", str(write_jsonl(tmp_path / "b.jsonl", [{**rows[0], "answer": 5}] * 5)))


def test_choice_whole_answer_tells_shared_first_tokens_apart(tmp_path):
    """"NY" and "ND" share their first token: first-token scoring cannot tell them apart, the
    whole answer can; sum vs mean normalisation as documented."""
    rows = [{"prompt": f"q{i}", "choices": ["NY", "ND"], "answer": 0} for i in range(5)]
    data = str(write_jsonl(tmp_path / "ny.jsonl", rows))
    ex = load_task("choice", data).heldout_examples()
    first = load_task("choice", data, choice_norm="first")
    assert first.evaluate(LogitModel(), ex)["reward"] == 0.5
    p_n = -np.log(np.exp(2) + 9)  # log p of token 4 after the prompt (logit 0; token 7 has 2, the 8 others 0)
    for norm, score in (("sum", lambda lp: sum(lp)), ("mean", lambda lp: sum(lp) / len(lp))):
        t = load_task("choice", data, choice_norm=norm)
        s_ny, s_nd = score([p_n, np.log(0.9)]), score([p_n, np.log(0.1)])
        want = np.exp(s_ny) / (np.exp(s_ny) + np.exp(s_nd))
        got = t.evaluate(LogitModel(), ex)
        assert got["accuracy"] == 1.0 and np.isclose(got["reward"], want), (norm, got, want)
    # sum and mean differ when the choices differ in length: "NY" (2 tokens) vs "NYC" (3 tokens)
    rows = [{"prompt": f"q{i}", "choices": ["NY", "NYC"], "answer": 1} for i in range(5)]
    data = str(write_jsonl(tmp_path / "nyc.jsonl", rows))
    by = {}
    for n in ("sum", "mean"):
        t = load_task("choice", data, choice_norm=n)
        by[n] = t.evaluate(LogitModel(), t.heldout_examples())["reward"]
    assert by["sum"] < 0.5 < by["mean"]  # the extra token costs log 0.5 in total, raises the per-token mean
