"""Quality beside speed: sentence-embedding cosine against the fp32 reference over lathe's
fixed evaluation set."""
from __future__ import annotations

import torch


def embeddings(run, tokenizer, sentences, batch_size: int = 32) -> torch.Tensor:
    from lathe.models.bert import mean_pool

    out = []
    for i in range(0, len(sentences), batch_size):
        b = tokenizer(sentences[i:i + batch_size])
        out.append(mean_pool(run(b).float(), b["attention_mask"]))
    return torch.cat(out)


def cosine_stats(ref: torch.Tensor, test: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(ref.double(), test.double())
    return {"min_cos": float(cos.min()), "mean_cos": float(cos.mean()), "n_sentences": len(cos)}
