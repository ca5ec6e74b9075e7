"""Image decoding and preprocessing (pillow + numpy), the ONE implementation used by the
trainer (torch side) and the station (ONNX side), so both see identical pixels.

    cfg = PreprocessConfig(size=64, mean=(0.5,)*3, std=(0.5,)*3)
    pixels = preprocess_image(open("part.png", "rb").read(), cfg)   # f32 [3, 64, 64]
    img = load_rgb(png_bytes, max_pixels=25_000_000)                 # InputError above the cap

Untrusted images are bounded before they are decoded: the header gives the size, and an image
over `max_pixels` (default MAX_PIXELS, 25 MP; `max_image_pixels` in station.toml) or over
MAX_SIDE a side is an InputError naming the limit; PIL's own decompression-bomb guard is one too.
Encoded images and PIL images are turned upright by their EXIF orientation (phone and many camera
JPEGs store the pixels sideways plus a tag), as a viewer shows them and as they were labelled;
the trainer reads files through the same `upright`.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST}
RESIZE_MODES = ("squash", "shortest_center_crop")
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_SIDE = 8192
MAX_PIXELS = 25_000_000


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes model pixels: resize to size x size, scale to [0,1], normalise."""

    size: int
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resample: str = "bicubic"
    resize_mode: str = "squash"

    def __post_init__(self):
        if not (isinstance(self.size, int) and 8 <= self.size <= 4096):
            raise ValueError(f"preprocess size must be an int in 8..4096, got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("preprocess mean and std need 3 values each, std > 0")
        if self.resample not in RESAMPLE:
            raise ValueError(f"preprocess resample must be one of {sorted(RESAMPLE)}, got {self.resample!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"preprocess resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        return cls(**d)


EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
    """`img` turned by its EXIF orientation tag (2-8), or itself when it has none (1, absent).
    An unreadable EXIF block or an out-of-range tag counts as no turn, as image viewers do: the
    pixels themselves are fine, and refusing a camera's picture for its metadata helps no one."""
    try:
        if img.getexif().get(EXIF_ORIENTATION, 1) not in range(2, 9):
            return img
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):  # malformed EXIF: pixels as stored
        return img


def load_rgb(image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Accept encoded bytes, a path-like, a PIL image or a uint8 array [H,W,3]; return RGB PIL,
    upright by its EXIF orientation (`upright`).

    Images over `max_pixels` pixels (width x height) are refused before they are decoded."""
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels, "image")
        return upright(image).convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(check_array(image, max_pixels), "RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) > MAX_IMAGE_BYTES:
            raise InputError(f"image is {len(image)} bytes; the limit is {MAX_IMAGE_BYTES}")
        return _decode(io.BytesIO(bytes(image)), "image bytes", max_pixels)
    if hasattr(image, "__fspath__") or isinstance(image, str):
        try:
            with open(image, "rb") as f:
                data = f.read(MAX_IMAGE_BYTES + 1)
        except OSError as err:
            raise InputError(f"cannot read image file {image}: {err.strerror or err}") from err
        if len(data) > MAX_IMAGE_BYTES:
            raise InputError(f"image file {image} is over {MAX_IMAGE_BYTES} bytes, the limit")
        return _decode(io.BytesIO(data), str(image), max_pixels)
    raise InputError(f"image must be encoded bytes, a path, a PIL image or a uint8 array, got {type(image).__name__}")


def check_array(arr: np.ndarray, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Validate a raw image array: uint8, [H, W, 3], sane size."""
    if arr.dtype != np.uint8:
        raise InputError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"image array must have shape [H, W, 3] (RGB), got {list(arr.shape)}")
    if not (1 <= arr.shape[0] <= MAX_SIDE and 1 <= arr.shape[1] <= MAX_SIDE):
        raise InputError(f"image side must be 1..{MAX_SIDE} pixels, got {arr.shape[:2]}")
    _check_pixels((arr.shape[1], arr.shape[0]), max_pixels, "image array")
    return np.ascontiguousarray(arr)


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise InputError(f"{what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                         "(max_image_pixels): send a smaller image")


def _decode(buf: io.BytesIO, what: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(buf)  # reads the header only: the size is known before any pixel is decoded
        if max(img.size) > MAX_SIDE:
            raise InputError(f"{what}: {img.size} is larger than {MAX_SIDE} pixels a side")
        _check_pixels(img.size, max_pixels, what)
        img.load()
        return upright(img).convert("RGB")
    except Image.DecompressionBombError as err:
        raise InputError(f"{what} refused as a decompression bomb: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"{what} is not a readable image (PNG/JPEG/BMP...): {err}") from None


def resize(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    if cfg.resize_mode == "squash":
        return img.resize((cfg.size, cfg.size), RESAMPLE[cfg.resample])
    w, h = img.size
    scale = cfg.size / min(w, h)
    nw, nh = max(cfg.size, round(w * scale)), max(cfg.size, round(h * scale))
    img = img.resize((nw, nh), RESAMPLE[cfg.resample])
    left, top = (nw - cfg.size) // 2, (nh - cfg.size) // 2
    return img.crop((left, top, left + cfg.size, top + cfg.size))


def preprocess_image(image, cfg: PreprocessConfig) -> np.ndarray:
    """Decode/resize/normalise one image into float32 [3, size, size]."""
    img = resize(load_rgb(image), cfg)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(images, cfg: PreprocessConfig) -> np.ndarray:
    """Stack several images into float32 [B, 3, size, size]."""
    return np.stack([preprocess_image(im, cfg) for im in images])
