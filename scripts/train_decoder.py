#!/usr/bin/env python
"""Train lathe's small decoder LM (Llama architecture) on the Python standard library's source.

    python scripts/train_decoder.py --out lathe/data/decoder-lm --steps 1200

Data: every *.py under sysconfig.get_paths()["stdlib"] (not site-packages), sorted by path; the
held-out split (sha1(relative path) % 10 == 0) is defined in lathe/bench/perplexity.py and
imported from there, so training and evaluation can never disagree. Files are joined into one
token stream, each preceded by <|endoftext|>; training batches are windows at random offsets
(seeded) of that stream.

Tokenizer: byte-level BPE (GPT-2 style pre-tokenizer, no normalizer: decode(encode(x)) == x)
trained by `tokenizers` on the training split only.

Output (written to a temporary folder, then renamed into place): config.json (model_type
"llama", LlamaForCausalLM), model.safetensors (fp32), tokenizer.json, tokenizer_config.json,
README.md with the command, the numbers and the held-out perplexity measured by
lathe.bench.perplexity on the saved checkpoint loaded back through lathe.load.

Ctrl-C stops training and saves what there is to <out>-interrupted (never over <out>).
--measure N runs N steps and prints the throughput, to choose --steps for a time budget.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

# One thread everywhere (the tokenizers library uses rayon): set before the imports.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lathe.bench.perplexity import (EOT, HELDOUT_MODULUS, heldout_perplexity, read_source,  # noqa: E402
                                    score, split_files)
from lathe.models.llama import LlamaForCausalLM  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="lathe/data/decoder-lm")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, a fraction of --lr")
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop training early (and say so in the README) past this wall time")
    ap.add_argument("--measure", type=int, default=0, metavar="N",
                    help="run N steps, print tokens/s, save nothing")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def token_stream(tok, texts) -> torch.Tensor:
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(eot)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int32)


# ----------------------------------------------------------------------------- model


def model_config(a, eot: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": a.vocab,
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.hidden // a.heads,
        "hidden_act": "silu",
        "max_position_embeddings": a.seq_len,
        "rms_norm_eps": 1e-6,
        "rope_theta": a.rope_theta,  # transformers 4.x reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},  # ... 5.x this
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def init_weights(model: LlamaForCausalLM, std: float):
    n_layers = len(model.model.layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):  # residual outputs (GPT-2)
            torch.nn.init.normal_(p, 0.0, std / math.sqrt(2 * n_layers))
        else:
            torch.nn.init.normal_(p, 0.0, std)


def make_optimizer(model, a):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=a.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, a) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ----------------------------------------------------------------------------- output


def save_checkpoint(out: Path, model, config: dict, tok, info: dict, a, argv):
    from safetensors.torch import save_file

    import lathe
    from lathe.io import atomic_dir

    with atomic_dir(out) as tmp:
        sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
            "pad_token": EOT, "unk_token": None, "model_max_length": config["max_position_embeddings"],
            "add_prefix_space": False}, indent=2) + "\n")
        # Evaluate the saved files as users will load them: lathe.load (meta device, assign).
        t0 = time.time()
        loaded = lathe.load(tmp)
        held = heldout_perplexity(loaded, tok, n_files=64, seq_len=a.seq_len, max_tokens=32768)
        train_files = split_files()[0]
        tr_texts = [t for t in (read_source(f) for _, f in train_files) if t]
        tr_texts = [tr_texts[i * len(tr_texts) // 64] for i in range(64)]
        train_eval = score(loaded, tok, tr_texts, seq_len=a.seq_len, max_tokens=32768)
        info["eval_s"] = time.time() - t0
        info["heldout"] = held
        info["train_eval"] = train_eval
        info["total_s"] = time.time() - info["t_start"]  # all but writing the README
        print(f"held-out perplexity {held['perplexity']:.3f} over {held['tokens']} tokens; "
              f"train-split perplexity {train_eval['perplexity']:.3f} (same eval on 64 train files)",
              flush=True)
        (tmp / "README.md").write_text(readme(config, info, a, argv, sd))
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700; this is package data
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
    return out


def readme(config, info, a, argv, sd) -> str:
    n_params = sum(v.numel() for v in sd.values())
    held, tr = info["heldout"], info["train_eval"]
    cmd = "python " + " ".join(shlex.quote(x) for x in ["scripts/train_decoder.py", *argv])
    status = "complete" if info["steps_done"] == a.steps else \
        f"STOPPED EARLY at step {info['steps_done']} of {a.steps} ({info['stop_reason']})"
    return f"""# decoder-lm: lathe's small Llama-architecture decoder

