"""Drawing for the synthetic data: bench backgrounds, parts, lighting. numpy + pillow only.

Every function takes a `numpy.random.Generator`, so an image is a pure function of its seed.
Objects are drawn SS times larger on an RGBA layer centred on the canvas, rotated, moved,
given a soft shadow and pasted on a textured bench; `finish` downsamples to SIZE x SIZE and
applies uneven lighting and sensor noise. Sizes below are in output pixels (64 px image).

    rng = np.random.default_rng(0)
    img = render_plate(rng, holes=3, defect="scratch")     # uint8 [64, 64, 3]
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SS = 3  # supersampling factor: draw at 192 px, downsample for anti-aliasing
CANVAS = SIZE * SS
C = CANVAS / 2

# Bench colours: mid tones of low saturation, so dark rubber, light metal and coloured
# cables all stand out. Names are used by generic captions.
BENCHES = {
    "grey": (118, 118, 120),
    "dark grey": (92, 94, 98),
    "brown": (120, 96, 74),
    "green": (84, 112, 90),
    "blue": (82, 96, 124),
}
COLOURS = {
    "red": (205, 35, 35),
    "green": (40, 165, 55),
    "blue": (40, 75, 210),
    "yellow": (235, 205, 35),
    "white": (240, 240, 236),
    "black": (28, 28, 30),
    "orange": (240, 135, 30),
    "purple": (135, 55, 170),
}
METALS = {"steel": (176, 180, 186), "zinc": (140, 146, 152), "brass": (196, 164, 84)}

Point = tuple[float, float]


def u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in rgb)


def shade(rgb: tuple[int, ...], factor: float) -> tuple[int, ...]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb)


def s(v: float) -> float:
    """Output pixels -> canvas pixels."""
    return v * SS


# --------------------------------------------------------------------------- background


def background(rng: np.random.Generator, bench: str | None = None) -> tuple[Image.Image, str]:
    """A textured bench: base colour + low-frequency blotches + grain or mat grid + speckle."""
    name = bench or str(rng.choice(list(BENCHES)))
    base = np.array(jitter(BENCHES[name], rng, 10), dtype=np.float32)
    low = rng.normal(0, 1, (6, 6)).astype(np.float32)
    low_img = Image.fromarray(low).resize((CANVAS, CANVAS), Image.BICUBIC)
    field = np.asarray(low_img, dtype=np.float32) * u(rng, 5, 12)
    kind = int(rng.integers(3))
    if kind == 0:  # wood-like grain along one axis
        grain = rng.normal(0, 1, CANVAS).astype(np.float32)
        grain = np.convolve(grain, np.ones(3) / 3, mode="same") * u(rng, 4, 9)
        field = field + (grain[:, None] if rng.random() < 0.5 else grain[None, :])
    elif kind == 1:  # cutting-mat grid
        step = int(rng.integers(30, 60))
        off = int(rng.integers(step))
        lines = np.zeros(CANVAS, dtype=np.float32)
        lines[off::step] = -u(rng, 10, 22)
        field = field + lines[:, None] + lines[None, :]
    speck = rng.normal(0, u(rng, 2, 6), (CANVAS, CANVAS)).astype(np.float32)
    arr = base[None, None, :] + (field + speck)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), name


def layer() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    return im, ImageDraw.Draw(im)


def place(bg: Image.Image, obj: Image.Image, angle: float, dx: float, dy: float,
          shadow: float = 0.45) -> None:
    """Rotate `obj` (drawn around the canvas centre) by `angle` degrees counter-clockwise,
    move it by (dx, dy) output pixels and paste it with a soft shadow."""
    rot = obj.rotate(angle, resample=Image.BICUBIC, center=(C, C))
    pos = (round(s(dx)), round(s(dy)))
    if shadow > 0:
        alpha = rot.getchannel("A").filter(ImageFilter.GaussianBlur(s(1.3)))
        alpha = alpha.point(lambda a: int(a * shadow))
        dark = Image.new("RGBA", rot.size, (0, 0, 0, 0))
        dark.putalpha(alpha)
        bg.paste(dark, (pos[0] + int(s(1.3)), pos[1] + int(s(1.7))), dark)
    bg.paste(rot, pos, rot)


def random_offset(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """A centre offset that keeps an object of bounding `radius` (output px) inside."""
    room = max(0.0, SIZE / 2 - radius - 1.5)
    return u(rng, -room, room), u(rng, -room, room)


def finish(bg: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Downsample, then uneven lighting (gradient, brightness, slight tint) and sensor noise."""
    small = np.asarray(bg.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) - 0.5
    gain = u(rng, 0.82, 1.15) * (1 + u(rng, -0.35, 0.35) * xx + u(rng, -0.35, 0.35) * yy)
    tint = np.array([u(rng, 0.95, 1.05) for _ in range(3)], dtype=np.float32)
    out = small * gain[..., None] * tint + rng.normal(0, u(rng, 1.0, 4.0), small.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- primitives


def circle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill, outline=None,
           width: float = 0) -> None:
    d.ellipse([s(cx - r), s(cy - r), s(cx + r), s(cy + r)], fill=fill, outline=outline,
              width=int(s(width)))


