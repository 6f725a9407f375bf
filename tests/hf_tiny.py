"""Small random Hugging Face checkpoints built from transformers' config classes (nothing is
downloaded): hidden 64, 2 layers, a 300-token byte-level tokenizer written beside them."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
TOK = dict(bos_token_id=1, eos_token_id=2)


def _configs():
    import transformers as t

    return {
        "qwen2": (t.Qwen2Config(**COMMON, num_key_value_heads=2), t.Qwen2ForCausalLM),
        "mistral": (t.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None), t.MistralForCausalLM),
        "phi3": (t.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0), t.Phi3ForCausalLM),
        "gemma2": (t.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16), t.Gemma2ForCausalLM),
        "gpt2": (t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=VOCAB, n_positions=512, **TOK),
                 t.GPT2LMHeadModel),
        "opt": (t.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                            vocab_size=VOCAB, max_position_embeddings=512, word_embed_proj_dim=64, pad_token_id=0, **TOK),
                t.OPTForCausalLM),
        "distilbert": (t.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=VOCAB,
                                          max_position_embeddings=512, pad_token_id=0), t.DistilBertModel),
        "roberta": (t.RobertaConfig(**{**COMMON, "max_position_embeddings": 514}, pad_token_id=1), t.RobertaModel),
        "vit": (t.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            image_size=32, patch_size=8), t.ViTModel),
        "t5": (t.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=VOCAB,
                          feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=2), t.T5EncoderModel),
    }


FAMILIES = ("qwen2", "mistral", "phi3", "gemma2", "gpt2", "opt", "distilbert", "roberta", "vit", "t5")
DECODERS = ("qwen2", "mistral", "phi3", "gemma2", "gpt2", "opt")


def tokenizer():
    """A byte-level BPE without merges: every byte one token, ids < 300."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<|endoftext|>": 4}
    for b in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def write(family: str, out: Path, seed: int = 0) -> Path:
    cfg, cls = _configs()[family]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # random init is tiny for some families: scale to realistic activations
        for n, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in n and "wte" not in n and "shared" not in n:
                p.normal_(0, 0.08)
    out = Path(out)
    model.save_pretrained(out)
    if family != "vit":
        tokenizer().save_pretrained(out)
    return out


def inputs(family: str, batch: int = 2, seq: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(5, 260, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def reference(family: str, path: Path, x: dict) -> torch.Tensor:
    """transformers' own fp32 forward: logits of a causal LM, else the last hidden state."""
    from lathe.models.generic import hf_class
    import json

    cls = hf_class(json.loads((Path(path) / "config.json").read_text()))
    m = cls.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        out = m(**x)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()
