"""torchao as a bench anchor (lathe.bench.torchao_backend): its int8 backend on a tiny model
against transformers' fp32 forward, int4 where a CPU kernel exists (else its one-line reason),
the guard without torchao, and one `lathe bench` table with torchao beside lathe."""
import sys

import pytest
import torch

from hf_tiny import inputs, reference, write

pytestmark = pytest.mark.filterwarnings("ignore")
tao = pytest.importorskip("lathe.bench.torchao_backend")


def _need_torchao():
    try:
        tao.import_torchao()
    except Exception as e:  # BadInput naming the extra
        pytest.skip(str(e))


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    return write("roberta", tmp_path_factory.mktemp("hf") / "roberta")


def test_int8_against_fp32(roberta):
    _need_torchao()
    from lathe.bench.backends import Spec, make

    x = inputs("roberta")
    ref = reference("roberta", roberta, x)
    b = make(Spec("torchao-int8", str(roberta), "torchao int8"))
    y = b.run(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert _cos(y, ref) >= 0.99  # the bound for int8 (W8A8)
    # really quantized: its Linear weights are torchao tensors, smaller than fp32
    m, nbytes = tao.quantized(roberta, "torchao-int8")
    kinds = {type(mod.weight.data).__name__ for mod in m.modules() if isinstance(mod, torch.nn.Linear)}
    assert kinds and "Tensor" not in kinds, kinds
    from lathe.models.generic import reference_model
    fp32 = sum(p.numel() * p.element_size() for p in reference_model(roberta).parameters())
    assert nbytes < fp32


def test_int4_runs_or_says_why(roberta):
    _need_torchao()
    try:
        cfg, dtype = tao.int4_config(group_size=32)
    except tao.Unavailable as e:
        msg = str(e)
        assert "\n" not in msg and "int4" in msg and "CPU kernel" in msg
        pytest.skip(f"no torchao int4 CPU kernel here: {msg}")
    x = inputs("roberta")
    ref = reference("roberta", roberta, x)
    m, _ = tao.quantized(roberta, "torchao-int4")
    with torch.inference_mode():
        assert _cos(m(**x).float(), ref) >= 0.95


def test_guard_without_torchao(monkeypatch):
    from lathe.errors import BadInput

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(BadInput, match=r"lathe\[torchao\]"):
        tao.import_torchao()


def test_one_table_with_lathe(roberta, tmp_path):
    _need_torchao()
    import lathe
    from lathe import benchflow
    from lathe.bench.report import table

    out = lathe.compress_checkpoint(roberta, "int8", tmp_path / "int8", calib=[inputs("roberta", 4, 16)])
    doc = benchflow.run(out, tmp_path / "work", ("torch", "torchao-int8", "torchao-int4", "lathe"), (1,), 16,
                        min_runs=3, min_seconds=0.05, log=lambda *_: None)
    labels = {r["backend"] for r in doc["results"]}
    assert any(lb.startswith("torchao int8") for lb in labels) and "torch fp32" in labels
    assert any(lb.startswith("lathe") for lb in labels)
    for lb in labels:  # quality beside speed for each row
        assert doc["quality"][lb]["min_cos"] > 0.9
    text = table(doc)
    assert "torchao int8" in text
    ran_int4 = any(lb.startswith("torchao int4") for lb in labels)
    assert ran_int4 or "torchao-int4: skipped:" in text


def test_decoder_bench_with_torchao(tmp_path):
    """`lathe bench DECODER --backend torchao-int8`: torchao's model decodes beside lathe's, with
    its perplexity (close to fp32's: int8 on a random model moves it little)."""
    _need_torchao()
    from lathe.bench import decoder

    src = write("qwen2", tmp_path / "qwen2")
    doc = decoder.run(src, (1,), 16, 2, min_runs=2, min_seconds=0.05, max_seconds=5, log=lambda *_: None,
                      backends=("torchao-int8", "torchao-int4"))
    names = [r["backend"] for r in doc["results"]]
    assert names[0] == "lathe fp32" and "torchao-int8" in names
    p0, p1 = doc["quality"]["lathe fp32"]["perplexity"], doc["quality"]["torchao-int8"]["perplexity"]
    assert abs(p1 / p0 - 1) < 0.02, (p0, p1)
    assert "torchao-int4" in names or "torchao-int4: skipped:" in decoder.table(doc)
