"""qes-edge: fine-tune GGUF-quantized LLMs in place with Quantized Evolution Strategies."""

__version__ = "0.1.0"
