"""ResNet from a transformers ResNetConfig (random weights) through int8: every conv on lathe's
kernel, the residual add + ReLU fused into the last conv of each block, int8 across max pooling."""
import pytest
import torch

import lathe


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_tiny_resnet_int8(tmp_path, layer_type):
    transformers = pytest.importorskip("transformers")
    from lathe import images, vision
    from lathe.compress.qconv import QConv2dInt8
    from lathe.models.resnet import random_checkpoint
    cfg = transformers.ResNetConfig(layer_type=layer_type, depths=[1, 1], hidden_sizes=[32, 64],
                                    embedding_size=16, num_labels=10).to_dict()
    src = random_checkpoint(cfg | {"image_size": 64}, tmp_path / "r")
    out = lathe.compress_checkpoint(src, "int8", tmp_path / "q")
    m, ref = lathe.load(out), lathe.load(src)
    from lathe.compress.fconv import FloatConvAct
    # the stem reads the image: fp32 by default (conv_float_first), writing u8 like the others
    convs = [q for q in m.modules() if isinstance(q, (QConv2dInt8, FloatConvAct))]
    assert isinstance(m.stem, FloatConvAct)
    assert len(convs) == len(ref.conv_units()) and sum(q.out_scale > 0 for q in convs) == len(convs) - 1
    x = images.image_set(8, 64)
    q = vision.quality(vision.logits(ref, x), vision.logits(m, x))
    assert q["cosine_mean"] > 0.97, q
