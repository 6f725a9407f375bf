"""Any `transformers` model, as torchao's `quantize_` sees it: transformers builds and runs the
model (attention, norms, rotary: transformers' code, SDPA), lathe swaps its Linear layers for
lathe's quantized modules in place.

- Sources load with transformers' from_pretrained (meta-device init, safetensors, weights
  assigned); lathe's compressed outputs load through lathe's transformers quantizer
  (lathe.integrations.transformers_quantizer), which swaps the manifest's modules in on the
  meta model before the weights are read.
- Modules that are not nn.Linear but are linear maps are normalised to nn.Linear first
  (NORMALIZERS: GPT-2's Conv1D, transposed; exact), so every compress handler sees Linears.
  A further module type registers with register_normalizer() or by adding its type to
  QUANTIZABLE.
- nn.Conv2d (CONV_QUANTIZABLE) is quantized by the int8 recipe only: lathe.compress.generic_conv
  swaps it for lathe's int8 conv module with the BatchNorm2d after it folded in.
- The model object stays the transformers class (its state-dict names, config, generate);
  its class is swapped for a subclass that adds lathe's adapter methods (blocks(),
  linear_groups(), is_decoder, pool(), ...) and a forward that takes lathe's batches
  (input_ids, attention_mask, token_type_ids, pixel_values) and returns a tensor: the logits
  or the last hidden state, as lathe's fast adapters do.
"""
from __future__ import annotations

import inspect
import re
from typing import Callable

import torch
import torch.nn as nn

from lathe.errors import BadInput
from lathe.text import TokenizerSettings

# module types that lathe's compress handlers quantize (after normalisation)
QUANTIZABLE: tuple = (nn.Linear,)
# module types the int8 recipe quantizes besides Linears (lathe.compress.generic_conv)
CONV_QUANTIZABLE: tuple = (nn.Conv2d,)
# module types with weights that need no quantizer (lookup tables, norms: 1-D weights)
_PASSIVE = (nn.Embedding, nn.LayerNorm, nn.GroupNorm)
NORMALIZERS: dict[str, Callable[[nn.Module], nn.Module]] = {}
_BLOCK_RE = re.compile(r"(DecoderLayer|EncoderLayer|Layer|Block)$")


def register_normalizer(class_name: str):
    """fn(module) -> an equivalent module lathe quantizes (e.g. nn.Linear); applied to every
    module whose class is named `class_name`, on load and on the meta model of a compressed
    checkpoint (the manifest records the transform)."""
    def deco(fn):
        NORMALIZERS[class_name] = fn
        return fn
    return deco


@register_normalizer("Conv1D")
def conv1d_to_linear(m: nn.Module) -> nn.Linear:
    """transformers' Conv1D (GPT-2, ...): y = x @ W + b with W [in, out]; as nn.Linear, W.T."""
    w = m.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device=w.device, dtype=w.dtype)
    if w.device.type != "meta":
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
    return lin


# ----------------------------------------------------------------------------- config -> class


