"""Distillation: the loss falls, the student moves toward the teacher, a killed run resumes to
the same result, QAT's straight-through estimator trains through fake quantization, bad
configs are refused. Student: lathe's decoder LM with a layer dropped (seconds a run)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lathe
from lathe.compress.checkpoint import build_model
from lathe.compress.config import config_from_dict
from lathe.compress.context import StepContext
from lathe.compress.distill import DistillConfig, _Data, fake_quant, fake_quant_ste, handler
from lathe.errors import BadInput
from lathe.source import open_source

DECODER = Path(lathe.__file__).parent / "data" / "decoder-lm"
SMALL = dict(batch_size=2, seq_len=32, lr=1e-3, warmup=1, seed=3)


@pytest.fixture(scope="module")
def src():
    return open_source(DECODER)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small training corpus: stdlib files of the decoder's training split (fixed by the
    Python install, unlike lathe's own sources, which change with every edit)."""
    from lathe.bench.perplexity import train_texts

    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text("\n".join(train_texts(n_files=6)))
    return str(p)


def student(src, drop=(2,)):
    m = build_model(src)
    for i in sorted(drop, reverse=True):
        del m.model.layers[i]
    return m


def kl_to_teacher(model, teacher, batch, quant=None):
    """Mean per-token KL(teacher || model) on a fixed batch (optionally with fake-quantized
    Linear weights, as the deployed int8/int4 model would compute)."""
    model.eval()
    saved = {}
    if quant:
        for n, m in model.named_modules():
            if type(m) is torch.nn.Linear and (quant == "int8" or m.in_features % 128 == 0):
                saved[n] = m.weight.data.clone()
                m.weight.data = fake_quant(m.weight.data, quant)
    with torch.no_grad():
        ls, lt = F.log_softmax(model(**batch), -1), F.log_softmax(teacher(**batch), -1)
    for n, w in saved.items():
        model.get_submodule(n).weight.data = w
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


def test_distill_lowers_loss_and_gap_to_teacher(src, corpus):
    ctx = StepContext(source=src)
    s = student(src)
    cfg = DistillConfig(steps=48, data=corpus, **SMALL)
    held = _Data(DistillConfig(batch_size=8, seq_len=64, data=corpus, seed=99), ctx, True).global_batch(0)
    before = kl_to_teacher(s, ctx.teacher(), held)
    r = handler(s, cfg, None, None, ctx)
    after = kl_to_teacher(s, ctx.teacher(), held)
    assert r["steps_run"] == 48 and r["resumed_from"] is None and r["device"] == "cpu"
    assert not s.training  # eval again after training
    # the loss that matters, KL to the teacher on a fixed held-out batch, fell; the training
    # curve itself (random batches of 2) is too noisy to compare point by point
    assert after < 0.8 * before, (before, after)
    assert len(r["loss_curve"]) >= 20 and all(0 <= v < 10 for v in r["loss_curve"])


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


@pytest.mark.parametrize("kill", ["ctrl-c", "crash"])
def test_resume_matches_uninterrupted(src, corpus, tmp_path, kill):
    cfg = DistillConfig(steps=6, data=corpus, save_every=2, **SMALL)
    ref = student(src)
    r_ref = handler(ref, cfg, None, None, StepContext(source=src, work_dir=tmp_path / "a"))

    def stop_at_3(step, total):
        if step == 3:
            raise KeyboardInterrupt if kill == "ctrl-c" else RuntimeError("killed")

    work = tmp_path / "b"
    s = student(src)
    with pytest.raises(KeyboardInterrupt if kill == "ctrl-c" else RuntimeError):
        handler(s, cfg, None, stop_at_3, StepContext(source=src, work_dir=work))
    s = student(src)  # a fresh process: the same starting weights
    r = handler(s, cfg, None, None, StepContext(source=src, work_dir=work))
    # Ctrl-C saves where it stopped; a hard crash resumes from the last periodic checkpoint
    assert r["resumed_from"] == (3 if kill == "ctrl-c" else 2)
    assert r["steps_run"] == 6 - r["resumed_from"]
    torch.testing.assert_close(_flat(s), _flat(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(r["loss_curve"]), torch.tensor(r_ref["loss_curve"]),
                               rtol=1e-5, atol=0)


def test_ste_gradient_is_identity():
    w = torch.randn(8, 128, requires_grad=True)
    for qat in ("int8", "int4"):
        w.grad = None
        q = fake_quant_ste(w, qat)
        assert not torch.equal(q.detach(), w.detach())  # the forward really is quantized
        torch.testing.assert_close(q.detach(), fake_quant(w.detach(), qat))
        (q * torch.arange(128.0)).sum().backward()
        torch.testing.assert_close(w.grad, torch.arange(128.0).expand(8, 128))


@pytest.mark.parametrize("qat", ["int8", "int4"])
def test_qat_lowers_quantized_error(src, corpus, qat):
    """Student = the teacher itself; QAT trains it to compensate its own quantization error,
    so the fake-quantized model ends closer to the fp32 teacher than plain rounding gives."""
    ctx = StepContext(source=src)
    s = student(src, drop=())
    held = _Data(DistillConfig(batch_size=8, seq_len=64, data=corpus, seed=99), ctx, True).global_batch(0)
    no_qat = kl_to_teacher(s, ctx.teacher(), held, quant=qat)
    # lr well below a quantization step (int8 steps are ~16x finer than int4's)
    lr = {"int8": 1e-6, "int4": 3e-5}[qat]
    r = handler(s, DistillConfig(steps=16, data=corpus, qat=qat, temperature=1.0, **{**SMALL, "lr": lr}),
                None, None, ctx)
    assert r["qat_layers"] > 0
    with_qat = kl_to_teacher(s, ctx.teacher(), held, quant=qat)
    assert with_qat < 0.85 * no_qat, (no_qat, with_qat, r["loss_curve"])
    # the hooks are gone: forward is nn.Linear's own again
    assert all("forward" not in vars(m) for m in s.modules())


def test_encoder_train_attention_matches_op(minilm):
    """BERT training mode (SDPA, differentiable) computes what the lathe op computes."""
    m = lathe.load(minilm)
    ids = torch.randint(1000, 2000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref = m(ids, mask)
    m.train()
    out = m(ids, mask)
    assert out.requires_grad
    ref_real, out_real = ref[mask.bool()], out.detach()[mask.bool()]
    err = (ref_real - out_real).abs().max() / ref_real.abs().max()
    assert err < 1e-5, err
    out[mask.bool()].sum().backward()
    assert m.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_encoder_distill_runs(minilm, tmp_path):
    """MiniLM with its last layer dropped: hidden + pooled cosine loss, a few steps."""
    src = open_source(minilm)
    m = build_model(src)
    del m.encoder.layer[5]
    data = tmp_path / "lines.txt"
    from lathe.text import calibration_texts

    data.write_text("\n".join(calibration_texts(32)))
    r = handler(m, DistillConfig(steps=6, batch_size=4, seq_len=32, lr=1e-4, warmup=1, data=str(data)),
                None, None, StepContext(source=src))
    assert r["model"] == "encoder" and r["hidden_weight"] == 1.0
    assert r["layer_map"][-1] == [4, 5]  # the last student layer maps to the last teacher layer
    assert all(torch.isfinite(torch.tensor(r["loss_curve"])))
    assert r["loss_last"] < r["loss_first"]


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("lr", -1.0), ("lr", float("nan")), ("batch_size", 1.5), ("seq_len", 1),
    ("warmup", -1), ("weight_decay", "x"), ("temperature", 0), ("kl_weight", -0.1),
    ("hidden_weight", -1), ("hidden_loss", "l1"), ("layer_map", "0:1"), ("layer_map", {0: -1}),
    ("save_every", -5), ("qat", "int3"), ("fsdp", "yes"), ("seed", True), ("data", 3),
    ("device", "tpu")])