def polygon_points(cx: float, cy: float, r: float, n: int, phase: float = 0.0) -> list[Point]:
    return [(s(cx + r * math.cos(phase + 2 * math.pi * k / n)),
             s(cy + r * math.sin(phase + 2 * math.pi * k / n))) for k in range(n)]


def polyline(d: ImageDraw.ImageDraw, pts: list[Point], fill, width: float) -> None:
    d.line([(s(x), s(y)) for x, y in pts], fill=fill, width=max(1, int(s(width))), joint="curve")


def bezier(p0: Point, p1: Point, p2: Point, n: int = 40) -> list[Point]:
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t ** 2 * np.array(p2)
    return [(float(x), float(y)) for x, y in pts]


def punch(obj: Image.Image, cx: float, cy: float, r: float) -> None:
    """Cut a see-through hole (alpha 0) into an object layer."""
    ImageDraw.Draw(obj).ellipse([s(cx - r), s(cy - r), s(cx + r), s(cy + r)], fill=(0, 0, 0, 0))


def wedge(cx: float, cy: float, r_in: float, r_out: float, a0: float, a1: float,
          rng: np.random.Generator, ragged: float = 0.12) -> list[Point]:
    """Canvas points of a wedge between angles a0..a1 (radians) whose two radial edges are
    torn (zig-zag); it overshoots r_in..r_out so cutting it leaves ragged ends."""
    n = 5
    radii = [r_in * 0.8 + (r_out * 1.25 - r_in * 0.8) * k / n for k in range(n + 1)]
    edge0 = [(r, a0 + u(rng, -ragged, ragged)) for r in radii]
    arc = [(r_out * 1.25, a0 + (a1 - a0) * k / 6) for k in range(1, 6)]
    edge1 = [(r, a1 + u(rng, -ragged, ragged)) for r in reversed(radii)]
    inner = [(r_in * 0.8, a1 - (a1 - a0) * k / 6) for k in range(1, 6)]
    return [(s(cx + r * math.cos(a)), s(cy + r * math.sin(a))) for r, a in edge0 + arc + edge1 + inner]


def masked_onto(base: Image.Image, marks: Image.Image) -> Image.Image:
    """Composite `marks` onto `base` only where `base` is opaque (defects stay on the part)."""
    alpha = np.minimum(np.asarray(marks.getchannel("A")), np.asarray(base.getchannel("A")))
    marks.putalpha(Image.fromarray(alpha))
    return Image.alpha_composite(base, marks)


# --------------------------------------------------------------------------- parts

RING_DEFECTS = ("gap", "notch")
PLATE_DEFECTS = ("scratch", "dent", "crack")
PART_KINDS = ("bolt", "nut", "washer", "gear")
ORIENTATION_ANGLES = {"up": 0.0, "left": 90.0, "down": 180.0, "right": -90.0}


