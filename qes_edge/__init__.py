"""qes-edge: fine-tune GGUF-quantized LLMs in place with Quantized Evolution Strategies."""

__version__ = "0.1.0"

# before anything can load llama.cpp: its OpenMP threads wait passively (see threads.py)
from qes_edge import threads as _threads  # noqa: E402,F401


def __getattr__(name):
    """`from qes_edge import batch_reward` (tasks/rewards.py), loaded when asked for."""
    if name == "batch_reward":
        from qes_edge.tasks.rewards import batch_reward
        return batch_reward
    raise AttributeError(f"module 'qes_edge' has no attribute {name!r}")
