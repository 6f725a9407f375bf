"""The model-adapter protocol: everything compress, export and bench ask of a model family.

A family is one file in lathe/models/ (bert.py, llama.py) whose top nn.Module also subclasses
ModelAdapter and answers the questions below; FAMILIES in lathe/models/__init__.py maps
config.json's model_type to it. Nothing outside lathe/models/ tests a class name or a
model_type: it calls adapter_of(model) (or model_class(config) before a model exists) and asks.

    blocks()            the ModuleList of repeated blocks (layer-by-layer calibration, distillation)
    blocks_path         its dotted name ("encoder.layer", "model.layers")
    linear_groups()     (input owner, [names of the Linears reading that input]): what SmoothQuant,
                        AWQ and GPTQ calibrate together
    prune_spec          where structured pruning finds heads and FFN neurons inside a block
    is_decoder          causal LM (logits out, KV cache) rather than an encoder (hidden states out)
    pool(out, mask)     the vector quality is scored on (encoders: the mean of the real tokens)
    fusable_act(name)   the activation that Linear `name` may apply in its kernel epilogue (None:
                        none); mark_act_fused(name) tells the model it is applied there
    tokenizer           TokenizerSettings (pad token, maximum length, end-of-text token): what
                        lathe.text.Tokenizer pads and truncates with (lathe.models.tokenizer(dir))
    hf_reference(path)  the transformers model lathe's output is compared with (bench, validation)
    typed_config        the config.json fields lathe reads, as a ModelConfig
    take_config(config) config.json checked for the family's `required` fields and kept

A model that is no ModelAdapter (a toy nn.Sequential in a test, a model built elsewhere) gets
FallbackAdapter: each Linear its own group, blocks found under the usual names, no fusion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from lathe.errors import BadInput
from lathe.text import TokenizerSettings  # noqa: F401  (the protocol's; core, so lathe.text can pad)

# Where transformer stacks keep their blocks, for models without an adapter.
BLOCK_PATHS = ("encoder.layer", "model.layers", "model.decoder.layers", "transformer.h",
               "gpt_neox.layers", "decoder.layers", "layers", "blocks", "h")


@dataclass(frozen=True)
class ModelConfig:
    """The config.json fields lathe reads, named once (families map their own keys)."""
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int | None = None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' pooling: the mean of the real tokens' vectors."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class _Output(nn.Module):
    """A transformers model whose forward returns the one tensor lathe's model returns."""

    def __init__(self, model: nn.Module, field: str):
        super().__init__()
        self.model, self.field = model, field

    def forward(self, **batch):
        return getattr(self.model(**batch), self.field)