def draw_ring(rng: np.random.Generator, defect: str | None) -> tuple[Image.Image, float]:
    """A dark rubber seal ring; `defect` "gap" (torn through) or "notch" (torn half way)."""
    obj, d = layer()
    r_out = u(rng, 15, 21)
    r_in = r_out * u(rng, 0.58, 0.7)
    grey = u(rng, 26, 58)
    rubber = jitter((grey, grey, grey * 1.05), rng, 6)
    circle(d, C / SS, C / SS, r_out, rubber, outline=shade(rubber, 0.6), width=0.6)
    hi = u(rng, 0, 2 * math.pi)
    mid = (r_out + r_in) / 2
    d.arc([s(C / SS - mid), s(C / SS - mid), s(C / SS + mid), s(C / SS + mid)],
          math.degrees(hi), math.degrees(hi) + u(rng, 50, 110), fill=shade(rubber, 1.6),
          width=int(s(0.8)))
    punch(obj, C / SS, C / SS, r_in)
    if defect is not None:
        a0 = u(rng, 0, 2 * math.pi)
        span = math.radians(u(rng, 28, 45) if defect == "gap" else u(rng, 20, 32))
        inner = r_in if defect == "gap" else r_in + (r_out - r_in) * u(rng, 0.3, 0.45)
        cut = wedge(C / SS, C / SS, inner, r_out, a0, a0 + span, rng)
        d.polygon(cut, fill=(0, 0, 0, 0))
    return obj, r_out + 1


def draw_plate(rng: np.random.Generator, holes: int, defect: str | None) -> tuple[Image.Image, float]:
    """A brushed metal plate with `holes` drilled holes and an optional scratch, dent or crack."""
    obj, d = layer()
    w, h = u(rng, 34, 44), u(rng, 27, 34)
    x0, y0 = C / SS - w / 2, C / SS - h / 2
    metal = jitter(METALS[str(rng.choice(["steel", "steel", "zinc"]))], rng, 14)
    d.rounded_rectangle([s(x0), s(y0), s(x0 + w), s(y0 + h)], radius=s(u(rng, 1, 4)), fill=metal,
                        outline=shade(metal, 0.55), width=int(s(0.8)))
    for _ in range(int(rng.integers(6, 12))):  # brushing streaks
        y = u(rng, y0 + 1, y0 + h - 1)
        d.line([(s(x0 + 1), s(y)), (s(x0 + w - 1), s(y))], fill=shade(metal, u(rng, 0.93, 1.07)),
               width=int(s(u(rng, 0.3, 0.8))))
    r = u(rng, 2.7, 3.5)
    centres = hole_positions(rng, holes, x0, y0, w, h, r)
    if defect is not None:
        marks = draw_plate_defect(rng, defect, x0, y0, w, h, metal, centres)
        obj = masked_onto(obj, marks)
        d = ImageDraw.Draw(obj)
    for cx, cy in centres:
        circle(d, cx, cy, r, fill=jitter((32, 32, 34), rng, 10), outline=shade(metal, 0.45),
               width=0.7)
    return obj, math.hypot(w, h) / 2 + 1


def hole_positions(rng: np.random.Generator, n: int, x0: float, y0: float, w: float, h: float,
                   r: float) -> list[Point]:
    """n hole centres inside the plate, apart from each other and from the edge."""
    margin, gap = r + 2.2, 2 * r + 3.0
    for _ in range(400):
        pts = [(u(rng, x0 + margin, x0 + w - margin), u(rng, y0 + margin, y0 + h - margin))
               for _ in range(n)]
        if all(math.dist(p, q) >= gap for i, p in enumerate(pts) for q in pts[i + 1:]):
            return pts
    # Dense fallback: a 2 x 2 grid, which always fits the smallest plate.
    grid = [(x0 + margin, y0 + margin), (x0 + w - margin, y0 + h - margin),
            (x0 + w - margin, y0 + margin), (x0 + margin, y0 + h - margin)]
    return grid[:n]


