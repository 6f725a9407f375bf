"""Recipes chain across runs: a pruned (unquantized) checkpoint can be compressed again, and
the result keeps the original model as its quality reference."""
import json

import pytest
import torch

import lathe
from lathe.compress.recipes import load_recipe, presets
from lathe.errors import BadInput


@pytest.mark.parametrize("name", ["prune-structured", "prune-int8", "sparse-2of4", "prune-wanda",
                                  "prune-sparsegpt", "lowrank"])
def test_issue8_presets_load(name):
    assert name in presets()
    rec = load_recipe(name)
    assert rec.steps


def test_prune_then_int8_in_two_runs(tmp_path, minilm):
    pruned = lathe.compress_checkpoint(minilm, load_recipe_from(tmp_path, "ffn: 0.25"), tmp_path / "p")
    q = lathe.compress_checkpoint(pruned, "int8", tmp_path / "q")
    m = json.loads((q / "lathe_manifest.json").read_text())
    orig = json.loads((pruned / "lathe_manifest.json").read_text())["source"]
    assert m["source"] == orig  # the reference stays the original model
    assert [p["path"] for p in m["parents"]] == [str(pruned)]
    assert m["recipe"]["name"] == "tiny-prune+int8"
    model = lathe.load(q)
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["intermediate_size"] == 1152
    ids = torch.randint(1000, 2000, (2, 9))
    assert torch.isfinite(model(ids)).all()
    with pytest.raises(BadInput, match="quantized"):
        lathe.compress_checkpoint(q, "int8", tmp_path / "again")
    # the summary of a chained run compares with the original model, not the parent
    from lathe.summary import summarize, weights_bytes

    row = summarize(pruned, q, reps=1, n_sentences=8)
    assert row["size_src"] == weights_bytes(minilm) > weights_bytes(pruned)


def load_recipe_from(tmp_path, fields: str):
    p = tmp_path / "r.yaml"
    p.write_text(f"name: tiny-prune\nsteps:\n  - method: prune-structured\n    {fields}\n")
    return str(p)


DECODER = lathe.__path__[0] + "/data/decoder-lm"
DISTILL = "name: more\nsteps:\n  - method: distill\n    steps: 2\n    batch_size: 2\n    seq_len: 16\n    save_every: 0\n"


def test_distilling_a_pruned_checkpoint_learns_from_the_original(tmp_path, caplog):
    """A chained distill's teacher is the original model the manifest records, not the pruned
    parent (whose copy of itself would teach nothing); with the original gone, the parent
    teaches, and a warning says so."""
    import shutil

    orig = tmp_path / "orig"
    shutil.copytree(DECODER, orig)
    pruned = lathe.compress_checkpoint(orig, load_recipe_from(tmp_path, "ffn: 0.25"), tmp_path / "p")
    (tmp_path / "d.yaml").write_text(DISTILL)
    out = lathe.compress_checkpoint(pruned, str(tmp_path / "d.yaml"), tmp_path / "d")
    rep = json.loads((out / "lathe_manifest.json").read_text())["report"]["steps"][0]
    assert rep["teacher"] == str(orig) and rep["loss_first"] > 0
    shutil.rmtree(orig)
    with caplog.at_level("WARNING", logger="lathe.compress"):
        out2 = lathe.compress_checkpoint(pruned, str(tmp_path / "d.yaml"), tmp_path / "d2")
    rep2 = json.loads((out2 / "lathe_manifest.json").read_text())["report"]["steps"][0]
    assert rep2["teacher"] == str(pruned)
    assert "missing or changed" in caplog.text
