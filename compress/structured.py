"""Structured pruning that physically shrinks the model: attention heads (respecting GQA
groups), FFN intermediate neurons, whole layers, and Conv2d channels.

Transformer models say where their parts live through their adapter's prune_spec (PRUNE_SPEC; see
lathe.models.bert / llama). The same number of heads / neurons is kept in every layer (the
config is uniform), each layer choosing its own by importance:
- activation: the channel's contribution at the Linear that consumes it, ||X_j||_2 *
  ||W_out[:, j]||_2 (X_j: the channel's calibration activations; Wanda's estimate), summed over
  a head's channels; for layers, Block Influence 1 - cos(block input, block output) (ShortGPT).
- gradient: first-order Taylor |w * dL/dw| summed over the weights a head / neuron / layer
  owns, gradients accumulated over the calibration batches; L = the mean L2 norm of the
  output vectors for encoders, next-token cross-entropy for decoders.
Linears are sliced, the attention modules' head counts and `model.config` updated
(num_attention_heads, num_key_value_heads, head_dim, intermediate_size, num_hidden_layers), so
checkpoint.save writes the new config.json and lathe.load builds the smaller shapes.

Conv2d: a generic pass over any traceable nn.Module (torch.fx) that prunes the channels
between Conv2d -> (BatchNorm2d) -> (elementwise activation) -> Conv2d, by BN |gamma| (or the
L1 norm of the filters without BN).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.compress.config import CONFIGS, _check_bool, register_handler
from lathe.errors import BadInput


def _frac(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
        raise BadInput(f"prune-structured.{name} must be a fraction in [0, 1), got {v!r}")
    return float(v)


@dataclass
class StructuredPruneConfig:
    """heads / ffn / conv_channels: fraction pruned per layer; layers: indices of layers to
    drop, or drop_layers: how many, chosen by importance; importance: activation | gradient;
    round_to: keep FFN neuron and conv channel counts a multiple of this; kv_groups: with GQA,
    prune whole KV groups instead of the same number of query heads in every group."""

    method: ClassVar[str] = "prune-structured"
    heads: float = 0.0
    ffn: float = 0.0
    layers: list = field(default_factory=list)
    drop_layers: int = 0
    importance: str = "activation"
    round_to: int = 1
    kv_groups: bool = False
    conv_channels: float = 0.0
    # Refit the projections that consume pruned channels (attention output, FFN down) by least
    # squares on calibration activations, so they reproduce the unpruned layer's output from the
    # channels that remain (as SliceGPT/FLAP-style reconstruction does); costs one Gram matrix a
    # projection, no training.
    reconstruct: bool = True

    def __post_init__(self):
        self.heads, self.ffn = _frac("heads", self.heads), _frac("ffn", self.ffn)
        self.conv_channels = _frac("conv_channels", self.conv_channels)
        if self.importance not in ("activation", "gradient"):
            raise BadInput(f"prune-structured.importance must be activation or gradient, got {self.importance!r}")
        if not isinstance(self.layers, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        and i >= 0 for i in self.layers) \
                or len(set(self.layers)) != len(self.layers):
            raise BadInput(f"prune-structured.layers must be a list of distinct layer indices, got {self.layers!r}")
        d = self.drop_layers
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise BadInput(f"prune-structured.drop_layers must be a non-negative integer, got {d!r}")
        if d and self.layers:
            raise BadInput("prune-structured: give either layers (which) or drop_layers (how many), not both")
        r = self.round_to
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise BadInput(f"prune-structured.round_to must be a positive integer, got {r!r}")
        _check_bool("prune-structured", "kv_groups", self.kv_groups)
        _check_bool("prune-structured", "reconstruct", self.reconstruct)
        if not (self.heads or self.ffn or self.layers or d or self.conv_channels):
            raise BadInput("prune-structured: nothing to prune (set heads, ffn, layers, drop_layers or conv_channels)")


CONFIGS[StructuredPruneConfig.method] = StructuredPruneConfig


def keep_count(n: int, frac: float, round_to: int = 1, what: str = "channels") -> int:
    """How many of n survive pruning frac of them, rounded up to a multiple of round_to."""
    keep = n - int(round(frac * n))
    if round_to > 1:
        keep = min(n, round_to * math.ceil(keep / round_to))
    if keep < 1:
        raise BadInput(f"prune-structured would prune every one of the {n} {what} ({frac:g}); "
                       f"use a smaller fraction")
    return keep


def slice_linear(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A new Linear holding lin's weight[rows][:, cols] (and bias[rows])."""
    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if rows is None else lin.bias.detach()[rows])
    return new


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.state_dict().values())