def hf_config(config: dict):
    """transformers' config object for a config.json dict; BadInput when transformers does not
    know the model_type."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mt = config.get("model_type")
    if mt not in CONFIG_MAPPING:
        raise BadInput(f"unsupported model_type {mt!r} in config.json: neither lathe's adapters "
                       f"nor transformers {transformers.__version__} know it")
    d = {k: v for k, v in config.items() if k != "quantization_config"}
    return CONFIG_MAPPING[mt].from_dict(d)


def hf_class(config: dict):
    """The transformers class that config.json's `architectures` names (an encoder-decoder's
    encoder alone, e.g. T5EncoderModel for T5ForConditionalGeneration); AutoModel's class
    for the model_type when it names none."""
    import transformers

    cfg = hf_config(config)
    for a in config.get("architectures") or []:
        if cfg.is_encoder_decoder and "EncoderModel" not in a:
            enc = re.sub(r"For\w+$|Model$", "", a) + "EncoderModel"
            if isinstance(getattr(transformers, enc, None), type):
                return getattr(transformers, enc)
            continue
        cls = getattr(transformers, a, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(cfg)]
    except KeyError:
        raise BadInput(f"transformers has no model class for model_type {config.get('model_type')!r}") from None


def is_decoder_config(config: dict) -> bool:
    """A causal LM (logits over the vocabulary, perplexity as its quality) by config.json."""
    from lathe.models import family_of

    fam = family_of(config)
    if fam is not None:
        return fam == "llama"
    return any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])


# ----------------------------------------------------------------------------- the adapter


class GenericAdapter:
    """Mixed into a transformers model's class (see adapt()): lathe's adapter methods."""

    lathe_generic = True

    # --- what lathe's compress passes and benches ask of an adapter
    @property
    def is_decoder(self) -> bool:
        return _base(self).__name__.endswith("ForCausalLM")

    @property
    def main_input(self) -> str:
        return getattr(self, "main_input_name", "input_ids")

    def blocks(self):
        """(path, ModuleList) of the repeated blocks: the longest ModuleList of modules named
        *DecoderLayer / *Layer / *Block (GPTQ/AWQ run layer by layer over it)."""
        best = None
        for name, m in self.named_modules():
            if isinstance(m, nn.ModuleList) and len(m) and _BLOCK_RE.search(type(m[0]).__name__):
                if best is None or len(m) > len(best[1]):
                    best = (name, m)
        return best

    def linear_groups(self):
        """(owner, [Linears reading the same input]): inside each block, the Linears a
        pre-hook sees the same tensor for are grouped (q/k/v, gate/up); every other Linear is
        a group of its own. Found by running nothing: siblings under one parent that share
        in_features and are named like projections of one input."""
        mods = {n: m for n, m in self.named_modules() if not self.keeps_fp32(n)}
        follower = set()  # k/v of a q, up of a gate: grouped with their leader
        for name, m in mods.items():
            parent, _, leaf = name.rpartition(".")
            if isinstance(m, QUANTIZABLE):
                for sib in _SIBLINGS.get(leaf, ()):
                    sn = f"{parent}.{sib}" if parent else sib
                    if isinstance(mods.get(sn), QUANTIZABLE) and mods[sn].in_features == m.in_features:
                        follower.add(sn)
        for name, m in mods.items():
            if not isinstance(m, QUANTIZABLE) or name in follower:
                continue
            parent, _, leaf = name.rpartition(".")
            group = [name] + [f"{parent}.{s}" if parent else s for s in _SIBLINGS.get(leaf, ())
                              if (f"{parent}.{s}" if parent else s) in follower]
            yield (parent or name), group

    def keeps_fp32(self, name: str) -> bool:
        """Modules transformers declares fp32-only (_keep_in_fp32_modules: T5's `wo`, whose
        forward reads `.weight.dtype`): lathe leaves them unquantized."""
        keep = getattr(self, "_keep_in_fp32_modules", None) or ()
        return any(name == k or name.endswith("." + k) for k in keep)

    def check_supported(self, steps=()):
        check_supported(self, steps)

    @property
    def prune_spec(self):
        return None  # structured pruning needs a fast adapter; unstructured works on any Linear

    def pool(self, hidden: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """Mean over real tokens (sentence embedding of an encoder)."""
        from lathe.models.bert import mean_pool

        if attention_mask is None or hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
            return hidden.float().mean(1) if hidden.dim() == 3 else hidden.float()
        return mean_pool(hidden.float(), attention_mask)

    def fusable_act(self, name: str):
        return None  # transformers applies activations itself: nothing to fuse into a GEMM

    def hf_reference(self):
        return _base(self)

    # lathe.models.tokenizer pads any transformers model with the protocol's defaults (padded
    # positions are masked out)
    tokenizer = TokenizerSettings()

    def transform(self, name: str):
        """Structural rewrites recorded in the manifest and replayed on the meta model.
        fuse_qkv is the fast adapters' (their attention reads one qkv GEMM); transformers'
        attention reads q/k/v, so it is declined here and nothing is recorded."""
        if name == "fuse_qkv":
            return
        apply_transform(self, name)
        self.applied_transforms.append(name)

    # --- lathe's calling convention
    def forward(self, *args, use_cache: bool = False, past_key_values=None, **kw):
        base = _base(self)
        params = _forward_params(base)
        kw = {k: v for k, v in kw.items() if k in params and v is not None}
        if not getattr(self.config, "type_vocab_size", None):
            # lathe's tokenizer always gives token_type_ids; GPT-2 would add wte[0] for them
            kw.pop("token_type_ids", None)
        if "use_cache" in params:
            kw["use_cache"] = use_cache
        if past_key_values is not None:  # transformers 5 names the cache `cache`, older ones past_key_values
            kw["cache" if "cache" in params else "past_key_values"] = past_key_values
        if "return_dict" in params:
            kw["return_dict"] = True
        out = base.forward(self, *args, **kw)
        if getattr(out, "logits", None) is not None:
            y = out.logits
        elif getattr(out, "last_hidden_state", None) is not None:
            y = out.last_hidden_state
        else:
            y = out[0]
        if not use_cache:
            return y
        return y, (getattr(out, "cache", None) if "cache" in params else out.past_key_values)


def _base(model) -> type:
    """The transformers class under lathe's adapter subclass."""
    cls = type(model)
    return cls.__mro__[2] if getattr(cls, "lathe_generic", False) else cls


