"""The table `lathe compress` prints: size, quality and latency against fp32, measured."""
import time

import lathe
from lathe import summary

DECODER = lathe.__path__[0] + "/data/decoder-lm"


def test_cli_prints_the_table(minilm, tmp_path, capsys):
    from lathe.cli import main

    t0 = time.perf_counter()
    assert main(["compress", str(minilm), "--recipe", "int8-dynamic", "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    header, row = out.strip().splitlines()[-2:]
    for col in ("recipe", "size MiB", "quality vs fp32", "latency ms"):
        assert col in header
    assert row.startswith("int8-dynamic") and "min cos" in row
    print(out)
    r = summary.summarize(minilm, tmp_path / "o", reps=2)
    assert r["size_ratio"] < 0.8  # int8 linears are a quarter of their fp32 bytes; embeddings stay fp32
    assert 0.9 < r["quality"]["value"] <= 1.0 + 1e-9
    assert r["ms_fp32"] > 0 and r["ms_out"] > 0
    assert time.perf_counter() - t0 < 120


def test_no_summary_skips_it(tmp_path, capsys):
    from lathe.cli import main

    assert main(["compress", DECODER, "--recipe", "int4-rtn", "-o", str(tmp_path / "o"),
                 "--no-summary"]) == 0
    assert "quality vs fp32" not in capsys.readouterr().out


def test_decoder_row_reports_perplexity(tmp_path):
    out = lathe.compress_checkpoint(DECODER, "int4-rtn", tmp_path / "o")
    r = summary.summarize(DECODER, out, reps=2)
    q = r["quality"]
    assert q["metric"] == "perplexity" and q["fp32"] > 1
    assert 1.0 <= q["ratio"] < 1.2  # int4 RTN costs a little perplexity, not a lot
    assert r["size_ratio"] < 1
    assert "ppl" in summary.table(r)
