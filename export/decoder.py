"""Decoder LM export with the KV cache as graph inputs and outputs, under the names
transformers/optimum use: inputs input_ids, attention_mask [B, past + S], position_ids,
past_key_values.{i}.key/value [B, kv_heads, past, head_dim]; outputs logits and
present.{i}.key/value [B, kv_heads, past + S, head_dim]. Batch, sequence and past are dynamic.

The example traced has past 3 and seq 5 (torch.export would bake in a size of 0 or 1); the
graph has no size-specific branch, and validation runs it at past 0 (prefill) and seq 1
(decode) against PyTorch, then checks that greedy decoding on onnxruntime gives the tokens
of lathe's `generate`."""
from __future__ import annotations

import torch
import torch.nn as nn

from lathe.errors import ValidationFailed
from lathe.export.validate import Validation

TOL = {"min_cos": 0.9999, "max_rel": 1e-3}  # fp32 and weight-only: the same math
TOL_QUANT = {"min_cos": 0.995, "max_rel": 0.1}  # dynamic int8 / MatMulNBits int8 activations


class WithCache(nn.Module):
    """LlamaForCausalLM with flat cache arguments: forward(input_ids, attention_mask,
    position_ids, past) -> (logits, [(k, v) per layer])."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        return self.lm(input_ids, attention_mask, past_key_values=[tuple(p) for p in past_key_values],
                       use_cache=True, position_ids=position_ids)


def _names(n_layers: int):
    past = [f"past_key_values.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
    present = [f"present.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids"] + past, ["logits"] + present


def _shape(lm):
    att = lm.model.layers[0].self_attn
    return len(lm.model.layers), att.num_kv_heads, att.head_dim


def example(lm, batch: int, seq: int, past: int, seed: int = 0):
    """Inputs for a step with `past` cached tokens: random ids and cache (the cache values
    only need to be plausible for a comparison)."""
    g = torch.Generator().manual_seed(seed)
    n, kv, d = _shape(lm)
    ids = torch.randint(1, lm.config["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    cache = [(torch.randn(batch, kv, past, d, generator=g), torch.randn(batch, kv, past, d, generator=g))
             for _ in range(n)]
    return ids, mask, pos, cache


def export_decoder(model, source, out, target, opset, validate, accuracy_level, external_data, slim):
    from torch.export import Dim

    from lathe.export.onnx import REFERENCE_OPS, export_model

    n, _, _ = _shape(model)
    ids, mask, pos, cache = example(model, 2, 5, 3)
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=4096)
    past = Dim("past", min=0, max=4096)
    kv = {0: batch, 2: past}
    total = Dim("total", min=1, max=8192)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
           "position_ids": {0: batch, 1: seq}, "past_key_values": [(kv, kv) for _ in range(n)]}
    inputs, outputs = _names(n)
    wrapped = WithCache(model).eval()
    export_model(wrapped, {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                           "past_key_values": cache}, out, target, opset, int8_mode="exact",
                 accuracy_level=accuracy_level, external_data=external_data, dynamic=dyn,
                 output_names=outputs, input_names=inputs)
    if slim:
        from lathe.export.save import slim as slim_file
        slim_file(out)
    quant = source.is_compressed and not (accuracy_level == 0 or _weight_only(model))
    report = validate_decoder(out, model, TOL_QUANT if quant else TOL, REFERENCE_OPS) if validate else None
    return out, report


def _weight_only(model) -> bool:
    from lathe.compress.formats import quantized_modules

    return all(m.format.exact_lowering for _, m in quantized_modules(model))


DecoderValidation = Validation  # one dataclass for every export check


def _feed(ids, mask, pos, cache):
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    for i, (k, v) in enumerate(cache):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k.numpy(), v.numpy()
    return feed


def ort_generate(sess, prompt: torch.Tensor, n_layers: int, kv: int, d: int, steps: int) -> torch.Tensor:
    """Greedy decoding on onnxruntime with the exported cache (prefill from an empty past)."""
    B, S = prompt.shape
    cache = [(torch.zeros(B, kv, 0, d), torch.zeros(B, kv, 0, d)) for _ in range(n_layers)]
    ids, out, past = prompt, [prompt], 0
    for _ in range(steps):
        s = ids.shape[1]
        mask = torch.ones(B, past + s, dtype=torch.int64)
        pos = torch.arange(past, past + s)[None].expand(B, s).contiguous()
        res = sess.run(None, _feed(ids, mask, pos, cache))
        ids = torch.from_numpy(res[0])[:, -1:].argmax(-1)
        cache = [(torch.from_numpy(res[1 + 2 * i]), torch.from_numpy(res[2 + 2 * i])) for i in range(n_layers)]
        past += s
        out.append(ids)
    return torch.cat(out, dim=1)


def validate_decoder(path, model, tol=TOL, reference_ops=(), raise_on_fail: bool = True,
                     gen_tokens: int = 6) -> DecoderValidation:
    """onnx.checker, then onnxruntime against PyTorch at prefill (past 0, batch 2, seq 7) and a
    decode step (past 7, seq 1), comparing logits and the present cache, then greedy decoding
    of `gen_tokens` tokens against lathe's generate."""
    from contextlib import ExitStack

    import onnx

    from lathe.export.validate import ort_session
    from lathe.kernels.dispatch import use_backend

    onnx.checker.check_model(str(path))
    sess = ort_session(path)
    n, kv, d = _shape(model)
    max_abs = max_rel = 0.0
    min_cos = 1.0
    steps = []
    with torch.inference_mode(), ExitStack() as stack:
        for op_name in reference_ops:
            stack.enter_context(use_backend("reference", op_name))
        for batch, seq, past in ((2, 7, 0), (2, 1, 7), (1, 1, 3)):
            ids, mask, pos, cache = example(model, batch, seq, past, seed=seq + past)
            if past == 7:  # a real decode step: the cache is the prefill's
                ids0, mask0, pos0, _ = example(model, batch, 7, 0, seed=7)
                _, cache = model(ids0, mask0, use_cache=True, position_ids=pos0)
            ref_logits, ref_cache = model(ids, mask, past_key_values=cache or None, use_cache=True,
                                          position_ids=pos)
            got = sess.run(None, _feed(ids, mask, pos, cache))
            refs = [ref_logits] + [t for kvp in ref_cache for t in kvp]
            for r, g in zip(refs, got):
                r, g = r.float(), torch.from_numpy(g)
                if r.shape != g.shape:
                    raise ValidationFailed(f"{path}: output shape {tuple(g.shape)} != PyTorch {tuple(r.shape)}")
                err = float((g - r).abs().max())
                max_abs = max(max_abs, err)
                max_rel = max(max_rel, err / float(r.abs().max().clamp(min=1e-12)))
                cos = torch.nn.functional.cosine_similarity(g.reshape(-1, r.shape[-1]), r.reshape(-1, r.shape[-1]))
                min_cos = min(min_cos, float(cos.min()))
            steps.append({"batch": batch, "seq": seq, "past": past})
        prompt = example(model, 1, 8, 0, seed=1)[0]
        want = model.generate(prompt, max_new_tokens=gen_tokens)
    got = ort_generate(sess, prompt, n, kv, d, gen_tokens)
    match = torch.equal(want, got)
    ok = match and min_cos >= tol["min_cos"] and max_rel <= tol["max_rel"]
    v = Validation(str(path), "decoder, KV cache", max_abs, max_rel, min_cos, steps, ok, match)
    if not ok and raise_on_fail:
        raise ValidationFailed(v.summary() + f" (needs min cosine >= {tol['min_cos']}, max rel <= {tol['max_rel']})")
    return v
