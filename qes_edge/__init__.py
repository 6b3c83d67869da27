"""qes-edge: fine-tune GGUF-quantized LLMs in place with Quantized Evolution Strategies."""

__version__ = "0.1.0"

# before anything can load llama.cpp: its OpenMP threads wait passively (see threads.py)
from qes_edge import threads as _threads  # noqa: E402,F401


def batch_reward(fn):
    """Mark a reward function as TRL's batch form, fn(completions, prompts, examples) -> one number
    per completion (tasks/rewards.py; a first parameter named `completions` is detected as well)."""
    fn.qes_batch_reward = True
    return fn
