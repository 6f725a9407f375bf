"""BERT-style encoders (BertModel: MiniLM, BERT, ...) built from plain modules whose names
match the Hugging Face checkpoint, so its safetensors load with `assign=True` and compress
passes can swap `nn.Linear` for lathe's quantized modules. Attention runs through
`torch.ops.lathe.attention`, so the dispatcher picks the kernel."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import lathe.kernels  # noqa: F401  (registers torch.ops.lathe.*)
from lathe.errors import BadInput
from lathe.models.base import ModelAdapter, mean_pool  # noqa: F401  (mean_pool re-exported)


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = nn.Embedding(c.get("max_position_embeddings", 512), c["hidden_size"])
        self.token_type_embeddings = nn.Embedding(c.get("type_vocab_size", 2), c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c.get("layer_norm_eps", 1e-12))

    def forward(self, input_ids, token_type_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c["hidden_size"]
        self.num_heads = c["num_attention_heads"]
        self.head_dim = c.get("head_dim", h // self.num_heads)
        inner = self.num_heads * self.head_dim
        self.query = nn.Linear(h, inner)
        self.key = nn.Linear(h, inner)
        self.value = nn.Linear(h, inner)

    def forward(self, x, key_padding_mask):
        B, S, _ = x.shape

        def heads(t):
            return t.view(B, S, -1, self.head_dim).transpose(1, 2)

        if hasattr(self, "qkv"):  # one GEMM instead of three (see fuse_qkv)
            q, k, v = self.qkv(x).split(self.num_heads * self.head_dim, dim=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.training and torch.is_grad_enabled():  # the op has no autograd (distillation)
            mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :].bool()
            o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask,
                                               scale=scale)
        else:
            o = torch.ops.lathe.attention(heads(q), heads(k), heads(v), key_padding_mask, False, scale)
        return o.transpose(1, 2).reshape(B, S, -1)

    def fuse_qkv(self):
        """Replace query/key/value by one module of concatenated output channels. Exact for
        nn.Linear and for lathe's per-channel quantized linears that share the input's
        quantization (same SmoothQuant vector): rows are quantized independently."""
        parts = [self.query, self.key, self.value]
        self.qkv = type(parts[0]).concat(parts) if hasattr(type(parts[0]), "concat") else _concat_linear(parts)
        del self.query, self.key, self.value


def _concat_linear(parts):
    lin = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts),
                    bias=parts[0].bias is not None, device=parts[0].weight.device,
                    dtype=parts[0].weight.dtype)  # a model loaded in fp16 stays fp16
    with torch.no_grad():
        lin.weight.copy_(torch.cat([p.weight for p in parts])) if lin.weight.device.type != "meta" else None
        if lin.bias is not None and lin.bias.device.type != "meta":
            lin.bias.copy_(torch.cat([p.bias for p in parts]))
    return lin


class SelfOutput(nn.Module):
    def __init__(self, c, in_features):
        super().__init__()
        self.dense = nn.Linear(in_features, c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c.get("layer_norm_eps", 1e-12))

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = SelfOutput(c, self.self.num_heads * self.self.head_dim)

    def forward(self, x, key_padding_mask):
        return self.output(self.self(x, key_padding_mask), x)


class Intermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["intermediate_size"])
        act = c.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise BadInput(f"unsupported hidden_act {act!r} in config.json")
        self.act = act
        # Set by compress when the activation is fused into a quantized dense's epilogue.
        self.act_fused = False

    def forward(self, x):
        x = self.dense(x)
        if self.act_fused:
            return x
        if self.act == "relu":
            return F.relu(x)
        return F.gelu(x, approximate="none" if self.act == "gelu" else "tanh")


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = SelfOutput(c, c["intermediate_size"])

    def forward(self, x, key_padding_mask):
        x = self.attention(x, key_padding_mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))


class BertEncoder(nn.Module, ModelAdapter):
    """forward(input_ids, attention_mask=None, token_type_ids=None) -> last_hidden_state
    [B, S, hidden] (the tensor that sentence-transformers mean-pools)."""

    # The model-adapter protocol (lathe.models.base).
    family, is_decoder, blocks_path, hf_class, style = "bert", False, "encoder.layer", "BertModel", "BERT-style"
    # Where structured pruning (lathe.compress.structured) finds heads and FFN neurons, per block.
    prune_spec = {"blocks": "encoder.layer", "attention": "attention.self",
                  "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                  "o": "attention.output.dense", "ffn_in": ("intermediate.dense",),
                  "ffn_out": "output.dense"}

    def fusable_act(self, name: str):
        """The FFN's first dense may apply GELU (exact, erf) in its epilogue."""
        owner = self.get_submodule(name.rpartition(".")[0]) if "." in name else None
        return "gelu" if isinstance(owner, Intermediate) and owner.act == "gelu" else None

    def mark_act_fused(self, name: str):
        self.get_submodule(name.rpartition(".")[0]).act_fused = True

    def __init__(self, config: dict):
        super().__init__()
        self.take_config(config)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, key_padding_mask)
        return x

    def _fixed_groups(self):
        for i, _ in enumerate(self.encoder.layer):
            p = f"encoder.layer.{i}"
            yield f"{p}.attention.self", [f"{p}.attention.self.{n}" for n in ("query", "key", "value")]
            yield f"{p}.attention.output.dense", [f"{p}.attention.output.dense"]
            yield f"{p}.intermediate.dense", [f"{p}.intermediate.dense"]
            yield f"{p}.output.dense", [f"{p}.output.dense"]
