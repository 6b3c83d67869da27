"""One full-parameter AdamW step of the GGUF model's architecture in PyTorch on the CPU: the FP16/
FP32 fine-tuning baseline that bench_memory.py compares QES with.  The weights are dequantized
from the GGUF (gguf.quants), the step is forward + backward + AdamW over n_ctx tokens."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGUFReader
from gguf.quants import dequantize

from qes_edge.models import default_model_path


def _meta(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]].tolist()[0]


def load_weights(path, dtype):
    r = GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    cfg = {k: _meta(r, f"{arch}.{k}") for k in ("block_count", "embedding_length", "attention.head_count",
                                                 "attention.head_count_kv", "feed_forward_length")}
    params = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
        params[t.name] = torch.nn.Parameter(torch.from_numpy(w).to(dtype))
    return cfg, params


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, theta=100000.0):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def forward(cfg, p, tokens):
    n_h, n_kv = cfg["attention.head_count"], cfg["attention.head_count_kv"]
    emb = p["token_embd.weight"]
    x = emb[tokens]
    T, D = x.shape
    hd = D // n_h
    pos = torch.arange(T)
    for i in range(cfg["block_count"]):
        b = f"blk.{i}."
        h = rms(x, p[b + "attn_norm.weight"])
        q = (h @ p[b + "attn_q.weight"].T).view(T, n_h, hd).transpose(0, 1)
        k = (h @ p[b + "attn_k.weight"].T).view(T, n_kv, hd).transpose(0, 1)
        v = (h @ p[b + "attn_v.weight"].T).view(T, n_kv, hd).transpose(0, 1)
        q, k = rope(q, pos), rope(k, pos)
        k, v = k.repeat_interleave(n_h // n_kv, 0), v.repeat_interleave(n_h // n_kv, 0)
        a = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
        x = x + a.transpose(0, 1).reshape(T, D) @ p[b + "attn_output.weight"].T
        h = rms(x, p[b + "ffn_norm.weight"])
        x = x + (F.silu(h @ p[b + "ffn_gate.weight"].T) * (h @ p[b + "ffn_up.weight"].T)) @ p[b + "ffn_down.weight"].T
    x = rms(x, p["output_norm.weight"])
    return x @ p.get("output.weight", emb).T


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
