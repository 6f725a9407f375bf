"""Knowledge distillation: train the (pruned) model as a student of the original (the teacher,
ctx.teacher()), optionally with quantization-aware training (QAT) of its Linear weights.

Loss (every term normalised by the GLOBAL token / sentence count, so a torchrun run with the
same global batch computes the same loss and gradients as one process):
- decoders: kl_weight * T^2 * KL(teacher || student) of the next-token distributions at
  temperature T, over the real tokens;
- hidden_weight * (the mean over mapped layer pairs of the hidden-state loss, mse or
  1 - cosine per token); for encoders (no logits) the pairs include the last layer, plus the
  loss of the mean-pooled sentence embedding.

Data: `data` (a text file: for encoders one example a line; for decoders one corpus, cut
into windows) or, by default, lathe.text.augmented_texts (encoders: stdlib docstring
sentences, short spans of them and random sequences of vocabulary words; never lathe's
evaluation sentences) or the decoder LM's training split of the stdlib source
(lathe.bench.perplexity, never the held-out files). The batch of step s depends only on
(seed, s), which makes a resumed run see the same data as an uninterrupted one.

Training: AdamW, linear warmup then cosine decay (to 10% of lr), gradient clipping, a
checkpoint every save_every steps (and on Ctrl-C) in ctx.work_dir, resumed when the same step
(same config and the same starting weights) runs again. Under torchrun: DDP, or with
`fsdp: true` FSDP (lathe.compress.fsdp: parameters, gradients and optimizer state sharded over
the ranks); each rank takes its share of each global batch; only rank 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.compress import distributed as dist
from lathe.compress import fsdp
from lathe.compress.config import CONFIGS, config_to_dict, register_handler
from lathe.errors import BadInput

log = logging.getLogger("lathe.distill")
SPARSE_MIN = 0.2  # keep_sparsity: the fraction of zeros that marks a weight as pruned
QAT_GROUP = 128  # int4 QAT: lathe's Int4Group default group size
MIN_LR_RATIO = 0.1  # cosine floor, a fraction of lr (as scripts/train_decoder.py)
CKPT_FORMAT = 2  # 2: full state dicts keyed by parameter name (lathe.compress.fsdp)


def _num(name, v, lo=None, hi=None, integer=False, lo_open=False):
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (not integer and not math.isfinite(v)):
        raise BadInput(f"distill.{name} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise BadInput(f"distill.{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise BadInput(f"distill.{name} must be <= {hi}, got {v!r}")


# An upper bound on distill.steps: a typo such as 1e20 must not run forever.
MAX_STEPS = 1_000_000


@dataclass
class DistillConfig:
    """Teacher -> student distillation (see the module docstring)."""

    method: ClassVar[str] = "distill"
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 16
    seq_len: int = 128
    warmup: int = 10
    weight_decay: float = 0.01
    temperature: float = 2.0
    kl_weight: float = 1.0  # decoders: KL on logits
    hidden_weight: float | None = None  # None: 1 for encoders or when layer_map is given, else 0
    hidden_loss: str = "cosine"  # mse | cosine
    layer_map: dict | list | None = None  # student layer -> teacher layer; None: uniform
    data: str | None = None  # text file; None: lathe's offline corpus (see module docstring)
    save_every: int = 50  # steps between checkpoints in the work folder; 0: only on Ctrl-C
    qat: str = "none"  # none | int8 | int4: fake-quantize the student's Linear weights (STE)
    grad_clip: float = 1.0  # max global grad norm; 0: off
    fsdp: bool = False  # under torchrun: FSDP (sharded student) instead of DDP
    # where to train: auto (the GPU when there is one: cuda:LOCAL_RANK under torchrun; else
    # where the model is), cpu or cuda; the model comes back to where it was afterwards
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    # keep pruned weights at zero: a Linear whose weight is at least SPARSE_MIN zeros (a pruned
    # or 2:4 model) keeps its mask through training, so distillation recovers quality without
    # undoing the sparsity
    keep_sparsity: bool = True

    def __post_init__(self):
        _num("steps", self.steps, 1, MAX_STEPS, integer=True)
        _num("lr", self.lr, 0, 1.0, lo_open=True)
        _num("batch_size", self.batch_size, 1, integer=True)
        _num("seq_len", self.seq_len, 2, 8192, integer=True)
        _num("warmup", self.warmup, 0, integer=True)
        _num("weight_decay", self.weight_decay, 0, 10)
        _num("temperature", self.temperature, 0, 100, lo_open=True)
        _num("kl_weight", self.kl_weight, 0)
        if self.hidden_weight is not None:
            _num("hidden_weight", self.hidden_weight, 0)
        if self.hidden_loss not in ("mse", "cosine"):
            raise BadInput(f"distill.hidden_loss must be mse or cosine, got {self.hidden_loss!r}")
        self._check_layer_map()
        if self.data is not None and not isinstance(self.data, str):
            raise BadInput(f"distill.data must be a path to a text file, got {self.data!r}")
        _num("save_every", self.save_every, 0, integer=True)
        if self.qat not in ("none", "int8", "int4"):
            raise BadInput(f"distill.qat must be none, int8 or int4, got {self.qat!r}")
        _num("grad_clip", self.grad_clip, 0)
        if not isinstance(self.fsdp, bool):
            raise BadInput(f"distill.fsdp must be true or false, got {self.fsdp!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BadInput(f"distill.device must be auto, cpu or cuda, got {self.device!r}")
        _num("seed", self.seed, 0, integer=True)
        _num("log_every", self.log_every, 1, integer=True)
        if not isinstance(self.keep_sparsity, bool):
            raise BadInput(f"distill.keep_sparsity must be true or false, got {self.keep_sparsity!r}")

    def _check_layer_map(self):
        m = self.layer_map
        if m is None:
            return
        items = m.items() if isinstance(m, dict) else enumerate(m) if isinstance(m, list) else None
        if items is None:
            raise BadInput(f"distill.layer_map must be a mapping student layer -> teacher layer "
                           f"(or a list, one teacher layer a student layer), got {m!r}")
        for i, j in items:
            for v in (i, j):
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                    raise BadInput(f"distill.layer_map entries must be layer indices >= 0, got {i!r}: {j!r}")

    def pairs(self, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
        """(student layer, teacher layer) pairs; the default maps layers uniformly, the last
        student layer to the last teacher layer."""
        if self.layer_map is None:
            return [(i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]
        m = self.layer_map
        items = m.items() if isinstance(m, dict) else enumerate(m)
        out = [(int(i), int(j)) for i, j in items if j is not None]
        for i, j in out:
            if i >= n_student or j >= n_teacher:
                raise BadInput(f"distill.layer_map {i}: {j} is out of range: the student has "
                               f"{n_student} layers, the teacher {n_teacher}")
        return out


CONFIGS[DistillConfig.method] = DistillConfig


# ----------------------------------------------------------------------------- model adapters


def _layers(model) -> nn.ModuleList:
    from lathe.models.base import adapter_of

    blocks = adapter_of(model).blocks()
    if blocks is None:
        raise BadInput(f"distill: {type(model).__name__} has no transformer layer list "
                       "(encoder.layer or model.layers)")
    return blocks


class _Capture:
    """Forward hooks keeping the output hidden state of chosen layers."""

    def __init__(self, layers, idx):
        self.out = {}
        self.hooks = [layers[i].register_forward_hook(self._hook(i)) for i in sorted(set(idx))]

    def _hook(self, i):
        def fn(mod, args, out):
            self.out[i] = out[0] if isinstance(out, tuple) else out
        return fn

    def remove(self):
        for h in self.hooks:
            h.remove()


# ----------------------------------------------------------------------------- QAT (STE)


def fake_quant(w: torch.Tensor, qat: str) -> torch.Tensor:
    """The weight as the deployed format will hold it: quantize then dequantize with lathe's
    formats (int8: Int8PerChannel; int4: Int4Group, group 128, asymmetric)."""
    from lathe.compress.formats import Int4Group, Int8PerChannel

    fmt = Int8PerChannel() if qat == "int8" else Int4Group(QAT_GROUP)
    return fmt.roundtrip(w)


def fake_quant_ste(w: torch.Tensor, qat: str) -> torch.Tensor:
    """Straight-through estimator: forward the quantized weight, backward as the identity."""
    return w + (fake_quant(w, qat) - w).detach()


def _qat_forward(lin: nn.Linear, qat: str):
    def forward(x):
        return F.linear(x, fake_quant_ste(lin.weight, qat), lin.bias)
    return forward


def enable_qat(model: nn.Module, qat: str):
    """Fake-quantize the Linear weights in forward (an instance-level forward, so state dicts
    and checkpoints are untouched). Returns (names, skipped, undo)."""
    names, skipped, patched = [], [], []
    for n, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        if n == "lm_head" or n.endswith(".lm_head"):  # the quantize presets keep it fp32
            skipped.append(f"{n}: lm_head")
        elif qat == "int4" and m.in_features % QAT_GROUP:
            skipped.append(f"{n}: in_features {m.in_features} is not a multiple of {QAT_GROUP}")
        else:
            m.forward = _qat_forward(m, qat)
            patched.append(m)
            names.append(n)

    def undo():
        for m in patched:
            del m.forward
    return names, skipped, undo


# ----------------------------------------------------------------------------- data


class _Data:
    """global_batch(step): the step's whole batch (all ranks), a function of (seed, step)."""

    def __init__(self, cfg: DistillConfig, ctx, decoder: bool):
        from lathe import models, text

        self.cfg, self.decoder = cfg, decoder
        path = ctx.source.path
        if decoder:
            self.stream = self._token_stream(path, cfg)
            if len(self.stream) <= cfg.seq_len:
                raise BadInput(f"distill.data holds {len(self.stream)} tokens; seq_len {cfg.seq_len} "
                               "needs more")
        else:
            texts = text.read_lines(cfg.data) if cfg.data else text.augmented_texts(path, cfg.seed)
            enc = models.tokenizer(path)(texts, cfg.seq_len)
            self.enc = {k: v for k, v in enc.items()}
            self.n = len(texts)

    @staticmethod
    def _token_stream(path, cfg):
        from pathlib import Path

        from lathe.corpus import EOT, as_tokenizers, train_texts

        if cfg.data:
            p = Path(cfg.data)
            if not p.is_file():
                raise BadInput(f"distill.data: file not found: {p}")
            try:
                texts = [p.read_text(encoding="utf-8")]
            except UnicodeDecodeError:
                raise BadInput(f"distill.data: {p} is not UTF-8 text") from None
        else:
            texts = train_texts(n_files=64)  # a spread over the training split (held-out excluded)
        tok = as_tokenizers(path)
        tok.no_truncation()
        tok.no_padding()
        eot = tok.token_to_id(EOT)
        ids = []
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids.extend(([eot] if eot is not None else []) + enc.ids)
        return torch.tensor(ids, dtype=torch.long)

    def global_batch(self, step: int) -> dict:
        cfg = self.cfg
        B = cfg.batch_size
        if self.decoder:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            off = torch.randint(0, len(self.stream) - cfg.seq_len + 1, (B,), generator=g)
            ids = torch.stack([self.stream[o:o + cfg.seq_len] for o in off.tolist()])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        # encoders: epochs over the examples, each in an order drawn from (seed, epoch)
        idx = []
        for pos in range(step * B, (step + 1) * B):
            epoch, k = divmod(pos, self.n)
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            idx.append(int(torch.randperm(self.n, generator=g)[k]))
        return {k: v[idx] for k, v in self.enc.items()}


