"""Rendering of realdev images: a clip-art drawing or an MNIST digit placed on a plain background,
optionally turned by 180 degrees, and procedural textures for the no-match set.

numpy + pillow only; every random choice comes from the generator passed in, so a sample's
pixels follow from its seed. Used by trainer/data/realdev.py.

    pixels = compose_clip(rgba, 224, np.random.default_rng(0), upside=True)   # uint8 [224, 224, 3]
"""

from __future__ import annotations

import numpy as np
from PIL import Image

BACKGROUNDS = ((255, 255, 255), (236, 236, 236), (245, 240, 225), (228, 236, 244), (232, 242, 230))
PAPERS = ((255, 255, 255), (250, 249, 242), (240, 236, 224), (232, 236, 240))
INKS = ((20, 20, 20), (25, 35, 90), (60, 30, 30))
SYMMETRY_MIN = 0.3  # upside_down leaves out drawings closer than this to their half-turn
PROCEDURAL = ("noise", "gradient", "checker", "stripes")


def turn_ambiguous(rgba: np.ndarray) -> bool:
    """True when the drawing looks about the same turned by 180 degrees or flipped top-bottom
    (an orange slice, a car seen from above): its upside_down answer could not be seen."""
    im = Image.new("RGBA", (rgba.shape[1], rgba.shape[0]), (255, 255, 255, 255))
    im.alpha_composite(Image.fromarray(rgba))
    g = np.asarray(im.convert("L").resize((32, 32), Image.BOX), np.float32)
    spread = np.abs(g - g.mean()).mean() + 1e-3
    return min(np.abs(g - g[::-1, ::-1]).mean(), np.abs(g - g[::-1]).mean()) / spread < SYMMETRY_MIN


def compose_clip(rgba: np.ndarray, size: int, rng: np.random.Generator, upside: bool) -> np.ndarray:
    """The drawing at 60-90% of the frame, maybe mirrored, on one of BACKGROUNDS."""
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    scale = rng.uniform(0.6, 0.9) * size / max(rgba.shape[:2])
    w, h = max(1, round(rgba.shape[1] * scale)), max(1, round(rgba.shape[0] * scale))
    im = Image.fromarray(rgba).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if upside:
        im = im.transpose(Image.ROTATE_180)
    return _paste(im, bg, size, rng)


def compose_digit(digit: np.ndarray, size: int, rng: np.random.Generator, upside: bool) -> np.ndarray:
    """The digit (white on black, 28x28) as ink on paper at 55-85% of the frame."""
    paper = PAPERS[rng.integers(len(PAPERS))]
    ink = INKS[rng.integers(len(INKS))]
    side = round(rng.uniform(0.55, 0.85) * size)
    alpha = Image.fromarray(digit).resize((side, side), Image.BILINEAR)
    if upside:
        alpha = alpha.transpose(Image.ROTATE_180)
    im = Image.new("RGBA", (side, side), ink + (255,))
    im.putalpha(alpha)
    return _paste(im, paper, size, rng)


def _paste(im: Image.Image, bg: tuple[int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = int(rng.integers(0, size - im.height + 1)), int(rng.integers(0, size - im.width + 1))
    canvas = Image.new("RGBA", (size, size), bg + (255,))
    canvas.alpha_composite(im, (x, y))
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8).copy()


def procedural(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A non-object image: "noise", "gradient", "checker" or "stripes"."""
    c1, c2 = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "noise":
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if kind == "gradient":
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) % 1.0
    elif kind == "checker":
        k = int(rng.integers(4, 16))
        t = ((np.floor(xx * k) + np.floor(yy * k)) % 2).astype(np.float32)
    else:
        t = (np.sin((xx * rng.uniform(-1, 1) + yy) * rng.uniform(10, 60)) > 0).astype(np.float32)
    return np.rint(c1 * (1 - t[..., None]) + c2 * t[..., None]).astype(np.uint8)
