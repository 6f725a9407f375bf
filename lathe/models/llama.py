"""Llama-architecture decoders (LlamaForCausalLM: Llama 2/3, TinyLlama, SmolLM, lathe's own
decoder-lm, ...) built from plain modules whose names match the Hugging Face checkpoint, so
its safetensors load with `assign=True` and compress passes can swap `nn.Linear` for lathe's
quantized modules.

- GQA (num_key_value_heads < num_attention_heads), RMSNorm, rotary position embeddings
  (rope_theta, "default" rope only), SiLU-gated MLP, tie_word_embeddings.
- Attention runs through `torch.ops.lathe.attention(..., causal=True)`, so the dispatcher picks
  the kernel. That op has no autograd formula, so in training mode with grad enabled (and
  only then) the same attention is computed by F.scaled_dot_product_attention instead.
- forward(input_ids, attention_mask=None, past_key_values=None, use_cache=False) returns the
  logits [B, S, vocab], or (logits, cache) when use_cache; the cache is a plain list, one
  (k, v) a layer, each [B, kv_heads, S_total, head_dim] with rotary already applied.
- Nothing is created in __init__ but parameters, so the model builds on the meta device; the
  rotary tables are computed in forward on the input's device.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import lathe.kernels  # noqa: F401  (registers torch.ops.lathe.*)
from lathe.errors import BadInput
from lathe.models.base import ModelAdapter, TokenizerSettings


def rope_theta(c: dict) -> float:
    """rope_theta from a transformers 4.x config (top level) or 5.x one (rope_parameters)."""
    rp = c.get("rope_parameters") or {}
    rs = c.get("rope_scaling") or {}
    kind = rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default"
    if kind != "default":
        raise BadInput(f"unsupported rope_type {kind!r} in config.json (lathe supports 'default')")
    return float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rotary(head_dim: int, theta: float, positions: torch.Tensor, dtype):
    """cos, sin [B, S, head_dim] for integer positions [B, S] (transformers' formula: fp32
    tables, halves concatenated, used with rotate_half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x [B, H, S, D]; cos/sin [B, S, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


def _train_attention(q, k, v, key_padding_mask, scale):
    """The same causal attention as torch.ops.lathe.attention, differentiable (training only)."""
    Sq, Sk = q.shape[2], k.shape[2]
    mask = None
    if key_padding_mask is not None or Sq != Sk:
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, None, :].bool()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class LlamaAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c["hidden_size"]
        self.num_heads = c["num_attention_heads"]
        self.num_kv_heads = c.get("num_key_value_heads") or self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise BadInput(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                           f"num_key_value_heads ({self.num_kv_heads}) in config.json")
        self.head_dim = c.get("head_dim") or h // self.num_heads
        bias = bool(c.get("attention_bias", False))
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)

    def _qkv(self, x, cos, sin):
        """q [B, Hq, S, D], k/v [B, Hkv, S, D], rotary applied to q and k."""
        B, S, _ = x.shape
        D = self.head_dim
        if hasattr(self, "qkv_proj"):  # one GEMM instead of three (see fuse_qkv)
            q, k, v = self.qkv_proj(x).split(
                [self.num_heads * D, self.num_kv_heads * D, self.num_kv_heads * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rotary(q.view(B, S, -1, D).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(B, S, -1, D).transpose(1, 2), cos, sin)
        return q, k, v.view(B, S, -1, D).transpose(1, 2)

    def forward(self, x, cos, sin, key_padding_mask, past=None):
        B, S, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.training and torch.is_grad_enabled():
            o = _train_attention(q, k, v, key_padding_mask, scale)
        else:
            o = torch.ops.lathe.attention(q, k, v, key_padding_mask, True, scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1)), (k, v)

    def forward_static(self, x, cos, sin, input_pos, decode_mask, end: int):
        """The static-cache path (see LlamaForCausalLM.forward_static): k/v written into
        self.kv_cache at input_pos; one token (decode_mask [B, max_len]) attends to every
        cached key up to its position, a prefill chunk causally to keys 0..end."""
        B, S, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        kc, vc = self.kv_cache.update(input_pos, k, v)
        scale = 1.0 / math.sqrt(self.head_dim)
        if decode_mask is not None:
            o = torch.ops.lathe.attention(q, kc, vc, decode_mask, False, scale)
        else:
            o = torch.ops.lathe.attention(q, kc[:, :, :end], vc[:, :, :end], None, True, scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))

    def fuse_qkv(self):
        """Replace q/k/v_proj by one module of concatenated output channels (see
        lathe.models.bert.SelfAttention.fuse_qkv; exact)."""
        from lathe.models.bert import _concat_linear

        parts = [self.q_proj, self.k_proj, self.v_proj]
        self.qkv_proj = type(parts[0]).concat(parts) if hasattr(type(parts[0]), "concat") \
            else _concat_linear(parts)
        del self.q_proj, self.k_proj, self.v_proj


class LlamaMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        act = c.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise BadInput(f"unsupported hidden_act {act!r} in config.json (Llama uses silu)")
        bias = bool(c.get("mlp_bias", False))
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        eps = c.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], eps)

    def forward(self, x, cos, sin, key_padding_mask, past=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, key_padding_mask, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv

    def forward_static(self, x, cos, sin, input_pos, decode_mask, end: int):
        x = x + self.self_attn.forward_static(self.input_layernorm(x), cos, sin, input_pos,
                                              decode_mask, end)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(LlamaDecoderLayer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c.get("rms_norm_eps", 1e-6))


class LlamaForCausalLM(nn.Module, ModelAdapter):
    """forward(input_ids, attention_mask=None, past_key_values=None, use_cache=False,
    position_ids=None) -> logits [B, S, vocab] (float, the lm_head's dtype), or
    (logits, cache) when use_cache.

    attention_mask [B, past + S] (1 = real token) masks padded keys. Positions default to
    past + arange(S), as transformers does without position_ids; pass position_ids [B, S] for
    left-padded batches. token_type_ids is accepted and ignored, so lathe's generic
    calibration batches (lathe.text.batches) can be fed as model(**batch).
    """

    # The model-adapter protocol (lathe.models.base).
    family, is_decoder, blocks_path, style = "llama", True, "model.layers", "Llama-style"
    hf_class, hf_output = "LlamaForCausalLM", "logits"
    tokenizer = TokenizerSettings(eot="<|endoftext|>")
    # Where structured pruning (lathe.compress.structured) finds heads and FFN neurons, per block.
    prune_spec = {"blocks": "model.layers", "attention": "self_attn", "q": "self_attn.q_proj",
                  "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                  "ffn_in": ("mlp.gate_proj", "mlp.up_proj"), "ffn_out": "mlp.down_proj"}

    def __init__(self, config: dict):
        super().__init__()
        self.take_config(config)
        self.model = LlamaModel(config)
        self.tied = bool(config.get("tie_word_embeddings", False))
        if not self.tied:
            self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        att = self.model.layers[0].self_attn if len(self.model.layers) else None
        self.head_dim = att.head_dim if att is not None else 1
        self.rope_theta = rope_theta(config)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False,
                position_ids=None, token_type_ids=None):
        B, S = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past_len + S):
                raise BadInput(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                               f"{(B, past_len + S)} (past {past_len} + new {S} tokens)")
            key_padding_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + S, device=input_ids.device)[None].expand(B, S)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary(self.head_dim, self.rope_theta, position_ids, x.dtype)
        cache = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, key_padding_mask,
                          past_key_values[i] if past_key_values else None)
            if use_cache:
                cache.append(kv)
        x = self.model.norm(x)
        logits = F.linear(x, self.model.embed_tokens.weight) if self.tied else self.lm_head(x)
        return (logits, cache) if use_cache else logits

    # ------------------------------------------------------------------ static KV cache
    def setup_static_cache(self, batch: int, max_len: int, dtype=None, device=None):
        """Preallocate every layer's KV cache [batch, kv_heads, max_len, head_dim] and the
        rotary tables for positions 0..max_len-1 (gpt-fast style), in the activation dtype
        (default: the embedding's) on the model's device. Then forward_static runs without
        allocating anything whose size depends on the position, so a decode step can be
        captured in a CUDA graph (lathe.models.static_cache.GraphedStep)."""
        from lathe.models.static_cache import StaticKVCache

        w = self.model.embed_tokens.weight
        dtype, device = dtype or w.dtype, device or w.device
        for layer in self.model.layers:
            a = layer.self_attn
            a.kv_cache = StaticKVCache(batch, a.num_kv_heads, max_len, a.head_dim, dtype, device)
        pos = torch.arange(max_len, device=device)
        cos, sin = rotary(self.head_dim, self.rope_theta, pos[None], dtype)
        self.register_buffer("rope_cos", cos[0], persistent=False)
        self.register_buffer("rope_sin", sin[0], persistent=False)
        self.register_buffer("cache_positions", pos, persistent=False)
        self.static_batch, self.max_len = batch, max_len
        return self

    def forward_static(self, input_ids, input_pos, start: int | None = None):
        """Logits [B, S, vocab] through the static cache (setup_static_cache first).

        input_pos int64 [S]: the tokens' positions, shared by every row. start=None is a decode
        step (S = 1): capture-safe, the attention masks keys beyond input_pos on the device.
        start=int is a prefill chunk at positions start..start+S-1 (not captured: the
        attended key range start+S is a Python int)."""
        B, S = input_ids.shape
        if not hasattr(self, "rope_cos"):
            raise BadInput("forward_static needs setup_static_cache(batch, max_len) first")
        if B != self.static_batch:
            raise BadInput(f"the static cache holds {self.static_batch} rows, the input has {B}")
        if start is None and S != 1:
            raise BadInput(f"a decode step takes one token a row, got {S}; pass start= for a prefill chunk")
        if start is not None and start + S > self.max_len:
            raise BadInput(f"positions {start}..{start + S - 1} pass the static cache's max_len {self.max_len}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_cos[input_pos][None], self.rope_sin[input_pos][None]
        mask = None
        if start is None:  # [B, max_len]: keys at or before the position are real
            mask = self.cache_positions.expand(B, -1) <= input_pos
        end = self.max_len if start is None else start + S
        for layer in self.model.layers:
            x = layer.forward_static(x, cos, sin, input_pos, mask, end)
        x = self.model.norm(x)
        return F.linear(x, self.model.embed_tokens.weight) if self.tied else self.lm_head(x)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, eos_token_id=None):
        """Greedy decoding with the KV cache (unpadded input_ids [B, S])."""
        logits, cache = self(input_ids, use_cache=True)
        out = [input_ids]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            logits, cache = self(nxt, past_key_values=cache, use_cache=True)
        return torch.cat(out, dim=1)

    def _fixed_groups(self):
        for i, _ in enumerate(self.model.layers):
            p = f"model.layers.{i}"
            yield f"{p}.self_attn", [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
            yield f"{p}.self_attn.o_proj", [f"{p}.self_attn.o_proj"]
            yield f"{p}.mlp", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
            yield f"{p}.mlp.down_proj", [f"{p}.mlp.down_proj"]
        if not self.tied:
            yield "lm_head", ["lm_head"]