def free_spot(rng: np.random.Generator, x0: float, y0: float, w: float, h: float, fx: float,
              fy: float, avoid: list[Point], clearance: float) -> Point:
    """A point in the middle (fx, fy fractions) of the plate, away from `avoid` if it can."""
    best, best_gap = (x0 + w / 2, y0 + h / 2), -1.0
    for _ in range(60):
        p = (u(rng, x0 + fx * w, x0 + (1 - fx) * w), u(rng, y0 + fy * h, y0 + (1 - fy) * h))
        gap = min((math.dist(p, q) for q in avoid), default=clearance)
        if gap >= clearance:
            return p
        if gap > best_gap:
            best, best_gap = p, gap
    return best


def draw_plate_defect(rng: np.random.Generator, kind: str, x0: float, y0: float, w: float,
                      h: float, metal: tuple[int, ...], holes: list[Point]) -> Image.Image:
    """A scratch, crack or dent on the plate, kept clear of the holes where possible."""
    marks, d = layer()
    if kind == "scratch":
        cx, cy = free_spot(rng, x0, y0, w, h, 0.3, 0.3, holes, 5.0)
        a, half = u(rng, 0, math.pi), u(rng, 0.3, 0.42) * w
        p0 = (cx - half * math.cos(a), cy - half * math.sin(a))
        p2 = (cx + half * math.cos(a), cy + half * math.sin(a))
        p1 = (cx + u(rng, -3, 3), cy + u(rng, -3, 3))
        polyline(d, bezier(p0, p1, p2), fill=jitter((58, 58, 62), rng, 12), width=u(rng, 1.0, 1.4))
    elif kind == "crack":
        side = int(rng.integers(4))
        x = x0 if side == 0 else x0 + w if side == 1 else u(rng, x0 + 6, x0 + w - 6)
        y = y0 if side == 2 else y0 + h if side == 3 else u(rng, y0 + 6, y0 + h - 6)
        heading = math.atan2(C / SS - y, C / SS - x)
        pts = [(x, y)]
        for _ in range(int(rng.integers(6, 9))):
            heading += u(rng, -0.7, 0.7)
            x, y = x + 3.5 * math.cos(heading), y + 3.5 * math.sin(heading)
            pts.append((x, y))
        polyline(d, pts, fill=jitter((22, 22, 24), rng, 8), width=u(rng, 1.0, 1.3))
        k = int(rng.integers(1, len(pts) - 1))
        bx, by = pts[k]
        b = heading + u(rng, 0.6, 1.2) * (1 if rng.random() < 0.5 else -1)
        polyline(d, [(bx, by), (bx + 5 * math.cos(b), by + 5 * math.sin(b))], fill=(25, 25, 27),
                 width=0.8)
    elif kind == "dent":
        cx, cy = free_spot(rng, x0, y0, w, h, 0.25, 0.25, holes, 11.0)
        rx, ry = u(rng, 6.0, 8.0), u(rng, 3.5, 4.5)
        dent = Image.new("RGBA", marks.size, (0, 0, 0, 0))
        dd = ImageDraw.Draw(dent)
        m = C / SS  # drawn at the canvas centre, then turned and moved to (cx, cy)
        dd.ellipse([s(m - rx), s(m - ry), s(m + rx), s(m + ry)], fill=shade(metal, 0.62))
        dd.ellipse([s(m - rx * 0.8), s(m - ry * 0.3), s(m + rx * 0.8), s(m + ry * 0.95)],
                   fill=shade(metal, 1.3))
        dd.line([(s(m - rx * 0.9), s(m)), (s(m + rx * 0.9), s(m))], fill=shade(metal, 0.5),
                width=int(s(0.7)))
        dent = dent.rotate(u(rng, 0, 360), center=(C, C), translate=(s(cx - m), s(cy - m)),
                           resample=Image.BICUBIC)
        marks = dent.filter(ImageFilter.GaussianBlur(s(0.35)))
    else:
        raise ValueError(f"unknown plate defect {kind!r}")
    return marks