_SIBLINGS = {  # the first projection of an input -> the others that read it
    "q_proj": ("k_proj", "v_proj"), "query": ("key", "value"), "q_lin": ("k_lin", "v_lin"),
    "gate_proj": ("up_proj",), "w1": ("w3",), "wi_0": ("wi_1",), "q": ("k", "v"),
}


def apply_transform(model: nn.Module, name: str):
    """normalize:<Class>: every module of that class through its registered normalizer."""
    if not name.startswith("normalize:"):
        raise BadInput(f"unknown model transform {name!r}")
    cls_name = name.split(":", 1)[1]
    fn = NORMALIZERS.get(cls_name)
    if fn is None:
        raise BadInput(f"unknown module normalizer {cls_name!r} in the manifest")
    for n, m in list(model.named_modules()):
        if type(m).__name__ == cls_name:
            _set(model, n, fn(m))


def _forward_params(cls) -> set:
    return set(inspect.signature(cls.forward).parameters)


def _set(model, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


_ADAPTED: dict[type, type] = {}


def adapt(model: nn.Module) -> nn.Module:
    """Give a transformers model lathe's adapter methods (class swap; no copy)."""
    cls = type(model)
    if getattr(cls, "lathe_generic", False):
        return model
    if cls not in _ADAPTED:
        _ADAPTED[cls] = type(f"Lathe{cls.__name__}", (GenericAdapter, cls), {"__module__": __name__})
    model.__class__ = _ADAPTED[cls]
    if not hasattr(model, "applied_transforms"):
        model.applied_transforms = []
    return model


def normalize(model: nn.Module) -> nn.Module:
    """Apply every registered normalizer (GPT-2's Conv1D -> nn.Linear), recorded as transforms."""
    present = {type(m).__name__ for m in model.modules()}
    for cls_name in NORMALIZERS:
        if cls_name in present:
            model.transform(f"normalize:{cls_name}")
    return model


def unhandled(model: nn.Module, convs: bool = False) -> dict:
    """{module type: count} of modules holding >= 2-D weights that lathe can neither quantize
    nor leave as they are without losing the point of compressing (not Linear, not Embedding;
    not Conv2d when convs, i.e. the recipe quantizes to int8)."""
    handled = QUANTIZABLE + _PASSIVE + (CONV_QUANTIZABLE if convs else ())
    out = {}
    for m in model.modules():
        if isinstance(m, handled) or type(m).__name__ in NORMALIZERS:
            continue
        own = [p for p in m.parameters(recurse=False) if p.dim() >= 2]
        if own:
            out[type(m).__name__] = out.get(type(m).__name__, 0) + 1
    return out


def check_supported(model: nn.Module, steps=()) -> None:
    """BadInput (exit 2) naming the module types lathe cannot handle when they hold most of
    the model's weights (a CNN under a recipe other than int8, a MoE with fused expert
    tensors, ...); a small unhandled module (ViT's patch embedding) stays in fp32.
    steps: the recipe's steps (Conv2d counts as handled when one is int8)."""
    convs = any(getattr(s, "method", None) == "int8" for s in steps)
    types = unhandled(model, convs)
    if not types:
        return
    total = sum(p.numel() for p in model.parameters())
    bad = sum(p.numel() for m in model.modules() if type(m).__name__ in types
              for p in m.parameters(recurse=False))
    lin = sum(m.weight.numel() for m in model.modules()
              if isinstance(m, QUANTIZABLE + (CONV_QUANTIZABLE if convs else ())))
    if lin == 0 or bad > 0.5 * total:
        names = ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))
        raise BadInput(f"unsupported architecture {_base(model).__name__}: "
                       f"lathe cannot quantize its module types {names} "
                       f"(it quantizes nn.Linear and GPT-2's Conv1D; nn.Conv2d with the int8 recipe)")


