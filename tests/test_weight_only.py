"""Weight-only quantization: int4 RTN / GPTQ / AWQ, int8 weight-only, FP8 simulation, their
modules, configs, bad inputs, and the int4-gptq recipe on MiniLM."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import lathe
from lathe.compress.config import (Fp8Config, Int4Config, Int8WeightOnlyConfig,
                                   config_from_dict)
from lathe.compress.modules import QUANT_MODULES, QLinearFP8, QLinearW4A16, QLinearW8A16
from lathe.compress.quantize import quantize, sqnr_db
from lathe.errors import BadInput
from testkit import One

K, N = 256, 128


def _inputs(T, seed, K=K):
    """Correlated, non-isotropic inputs: a random mixing matrix and log-normal channel scales
    (a few channels an order of magnitude larger, as in transformer activations)."""
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    chan = torch.exp(1.0 * torch.randn(K, generator=g))
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(seed))
    return (x @ mix) * chan


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    calib = [{"x": _inputs(512, s)} for s in range(4)]
    test_x = _inputs(2048, 99)
    with torch.no_grad():
        ref = lin(test_x)
    return lin, calib, test_x, ref


def _err(problem, cfg):
    lin, calib, x, ref = problem
    m = One(copy.deepcopy(lin))
    report = quantize(m, cfg, calib)
    assert isinstance(m.lin, QLinearW4A16) and report["quantized"] == ["lin"]
    with torch.no_grad():
        y = m(x)
    assert torch.isfinite(y).all()
    return float((y - ref).pow(2).mean()), m, report


@pytest.mark.parametrize("g", [32, 128])
def test_gptq_and_awq_beat_rtn(problem, g):
    rtn, _, _ = _err(problem, Int4Config(algo="rtn", group_size=g))
    gptq, _, rep = _err(problem, Int4Config(algo="gptq", group_size=g))
    awq, m, rep_awq = _err(problem, Int4Config(algo="awq", group_size=g))
    awq_scale_only, _, _ = _err(problem, Int4Config(algo="awq", group_size=g, awq_clip=False))
    assert gptq < 0.8 * rtn, (gptq, rtn)
    assert awq < 0.95 * rtn and awq_scale_only < 0.95 * rtn, (awq, awq_scale_only, rtn)
    assert rep["peak_rss_mb"] > 0 and rep["layers"]["lin"]["tokens"] == 2048
    assert m.lin.smooth is not None and rep_awq["layers"]["lin"]["alpha"] > 0


def test_act_order(problem):
    rtn, _, _ = _err(problem, Int4Config(algo="rtn", group_size=64))
    plain, _, _ = _err(problem, Int4Config(algo="gptq", group_size=64))
    ao, m, rep = _err(problem, Int4Config(algo="gptq", group_size=64, act_order=True))
    assert ao < 0.8 * rtn and ao < 1.25 * plain, (ao, plain, rtn)
    # the plain format: groups in the original column order, no permutation stored
    assert m.lin.scales.shape == (N, K // 64) and m.lin.qweight.shape == (N, K // 2)
    assert "original column order" in rep["act_order_groups"]


def test_symmetric_vs_asymmetric(problem):
    for algo in ("rtn", "gptq"):
        e_sym, m_sym, _ = _err(problem, Int4Config(algo=algo, symmetric=True))
        e_asym, m_asym, _ = _err(problem, Int4Config(algo=algo, symmetric=False))
        assert (m_sym.lin.zeros == 8).all()
        assert not (m_asym.lin.zeros == 8).all()
        assert m_sym.lin.format.manifest()["symmetric"] and not m_asym.lin.format.manifest()["symmetric"]
        assert e_asym < 1.5 * e_sym and e_sym < 2.5 * e_asym
    rtn_sym, _, _ = _err(problem, Int4Config(algo="rtn", symmetric=True))
    gptq_sym, _, _ = _err(problem, Int4Config(algo="gptq", symmetric=True))
    assert gptq_sym < 0.8 * rtn_sym


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_weight_only_sqnr(problem, group_size):
    lin, _, x, ref = problem
    m = One(copy.deepcopy(lin))
    rep = quantize(m, Int8WeightOnlyConfig(group_size=group_size))
    assert isinstance(m.lin, QLinearW8A16) and rep["quantized"] == ["lin"]
    assert m.lin.scales.shape == (N, 1 if group_size is None else K // group_size)
    with torch.no_grad():
        assert sqnr_db(ref, m(x)) > 40


def test_fp8_simulation(problem):
    lin, _, x, ref = problem
    for gran in ("per_channel", "per_tensor"):
        m = One(copy.deepcopy(lin))
        quantize(m, Fp8Config(granularity=gran))
        assert isinstance(m.lin, QLinearFP8) and m.lin.weight.dtype == torch.float8_e4m3fn
        assert "sm_89" in QLinearFP8.__doc__ and "fp8_linear" in QLinearFP8.__doc__
        with torch.no_grad():
            assert sqnr_db(ref, m(x)) > 20


@pytest.mark.parametrize("make", [
    lambda lin: QLinearW4A16.from_linear(lin, group_size=64),
    lambda lin: QLinearW4A16.from_linear(lin, group_size=32, symmetric=True,
                                         smooth=torch.rand(K) + 0.5),
    lambda lin: QLinearW8A16.from_linear(lin, group_size=None),
    lambda lin: QLinearW8A16.from_linear(lin, group_size=64),
    lambda lin: QLinearFP8.from_linear(lin, granularity="per_tensor"),
])
def test_modules_rebuild_from_manifest(problem, make, tmp_path):
    """What checkpoint.build_model does: class + manifest_args on meta, then the saved tensors."""
    from safetensors.torch import load_file, save_file

    lin, _, x, _ = problem
    q = make(lin)
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(tmp_path / "m.safetensors"))
    json.dumps({"args": q.manifest_args(), "format": q.format.manifest()})  # manifest-ready
    with torch.device("meta"):
        r = QUANT_MODULES[type(q).__name__](**q.manifest_args())
    r.load_state_dict(load_file(str(tmp_path / "m.safetensors")), assign=True, strict=True)
    r.prepare()
    with torch.no_grad():
        assert torch.equal(q(x[:64]), r(x[:64]))


def test_prepare_asks_the_dispatcher(problem):
    q = QLinearW4A16.from_linear(problem[0])
    assert q.backend == lathe.kernels.backend_for("linear_w4a16", "cpu")


# ----------------------------------------------------------------------------- bad inputs


def test_nan_weight_names_the_layer(problem):
    lin = copy.deepcopy(problem[0])
    with torch.no_grad():
        lin.weight[3, 7] = float("nan")
    for cfg in (Int4Config(algo="rtn"), Int4Config(algo="gptq"), Int8WeightOnlyConfig()):
        with pytest.raises(BadInput, match=r"weight of lin"):
            quantize(One(copy.deepcopy(lin)), cfg, problem[1])


def test_zero_channels_give_scale_one_and_no_nan(problem):
    lin, calib, x, _ = problem
    lin = copy.deepcopy(lin)
    with torch.no_grad():
        lin.weight[:5] = 0  # all-zero output channels
        lin.weight[:, :64] = 0  # an all-zero weight group
    dead = [{"x": b["x"].clone()} for b in calib]
    for b in dead:
        b["x"][:, 100:110] = 0  # input channels that never fire: H_jj = 0, mean|x| = 0
    for algo in ("rtn", "gptq", "awq"):
        m = One(copy.deepcopy(lin))
        quantize(m, Int4Config(algo=algo, group_size=64), dead)
        q = m.lin
        assert torch.isfinite(q.scales).all() and (q.scales[:5] == 1).all()
        assert (q.scales[:, 0] == 1).all()
        if q.smooth is not None:
            assert torch.isfinite(q.smooth).all() and (q.smooth[100:110] == 1).all()
        with torch.no_grad():
            y = m(x)
        assert torch.isfinite(y).all()
        assert torch.equal(y[:, :5], lin.bias[:5].expand(len(x), 5))
    m = One(copy.deepcopy(lin))
    quantize(m, Int8WeightOnlyConfig(group_size=64))
    assert (m.lin.scales[:5] == 1).all() and torch.isfinite(m.lin.scales).all()


@pytest.mark.parametrize("algo", ["gptq", "awq"])
def test_empty_calibration(problem, algo):
    for calib in ([], None):
        with pytest.raises(BadInput, match="calibration"):
            quantize(One(copy.deepcopy(problem[0])), Int4Config(algo=algo), calib)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(128, 96)
        self.conv = nn.Conv1d(96, 96, 1)
        self.b = nn.Linear(96, 64)  # 96 is not a multiple of 64
        self.lm_head = nn.Linear(64, 128)

    def forward(self, x):
        h = self.a(x)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(self.b(h))

    def linear_groups(self):
        yield "a", ["a"]
        yield "conv", ["conv"]
        yield "b", ["b"]
        yield "lm_head", ["lm_head"]


def test_skips_are_reported(caplog):
    torch.manual_seed(0)
    calib = [{"x": torch.randn(2, 8, 128)}]
    m = Mixed()
    with caplog.at_level("INFO", logger="lathe.compress"):
        rep = quantize(m, Int4Config(algo="gptq", group_size=64), calib)
    assert rep["quantized"] == ["a"] and isinstance(m.a, QLinearW4A16)
    sk = "\n".join(rep["skipped"])
    assert "conv: Conv1d is not an nn.Linear" in sk
    assert "b: in_features 96 is not a multiple of group_size 64" in sk
    assert "lm_head: skip list" in sk
    assert "Conv1d is not an nn.Linear" in caplog.text
    with torch.no_grad():
        assert torch.isfinite(m(calib[0]["x"])).all()


def test_sensitivity():
    from lathe.compress.weight_only import sensitivity

    torch.manual_seed(0)
    m = Mixed()
    with torch.no_grad():
        m.a.weight[:, :4] *= 30  # a few outlier input channels: a is the sensitive one
    calib = [{"x": torch.randn(2, 8, 128)} for _ in range(2)]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = Int4Config(algo="rtn", group_size=32, skip=[])
    res = sensitivity(m, calib, cfg)
    assert [n for n, _ in res] == ["a", "b", "lm_head"]
    assert all(0 < db < 80 for _, db in res)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert isinstance(m.a, nn.Linear)
    assert len(sensitivity(m, calib, Int8WeightOnlyConfig(skip=[]))) == 3


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("d, field", [
    ({"method": "int4", "bogus": 1}, "bogus"),
    ({"method": "int4", "algo": "hqq"}, "algo"),
    ({"method": "int4", "group_size": 100}, "group_size"),
    ({"method": "int4", "group_size": True}, "group_size"),
    ({"method": "int4", "symmetric": "yes"}, "symmetric"),
    ({"method": "int4", "algo": "rtn", "act_order": True}, "act_order"),
    ({"method": "int4", "algo": "gptq", "damp": 0}, "damp"),
    ({"method": "int4", "algo": "gptq", "damp": "lots"}, "damp"),
    ({"method": "int4", "algo": "awq", "awq_grid": 0}, "awq_grid"),
    ({"method": "int4", "algo": "awq", "awq_clip": "no"}, "awq_clip"),
    ({"method": "int4", "skip": "lm_head"}, "skip"),
    ({"method": "int8-weight-only", "group_size": 20}, "group_size"),
    ({"method": "int8-weight-only", "group": 32}, "group"),
    ({"method": "fp8", "granularity": "per_row"}, "granularity"),
    ({"method": "fp8", "act_granularity": "per_channel"}, "act_granularity"),
])
def test_config_errors_name_the_field(d, field):
    with pytest.raises(BadInput, match=rf"\b{field}\b"):
        config_from_dict(d)


def test_presets_load():
    from lathe.compress.recipes import load_recipe

    for name, algo in (("int4-rtn", "rtn"), ("int4-gptq", "gptq"), ("int4-awq", "awq")):
        (step,) = load_recipe(name).steps
        assert isinstance(step, Int4Config) and step.algo == algo and step.group_size == 128
    assert isinstance(load_recipe("int8-weight-only").steps[0], Int8WeightOnlyConfig)
    assert isinstance(load_recipe("fp8").steps[0], Fp8Config)


# ----------------------------------------------------------------------------- MiniLM


@pytest.mark.slow
def test_minilm_int4_gptq(minilm, tmp_path):
    from lathe.compress.checkpoint import save
    from lathe.models.bert import mean_pool
    from lathe.compress.pipeline import calibration_batches
    from lathe.source import open_source
    from lathe.text import Tokenizer, eval_sentences

    # half the default calibration set (64 texts) keeps this test's time down
    out = lathe.compress_checkpoint(minilm, "int4-gptq", tmp_path / "q",
                                    calib=calibration_batches(minilm, n=64))
    manifest = json.loads((out / "lathe_manifest.json").read_text())
    rep = manifest["report"]["steps"][0]
    assert rep["algo"] == "gptq" and len(rep["quantized"]) == 36 and not rep["skipped"]
    assert rep["calibration"].startswith("layer by layer over encoder.layer") and rep["peak_rss_mb"] > 0
    q = lathe.load(out)
    assert sum(isinstance(m, QLinearW4A16) for m in q.modules()) == 36
    b = Tokenizer(minilm)(eval_sentences()[:64])
    with torch.inference_mode():
        ref = mean_pool(lathe.load(minilm)(**b), b["attention_mask"])
        got = mean_pool(q(**b), b["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(ref, got)
    assert cos.min() > 0.9, float(cos.min())
    # save -> load -> forward is bit-identical
    save(q, open_source(out), tmp_path / "again", recipe=manifest["recipe"])
    q2 = lathe.load(tmp_path / "again")
    b5 = Tokenizer(minilm)(eval_sentences()[:5])
    with torch.inference_mode():
        assert torch.equal(q(**b5), q2(**b5))


DECODER = __import__("pathlib").Path(lathe.__file__).parent / "data" / "decoder-lm"


@pytest.mark.slow
@pytest.mark.skipif(not (DECODER / "config.json").is_file(), reason="lathe/data/decoder-lm is absent")
def test_decoder_int4_gptq_layer_by_layer(tmp_path):
    """The Llama path: blocks at model.layers (tuple outputs, several positional inputs),
    gate/up sharing an input, down_proj (in 704) skipped at group 128, tied lm_head untouched."""
    import torch.nn.functional as F

    from lathe.text import Tokenizer, batches, calibration_texts

    tok = Tokenizer(DECODER)
    calib = batches(tok, list(calibration_texts(32)), batch_size=16, seq_len=64)
    out = lathe.compress_checkpoint(DECODER, "int4-gptq", tmp_path / "q", calib=calib)
    rep = json.loads((out / "lathe_manifest.json").read_text())["report"]["steps"][0]
    c = json.loads((DECODER / "config.json").read_text())
    n_layers, inter = c["num_hidden_layers"], c["intermediate_size"]
    assert rep["calibration"].startswith("layer by layer over model.layers")
    down_ok = inter % 128 == 0
    assert len(rep["quantized"]) == (7 if down_ok else 6) * n_layers
    assert len(rep["skipped"]) == (0 if down_ok else n_layers)
    assert all(f"down_proj: in_features {inter} is not a multiple of group_size 128" in s
               for s in rep["skipped"])
    ids = tok(list(calibration_texts(40))[32:40], seq_len=64)["input_ids"]
    with torch.inference_mode():
        ref = F.log_softmax(lathe.load(DECODER)(input_ids=ids).float(), -1)
        got = F.log_softmax(lathe.load(out)(input_ids=ids).float(), -1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert kl < 0.01, kl