def _local(batch: dict, device) -> dict:
    """This rank's share of a global batch, trimmed to its longest real sequence."""
    s = dist.shard_range(batch["input_ids"].shape[0])
    b = {k: v[s.start:s.stop] for k, v in batch.items()}
    if b["input_ids"].shape[0]:
        L = max(int(b["attention_mask"].sum(1).max()), 1)
        b = {k: v[:, :L] for k, v in b.items()}
    return {k: v.to(device) for k, v in b.items()}


# ----------------------------------------------------------------------------- loss


def _hidden_loss(s, t, kind):
    """Per-row loss [..., ] of hidden vectors (last dim)."""
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)


def _loss_terms(cfg, decoder, pool, s_out, t_out, s_hid, t_hid, pairs, mask, n_tok, n_seq, hw):
    """This rank's share of the global loss (sums divided by the global counts)."""
    m = mask.to(torch.float32)
    terms = {}
    total = s_out.new_zeros(())
    if decoder and cfg.kl_weight > 0:
        T = cfg.temperature
        logp_s = F.log_softmax(s_out.float() / T, dim=-1)
        logp_t = F.log_softmax(t_out.float() / T, dim=-1)
        kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # [B, S]
        terms["kl"] = (kl * m).sum() / n_tok * T * T
        total = total + cfg.kl_weight * terms["kl"]
    if hw > 0:
        h = s_out.new_zeros(())
        for i, j in pairs:
            h = h + (_hidden_loss(s_hid[i].float(), t_hid[j].float(), cfg.hidden_loss) * m).sum() / n_tok
        h = h / max(len(pairs), 1)
        if not decoder:  # the sentence embedding MiniLM users consume
            pooled = _hidden_loss(pool(s_out.float(), mask), pool(t_out.float(), mask), cfg.hidden_loss)
            h = h + pooled.sum() / n_seq
        terms["hidden"] = h
        total = total + hw * h
    return total, terms


