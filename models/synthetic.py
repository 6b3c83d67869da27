"""A small llama-architecture GGUF with random weights, written with the gguf package: for the
machines the default model cannot travel to (scripts/test_gpu.sh: 64 MiB of working tree and no
package registry) and for tests of placement and bit-identity, which need a real llama.cpp model,
not a sensible one.  A byte-level SentencePiece vocabulary (every text tokenizes, no merges), no
chat template (train it with --raw-prompt), the trainable tensors in Q4_0, Q4_1, Q5_0 and Q8_0.

    python models/synthetic.py OUT.gguf [--layers 4] [--embd 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TYPES = ("Q4_0", "Q8_0", "Q4_1", "Q5_0")  # cycled over the trainable tensors


def write_synthetic(out: str | Path, n_layer: int = 4, n_embd: int = 256, n_ff: int = 512, n_head: int = 4,
                    n_head_kv: int = 2, seed: int = 0) -> Path:
    import gguf
    from gguf.constants import GGMLQuantizationType as T
    from gguf.quants import quantize

    out = Path(out)
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("qes-edge synthetic llama")
    w.add_block_count(n_layer)
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(2)  # mostly Q4_0
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def dense(shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", dense((n_vocab, n_embd), 0.5).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    k = 0
    head_dim = n_embd // n_head
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        for name, shape in (("attn_q", (n_embd, n_embd)), ("attn_k", (n_head_kv * head_dim, n_embd)),
                            ("attn_v", (n_head_kv * head_dim, n_embd)), ("attn_output", (n_embd, n_embd)),
                            ("ffn_gate", (n_ff, n_embd)), ("ffn_up", (n_ff, n_embd)), ("ffn_down", (n_embd, n_ff))):
            qt = T[TYPES[k % len(TYPES)]]
            k += 1
            x = dense(shape, 1.0 / np.sqrt(shape[1]))
            w.add_tensor(f"blk.{i}.{name}.weight", quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    a = ap.parse_args()
    p = write_synthetic(a.out, a.layers, a.embd, 2 * a.embd)
    print(f"wrote {p} ({p.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