def draw_label(rng: np.random.Generator) -> tuple[Image.Image, float]:
    """An upright printed label: dark header band on top, text lines, a barcode bottom right."""
    obj, d = layer()
    w, h = u(rng, 38, 46), u(rng, 23, 28)
    x0, y0 = C / SS - w / 2, C / SS - h / 2
    paper = jitter((238, 236, 226), rng, 12)
    ink = jitter(tuple(np.array([(20, 20, 24), (20, 30, 90), (120, 20, 20)])[rng.integers(3)]), rng, 10)
    d.rectangle([s(x0), s(y0), s(x0 + w), s(y0 + h)], fill=paper, outline=shade(paper, 0.7),
                width=int(s(0.5)))
    band = h * u(rng, 0.28, 0.34)
    d.rectangle([s(x0), s(y0), s(x0 + w), s(y0 + band)], fill=ink)
    d.rectangle([s(x0 + 2), s(y0 + 1.5), s(x0 + 2 + band - 3), s(y0 + band - 1.5)], fill=paper)
    y = y0 + band + 2.5
    for _ in range(int(rng.integers(2, 4))):
        if y + 1.5 > y0 + h - 2:
            break
        d.rectangle([s(x0 + 2.5), s(y), s(x0 + 2.5 + w * u(rng, 0.3, 0.55)), s(y + 1.4)],
                    fill=shade(ink, 1.3))
        y += 3.6
    bx = x0 + w * 0.66
    while bx < x0 + w - 2.5:
        bw = u(rng, 0.5, 1.3)
        d.rectangle([s(bx), s(y0 + h - 9), s(bx + bw), s(y0 + h - 2)], fill=(20, 20, 20))
        bx += bw + u(rng, 0.5, 1.3)
    return obj, math.hypot(w, h) / 2 + 1


def draw_part(rng: np.random.Generator, kind: str, scale: float = 1.0) -> tuple[Image.Image, float]:
    """Loose hardware seen from above: a bolt, nut, washer or gear, in steel, zinc or brass."""
    obj, d = layer()
    metal = jitter(METALS[str(rng.choice(list(METALS)))], rng, 14)
    edge = shade(metal, 0.55)
    cx = cy = C / SS
    if kind == "bolt":
        length, ws = u(rng, 25, 31) * scale, u(rng, 5.0, 6.5) * scale
        wh, hl = ws * u(rng, 1.9, 2.2), u(rng, 5, 6.5) * scale
        xa = cx - length / 2
        d.rectangle([s(xa), s(cy - wh / 2), s(xa + hl), s(cy + wh / 2)], fill=metal, outline=edge,
                    width=int(s(0.7)))
        d.rectangle([s(xa + hl), s(cy - ws / 2), s(cx + length / 2), s(cy + ws / 2)], fill=metal,
                    outline=edge, width=int(s(0.7)))
        x = xa + hl + u(rng, 2, 6)
        while x < cx + length / 2 - 1:
            polyline(d, [(x, cy - ws / 2), (x + 1.2, cy + ws / 2)], fill=shade(metal, 0.6), width=0.6)
            x += 2.0 * scale
        return obj, length / 2 + 1
    radius = u(rng, 9, 12) * scale
    if kind == "nut":
        d.polygon(polygon_points(cx, cy, radius, 6, u(rng, 0, 1)), fill=metal, outline=edge,
                  width=int(s(0.8)))
        hole = radius * u(rng, 0.42, 0.5)
        circle(d, cx, cy, hole * 1.3, fill=shade(metal, 0.85))
        punch(obj, cx, cy, hole)
    elif kind == "washer":
        circle(d, cx, cy, radius, fill=metal, outline=edge, width=0.7)
        circle(d, cx, cy, radius * 0.78, fill=None, outline=shade(metal, 1.15), width=0.5)
        punch(obj, cx, cy, radius * u(rng, 0.45, 0.52))
    elif kind == "gear":
        n = int(rng.integers(8, 12))
        body, tooth = radius * 0.78, radius
        pts: list[Point] = []
        for k in range(n):
            a = 2 * math.pi * k / n
            for da, r in ((-0.3, body), (-0.18, tooth), (0.18, tooth), (0.3, body)):
                ang = a + da * 2 * math.pi / n
                pts.append((s(cx + r * math.cos(ang)), s(cy + r * math.sin(ang))))
        d.polygon(pts, fill=metal, outline=edge, width=int(s(0.6)))
        circle(d, cx, cy, body * 0.5, fill=None, outline=shade(metal, 0.7), width=0.6)
        punch(obj, cx, cy, radius * u(rng, 0.18, 0.25))
    else:
        raise ValueError(f"unknown part kind {kind!r}")
    return obj, radius + 1