# ----------------------------------------------------------------------------- checkpoints


def _fingerprint(cfg, model) -> str:
    """Same config (save_every/log_every aside) and the same starting weights: same run."""
    d = {k: v for k, v in config_to_dict(cfg).items() if k not in ("save_every", "log_every")}
    h = hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for n, p in model.state_dict().items():
            p = p.double()
            h.update(f"{n}{tuple(p.shape)}{float(p.sum())!r}{float(p.abs().sum())!r}".encode())
    return h.hexdigest()[:16]


def _save(path, model, opt, sched, step, losses):
    """Atomic; tensors, ints, floats, strings and lists only, so torch.load(weights_only=True)
    reads it. Full state dicts keyed by name (lathe.compress.fsdp), gathered on every rank
    (collective when the model is sharded), written by rank 0."""
    from lathe.io import atomic_file

    state = {"model": fsdp.model_state(model), "optim": fsdp.optim_state(model, opt),
             "sched": sched.state_dict(), "step": int(step),
             "losses": torch.tensor(losses, dtype=torch.float64), "rng": torch.get_rng_state(),
             "format": CKPT_FORMAT}
    if path is not None and dist.is_main():
        with atomic_file(path) as tmp:
            torch.save(state, tmp)


def _load(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: start over rather than fail
        log.warning("distill: ignoring unreadable checkpoint %s (%s)", path, e)
        return None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        log.warning("distill: ignoring checkpoint %s written by an older lathe", path)
        return None
    return state


# ----------------------------------------------------------------------------- the loop


def _optimizer(model, cfg):
    decay = [p for n, p in model.named_parameters()
             if p.requires_grad and p.dim() >= 2 and "embed" not in n]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)


