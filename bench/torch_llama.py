"""The fp16 baseline for the decoder benchmarks: a plain-PyTorch Llama (nn.Linear,
F.scaled_dot_product_attention, no lathe op) with the same static KV cache and the same
CUDA-graphed decode step as lathe's adapter (lathe.models.static_cache), so a speed-up is
lathe's kernels, not a better decode loop. Loads a Hugging Face Llama checkpoint's
safetensors straight to the device in the given dtype."""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.models.llama import apply_rotary, rope_theta, rotary
from lathe.models.static_cache import StaticKVCache


class _RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        self.H, self.Hkv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        self.D = c.get("head_dim") or h // self.H
        self.wqkv = nn.Linear(h, (self.H + 2 * self.Hkv) * self.D, bias=False)  # fused, as gpt-fast
        self.wo = nn.Linear(self.H * self.D, h, bias=False)
        self.w13 = nn.Linear(h, 2 * i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)
        eps = c.get("rms_norm_eps", 1e-6)
        self.norm1, self.norm2 = _RMSNorm(h, eps), _RMSNorm(h, eps)
        self.kv_cache = None

    def forward(self, x, cos, sin, input_pos, mask, end):
        B, S, _ = x.shape
        q, k, v = self.wqkv(self.norm1(x)).split([self.H * self.D, self.Hkv * self.D, self.Hkv * self.D], -1)
        q = apply_rotary(q.view(B, S, self.H, self.D).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(B, S, self.Hkv, self.D).transpose(1, 2), cos, sin)
        kc, vc = self.kv_cache.update(input_pos, k, v.view(B, S, self.Hkv, self.D).transpose(1, 2))
        gqa = self.H != self.Hkv
        if mask is not None:  # decode: every cached key up to the position
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask[:, None, None, :], enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], is_causal=True, enable_gqa=gqa)
        x = x + self.wo(o.transpose(1, 2).reshape(B, S, -1))
        g, u = self.w13(self.norm2(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(g) * u)


class TorchLlama(nn.Module):
    """setup_static_cache / forward_static as lathe.models.llama.LlamaForCausalLM (prefill
    from position 0 with start=0, one-token decode steps with start=None)."""

    def __init__(self, config: dict):
        super().__init__()
        c = config
        self.config = c
        self.embed = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = _RMSNorm(c["hidden_size"], c.get("rms_norm_eps", 1e-6))
        self.tied = bool(c.get("tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.theta = rope_theta(c)

    @classmethod
    def load(cls, path, device="cuda", dtype=torch.float16):
        import json
        from pathlib import Path

        from safetensors import safe_open

        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        t = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt", device=str(device)) as fh:
                t.update({k: fh.get_tensor(k).to(dtype) for k in fh.keys()})
        sd = {"embed.weight": t["model.embed_tokens.weight"], "norm.weight": t["model.norm.weight"]}
        if not cfg.get("tie_word_embeddings", False):
            sd["lm_head.weight"] = t["lm_head.weight"]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            sd[f"blocks.{i}.wqkv.weight"] = torch.cat([t[a + n + ".weight"] for n in ("q_proj", "k_proj", "v_proj")])
            sd[f"blocks.{i}.wo.weight"] = t[a + "o_proj.weight"]
            sd[f"blocks.{i}.w13.weight"] = torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]])
            sd[f"blocks.{i}.w2.weight"] = t[p + "mlp.down_proj.weight"]
            sd[f"blocks.{i}.norm1.weight"] = t[p + "input_layernorm.weight"]
            sd[f"blocks.{i}.norm2.weight"] = t[p + "post_attention_layernorm.weight"]
        with torch.device("meta"):
            m = cls(cfg)
        m.load_state_dict(sd, assign=True, strict=True)
        return m.eval()

    def setup_static_cache(self, batch: int, max_len: int, dtype=None, device=None):
        w = self.embed.weight
        dtype, device = dtype or w.dtype, device or w.device
        for b in self.blocks:
            b.kv_cache = StaticKVCache(batch, b.Hkv, max_len, b.D, dtype, device)
        pos = torch.arange(max_len, device=device)
        cos, sin = rotary(self.blocks[0].D, self.theta, pos[None], dtype)
        self.register_buffer("rope_cos", cos[0], persistent=False)
        self.register_buffer("rope_sin", sin[0], persistent=False)
        self.register_buffer("cache_positions", pos, persistent=False)
        self.max_len = max_len
        return self

    def forward_static(self, input_ids, input_pos, start: int | None = None):
        B, S = input_ids.shape
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[input_pos][None], self.rope_sin[input_pos][None]
        mask = None if start is not None else self.cache_positions.expand(B, -1) <= input_pos
        end = self.max_len if start is None else start + S
        for b in self.blocks:
            x = b(x, cos, sin, input_pos, mask, end)
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.tied else self.lm_head(x)

    def forward(self, input_ids, attention_mask=None):
        """Full-sequence logits (perplexity): a fresh static cache of the input's length."""
        B, S = input_ids.shape
        self.setup_static_cache(B, S)
        return self.forward_static(input_ids, torch.arange(S, device=input_ids.device), start=0)