def draw_cable(obj: Image.Image, rng: np.random.Generator, rgb: tuple[int, ...],
               width: float | None = None) -> None:
    """A curved insulated cable crossing the view, with outline and a specular highlight."""
    d = ImageDraw.Draw(obj)
    w = width if width is not None else u(rng, 4.5, 7.0)
    theta = u(rng, 0, 2 * math.pi)
    end = theta + math.pi + u(rng, -0.7, 0.7)
    p0 = (32 + 42 * math.cos(theta), 32 + 42 * math.sin(theta))
    p2 = (32 + 42 * math.cos(end), 32 + 42 * math.sin(end))
    p1 = (32 + u(rng, -14, 14), 32 + u(rng, -14, 14))
    pts = bezier(p0, p1, p2)
    polyline(d, pts, fill=shade(rgb, 0.5), width=w + 1.0)
    polyline(d, pts, fill=rgb, width=w)
    hi = tuple(int(c + (255 - c) * 0.45) for c in rgb)
    off = -w * 0.22
    polyline(d, [(x + off, y + off) for x, y in pts], fill=hi, width=max(0.7, w * 0.25))


# --------------------------------------------------------------------------- scenes


def scene(rng: np.random.Generator, obj: Image.Image, radius: float, angle: float,
          bench: str | None = None) -> np.ndarray:
    bg, _ = background(rng, bench)
    dx, dy = random_offset(rng, radius)
    place(bg, obj, angle, dx, dy)
    return finish(bg, rng)


def render_ring(rng: np.random.Generator, defect: str | None, bench: str | None = None) -> np.ndarray:
    obj, radius = draw_ring(rng, defect)
    return scene(rng, obj, radius, 0.0, bench)


def render_plate(rng: np.random.Generator, holes: int, defect: str | None,
                 bench: str | None = None) -> np.ndarray:
    obj, radius = draw_plate(rng, holes, defect)
    return scene(rng, obj, radius, u(rng, -180, 180), bench)


def render_label(rng: np.random.Generator, orientation: str, bench: str | None = None) -> np.ndarray:
    """Label turned to `orientation`: "up", "down", "left" (turned 90 degrees counter-clockwise:
    its top edge is on the left) or "right" (90 degrees clockwise), +-10 degrees of jitter."""
    obj, radius = draw_label(rng)
    return scene(rng, obj, radius, ORIENTATION_ANGLES[orientation] + u(rng, -10, 10), bench)


def render_part(rng: np.random.Generator, kind: str, bench: str | None = None) -> np.ndarray:
    obj, radius = draw_part(rng, kind, scale=u(rng, 1.0, 1.3))
    return scene(rng, obj, radius, u(rng, -180, 180), bench)


def render_cable(rng: np.random.Generator, colour: str, bench: str | None = None) -> np.ndarray:
    bg, _ = background(rng, bench)
    obj, _ = layer()
    if rng.random() < 0.4:  # a thin neutral wire nearby, so the colour is not the only line
        draw_cable(obj, rng, jitter(COLOURS[str(rng.choice(["black", "white"]))], rng, 20), width=2.0)
    rgb = shade(jitter(COLOURS[colour], rng, 18), u(rng, 0.85, 1.1))
    draw_cable(obj, rng, rgb)
    place(bg, obj, 0.0, 0.0, 0.0)
    return finish(bg, rng)