def lr_factor(step: int, cfg) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to MIN_LR_RATIO at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train_device(cfg: DistillConfig, home: torch.device) -> torch.device:
    """The device distillation trains on (see DistillConfig.device)."""
    import os

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise BadInput("distill.device is cuda but no CUDA device is available (use auto or cpu)")
    if cfg.device == "cpu" or (cfg.device == "auto" and not cuda):
        return home if home.type == "cpu" else torch.device("cpu")
    if home.type == "cuda":
        return home
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if dist.is_distributed() else 0)


def _wrap(student):
    """DDP under torch.distributed (gradients averaged over ranks); the student otherwise."""
    if not dist.is_distributed():
        return student
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(student.parameters()).device
    return DDP(student, device_ids=[dev.index] if dev.type == "cuda" else None)


def sparsity_masks(model) -> list:
    """[(weight, mask)] of the Linear weights that are at least SPARSE_MIN zeros."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.numel():
            mask = m.weight.detach() != 0
            if 1.0 - mask.float().mean().item() >= SPARSE_MIN:
                out.append((m.weight, mask))
    return out


@register_handler(DistillConfig)
def handler(model, cfg: DistillConfig, calib, progress, ctx=None) -> dict:
    from lathe.compress.checkpoint import describe_modules

    if describe_modules(model):
        raise BadInput("distill must run before the quantization steps of a recipe (it trains fp "
                       "weights); use distill.qat for quantization-aware training")
    from lathe.models.base import adapter_of

    adapter = adapter_of(model)
    decoder = adapter.is_decoder
    hw = cfg.hidden_weight if cfg.hidden_weight is not None else \
        (1.0 if (not decoder or cfg.layer_map is not None) else 0.0)
    if (cfg.kl_weight if decoder else 0.0) + hw <= 0:
        raise BadInput("distill: nothing to distill: " + ("kl_weight and hidden_weight are both 0"
                       if decoder else "encoders have no logits; set hidden_weight > 0"))
    if ctx is None or ctx.source is None:
        raise BadInput("distill needs the original model as teacher: run it in a recipe "
                       "(lathe compress) or pass ctx=StepContext(source=...)")
    home = next(model.parameters()).device
    dev = train_device(cfg, home)
    use_fsdp = cfg.fsdp and dist.is_distributed()
    fingerprint = _fingerprint(cfg, model) if ctx.work_dir is not None else None
    if use_fsdp:  # train a sharded copy (each rank's shard on dev); its full weights come
        # back into `model`, which never leaves home, at the end
        student = fsdp.shard(model, _layers, dev)
        teacher = fsdp.shard(ctx.teacher(), _layers, dev)  # frozen, sharded alike
    else:
        student = model.to(dev)
        teacher = ctx.teacher().to(dev)
    s_layers, t_layers = _layers(student), _layers(teacher)
    pairs = cfg.pairs(len(s_layers), len(t_layers)) if hw > 0 else []
    data = _Data(cfg, ctx, decoder)
    s_cap = _Capture(s_layers, [i for i, _ in pairs])
    t_cap = _Capture(t_layers, [j for _, j in pairs])

    torch.manual_seed(cfg.seed)
    opt = _optimizer(student, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ckpt = None
    if fingerprint is not None:
        ckpt = ctx.work_dir / f"distill-{fingerprint}.pt"
    start, losses = 0, []
    state = _load(ckpt) if ckpt is not None and ckpt.is_file() else None
    if state is not None:
        fsdp.load(student, opt, state["model"], state["optim"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        start, losses = int(state["step"]), state["losses"].tolist()
        log.info("distill: resuming from step %d/%d (%s)", start, cfg.steps, ckpt)
    masks = sparsity_masks(student) if cfg.keep_sparsity else []
    qat_names, qat_skipped, undo_qat = enable_qat(student, cfg.qat) if cfg.qat != "none" else ([], [], None)

    def save(step):
        if ckpt is not None:
            _save(ckpt, student, opt, sched, step, losses)

    wrapped = student if use_fsdp else _wrap(student)
    params = [p for p in student.parameters() if p.requires_grad]
    student.train()
    t0, done = time.time(), start
    try:
        for step in range(start, cfg.steps):
            batch = _local(data.global_batch(step), dev)
            mask = batch["attention_mask"]
            # global counts: each rank's sums are divided by them (exact under any sharding)
            counts = dist.all_reduce_sum_(torch.tensor([float(mask.sum()), float(mask.shape[0])]))
            with torch.no_grad():
                t_out = teacher(**batch)
            s_out = wrapped(**batch)
            loss, terms = _loss_terms(cfg, decoder, adapter.pool, s_out, t_out, s_cap.out, t_cap.out, pairs,
                                      mask, counts[0], counts[1], hw)
            opt.zero_grad(set_to_none=True)
            (loss * dist.world()).backward()  # DDP / FSDP average gradients over ranks
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if masks:
                with torch.no_grad():
                    for w, m in masks:
                        w.mul_(m)
            sched.step()
            done = step + 1
            losses.append(float(dist.all_reduce_sum_(loss.detach().double().reshape(1))))
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save(done)
            if done % cfg.log_every == 0 or done == cfg.steps:
                log.info("distill step %d/%d loss %.6f %s lr %.3g", done, cfg.steps, losses[-1],
                         " ".join(f"{k} {float(v.detach()):.5f}" for k, v in terms.items()),
                         sched.get_last_lr()[0])
            if progress:
                progress(done, cfg.steps)
    except KeyboardInterrupt:
        save(done)  # a later run resumes here
        raise
    finally:
        s_cap.remove()
        t_cap.remove()
        if undo_qat:
            undo_qat()
        student.eval()
    save(done)  # a crash in a later recipe step does not redo the distillation
    if use_fsdp:  # every rank gets the trained full weights back in its plain model
        model.load_state_dict(fsdp.model_state(student))
        del student, wrapped, opt
    model.to(home)  # later recipe steps and the save find it where it was
    ctx.teacher().to(home)
    dist.barrier()
    rep = _report(cfg, decoder, losses, start, done, time.time() - t0, pairs, hw, qat_names, qat_skipped)
    rep["sparse_layers_kept"] = len(masks)
    rep["device"] = str(dev)
    rep["teacher"] = str(ctx.teacher_origin().path)
    rep["parallel"] = ("fsdp" if use_fsdp else "ddp") if dist.is_distributed() else None
    return rep


def _report(cfg, decoder, losses, start, done, seconds, pairs, hw, qat_names, qat_skipped):
    k = max(1, len(losses) // 20)
    return {
        "method": "distill", "model": "decoder" if decoder else "encoder",
        "steps": cfg.steps, "steps_run": done - start, "resumed_from": start or None,
        "seconds": round(seconds, 3),
        "steps_per_s": round((done - start) / seconds, 3) if seconds > 0 and done > start else None,
        "world": dist.world(),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "loss_min": min(losses) if losses else None,
        "loss_every": k, "loss_curve": [round(x, 6) for x in losses[::k]],
        "hidden_weight": hw, "layer_map": [list(p) for p in pairs],
        "qat": cfg.qat, "qat_layers": len(qat_names), "qat_skipped": qat_skipped,
    }


__all__ = ["DistillConfig", "handler", "fake_quant", "fake_quant_ste", "enable_qat", "lr_factor"]