class ModelAdapter:
    """Mixed into a family's top nn.Module; the class attributes are its static answers."""

    family: ClassVar[str] = "?"
    is_decoder: ClassVar[bool] = False
    blocks_path: ClassVar[str] = ""
    prune_spec: ClassVar[dict | None] = None
    tokenizer: ClassVar[TokenizerSettings] = TokenizerSettings()
    hf_class: ClassVar[str] = ""  # transformers class name for hf_reference
    hf_output: ClassVar[str] = "last_hidden_state"
    style: ClassVar[str] = "?"  # how a message names the family ("BERT-style")
    # config.json fields a transformer family cannot be built without
    required: ClassVar[tuple] = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                                 "vocab_size")

    def take_config(self, config: dict) -> None:
        """Called first by a family's __init__ (after nn.Module's): config.json checked for the
        required fields (BadInput naming the missing ones) and kept; no transform applied yet."""
        missing = [k for k in self.required if k not in config]
        if missing:
            raise BadInput(f"config.json lacks {', '.join(missing)} for a {self.style} model")
        self.config = dict(config)
        self.applied_transforms: list[str] = []  # recorded in the manifest, replayed by load

    def blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.blocks_path)

    def linear_groups(self):
        """For compress: (name of a module that takes x, [names of the Linears reading x]): the
        family's _fixed_groups() with low-rank factored Linears split (lathe.models.split_factored)."""
        from lathe.models import split_factored

        if not hasattr(self, "_fixed_groups"):
            return ((n, [n]) for n, m in self.named_modules() if isinstance(m, nn.Linear))
        return split_factored(self, self._fixed_groups())

    def transform(self, name: str):
        """Structural rewrites a compressed checkpoint records and load replays on the meta model:
        fuse_qkv concatenates each block's q/k/v (the attention named by prune_spec)."""
        from lathe.models import any_factored

        if name != "fuse_qkv" or self.prune_spec is None:
            raise BadInput(f"unknown model transform {name!r}")
        spec = self.prune_spec
        a = [block.get_submodule(spec["attention"]) for block in self.blocks()]
        qkv = [spec[p].rpartition(".")[2] for p in ("q", "k", "v")]
        if any(any_factored(*(getattr(x, n) for n in qkv)) for x in a):
            return  # low-rank q/k/v: nothing to concatenate, and nothing recorded
        for x in a:
            x.fuse_qkv()
        self.applied_transforms.append(name)

    def pool(self, out: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(out, attention_mask)

    def fusable_act(self, name: str) -> str | None:
        return None

    def mark_act_fused(self, name: str) -> None:
        raise BadInput(f"{type(self).__name__} fuses no activation into {name}")

    @property
    def typed_config(self) -> ModelConfig:
        c = self.config
        return ModelConfig(self.family, c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                           c.get("num_key_value_heads", c["num_attention_heads"]), c["intermediate_size"],
                           c.get("vocab_size"))

    @classmethod
    def hf_reference(cls, path, device: str = "cpu") -> nn.Module:
        """transformers' implementation of this family, loaded from `path`, returning the
        tensor lathe's model returns (the anchor of `lathe bench` and validation)."""
        import transformers

        m = getattr(transformers, cls.hf_class).from_pretrained(str(path)).eval().to(device)
        return _Output(m, cls.hf_output)


class FallbackAdapter(ModelAdapter):
    """The answers for a model that is no ModelAdapter, by duck typing (one Linear a group,
    blocks under a usual name, a decoder when it can generate)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = getattr(model, "config", None)
        if getattr(model, "lathe_generic", False):  # lathe.models.generic: the model answers itself
            self.is_decoder = model.is_decoder
            self.prune_spec = model.prune_spec
            found = model.blocks()  # (path, ModuleList) or None
            self.blocks_path = found[0] if found else ""
            self.pool = model.pool
            return
        self.is_decoder = hasattr(model, "generate")
        self.prune_spec = getattr(type(model), "prune_spec", None)
        self.blocks_path = next((p for p in BLOCK_PATHS if _module_list(model, p) is not None), "")

    def blocks(self) -> nn.ModuleList:
        return _module_list(self.model, self.blocks_path) if self.blocks_path else None

    def linear_groups(self):
        if hasattr(self.model, "linear_groups"):
            return self.model.linear_groups()
        return ((n, [n]) for n, m in self.model.named_modules() if isinstance(m, nn.Linear))

    def _owner(self, name: str):
        return self.model.get_submodule(name.rpartition(".")[0]) if "." in name else None

    def fusable_act(self, name: str) -> str | None:
        owner = self._owner(name)
        if owner is not None and getattr(owner, "act", None) == "gelu" and hasattr(owner, "act_fused"):
            return "gelu"
        return None

    def mark_act_fused(self, name: str) -> None:
        self._owner(name).act_fused = True


def _module_list(model: nn.Module, path: str):
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return None
    return m if isinstance(m, nn.ModuleList) and len(m) > 0 else None


def adapter_of(model: nn.Module) -> ModelAdapter:
    """The adapter that answers for `model`: the model itself when its family implements the
    protocol (lathe's models), else a FallbackAdapter over it."""
    return model if isinstance(model, ModelAdapter) else FallbackAdapter(model)
