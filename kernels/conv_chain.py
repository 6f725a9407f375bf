"""`torch.ops.lathe.conv_chain_int8`: a model's int8 convolutions run as one op. On the CPU one
C++ call (csrc/cpu/conv_chain.h) quantizes the images and runs every layer on a persistent
activation arena, with no per-layer dispatch, allocation or page faults; elsewhere (the
reference backend, other devices) the units run one by one.

A model adapter lists its units as steps [(unit, producer, residual)] in execution order, the
producer/residual as indices into the steps (-1: the images / none); int8_chain(owner, steps_fn)
builds the chain once. Units are duck-typed (lathe.compress.qconv.QConv2dInt8 is one): they
have chain_layer() (a dict, or None when they must run one by one) and wrap_output(y, bad), and
calling one runs it alone. chain_layer()'s dict: depthwise, C, N, k, stride, padding ("same" or
an int), packed, wsum, w_scale, bias, act, in/out scale and zero point, out_hw(h, w). An fp32
first layer (lathe.compress.fconv.FloatConvAct) gives fpacked instead of packed/wsum/w_scale:
its fp32 weights in csrc/cpu/conv_f32_u8.h's layout; it reads the fp32 images themselves."""
from __future__ import annotations

import math
import weakref

import torch

from lathe.errors import BadInput
from lathe.kernels.dispatch import backend_for

CHAINS: "weakref.WeakValueDictionary[int, ConvChain]" = weakref.WeakValueDictionary()
_OWNED = weakref.WeakKeyDictionary()  # model -> its chain (outside the module: deepcopy/pickle never see it)