A {n_params / 1e6:.2f}M-parameter `LlamaForCausalLM` (model_type "llama") trained from scratch on
the Python standard library's source, for LLM-style checks of lathe's compress -> export -> bench
path (GQA, RMSNorm, rotary embeddings, SiLU-gated MLP, tied embeddings, KV-cache decode). It
loads with `lathe.load("lathe/data/decoder-lm")` and with transformers'
`LlamaForCausalLM.from_pretrained`. It has learned the surface statistics of Python source
(see the perplexity below) but greedy samples soon repeat themselves: it is a test model, not
a useful code model.

## Reproduce

    {cmd}

Run from the repository root (one thread: torch.set_num_threads({a.threads}), RAYON_NUM_THREADS=1).
Seed {a.seed}; the data order is seeded, so a rerun on the same machine, Python and torch gives
the same weights (up to floating-point reduction order on other CPUs).

## Data and split

- Corpus: every `*.py` under `sysconfig.get_paths()["stdlib"]` (here Python
  {platform.python_version()}: {info['n_train_files']} train + {info['n_heldout_files']} held-out
  files), sorted by path, excluding `site-packages/` and files that are not UTF-8.
- Held out: files whose `int(sha1(relative posix path).hexdigest(), 16) % {HELDOUT_MODULUS} == 0`
  (`lathe.bench.perplexity.is_heldout`, the one definition, imported by this script).
  Neither the tokenizer nor the model saw them.
- Training stream: the training files in path order, each preceded by `{EOT}`
  ({info['train_tokens']:,} tokens); each step samples {a.batch} windows of {a.seq_len}+1
  tokens at random offsets.

## Tokenizer

Byte-level BPE (`tokenizers` {info['tokenizers_version']}, GPT-2 pre-tokenizer, no normalizer,
so decode(encode(text)) == text), vocab {a.vocab} with `{EOT}` = id {config['eos_token_id']}
(bos = eos = pad), trained on the training split only ({info['tokenizer_s']:.0f} s).
{info['bytes_per_token']:.2f} bytes of source a token on the training split.

## Model

