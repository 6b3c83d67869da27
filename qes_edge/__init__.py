"""qes-edge: fine-tune GGUF-quantized LLMs in place with Quantized Evolution Strategies."""

__version__ = "0.1.0"

# before anything can load llama.cpp: its OpenMP threads wait passively (see threads.py)
from qes_edge import threads as _threads  # noqa: E402,F401
