"""lathe.text.Tokenizer pads and truncates as its TokenizerSettings say, and
lathe.models.tokenizer(dir) hands it the settings of the directory's model family (the
adapter's `tokenizer`), which are the ones lathe always used: [PAD] = 0, 512 tokens."""
import json

import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer

import lathe
from lathe import models
from lathe.models.base import ModelAdapter
from lathe.models.bert import BertEncoder
from lathe.models.llama import LlamaForCausalLM
from lathe.text import Tokenizer, TokenizerSettings, eval_sentences

DECODER = lathe.__path__[0] + "/data/decoder-lm"
LONG = " ".join(["word"] * 700)  # more than 512 tokens


def _raw(model_dir, seq_len=None):
    """The tokenizers library driven as lathe.text did before the settings moved to the adapter."""
    tok = RawTokenizer.from_file(f"{model_dir}/tokenizer.json")
    tok.enable_truncation(max_length=seq_len or 512)
    if seq_len:
        tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    else:
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


@pytest.mark.parametrize("which", ["minilm", "decoder"])
@pytest.mark.parametrize("seq_len", [None, 16])
def test_family_settings_give_the_old_tokens(which, seq_len, minilm):
    d = minilm if which == "minilm" else DECODER
    texts = eval_sentences()[:7] + [LONG]
    got = models.tokenizer(d)(texts, seq_len)
    enc = _raw(d, seq_len).encode_batch(texts)
    assert torch.equal(got["input_ids"], torch.tensor([e.ids for e in enc]))
    assert torch.equal(got["attention_mask"], torch.tensor([e.attention_mask for e in enc]))
    assert torch.equal(got["token_type_ids"], torch.tensor([e.type_ids for e in enc]))
    assert got["input_ids"].shape[1] == (seq_len or 512)  # LONG truncated to max_length


def test_models_tokenizer_reads_the_family_settings(minilm, tmp_path):
    assert models.tokenizer(minilm).settings is BertEncoder.tokenizer
    assert models.tokenizer(DECODER).settings is LlamaForCausalLM.tokenizer
    assert LlamaForCausalLM.tokenizer.eot == "<|endoftext|>"
    # a model lathe has no family for (the generic transformers path): the protocol's defaults
    (tmp_path / "tokenizer.json").write_bytes((minilm / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert models.tokenizer(tmp_path).settings == ModelAdapter.tokenizer == TokenizerSettings()


def test_settings_decide_padding_and_truncation(minilm, monkeypatch):
    s = TokenizerSettings(pad_token="[PAD]", pad_id=7, max_length=9)
    monkeypatch.setattr(BertEncoder, "tokenizer", s)
    tok = models.tokenizer(minilm)
    assert tok.settings is s and tok.max_length == 9
    out = tok(["a", "a much longer sentence than nine tokens, surely, with commas"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (2, 9)  # truncated to max_length, padded to the longest
    assert (ids[0][mask[0] == 0] == 7).all() and (mask[0] == 0).any()
    assert (mask[1] == 1).all()
    fixed = Tokenizer(minilm, s)(["a"], seq_len=12)["input_ids"]
    assert fixed.shape == (1, 12) and (fixed[0, 3:] == 7).all()  # [CLS] a [SEP], then pad_id
