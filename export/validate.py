"""Validation of an exported graph, every time: onnx.checker, an onnxruntime run on real
sentences at two batch/sequence sizes (so dynamic axes are exercised), and a comparison with
the PyTorch model (max abs / relative error, cosine of mean-pooled embeddings)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lathe.errors import ValidationFailed

# Per precision: the PyTorch model and its export compute the same math; int8 graphs may
# differ where a rounding tie falls the other way, so they get a looser bound.
# "int8-static" is the tensorrt target's QDQ graph: a different quantization from the PyTorch
# model's (static per-tensor symmetric activations instead of per-token dynamic ones).
TOLERANCE = {"fp32": {"min_cos": 0.9999, "max_rel": 1e-3}, "int8": {"min_cos": 0.999, "max_rel": 0.05},
             "int8-static": {"min_cos": 0.98, "max_rel": 0.5},
             # onnxruntime int8_mode "fast": per-tensor activations (shared by the whole batch)
             # where lathe quantizes per token; "hybrid" keeps the outlier layers per token
             "int8-fast": {"min_cos": 0.97, "max_rel": 0.8},
             "int8-hybrid": {"min_cos": 0.99, "max_rel": 0.2},
             # int4 / int8 weight-only dequantized to fp32 as the reference does: same math
             "weight-only": {"min_cos": 0.9999, "max_rel": 2e-3},
             # MatMulNBits accuracy_level 4: activations quantized to int8 per block in the graph
             "int4-a8": {"min_cos": 0.998, "max_rel": 0.1},
             # FP8 QDQ: lathe's simulation; the fp32 GEMM sums in another order, so a value
             # near an fp8 rounding boundary may round the other way
             "fp8": {"min_cos": 0.998, "max_rel": 0.1}}


@dataclass
class Validation:
    """The verdict of every export check (encoders and decoders). shapes: the [batch, seq]
    pairs run, or a decoder's steps ({batch, seq, past}); greedy_match: a decoder's greedy
    decode on onnxruntime equals lathe's generate (None for encoders)."""
    path: str
    precision: str
    max_abs: float
    max_rel: float
    min_cos: float
    shapes: list
    passed: bool
    greedy_match: bool | None = None

    @property
    def steps(self) -> list:
        return self.shapes

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        head = (f"validation {verdict}: {self.path} ({self.precision}) vs PyTorch on onnxruntime: "
                f"max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e}, min cosine {self.min_cos:.6f} ")
        if self.greedy_match is None:
            return head + f"over shapes {self.shapes}"
        return (head + f"(logits and present) over {self.shapes}; greedy decode "
                f"{'matches' if self.greedy_match else 'DIFFERS from'} lathe generate")

    def to_dict(self):
        return {k: v for k, v in asdict(self).items() if v is not None}


def ort_session(model, threads: int | None = None, profile_prefix: str | None = None):
    """The one onnxruntime CPU session builder: `model` is a path or an onnx ModelProto;
    intra-op threads = threads or torch's, one inter-op thread, warnings off, and threads that
    do not spin-wait between runs (interleaved with torch and lathe on a small machine, spinning
    threads steal the others' time; every onnxruntime graph lathe runs, anchors included, gets
    the same options)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:  # onnxruntime's per-node profile (lathe bench conv-layers reads it)
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def validate_onnx(path, model, model_dir, quantized: bool, raise_on_fail: bool = True,
                  precision: str | None = None, reference_ops=()) -> Validation:
    """precision picks the TOLERANCE entry; default "int8" if quantized else "fp32".
    reference_ops: lathe ops run on their PyTorch reference for the comparison (the format's
    exact math: lathe's CPU int4 kernel quantizes activations to int8, the graph does not)."""
    from contextlib import ExitStack

    from lathe.kernels.dispatch import use_backend
    import onnx

    from lathe.models.base import adapter_of
    from lathe.models import tokenizer
    from lathe.text import eval_sentences

    onnx.checker.check_model(str(path))
    sess = ort_session(path)
    names = {i.name for i in sess.get_inputs()}
    tok = tokenizer(model_dir)
    sents = eval_sentences()
    max_abs = max_rel = 0.0
    min_cos = 1.0
    shapes = []
    for batch, seq in ((3, 24), (8, 64)):
        b = tok(sents[:batch], seq_len=seq)
        with torch.inference_mode(), ExitStack() as stack:
            for op_name in reference_ops:
                stack.enter_context(use_backend("reference", op_name))
            ref = model(**b).float()
        got = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in b.items() if k in names})[0])
        max_abs = max(max_abs, float((got - ref).abs().max()))
        max_rel = max(max_rel, float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)))
        pool = adapter_of(model).pool
        cos = torch.nn.functional.cosine_similarity(pool(got, b["attention_mask"]), pool(ref, b["attention_mask"]))
        min_cos = min(min_cos, float(cos.min()))
        shapes.append([batch, seq])
    prec = precision or ("int8" if quantized else "fp32")
    tol = TOLERANCE[prec]
    ok = min_cos >= tol["min_cos"] and max_rel <= tol["max_rel"]
    v = Validation(str(path), prec, max_abs, max_rel, min_cos, shapes, ok)
    if not ok and raise_on_fail:
        raise ValidationFailed(v.summary() + f" (needs min cosine >= {tol['min_cos']}, max rel <= {tol['max_rel']})")
    return v