# ----------------------------------------------------------------------------- importance


class _Parts:
    """The modules of block i named by the model's PRUNE_SPEC."""

    def __init__(self, model, spec, i):
        self.prefix = f"{spec['blocks']}.{i}"
        self.block = model.get_submodule(self.prefix)
        self.spec = spec

    def name(self, key):
        return f"{self.prefix}.{self.spec[key]}"

    def get(self, key):
        return self.block.get_submodule(self.spec[key])


def _activation_stats(model, spec, n_layers, calib, progress, gram: bool = False):
    """Per layer: sum of x_j^2 at the o-projection's and FFN-out's inputs, and the mean Block
    Influence 1 - cos(in, out) over real tokens. gram: also X^T X of those inputs, with a
    column of ones appended (the bias), for least-squares reconstruction."""
    from lathe.compress.calibration import real_tokens as _tokens, run_batches
    from lathe.compress.weight_only import _first

    stats = [{"o": 0.0, "ffn": 0.0, "bi": 0.0, "n": 0} for _ in range(n_layers)]
    state, hooks = {}, []

    def sq(i, key):
        def pre(mod, args):
            x = _tokens(args[0].detach(), state["mask"]).double()
            stats[i][key] += x.pow(2).sum(0)
            if gram:
                xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
                stats[i]["G_" + key] += xa.T @ xa
        return pre

    def block_hook(i):
        def hook(mod, args, out):
            a = _tokens(args[0].detach(), state["mask"]).double()
            b = _tokens(_first(out).detach(), state["mask"]).double()
            stats[i]["bi"] += float((1 - F.cosine_similarity(a, b, dim=-1)).sum())
            stats[i]["n"] += a.shape[0]
        return hook

    for i in range(n_layers):
        p = _Parts(model, spec, i)
        for key, part in (("o", "o"), ("ffn", "ffn_out")):  # sized up front: every rank reduces all
            k = p.get(part).in_features
            stats[i][key] = torch.zeros(k, dtype=torch.float64)
            if gram:
                stats[i]["G_" + key] = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        hooks += [p.get("o").register_forward_pre_hook(sq(i, "o")),
                  p.get("ffn_out").register_forward_pre_hook(sq(i, "ffn")),
                  p.block.register_forward_hook(block_hook(i))]
    run_batches(model, calib, hooks, state, progress, torch.no_grad)
    _all_reduce_stats(stats)
    for s in stats:
        s["bi"] /= max(s["n"], 1)
    return stats


def _all_reduce_stats(stats):
    """Under torchrun each rank saw its share of the calibration batches: sum them, so every
    rank plans the same cut (a no-op in one process)."""
    from lathe.compress import distributed as dist

    if not dist.is_distributed():
        return
    for s in stats:
        for v in s.values():
            if torch.is_tensor(v):
                dist.all_reduce_sum_(v)
        c = dist.all_reduce_sum_(torch.tensor([s["bi"], float(s["n"])], dtype=torch.float64))
        s["bi"], s["n"] = float(c[0]), int(c[1])


def _channel_score(act, key, consumer):
    """||X_j||_2 * ||W[:, j]||_2: channel j's contribution at the Linear that consumes it."""
    return act[key].sqrt() * consumer.weight.detach().double().norm(dim=0)