class ConvChain:
    def __init__(self, steps):
        self.steps = [(m, int(s), int(r)) for m, s, r in steps]
        layers = []
        for i, (m, s, r) in enumerate(self.steps):
            if not -1 <= s < i or not -1 <= r < i:
                raise BadInput(f"int8 chain step {i}: its inputs must come before it")
            d = m.chain_layer()
            if d is not None and d.get("fpacked") is not None and i > 0:
                raise BadInput(f"int8 chain step {i}: only the first layer may be fp32")
            if d is None:
                raise BadInput(f"int8 chain step {i} cannot run in a chain now")
            if i + 1 < len(self.steps) and d["out_scale"] <= 0:
                raise BadInput(f"int8 chain step {i} has an fp32 output: only the last may")
            if d["padding"] != "same" and not isinstance(d["padding"], int):
                raise BadInput(f"int8 chain step {i}: padding {d['padding']!r} is not supported")
            layers.append(d | {"src": s, "res": r})
        first = layers[0]
        self.in_channels, self.in_scale, self.in_zp = first["C"], first["in_scale"], first["in_zp"]
        if any(d["src"] < 0 and (d["in_scale"], d["in_zp"]) != (self.in_scale, self.in_zp) for d in layers):
            raise BadInput("int8 chain: the units reading the images disagree on their quantization")
        self.layers = layers
        self.key = id(self)
        CHAINS[self.key] = self
        self._cpp = None

    def _cpp_chain(self):
        from lathe.kernels import cpu_conv
        if self._cpp is None:
            self._cpp = cpu_conv.chain(self.in_channels, self.in_scale, self.in_zp, [
                {"depthwise": d["depthwise"], "C": d["C"], "N": d["N"], "kh": d["k"], "kw": d["k"],
                 "stride": d["stride"], "pad": -1 if d["padding"] == "same" else int(d["padding"]),
                 "packed": d["packed"], "wsum": d["wsum"], "w_scale": d["w_scale"], "bias": d["bias"],
                 "src": d["src"], "res": d["res"], "act": d["act"], "out_scale": d["out_scale"],
                 "out_zp": d["out_zp"], "fpacked": d.get("fpacked")} for d in self.layers])  # self.layers keeps the tensors alive
        return self._cpp

    def run_cpu(self, x: torch.Tensor):
        from lathe.kernels import cpu_conv
        return cpu_conv.run_chain(self._cpp_chain(), x.contiguous() if x.dtype == torch.uint8 else x.float().contiguous())

    def run_modules(self, x: torch.Tensor):
        """The units one by one: the same (NHWC output, bad images)."""
        if x.dtype == torch.uint8:  # codes: the first units requantize them exactly at the same (scale, zp)
            x = ((x[..., :self.in_channels].float() - self.in_zp) * self.in_scale).permute(0, 3, 1, 2)
        outs = []
        for m, s, r in self.steps:
            outs.append(m(x if s < 0 else outs[s], residual=None if r < 0 else outs[r]))
        y = outs[-1]
        y = y.q if hasattr(y, "q") else y.permute(0, 2, 3, 1).contiguous()
        return y, ~torch.isfinite(x.sum((1, 2, 3)))

    def layer_times(self, x: torch.Tensor, runs: int = 5) -> list[tuple[str, float]]:
        """Where a CPU run's time goes: [(label, median seconds over `runs` runs)], first the
        images' quantization, then each layer (kind, kernel, stride, channels), as the C++ chain
        clocks them (bench/conv_layers.py prints them beside onnxruntime's per-node profile)."""
        import statistics

        cc = self._cpp_chain()
        per = []
        cc.set_profile(True)
        try:
            for _ in range(runs):
                cc.profile_reset()
                self.run_cpu(x)
                per.append(cc.profile_ns())
        finally:
            cc.set_profile(False)
        labels = ["quantize images"] + [
            f"{i:2d} {'dw' if d['depthwise'] else 'conv'} k{d['k']} s{d['stride']} {d['C']}->{d['N']}"
            for i, d in enumerate(self.layers)]
        return [(n, statistics.median(p[j] for p in per) / 1e9) for j, n in enumerate(labels)]

    def out_shape(self, H: int, W: int):
        hw = []
        for d in self.layers:
            h, w = (H, W) if d["src"] < 0 else hw[d["src"]]
            hw.append(d["out_hw"](h, w))
        last = self.layers[-1]
        u8 = last["out_scale"] > 0
        return (*hw[-1], -(-last["N"] // 4) * 4 if u8 else last["N"], u8)

    def __call__(self, x):
        """x: fp32 images [B, C, H, W], or the u8 NHWC codes an fp32 first layer wrote at this
        chain's input quantization (a lathe.compress.qconv.QAct: q, C, scale, zp, bad)."""
        bad_in = None
        if hasattr(x, "q"):
            if self.layers[0].get("fpacked") is not None:
                raise BadInput("int8 chain: its first layer is fp32 and reads the fp32 images, not u8 codes")
            if x.C != self.in_channels or x.zp != self.in_zp or not math.isclose(x.scale, self.in_scale, rel_tol=1e-6):
                raise BadInput(f"int8 chain: its input codes ({x.C} channels, scale {x.scale}, zp {x.zp}) are not "
                               f"the quantization its first units read ({self.in_channels}, {self.in_scale}, {self.in_zp})")
            x, bad_in = x.q, x.bad
        elif x.dim() != 4 or x.shape[1] != self.in_channels:
            raise BadInput(f"int8 conv expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        y, bad = torch.ops.lathe.conv_chain_int8(x, self.key)
        if bad_in is not None:
            bad = bad | bad_in
        return self.steps[-1][0].wrap_output(y, bad if bad.any() else None)


def int8_chain(owner, steps_fn) -> ConvChain | None:
    """owner's ConvChain over steps_fn(), built once (again when its units or their packed weights
    change); None where the units must run one by one (not all int8 yet, an export tracing)."""
    steps = steps_fn()
    if not steps or not all(callable(getattr(m, "chain_layer", None)) for m, _, _ in steps):
        return None
    if not steps[0][0].chain_ready():
        return None
    c = _OWNED.get(owner)
    if c is None or len(c.steps) != len(steps) or not all(
            a[0] is b[0] and a[1:] == tuple(b[1:]) and (d["packed"] if d.get("fpacked") is None else d["fpacked"]) is b[0]._packed
            for a, b, d in zip(c.steps, steps, c.layers)):
        c = ConvChain(steps)
        _OWNED[owner] = c
    return c


@torch.library.custom_op("lathe::conv_chain_int8", mutates_args=())
def conv_chain_int8(x: torch.Tensor, chain: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 images [B, C, H, W] (or u8 NHWC codes [B, H, W, C4] at the chain's input
    quantization) -> (the chain's last output, NHWC: fp32 [B, OH, OW, N] or u8 [B, OH, OW, N4]
    codes; bool [B]: the images that held a NaN or Inf)."""
    c = _chain(chain)
    _check_input(x, c)
    if backend_for("conv2d_int8", x.device) == "cpu":
        return c.run_cpu(x)
    return c.run_modules(x)


@conv_chain_int8.register_fake
def _(x, chain):
    c = _chain(chain)
    _check_input(x, c)
    OH, OW, ld, u8 = c.out_shape(*_hw(x))
    return (x.new_empty(x.shape[0], OH, OW, ld, dtype=torch.uint8 if u8 else torch.float32),
            x.new_empty(x.shape[0], dtype=torch.bool))


def _hw(x: torch.Tensor) -> tuple[int, int]:
    return (x.shape[1], x.shape[2]) if x.dtype == torch.uint8 else (x.shape[-2], x.shape[-1])


def _check_input(x: torch.Tensor, c: ConvChain):
    c4 = -(-c.in_channels // 4) * 4
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] != c4:
            raise BadInput(f"conv_chain_int8: expected u8 codes [B, H, W, {c4}], got {tuple(x.shape)}")
    elif x.dim() != 4 or x.shape[1] != c.in_channels:
        raise BadInput(f"conv_chain_int8: expected images [B, {c.in_channels}, H, W], got {tuple(x.shape)}")


def _chain(key: int) -> ConvChain:
    c = CHAINS.get(key)
    if c is None:
        raise BadInput(f"conv_chain_int8: no chain {key} (its model was freed)")
    return c
