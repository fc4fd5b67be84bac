"""Deterministic synthetic test images (no network), cached on disk, plus data-URL helpers."""
from __future__ import annotations

import base64
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .cache import cache_root, ensure_file, params_key


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """RGB image with a seeded gradient background and a few shapes.

    Varied content keeps the vision tower's activations non-degenerate; same args give
    byte-identical pixels.
    """
    rng = random.Random(seed)
    c0 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float64)
    c1 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float64)
    ys, xs = np.mgrid[0:height, 0:width]
    t = ((xs / max(width - 1, 1) + ys / max(height - 1, 1)) / 2)[..., None]
    img = Image.fromarray((c0 + (c1 - c0) * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3 + rng.randrange(3)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(4, max(5, width // 2)), y0 + rng.randrange(4, max(5, height // 2))
        fill = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
    return img


def save_image(width: int, height: int, seed: int = 0) -> Path:
    """PNG of make_image(...) under cache_root()/images, keyed by its parameters."""
    key = params_key({"width": width, "height": height, "seed": seed})
    target = cache_root() / "images" / f"img-{width}x{height}-s{seed}-{key}.png"
    return ensure_file(target, lambda tmp: make_image(width, height, seed).save(tmp, format="PNG"))


def to_data_url(image: str | Path | Image.Image) -> str:
    """Base64 PNG data URL (what OpenAI-style clients send in image_url.url)."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as f:
            image = f.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