def _loss(model, out, batch):
    """Decoders: next-token cross-entropy; encoders: mean L2 norm of the output vectors."""
    mask = batch.get("attention_mask")
    mask = torch.ones(batch["input_ids"].shape) if mask is None else mask
    from lathe.models.base import adapter_of

    if adapter_of(model).is_decoder:  # logits
        tgt = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).float(), tgt.reshape(-1),
                               ignore_index=-100)
    m = mask.bool()
    return out[m].float().norm(dim=-1).mean()


def _accumulate_grads(model, calib, progress):
    """Sum of dL/dw over the calibration batches, left in p.grad (the caller clears it)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.train()
    try:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for j, b in enumerate(calib):
                _loss(model, model(**b), b).backward()
                if progress:
                    progress(j + 1, len(calib))
        from lathe.compress import distributed as dist

        if dist.is_distributed():  # each rank's share of the batches: sum the gradients
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce_sum_(p.grad)
    finally:
        model.train(was_training)
        for p, f in flags.items():
            p.requires_grad_(f)


def _taylor(p: torch.Tensor) -> torch.Tensor:
    g = p.grad if p.grad is not None else torch.zeros_like(p)
    return (p.detach() * g).abs().double()


# ----------------------------------------------------------------------------- the passes


def _head_plan(parts, cfg, act, grad):
    """-> (kept query heads (sorted), kept KV heads (sorted)) for one layer."""
    att = parts.get("attention")
    Hq, D = att.num_heads, att.head_dim
    G = getattr(att, "num_kv_heads", Hq)
    qpg = Hq // G
    q, k, v, o = (parts.get(x) for x in ("q", "k", "v", "o"))
    if grad:
        sq = _taylor(q.weight).reshape(Hq, -1).sum(1) + _taylor(o.weight).reshape(o.out_features, Hq, D).sum((0, 2))
        if q.bias is not None:
            sq += _taylor(q.bias).reshape(Hq, D).sum(1)
        skv = sum(_taylor(m.weight).reshape(G, -1).sum(1) + (_taylor(m.bias).reshape(G, D).sum(1)
                                                               if m.bias is not None else 0) for m in (k, v))
    else:
        chan = _channel_score(act, "o", o)
        sq, skv = chan.reshape(Hq, D).sum(1), torch.zeros(G, dtype=torch.float64)
    if qpg == 1 or cfg.kv_groups:  # whole KV groups (MHA: a head is its own group)
        keep_g = keep_count(G, cfg.heads, 1, "key/value head groups" if qpg > 1 else "heads")
        gscore = sq.reshape(G, qpg).sum(1) + skv
        groups = sorted(torch.topk(gscore, keep_g).indices.tolist())
        return [g * qpg + j for g in groups for j in range(qpg)], groups
    keep_q = keep_count(qpg, cfg.heads, 1, "query heads of a key/value group")
    heads = []
    for g in range(G):
        top = torch.topk(sq[g * qpg:(g + 1) * qpg], keep_q).indices
        heads += sorted((g * qpg + top).tolist())
    return heads, list(range(G))


REFIT_MIN_TOKENS = 3  # calibration tokens per fitted column below which refit is skipped


def refit(lin: nn.Linear, keep: torch.Tensor, G: torch.Tensor, damp: float = 1e-4):
    """lin restricted to input columns `keep`, refitted by ridge least squares so that
    W' x[keep] + b' matches W x + b over the calibration activations whose Gram matrix (with
    the ones column last) is G. Returns (weight, bias) for the sliced Linear, or None when
    the calibration set is too small for a fit that generalises (then the plain cut is kept)."""
    K = lin.in_features
    W = lin.weight.detach().double()
    has_b = lin.bias is not None
    Wa = torch.cat([W, lin.bias.detach().double()[:, None]], 1) if has_b else W
    cols = torch.cat([keep, torch.tensor([K])]) if has_b else keep
    Gfull = G if has_b else G[:K, :K]
    if float(G[K, K]) < REFIT_MIN_TOKENS * len(cols):  # too few tokens: the fit would overfit
        return None
    A = Gfull[cols][:, cols].clone()
    A.diagonal().add_(damp * A.diagonal().mean())
    C = Wa @ Gfull[:, cols]  # [N, |cols|]
    Wn = torch.linalg.solve(A, C.T).T  # A symmetric: C A^-1
    if not torch.isfinite(Wn).all():
        return None
    w = Wn[:, :len(keep)].to(lin.weight.dtype)
    return w, (Wn[:, -1].to(lin.weight.dtype) if has_b else None)


def _set_fit(new: nn.Linear, fit):
    if fit is not None:
        with torch.no_grad():
            new.weight.copy_(fit[0])
            if fit[1] is not None:
                new.bias.copy_(fit[1])
    return new


def _prune_heads(model, spec, parts, heads, groups, G=None):
    from lathe.compress.quantize import _set_module

    att = parts.get("attention")
    D = att.head_dim

    def chans(hs):
        return torch.tensor([h * D + d for h in hs for d in range(D)], dtype=torch.long)

    qc, kvc = chans(heads), chans(groups)
    _set_module(model, parts.name("q"), slice_linear(parts.get("q"), rows=qc))
    _set_module(model, parts.name("k"), slice_linear(parts.get("k"), rows=kvc))
    _set_module(model, parts.name("v"), slice_linear(parts.get("v"), rows=kvc))
    fit = refit(parts.get("o"), qc, G) if G is not None else None
    _set_module(model, parts.name("o"), _set_fit(slice_linear(parts.get("o"), cols=qc), fit))
    att.num_heads = len(heads)
    if hasattr(att, "num_kv_heads"):
        att.num_kv_heads = len(groups)


def _ffn_plan(parts, keep, act, grad):
    out = parts.get("ffn_out")
    if grad:
        score = _taylor(out.weight).sum(0)
        for key in parts.spec["ffn_in"]:
            m = parts.block.get_submodule(key)
            score = score + _taylor(m.weight).sum(1) + (_taylor(m.bias) if m.bias is not None else 0)
    else:
        score = _channel_score(act, "ffn", out)
    return torch.sort(torch.topk(score, keep).indices).values


def _prune_ffn(model, parts, idx, G=None):
    from lathe.compress.quantize import _set_module

    for key in parts.spec["ffn_in"]:
        _set_module(model, f"{parts.prefix}.{key}", slice_linear(parts.block.get_submodule(key), rows=idx))
    fit = refit(parts.get("ffn_out"), idx, G) if G is not None else None
    _set_module(model, parts.name("ffn_out"), _set_fit(slice_linear(parts.get("ffn_out"), cols=idx), fit))


def _check_plain(model, spec, n_layers):
    for i in range(n_layers):
        p = _Parts(model, spec, i)
        for key in ("q", "k", "v", "o", "ffn_out"):
            try:
                m = p.get(key)
            except AttributeError:
                raise BadInput(f"prune-structured: {p.name(key)} is missing (fused by an earlier "
                               "step?); put prune-structured before quantization steps") from None
            if type(m) is not nn.Linear:
                raise BadInput(f"prune-structured: {p.name(key)} is a {type(m).__name__}, not an "
                               "nn.Linear; put prune-structured before quantization/low-rank steps")


def prune_transformer(model, cfg: StructuredPruneConfig, calib, progress) -> dict:
    from lathe.compress.weight_only import _need_calib

    from lathe.models.base import adapter_of

    spec = adapter_of(model).prune_spec
    if spec is None:
        raise BadInput(f"prune-structured: {type(model).__name__} has no PRUNE_SPEC (heads, ffn and "
                       "layers are known for lathe's BERT and Llama models); conv_channels works on any model")
    blocks = model.get_submodule(spec["blocks"])
    L = len(blocks)
    _check_plain(model, spec, L)
    bad = [i for i in cfg.layers if i >= L]
    if bad:
        raise BadInput(f"prune-structured.layers: layer {bad[0]} does not exist (the model has {L})")
    if len(cfg.layers) >= L or cfg.drop_layers >= L:
        raise BadInput(f"prune-structured would drop every one of the {L} layers")
    grad = cfg.importance == "gradient"
    needs = cfg.heads or cfg.ffn or cfg.drop_layers
    act = [None] * L
    if needs:
        _need_calib(calib, f"prune-structured with {cfg.importance} importance")
        if grad:
            _accumulate_grads(model, calib, progress)
            if cfg.reconstruct and (cfg.heads or cfg.ffn):
                act = _activation_stats(model, spec, L, calib, progress, True)
        else:
            act = _activation_stats(model, spec, L, calib, progress, cfg.reconstruct)
    c = model.config
    report = {"params_before": param_count(model)}
    try:
        # plan everything from the same statistics, then cut
        drop = list(cfg.layers)
        if cfg.drop_layers:
            if grad:
                score = [float(sum(_taylor(p).sum() for p in blocks[i].parameters())) for i in range(L)]
            else:
                score = [a["bi"] for a in act]
            drop = sorted(sorted(range(L), key=lambda i: score[i])[:cfg.drop_layers])
            report["layer_importance"] = [round(s, 6) for s in score]
        keep_layers = [i for i in range(L) if i not in drop]
        plans = {}
        for i in keep_layers:
            p = _Parts(model, spec, i)
            plan = {}
            if cfg.heads:
                plan["heads"] = _head_plan(p, cfg, act[i], grad)
            if cfg.ffn:
                n = p.get("ffn_out").in_features
                plan["ffn"] = _ffn_plan(p, keep_count(n, cfg.ffn, cfg.round_to, "FFN neurons"), act[i], grad)
            plans[i] = plan
    finally:
        if grad:
            for q in model.parameters():
                q.grad = None
    with torch.no_grad():
        for i, plan in plans.items():
            p = _Parts(model, spec, i)
            a = act[i] or {}
            if "heads" in plan:
                _prune_heads(model, spec, p, *plan["heads"], G=a.get("G_o") if cfg.reconstruct else None)
            if "ffn" in plan:
                _prune_ffn(model, p, plan["ffn"], G=a.get("G_ffn") if cfg.reconstruct else None)
    if drop:
        parent, _, leaf = spec["blocks"].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                nn.ModuleList(blocks[i] for i in keep_layers))
        c["num_hidden_layers"] = len(keep_layers)
    first = _Parts(model, spec, 0)
    att = first.get("attention")
    changed = {"num_hidden_layers": c["num_hidden_layers"]}
    if cfg.heads:
        c["num_attention_heads"] = att.num_heads
        c["head_dim"] = att.head_dim  # hidden_size // heads no longer gives it
        changed |= {"num_attention_heads": att.num_heads, "head_dim": att.head_dim}
        if hasattr(att, "num_kv_heads"):
            c["num_key_value_heads"] = att.num_kv_heads
            changed["num_key_value_heads"] = att.num_kv_heads
    if cfg.ffn:
        c["intermediate_size"] = first.get("ffn_out").in_features
        changed["intermediate_size"] = c["intermediate_size"]
    report |= {"config": changed, "dropped_layers": drop,
               "kept_heads": {i: plans[i]["heads"][0] for i in keep_layers if "heads" in plans[i]},
               "params_after": param_count(model)}
    notes = ["a smaller dense model: config.json is rewritten with the new shapes"]
    if cfg.heads and c.get("model_type") == "bert":
        notes.append("head-pruned BERT sets head_dim in config.json: it loads in lathe, not in "
                     "transformers' BertModel (which derives the head size from hidden_size / "
                     "num_attention_heads); FFN- and layer-pruned BERT load in both")
    report["notes"] = notes
    return report


# ----------------------------------------------------------------------------- Conv2d


_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish,
                        nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.ELU, nn.Mish)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.hardswish, F.elu,
                          torch.relu, torch.sigmoid, torch.tanh, F.dropout}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh"}


def conv_chains(model: nn.Module):
    """[(conv1, bn or None, conv2)] module names where conv1's output reaches only conv2,
    through at most one BatchNorm2d (right after conv1) and elementwise activations."""
    import torch.fx as fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # fx raises many types for untraceable code
        raise BadInput(f"prune-structured.conv_channels: cannot trace {type(model).__name__} with "
                       f"torch.fx ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    mods = dict(model.named_modules())
    calls = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    def plain_conv(name):
        m = mods.get(name)
        return isinstance(m, nn.Conv2d) and m.groups == 1 and calls.get(name) == 1

    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not plain_conv(node.target):
            continue
        cur, bn = node, None
        while len(cur.users) == 1:
            u = next(iter(cur.users))
            if not u.args or u.args[0] is not cur:
                break
            m = mods.get(u.target) if u.op == "call_module" else None
            if isinstance(m, nn.BatchNorm2d) and cur is node and calls.get(u.target) == 1:
                bn = u.target
            elif isinstance(m, _ELEMENTWISE_MODULES) or (u.op == "call_function" and u.target in _ELEMENTWISE_FUNCTIONS) \
                    or (u.op == "call_method" and u.target in _ELEMENTWISE_METHODS):
                pass
            elif u.op == "call_module" and plain_conv(u.target):
                chains.append((node.target, bn, u.target))
                break
            else:
                break
            cur = u
    return chains


def _slice_conv(conv: nn.Conv2d, out_idx=None, in_idx=None) -> nn.Conv2d:
    w = conv.weight.detach()
    w = w[out_idx] if out_idx is not None else w
    w = w[:, in_idx] if in_idx is not None else w
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach() if out_idx is None else conv.bias.detach()[out_idx])
    return new


def _slice_bn(bn: nn.BatchNorm2d, idx) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device if bn.affine else None)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[idx])
            new.bias.copy_(bn.bias[idx])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[idx])
            new.running_var.copy_(bn.running_var[idx])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.train(bn.training)


def prune_conv_channels(model: nn.Module, frac: float, round_to: int = 1) -> dict:
    """Prune frac of the channels of every Conv2d chain (see conv_chains), in place."""
    from lathe.compress.quantize import _set_module

    chains = conv_chains(model)
    done = {}
    for c1, bn, c2 in chains:
        conv1 = model.get_submodule(c1)
        C = conv1.out_channels
        keep = keep_count(C, frac, round_to, f"channels of {c1}")
        norm = model.get_submodule(bn) if bn else None
        if norm is not None and norm.affine:
            score = norm.weight.detach().abs()
        else:
            score = conv1.weight.detach().abs().sum((1, 2, 3))
        idx = torch.sort(torch.topk(score, keep).indices).values
        _set_module(model, c1, _slice_conv(conv1, out_idx=idx))
        if norm is not None:
            _set_module(model, bn, _slice_bn(norm, idx))
        _set_module(model, c2, _slice_conv(model.get_submodule(c2), in_idx=idx))
        done[c1] = {"channels": C, "kept": keep, "into": c2, "importance": "bn_gamma" if norm is not None
                    and norm.affine else "filter_l1"}
    return done


# ----------------------------------------------------------------------------- handler


@register_handler(StructuredPruneConfig)
def _structured(model, cfg: StructuredPruneConfig, calib, progress, ctx=None):
    t0 = time.perf_counter()
    before = param_count(model)
    report = {"method": "prune-structured", "importance": cfg.importance}
    if cfg.heads or cfg.ffn or cfg.layers or cfg.drop_layers:
        report |= prune_transformer(model, cfg, calib, progress)
    if cfg.conv_channels:
        convs = prune_conv_channels(model, cfg.conv_channels, cfg.round_to)
        if not convs:
            raise BadInput("prune-structured.conv_channels: the model has no Conv2d -> (BatchNorm2d) "
                           "-> (activation) -> Conv2d chain to prune")
        report["conv"] = convs
    report |= {"params_before": before, "params_after": param_count(model),
               "seconds": round(time.perf_counter() - t0, 2)}
    return report


__all__ = ["StructuredPruneConfig", "keep_count", "slice_linear", "conv_chains",
           "prune_conv_channels", "prune_transformer", "param_count"]
