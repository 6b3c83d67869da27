"""A run's configuration: every option that decides the bits, its checks, and its record in the
ledger (old records read with the defaults they were written under)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from qes_edge.native.fixed_point import COEF_BOUND_Q16, DEFAULT_CLAMP_Q16, beta_to_q14, coefs_to_q16
from qes_edge.native.types import DEFAULT_FROZEN
from qes_edge.training.coefficients import DEFAULT_SCHEME, MEAN_ABS_BOUND, SCHEMES

# the engine (libqes) and the tasks are imported where a config is checked or recorded: the
# command line reads the defaults below for its options without loading them

MAX_POPULATION = 4096
MAX_WINDOW = 1000
MIN_CTX = 64        # the shortest built-in prompt with its chat template is about 40 tokens
MAX_CTX = 1 << 20


#: the tasks that generate completions: batching their greedy decoding is 1.35x faster on a CPU
GENERATION_TASKS = ("jsonl", "countdown", "reward")


def default_eval_batch(task: str) -> int:
    """--eval-batch when none is given: 8 prompts a decode for the tasks that generate (their
    decoding is memory-bound, 1.35x faster batched on a CPU), 1 for the tasks scored by logits
    (sentiment, choice: compute-bound, at most 8% faster batched, for about 7 MB more: the peak
    then stays at 1.09x plain inference's).  benchmarks/bench_eval.py measured both."""
    return 8 if task in GENERATION_TASKS or ":" in task else 1


@dataclass
class TrainConfig:
    task: str = "sentiment"
    data: str | None = None
    population: int = 16
    sigma: float = 0.01
    alpha: float = 0.001
    beta: float = 0.9
    window: int = 50
    error_feedback: bool = True
    residual: str = "replay"          # "replay" (seed replay) or "stored" (int32 per code)
    anti_windup: bool = True
    coef_scheme: str = DEFAULT_SCHEME   # coefficients.py: "pairs" (new runs), "pairs-rank", "zscore", "rank"
    coef_clip: float = 3.0
    batch: int = 24
    balance: bool = True              # class-balanced batches when the task has classes
    seed: int = 0
    n_ctx: int = 512
    frozen: list = field(default_factory=lambda: list(DEFAULT_FROZEN))
    derive: int = 2                   # member seeds and batches: 2 = derive.py (spec), 1 = NumPy (old ledgers)
    raw_prompt: bool = False          # prompts as given, without the model's chat template
    choice_norm: str = "mean"         # choice task: "mean" or "sum" log-probability per choice ("first": old runs)
    rewards: list = field(default_factory=list)  # [[module:function, weight], ...]: --reward (task "reward")
    split: str = "fixed"              # held out: "fixed" (20% of the data file) or "valid" (a data folder's valid.jsonl)
    # the evaluation layout (llama/batched.py): llama.cpp's bits depend on it, so it is recorded
    eval_batch: int = 0               # prompts per decode; 1: one at a time (runs before it); 0 (not
                                      # given): by task, default_eval_batch (recorded resolved)
    n_batch: int = 512                # tokens per llama_decode
    n_ubatch: int = 512               # tokens per compute graph
    kv_type: str = "f16"              # KV cache element type

    def __post_init__(self):
        if not self.eval_batch:
            self.eval_batch = default_eval_batch("reward" if self.rewards else self.task)

    def eval_layout(self):
        from qes_edge.llama.batched import EvalLayout
        return EvalLayout(self.eval_batch, self.n_batch, self.n_ubatch, self.kv_type)

    def validate(self) -> None:
        """Every check that can be made before any work (model load, evaluation, forward passes),
        including the bound the C library enforces on a step's coefficients."""
        from qes_edge.native.engine import sigma_threshold
        from qes_edge.tasks.base import CHOICE_NORMS
        self.eval_layout().check()
        if self.rewards and self.task != "reward":
            raise ValueError(f"--reward scores the completions of --data's prompts: give it without --task "
                             f"(it is task 'reward'), not with --task {self.task}")
        from qes_edge.tasks.data import SPLITS
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not isinstance(self.raw_prompt, bool):
            raise ValueError(f"raw_prompt must be true or false, got {self.raw_prompt!r}")
        if self.choice_norm not in CHOICE_NORMS:
            raise ValueError(f"choice_norm must be 'mean' or 'sum' (or 'first', the first token only, as runs "
                             f"before whole-answer scoring), got {self.choice_norm!r}")
        if self.population < 2 or self.population % 2:
            raise ValueError(f"population must be an even number >= 2 (mirrored pairs), got {self.population}")
        if self.population > MAX_POPULATION:
            raise ValueError(f"population {self.population} is above the supported {MAX_POPULATION}")
        if self.residual not in ("replay", "stored"):
            raise ValueError(f"residual must be 'replay' or 'stored', got {self.residual!r}")
        if not 0 <= self.window <= MAX_WINDOW:
            raise ValueError(f"window must be in [0, {MAX_WINDOW}], got {self.window}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not MIN_CTX <= self.n_ctx <= MAX_CTX:
            raise ValueError(f"n_ctx must be in [{MIN_CTX}, {MAX_CTX}] tokens, got {self.n_ctx}")
        if self.coef_scheme not in SCHEMES:
            raise ValueError(f"coefficient scheme must be one of {', '.join(SCHEMES)}, got {self.coef_scheme!r}")
        if not (math.isfinite(self.coef_clip) and self.coef_clip > 0):
            raise ValueError(f"coefficient clip must be finite and > 0, got {self.coef_clip!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be finite and > 0, got {self.alpha!r}")
        beta_to_q14(self.beta)  # finite, in [0, 1]
        sigma_threshold(self.sigma)
        # the largest sum of |c_i| a step can have: z-scores (of members or of pair differences)
        # have sum(z^2) = n, so sum|z| <= n (clipping only lowers it); pair weights are within
        # +-1, centered ranks within +-0.5.  Each q_i rounds by <= 1/2.
        sum_c = self.population * MEAN_ABS_BOUND[self.coef_scheme]
        total = math.ceil(sum_c * (self.alpha / self.sigma) * 65536 + self.population / 2)
        coefs_to_q16([min(self.coef_clip, sum_c)], self.alpha, self.sigma)  # one coefficient's own bound
        if total > COEF_BOUND_Q16:
            raise ValueError(f"alpha {self.alpha} / sigma {self.sigma} is too large for population {self.population}: "
                             f"a step's coefficients could sum to {total:,} in Q16, above the engine's bound of 2^30 "
                             f"({COEF_BOUND_Q16:,}); lower alpha or the population, or raise sigma")

    def record(self) -> dict:
        """Everything that decides the bits, as stored in the ledger."""
        from qes_edge import __version__
        from qes_edge.native import binding as _native
        from qes_edge.native.engine import sigma_threshold
        d = asdict(self)
        d.update(threshold=sigma_threshold(self.sigma), clamp_q16=DEFAULT_CLAMP_Q16,
                 noise_spec=_native.lib.qes_noise_spec_version(), engine=__version__)
        return d

    @classmethod
    def from_options(cls, options: dict) -> "TrainConfig":
        """The config that `train`'s options ask for (`queue add` takes the same): the fields named
        in options, the others at their defaults; any other option (steps, ledger, threads...) is
        not the config's and is ignored."""
        d = {k: v for k, v in options.items() if k in cls.__dataclass_fields__}
        if d.get("rewards"):  # --reward a:f[=w], repeated: the task is their weighted sum
            from qes_edge.tasks.rewards import parse_reward
            d["rewards"] = [list(parse_reward(x)) if isinstance(x, str) else list(x) for x in d["rewards"]]
            if d.get("task", cls.task) == cls.task:
                d["task"] = "reward"
        elif "rewards" in d:
            d["rewards"] = []
        if d.get("eval_batch") is None:  # not given: by task (__post_init__, default_eval_batch)
            d.pop("eval_batch", None)
        if d.get("data") is not None:
            d["data"] = str(d["data"])
            if "split" not in d:  # a data folder with valid.jsonl holds it out; else a fixed 20%
                from qes_edge.tasks.data import data_files
                try:
                    d["split"] = data_files(d["data"]).default_split()
                except ValueError:
                    pass  # the task says what is wrong with the data, where it is read
        return cls(**d)

    @classmethod
    def from_record(cls, d: dict) -> "TrainConfig":
        # ledgers written before balanced batches drew them at random, and before derive 2 with NumPy;
        # before chat templates every prompt but sentiment's and countdown's went in raw (those two
        # wrote ChatML by hand: the template renders sentiment's byte for byte, countdown's with the
        # model's default system turn), and choices were scored by their first token
        old_raw = d.get("task") not in ("sentiment", "countdown")
        old_norm = "first" if d.get("task") == "choice" else "mean"
        d = {"balance": False, "derive": 1, "raw_prompt": old_raw, "choice_norm": old_norm, "coef_scheme": "zscore",
             "eval_batch": 1, **d}  # and member z-scores, before pair differences; one prompt a decode
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