hidden {a.hidden}, {a.layers} layers, {a.heads} heads of {a.hidden // a.heads}, {a.kv_heads} KV heads
(GQA), intermediate {a.intermediate}, rope_theta {a.rope_theta:g}, context {a.seq_len}
(max_position_embeddings; longer inputs run but positions past {a.seq_len} were never
trained), tied input/output embeddings. {n_params:,} parameters stored as **fp32** in
model.safetensors (the tied lm_head is not stored: it is `model.embed_tokens.weight`).

## Training

AdamW (betas 0.9/0.95, weight decay {a.weight_decay} on matrices except the embedding), lr
{a.lr:g}, {a.warmup} warmup steps then cosine to {a.lr * a.min_lr_ratio:g}, grad-norm clip 1.0,
batch {a.batch} x {a.seq_len} = {a.batch * a.seq_len:,} tokens, **{info['steps_done']} steps**
({status}), {info['steps_done'] * a.batch * a.seq_len:,} tokens seen
(~{info['steps_done'] * a.batch * a.seq_len / info['train_tokens']:.2f} epochs), torch
{torch.__version__}, CPU, one thread (timings on a 2-vCPU machine shared with other jobs).

| | |
|---|---|
| tokenizer training | {info['tokenizer_s']:.0f} s |
| tokenizing the training split | {info['encode_s']:.0f} s |
| model training | {info['train_s']:.0f} s ({info['tok_per_s']:.0f} tokens/s) |
| evaluation | {info['eval_s']:.0f} s |
| total wall | {info['total_s'] / 60:.1f} min |
| final train loss (mean of the last 50 steps) | {info['final_loss']:.4f} |
| held-out perplexity | **{held['perplexity']:.3f}** (nll {held['nll']:.4f}) |
| train-split perplexity, same evaluation | {tr['perplexity']:.3f} (nll {tr['nll']:.4f}) |

Evaluation: `lathe.bench.perplexity.heldout_perplexity` on this directory loaded with
`lathe.load`: 64 held-out files evenly spaced over the sorted list
(`heldout_texts(64)`), each prefixed by `{EOT}`, non-overlapping windows of {a.seq_len}, at
most 512 scored tokens a file, {held['tokens']:,} tokens in all. The train-split row is the
same evaluation on 64 evenly spaced training files.
"""


# ----------------------------------------------------------------------------- main


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t_start = time.time()
    info = {"stop_reason": ""}

    train_files, held_files = split_files()
    texts = [t for t in (read_source(f) for _, f in train_files) if t]
    info["n_train_files"], info["n_heldout_files"] = len(texts), len(held_files)
    print(f"{len(texts)} training files, {len(held_files)} held out "
          f"({sum(map(len, texts)) / 1e6:.1f} M characters of training text)", flush=True)

    t0 = time.time()
    tok = train_tokenizer(texts, a.vocab)
    info["tokenizer_s"] = time.time() - t0
    import tokenizers
    info["tokenizers_version"] = tokenizers.__version__
    print(f"tokenizer: vocab {tok.get_vocab_size()} in {info['tokenizer_s']:.1f} s", flush=True)
    t0 = time.time()
    stream = token_stream(tok, texts)
    info["encode_s"] = time.time() - t0
    info["train_tokens"] = len(stream)
    info["bytes_per_token"] = sum(len(t.encode()) for t in texts) / len(stream)
    print(f"training stream: {len(stream):,} tokens ({info['bytes_per_token']:.2f} bytes/token) "
          f"in {info['encode_s']:.1f} s", flush=True)

    eot = tok.token_to_id(EOT)
    config = model_config(a, eot)
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(config)
    init_weights(model, config["initializer_range"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    model.train()
    opt = make_optimizer(model, a)
    gen = torch.Generator().manual_seed(a.seed)
    T, B = a.seq_len, a.batch
    steps = a.measure or a.steps
    losses = []
    t_train = time.time()
    done = 0
    try:
        for step in range(steps):
            lr = lr_at(step, a)
            for g in opt.param_groups:
                g["lr"] = lr
            starts = torch.randint(0, len(stream) - T - 1, (B,), generator=gen)
            chunk = torch.stack([stream[s:s + T + 1] for s in starts.tolist()]).long()
            logits = model(chunk[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     chunk[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            done = step + 1
            el = time.time() - t_train
            if done % 25 == 0 or done == steps or done <= 3:
                tps = done * B * T / el
                recent = sum(losses[-25:]) / len(losses[-25:])
                print(f"step {done}/{steps} loss {recent:.4f} lr {lr:.2e} {tps:.0f} tok/s "
                      f"elapsed {el / 60:.1f} min eta {(steps - done) * el / done / 60:.1f} min",
                      flush=True)
            if a.max_minutes is not None and (time.time() - t_start) / 60 > a.max_minutes:
                info["stop_reason"] = f"--max-minutes {a.max_minutes:g} reached"
                print(f"stopping: {info['stop_reason']}", flush=True)
                break
    except KeyboardInterrupt:
        info["stop_reason"] = "interrupted (Ctrl-C)"
        print(f"\ninterrupted at step {done}: saving", flush=True)
    info["train_s"] = time.time() - t_train
    info["steps_done"] = done
    info["tok_per_s"] = done * B * T / max(info["train_s"], 1e-9)
    if a.measure:
        print(f"measure: {info['tok_per_s']:.0f} tokens/s with {a.threads} thread(s): "
              f"{a.batch * a.seq_len / info['tok_per_s']:.2f} s/step")
        return 0
    if not done:
        print("no step done: nothing saved")
        return 1
    info["final_loss"] = sum(losses[-50:]) / len(losses[-50:])
    out = Path(a.out)
    if info["stop_reason"].startswith("interrupted"):
        out = out.with_name(out.name + "-interrupted")
    model.eval()
    info["t_start"] = t_start
    t_eval_start = time.time()
    save_checkpoint(out, model, config, tok, info, a, argv)
    print(f"saved {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB) "
          f"final train loss {info['final_loss']:.4f}, total {(time.time() - t_start) / 60:.1f} min "
          f"(eval+save {time.time() - t_eval_start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