def test_bad_config(field, value):
    with pytest.raises(BadInput, match=f"distill.{field}"):
        config_from_dict({"method": "distill", field: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_without_gpu_is_bad_input(src):
    with pytest.raises(BadInput, match="distill.device is cuda but no CUDA device"):
        handler(student(src), DistillConfig(steps=1, device="cuda"), None, None, StepContext(source=src))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_distill_trains_on_gpu_and_returns(src, corpus):
    """device auto trains a CPU-built student on the GPU, then hands it back on the CPU,
    trained (the held-out KL fell)."""
    ctx = StepContext(source=src)
    s = student(src)
    held = _Data(DistillConfig(batch_size=8, seq_len=64, data=corpus, seed=99), ctx, True).global_batch(0)
    before = kl_to_teacher(s, ctx.teacher(), held)
    r = handler(s, DistillConfig(steps=48, data=corpus, **SMALL), None, None, ctx)
    assert r["device"].startswith("cuda")
    assert all(p.device.type == "cpu" for p in s.parameters())
    assert kl_to_teacher(s, ctx.teacher(), held) < 0.8 * before


def test_bad_inputs(src, tmp_path):
    with pytest.raises(BadInput, match="unknown field"):
        config_from_dict({"method": "distill", "stpes": 3})
    with pytest.raises(BadInput, match="teacher"):
        handler(student(src), DistillConfig(steps=1), None, None, None)
    with pytest.raises(BadInput, match="out of range"):
        handler(student(src), DistillConfig(steps=1, layer_map={0: 9}, data=str(tmp_path / "x")),
                None, None, StepContext(source=src))
    with pytest.raises(BadInput, match="not found"):
        handler(student(src), DistillConfig(steps=1, data=str(tmp_path / "missing.txt")),
                None, None, StepContext(source=src))


def test_recipe_distill_then_int8(src, corpus, tmp_path):
    """A recipe step: distill (QAT int8) then int8, saved and loaded back; the work folder
    with the distillation checkpoint is removed once the output is complete."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: qat-int8\nsteps:\n  - method: distill\n    steps: 2\n    batch_size: 2\n"
                      f"    seq_len: 16\n    lr: 1.0e-6\n    qat: int8\n    data: {corpus}\n"
                      f"  - method: int8\n    smoothquant: false\n")
    out = lathe.compress_checkpoint(DECODER, str(recipe), tmp_path / "out")
    m = lathe.load(out)
    assert type(m.model.layers[0].mlp.up_proj).__name__ == "QLinearW8A8"
    assert not (tmp_path / ".out.work").exists()
    ids = torch.randint(1, 4000, (1, 8))
    assert torch.isfinite(m(ids)).all()


def test_distill_keeps_2of4_sparsity(src, corpus):
    """A 2:4 model stays 2:4 through distillation (the mask is re-applied after every step)."""
    from lathe.compress.prune import PruneConfig
    from lathe.compress.quantize import quantize

    ctx = StepContext(source=src)
    s = build_model(src)
    quantize(s, PruneConfig(algo="magnitude", pattern="2:4"), None)
    before = {n: m.weight.detach() != 0 for n, m in s.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    r = handler(s, DistillConfig(steps=4, data=corpus, **SMALL), None, None, ctx)
    assert r["sparse_layers_kept"] == len(before)
    for n, mask in before.items():
        w = s.get_submodule(n).weight.detach()
        assert torch.equal(w != 0, mask), n  # same zeros: trained weights stayed non-zero too
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), n
