"""A decode path that is not launch-bound (gpt-fast style): a static KV cache written in place
at the position tensor, and the one-token decode step captured once in a CUDA graph and
replayed. Shared by lathe's Llama adapter and the plain-PyTorch baseline the benchmarks
compare it with (lathe.bench.torch_llama), so both run the same cache and the same graph.

A model that supports it has setup_static_cache(batch, max_len, dtype, device) and
forward_static(input_ids, input_pos, start=None) (see lathe.models.llama)."""
from __future__ import annotations

import torch
import torch.nn as nn


class StaticKVCache(nn.Module):
    """k, v [B, H_kv, max_len, D], preallocated; update writes new keys/values at the
    positions (index_copy_: no allocation, no host sync) and returns the whole buffers."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """input_pos int64 [S]; k, v [B, H_kv, S, D]."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class GraphedStep:
    """step(tokens [B, 1], input_pos [1]) -> logits, as model.forward_static computes them.

    On a CUDA device the first call warms the step up on a side stream (Triton autotuning and
    lazy initialisation happen there), captures it in a torch.cuda.CUDAGraph, and every call
    replays the graph after copying its inputs into the captured ones: one launch a token.
    The returned logits tensor is the graph's static output (overwritten by the next call).
    On the CPU (or with graph=False) it calls the model directly, the same code path."""

    def __init__(self, model: nn.Module, graph: bool = True, warmup: int = 2):
        self.model, self.warmup = model, warmup
        self.graph_wanted = graph
        self.graph = None

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if not (self.graph_wanted and tokens.is_cuda):
            return self.model.forward_static(tokens, input_pos)
        if self.graph is None:
            self._capture(tokens, input_pos)
        self.tokens.copy_(tokens)
        self.pos.copy_(input_pos)
        self.graph.replay()
        return self.out

    def _capture(self, tokens, input_pos):
        # The warm-up steps write this position's k/v into the cache; the replay that follows
        # writes the same values again, so nothing is lost.
        self.tokens, self.pos = tokens.clone(), input_pos.clone()
        side = torch.cuda.Stream(tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model.forward_static(self.tokens, self.pos)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.model.forward_static(self.tokens, self.pos)


@torch.no_grad()
def generate_static(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    graph: bool = True, step: GraphedStep | None = None):
    """Greedy decoding through the static cache: prefill input_ids [B, S] at positions
    0..S-1, then max_new_tokens one-token steps (CUDA-graphed on a GPU). The cache must hold
    S + max_new_tokens positions (model.setup_static_cache). Returns [B, S + max_new_tokens]."""
    B, S = input_ids.shape
    dev = input_ids.device
    logits = model.forward_static(input_ids, torch.arange(S, device=dev), start=0)
    step = step or GraphedStep(model, graph)
    out = [input_ids]
    nxt = logits[:, -1:].argmax(-1)
    pos = torch.tensor([S], device=dev)
    for i in range(max_new_tokens):
        out.append(nxt)
        if i == max_new_tokens - 1:
            break
        logits = step(nxt, pos)
        nxt = logits[:, -1:].argmax(-1)
        pos += 1
    return torch.cat(out, dim=1)
