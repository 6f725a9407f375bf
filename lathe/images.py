"""Fixed image sets for CNN calibration and quality: scikit-image's bundled sample images (the
files inside its wheel, never the pooch-fetched ones) with deterministic crops, flips and
colour changes, resized to size x size and ImageNet-normalised."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lathe.errors import BadInput

# files shipped in skimage/data (greyscale ones are repeated over RGB)
SAMPLES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
           "ihc.png", "motorcycle_left.png", "retina.jpg", "color.png", "logo.png", "camera.png",
           "coins.png", "moon.png", "page.png", "text.png", "brick.png", "grass.png", "gravel.png",
           "cell.png", "horse.png")
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def sample(name: str) -> torch.Tensor:
    """One bundled image as float [3, H, W] in [0, 1] (a fresh copy of the decoded file)."""
    return _decoded(name).clone()


@functools.lru_cache(maxsize=None)
def _decoded(name: str) -> torch.Tensor:
    """Decoded once a process: the ~20 samples (a few MB) are read by every image set."""
    import os

    import numpy as np
    import skimage
    from skimage import io

    path = os.path.join(skimage.data_dir, name)
    if not os.path.isfile(path):
        raise BadInput(f"scikit-image's bundled image {name} is missing from {skimage.data_dir}")
    a = np.asarray(io.imread(path))
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    a = a.astype(np.float32) / (255.0 if a.max() > 1 else 1.0)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    return torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1).contiguous()


def normalize(img: torch.Tensor) -> torch.Tensor:
    return (img - MEAN) / STD


def center(name: str, size: int = 224) -> torch.Tensor:
    """The whole image, centre-cropped square and resized (no augmentation), normalised."""
    img = sample(name)
    h, w = img.shape[-2:]
    s = min(h, w)
    img = img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return normalize(F.interpolate(img[None], (size, size), mode="bilinear", antialias=True,
                                   align_corners=False)[0])


def _variant(img: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    r = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
    area = r(0.25, 1.0)
    side = int(min(h, w) * area ** 0.5)
    y0, x0 = int(r(0, h - side)), int(r(0, w - side))
    x = img[:, y0:y0 + side, x0:x0 + side]
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
    x = F.interpolate(x[None], (size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    grey = x.mean(0, keepdim=True)
    x = grey + (x - grey) * r(0.6, 1.4)           # saturation
    x = (x - x.mean()) * r(0.7, 1.3) + x.mean()   # contrast
    return (x * r(0.7, 1.3)).clamp(0, 1)          # brightness


def image_set(n: int = 256, size: int = 224, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] normalised images: the bundled samples in turn, each a fresh
    deterministic crop / flip / colour variant (the first round is the plain centre crop)."""
    if n < 1:
        raise BadInput(f"need at least one image, got n={n}")
    if size < 32:
        raise BadInput(f"image size {size} is too small (at least 32)")
    imgs = [sample(s) for s in SAMPLES]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        j = i % len(imgs)
        out.append(center(SAMPLES[j], size) if i < len(imgs) else normalize(_variant(imgs[j], g, size)))
    return torch.stack(out)


def batches(x: torch.Tensor, batch_size: int = 32) -> list[dict]:
    """Calibration batches in the shape compress passes use: model(**batch)."""
    return [{"pixel_values": x[i:i + batch_size]} for i in range(0, len(x), batch_size)]
