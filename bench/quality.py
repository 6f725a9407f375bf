"""Quality beside speed: sentence-embedding cosine against the fp32 reference over lathe's
fixed evaluation set."""
from __future__ import annotations

import torch


def embeddings(run, tokenizer, sentences, batch_size: int = 32, pool=None) -> torch.Tensor:
    """pool: the model adapter's (lathe.models.base.adapter_of(model).pool); default the
    encoders' mean over real tokens."""
    from lathe.models.base import mean_pool

    pool = pool or mean_pool
    out = []
    for i in range(0, len(sentences), batch_size):
        b = tokenizer(sentences[i:i + batch_size])
        out.append(pool(run(b).float(), b["attention_mask"]))
    return torch.cat(out)


def cosine_stats(ref: torch.Tensor, test: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(ref.double(), test.double())
    return {"min_cos": float(cos.min()), "mean_cos": float(cos.mean()), "n_sentences": len(cos)}
