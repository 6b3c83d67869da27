"""The GGUF model's architecture (llama) in PyTorch on the CPU, for the backprop baselines:
bench_memory.py's one full-parameter AdamW step and vs_backprop.py's LoRA and full fine-tuning.

The weights are dequantized from the GGUF (gguf.quants).  The forward pass follows llama.cpp's
llama graph: RMS norm with the file's epsilon, RoPE with the file's base frequency rotating
*adjacent* pairs of each head's dimensions (llama.cpp's "normal" RoPE: the GGUF converter permutes
Q and K for it, so the HF "rotate half" would be wrong here), grouped-query attention, SwiGLU, and
the output projection tied to the token embedding when the file has no output.weight.
vs_backprop.py checks it against llama.cpp's own scores on the base model before it trains."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from gguf import GGUFReader
from gguf.quants import dequantize

from qes_edge.gguf.models import default_model_path

# the projections LoRA adapts ("attention and MLP projections")
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def read_config(reader) -> dict:
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise SystemExit(f"torch_llama implements the llama architecture; this file is {arch!r}")
    get = lambda k, d=None: reader.fields[f"{arch}.{k}"].contents() if f"{arch}.{k}" in reader.fields else d
    return {"block_count": get("block_count"), "embedding_length": get("embedding_length"),
            "attention.head_count": get("attention.head_count"),
            "attention.head_count_kv": get("attention.head_count_kv"),
            "feed_forward_length": get("feed_forward_length"),
            "rope.freq_base": float(get("rope.freq_base", 10000.0)),
            "rms_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5))}


def load_weights(path, dtype=torch.float32, requires_grad: bool = True):
    """(config, {tensor name: Parameter}) with every tensor of the GGUF dequantized to dtype."""
    r = GGUFReader(path)
    cfg = read_config(r)
    params = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
        params[t.name] = torch.nn.Parameter(torch.from_numpy(w).to(dtype), requires_grad=requires_grad)
    return cfg, params


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    """llama.cpp's normal RoPE over x [B, heads, T, d]: dims (2i, 2i+1) rotated by pos·θ^(-2i/d)."""
    T, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


class Lora:
    """Low-rank adapters B·A (B zero at the start) on PROJECTIONS, scaled by alpha/rank."""

    def __init__(self, params, rank: int, alpha: float, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.scale = alpha / rank
        self.ab = {}
        for name, w in params.items():
            if name.split(".")[-2] in PROJECTIONS:
                out_f, in_f = w.shape
                a = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
                self.ab[name] = (torch.nn.Parameter(a), torch.nn.Parameter(torch.zeros(out_f, rank)))

    def parameters(self):
        return [p for ab in self.ab.values() for p in ab]

    def merged(self, params) -> dict:
        """The base weights with every adapter folded in (what a user deploys)."""
        with torch.no_grad():
            return {n: (w + self.scale * self.ab[n][1] @ self.ab[n][0]) if n in self.ab else w.detach()
                    for n, w in params.items()}


def forward(cfg, p, tokens, lora: Lora | None = None, rows=None, checkpoint: bool = False):
    """Logits [B, T, vocab] for tokens [B, T] (or [T]: [T, vocab]), causal; right padding is harmless
    (no real position attends to a later one).  rows = (batch indices, positions): the logits at
    those positions only, [N, vocab] (the output projection of the vocabulary is most of the memory
    of a step over a whole batch; a loss needs it where the answer is).  checkpoint: keep only each
    block's input for the backward pass and recompute the block (gradient checkpointing: about a
    third more compute, the activations of one block instead of all of them)."""
    single = tokens.dim() == 1
    if single:
        tokens = tokens[None]
    n_h, n_kv, eps, theta = (cfg["attention.head_count"], cfg["attention.head_count_kv"], cfg["rms_eps"],
                             cfg["rope.freq_base"])

    def lin(h, name):
        y = h @ p[name].T
        if lora is not None and name in lora.ab:
            a, b = lora.ab[name]
            y = y + lora.scale * ((h @ a.T) @ b.T)
        return y

    def block(x, i):
        B, T, D = x.shape
        hd = D // n_h
        b = f"blk.{i}."
        h = rms(x, p[b + "attn_norm.weight"], eps)
        q = lin(h, b + "attn_q.weight").view(B, T, n_h, hd).transpose(1, 2)
        k = lin(h, b + "attn_k.weight").view(B, T, n_kv, hd).transpose(1, 2)
        v = lin(h, b + "attn_v.weight").view(B, T, n_kv, hd).transpose(1, 2)
        q, k = rope(q, theta), rope(k, theta)
        k, v = k.repeat_interleave(n_h // n_kv, 1), v.repeat_interleave(n_h // n_kv, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + lin(a.transpose(1, 2).reshape(B, T, D), b + "attn_output.weight")
        h = rms(x, p[b + "ffn_norm.weight"], eps)
        return x + lin(F.silu(lin(h, b + "ffn_gate.weight")) * lin(h, b + "ffn_up.weight"), b + "ffn_down.weight")

    emb = p["token_embd.weight"]
    x = emb[tokens]
    for i in range(cfg["block_count"]):
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, i, use_reentrant=False)
        else:
            x = block(x, i)
    x = rms(x, p["output_norm.weight"], eps)
    if rows is not None:
        return x[rows[0], rows[1]] @ p.get("output.weight", emb).T
    out = x @ p.get("output.weight", emb).T
    return out[0] if single else out


def adamw_step(n_ctx, dtype, peak_rss_mb):
    torch.set_num_threads(2)
    cfg, p = load_weights(default_model_path(), dtype)
    opt = torch.optim.AdamW(p.values(), lr=1e-5)
    tokens = torch.randint(0, p["token_embd.weight"].shape[0], (n_ctx + 1,))
    logits = forward(cfg, p, tokens[:-1])
    loss = F.cross_entropy(logits.float(), tokens[1:])
    loss.backward()
    opt.step()
    n = sum(v.numel() for v in p.values())
    return {"peak_rss_mb": peak_rss_mb(), "params": n, "loss": float(loss), "dtype": str(dtype)}