# ----------------------------------------------------------------------------- loading


def _quiet():
    import contextlib

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def cm():
        old = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        prog = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(old)
            if prog:
                hf_logging.enable_progress_bar()
    return cm()


def load_source(src, device="cpu") -> nn.Module:
    """A Hugging Face source (fp32) or a lathe compressed output of a generic model, as the
    transformers model with lathe's adapter methods, normalised (Conv1D -> Linear)."""
    cls = hf_class(src.config)
    kw = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    # a compressed output needs quant_method "lathe" registered with transformers first
    # (lathe.integrations.transformers_quantizer; lathe.compress.checkpoint.build_model imports it)
    try:
        with _quiet():
            model = cls.from_pretrained(str(src.path), **kw)
    except ValueError as e:
        if "attn_implementation" not in str(e) and "sdpa" not in str(e).lower():
            raise BadInput(f"{src.path}: transformers cannot load it: {str(e).splitlines()[0]}") from None
        kw.pop("attn_implementation")
        with _quiet():
            model = cls.from_pretrained(str(src.path), **kw)
    model = adapt(model.eval())
    if not src.is_compressed:
        normalize(model)
    return model.to(device)


def build_meta(config: dict) -> nn.Module:
    """The model with every parameter on the meta device (what the quantizer swaps modules in)."""
    cls = hf_class(config)
    with torch.device("meta"):
        model = cls._from_config(hf_config(config), dtype=torch.float32)
    return adapt(model)


# ----------------------------------------------------------------------------- vision inputs


def takes_pixels(config: dict) -> bool:
    """True for a model whose input is pixel_values (ViT, ...), not token ids."""
    from lathe.models import family_of

    if family_of(config) is not None:
        return False
    try:
        return getattr(hf_class(config), "main_input_name", "input_ids") == "pixel_values"
    except BadInput:
        return False


def image_batches(config: dict, n: int = 32, batch_size: int = 8, seed: int = 0) -> list:
    """Synthetic images for calibration and quick quality checks of vision models: lathe ships
    no image data, so these are seeded smooth colour fields with noise, normalised as image
    processors do (about zero mean, unit range). They exercise every layer; they are not a
    substitute for real images when calibration statistics matter (pass your own batches)."""
    size = config.get("image_size") or 224
    size = size if isinstance(size, int) else size[0]
    ch = config.get("num_channels") or 3
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        low = torch.rand(b, ch, 4, 4, generator=g)
        img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        img = img + 0.1 * torch.randn(b, ch, size, size, generator=g)
        out.append({"pixel_values": (img - 0.5) / 0.5})
    return out


def reference_model(path) -> nn.Module:
    """transformers' own model for a Hugging Face directory, fp32, eval: the anchor benches and
    tests compare against (BertModel for MiniLM, Qwen2ForCausalLM, ...)."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(path) / "config.json").read_text())
    with _quiet():
        return hf_class(cfg).from_pretrained(str(path), dtype=torch.float32).eval()
