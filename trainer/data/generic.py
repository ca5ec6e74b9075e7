"""Generic pretraining data for the tiny base (instructions) and the tiny CLIP (captions).

Same world as the inspection stream (benches, rings, plates, cables, labels, loose hardware,
plus simple coloured shapes and arrows), but not its tasks, and never its test phrasings:
no generic text equals or contains a stream test phrasing after normalisation
(tests/test_data.py checks). The vocabulary covers every word of the stream's
phrasings, so the tokenizer and CLIP have seen them all.

    generic_instruction_samples(seed, n)  -> list[Sample]   image + generic question + short answer
    generic_caption_pairs(seed, n)        -> list[(uint8 [64, 64, 3], text)]  captions and
                                             question-style texts about the same content
    corpus_text()                         -> list[str]  everything the tokenizer is trained on

Every item i is drawn from generators seeded by (seed, kind, i), so texts can be listed
without rendering their images (corpus_text does that).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import ImageDraw

from . import render as R
from .synthetic import SPECS
from .types import Sample

SHAPES = ("circle", "square", "triangle", "ring", "bar", "cross")
PLURAL = {"cross": "crosses"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
ARROW_ANGLES = {"right": 0.0, "up": 90.0, "left": 180.0, "down": -90.0}
OBJECTS = ("plate", "cable", "label", "ring")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("What shape is this?", "Which shape is shown?", "Name the shape.",
              "What is the shape of the object?", "What sort of shape do you see?",
              "Identify the shape in the image."),
    "colour": ("What colour is the object?", "What color is the shape?",
               "Which colour is the shape in the image?", "Name the color of the object.",
               "Tell me the colour of this shape.", "Identify the object colour."),
    "count": ("How many objects are there?", "Count the shapes.", "How many shapes can you see?",
              "What is the number of objects in the image?", "Tell me how many shapes are shown.",
              "Count the objects: how many do you see?"),
    "mark": ("Is there a mark on it?", "Does the object have a mark?", "Is the shape marked or not?",
             "Can you see a mark on the shape?", "Would you say the object has a mark?",
             "Check the shape: is any mark visible?"),
    "arrow": ("Which way does the arrow point?", "What direction is the arrow pointing?",
              "Which direction is the arrow facing?", "Describe the orientation of the arrow.",
              "Is the arrow pointing up, down, left or right?", "Where is the arrow oriented?"),
    "object": ("What object is this?", "Which object is shown?", "Name the object in the image.",
               "What kind of object do you see?", "What type of thing is on the bench?",
               "Identify the object."),
}


def plural(word: str, n: int) -> str:
    return word if n == 1 else PLURAL.get(word, word + "s")


def pick(rng: np.random.Generator, items) -> str:
    return str(items[int(rng.integers(len(items)))])


# --------------------------------------------------------------------------- drawing


def draw_shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rgb, rot: float) -> None:
    """A flat shape centred at (cx, cy) output px, of size r, turned by `rot` radians."""
    edge = R.shade(rgb, 0.6)
    if kind == "circle":
        R.circle(d, cx, cy, r, fill=rgb, outline=edge, width=0.5)
    elif kind == "ring":
        R.circle(d, cx, cy, r, fill=None, outline=rgb, width=r * 0.4)
    elif kind in ("square", "triangle"):
        n = 4 if kind == "square" else 3
        d.polygon(R.polygon_points(cx, cy, r * (1.2 if n == 4 else 1.25), n, rot), fill=rgb, outline=edge)
    elif kind in ("bar", "cross"):
        for a in (rot,) if kind == "bar" else (rot, rot + math.pi / 2):
            dx, dy = math.cos(a) * r * 1.3, math.sin(a) * r * 1.3
            R.polyline(d, [(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=rgb, width=r * 0.55)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def render_shapes(rng: np.random.Generator, p: dict) -> np.ndarray:
    """p: shape, colour, count, mark, bench. Several shapes are kept apart so they can be counted."""
    bg, _ = R.background(rng, p["bench"])
    obj, d = R.layer()
    n = p["count"]
    r = R.u(rng, 9, 13) if n == 1 else R.u(rng, 4.5, 6.0)
    room = 32 - r * 1.4 - 2
    pts: list[tuple[float, float]] = []
    for spacing in (3.2, 2.8, 2.4, 2.1):  # rejection sampling; relax the gap if a draw is crowded
        pts = []
        for _ in range(500):
            q = (32 + R.u(rng, -room, room), 32 + R.u(rng, -room, room))
            if all(math.dist(q, o) > r * spacing for o in pts):
                pts.append(q)
            if len(pts) == n:
                break
        if len(pts) == n:
            break
    assert len(pts) == n, "shape placement failed"
    rgb = R.jitter(R.COLOURS[p["colour"]], rng, 15)
    for cx, cy in pts:
        draw_shape(d, p["shape"], cx, cy, r, rgb, R.u(rng, 0, math.pi))
    if p["mark"]:
        cx, cy = pts[0]
        ink = (250, 250, 250) if p["colour"] in ("black", "blue", "purple") else (15, 15, 15)
        m = r * 0.45
        R.polyline(d, [(cx - m, cy - m), (cx + m, cy + m)], fill=ink, width=1.3)
        R.polyline(d, [(cx - m, cy + m), (cx + m, cy - m)], fill=ink, width=1.3)
    R.place(bg, obj, 0.0, 0.0, 0.0)
    return R.finish(bg, rng)


def render_arrow(rng: np.random.Generator, p: dict) -> np.ndarray:
    """p: direction, colour, bench. The arrow is drawn pointing right, then turned."""
    obj, d = R.layer()
    length, w = R.u(rng, 30, 44), R.u(rng, 4, 6)
    c = R.C / R.SS
    head = length * 0.35
    x0, x1 = c - length / 2, c + length / 2
    pts = [(x0, c - w / 2), (x1 - head, c - w / 2), (x1 - head, c - w * 1.6), (x1, c),
           (x1 - head, c + w * 1.6), (x1 - head, c + w / 2), (x0, c + w / 2)]
    rgb = R.jitter(R.COLOURS[p["colour"]], rng, 15)
    d.polygon([(R.s(x), R.s(y)) for x, y in pts], fill=rgb, outline=R.shade(rgb, 0.6))
    return R.scene(rng, obj, length / 2 + 1, ARROW_ANGLES[p["direction"]] + R.u(rng, -10, 10), p["bench"])


def render_parts(rng: np.random.Generator, p: dict) -> np.ndarray:
    """One part, or two parts side by side ("a bolt next to a nut")."""
    if len(p["parts"]) == 1:
        return R.render_part(rng, p["parts"][0], p["bench"])
    bg, _ = R.background(rng, p["bench"])
    for kind, dx in zip(p["parts"], (-15.0, 15.0)):
        obj, _ = R.draw_part(rng, kind, scale=0.7)
        R.place(bg, obj, R.u(rng, -180, 180), dx + R.u(rng, -2, 2), R.u(rng, -12, 12))
    return R.finish(bg, rng)


RENDER = {
    "shapes": render_shapes,
    "arrow": render_arrow,
    "parts": render_parts,
    "ring": lambda rng, p: R.render_ring(rng, p["defect"], p["bench"]),
    "plate": lambda rng, p: R.render_plate(rng, p["holes"], p["defect"], p["bench"]),
    "cable": lambda rng, p: R.render_cable(rng, p["colour"], p["bench"]),
    "label": lambda rng, p: R.render_label(rng, p["direction"], p["bench"]),
}


# --------------------------------------------------------------------------- scene parameters


def sample_params(kind: str, rng: np.random.Generator) -> dict:
    bench = pick(rng, list(R.BENCHES))
    if kind == "shapes":
        return {"bench": bench, "shape": pick(rng, SHAPES), "colour": pick(rng, list(R.COLOURS)),
                "count": int(rng.integers(1, 6)), "mark": bool(rng.random() < 0.5)}
    if kind == "arrow":
        return {"bench": bench, "direction": pick(rng, list(ARROW_ANGLES)),
                "colour": pick(rng, list(R.COLOURS))}
    if kind == "ring":
        return {"bench": bench, "defect": pick(rng, R.RING_DEFECTS) if rng.random() < 0.5 else None}
    if kind == "plate":
        return {"bench": bench, "holes": int(rng.integers(1, 5)),
                "defect": pick(rng, R.PLATE_DEFECTS) if rng.random() < 0.5 else None}
    if kind == "cable":
        return {"bench": bench, "colour": pick(rng, ("red", "green", "blue", "yellow"))}
    if kind == "label":
        return {"bench": bench, "direction": pick(rng, list(R.ORIENTATION_ANGLES))}
    if kind == "parts":
        n = 1 if rng.random() < 0.6 else 2
        parts = [str(k) for k in rng.choice(R.PART_KINDS, size=n, replace=False)]
        return {"bench": bench, "parts": parts}
    raise ValueError(f"unknown scene kind {kind!r}")


# --------------------------------------------------------------------------- instruction samples

INSTRUCTION_KINDS = ("shape", "colour", "count", "mark", "arrow", "object")


def instruction_spec(seed: int, i: int) -> tuple[str, dict, str, str]:
    """(scene kind, params, question, answer) of generic instruction sample i, no image."""
    rng = np.random.default_rng([seed, 101, i, 0])
    family = INSTRUCTION_KINDS[i % len(INSTRUCTION_KINDS)]
    question = pick(rng, QUESTIONS[family])
    if family == "arrow":
        p = sample_params("arrow", rng)
        return "arrow", p, question, p["direction"]
    if family == "object":
        obj = pick(rng, OBJECTS)
        return obj, sample_params(obj, rng), question, obj
    p = sample_params("shapes", rng)
    if family != "count":
        p["count"] = 1
    answer = {"shape": p["shape"], "colour": p["colour"], "count": str(p["count"]),
              "mark": "yes" if p["mark"] else "no"}[family]
    return "shapes", p, question, answer


def generic_instruction_samples(seed: int, n: int) -> list[Sample]:
    """n generic image + question -> short answer samples (families in rotation)."""
    out = []
    for i in range(n):
        kind, p, question, answer = instruction_spec(seed, i)
        image = RENDER[kind](np.random.default_rng([seed, 101, i, 1]), p)
        out.append(Sample(image=image, instruction=question, answer=answer, task_id="generic",
                          source=f"generic:instructions/seed={seed}#{i}"))
    return out


# --------------------------------------------------------------------------- captions


def _n(k: int) -> str:
    return NUMBER_WORDS[k]


def caption_texts(kind: str, p: dict) -> list[str]:
    """All the true texts for a scene: captions in several templates, plus question-style texts
    about the same content (so CLIP maps questions about a domain near images of it)."""
    b = p["bench"]
    if kind == "shapes":
        sh, c, k = p["shape"], p["colour"], p["count"]
        texts = [f"{_n(k)} {c} {plural(sh, k)}", f"{_n(k)} {c} {plural(sh, k)} on a {b} bench",
                 f"{k} {plural(sh, k)} in {c}", f"how many {plural(sh, 2)} are on the bench"]
        if k == 1:
            texts += [f"a {c} {sh}", f"a {c} {sh} on a {b} bench", f"a simple {sh} shape in {c}",
                      f"the shape is a {sh}", "what shape is on the bench"]
            texts += ([f"a {c} {sh} with a mark", f"a {sh} marked with a cross"] if p["mark"]
                      else [f"a clean {c} {sh} without any mark"])
        return texts
    if kind == "arrow":
        d, c = p["direction"], p["colour"]
        return [f"an arrow pointing {d}", f"a {c} arrow that points {d}", f"a {c} arrow facing {d}",
                f"an arrow oriented {d} on a {b} bench", "which way is the arrow turned",
                f"the arrow shows the direction {d}"]
    if kind == "ring":
        common = ["a rubber seal ring", f"a rubber ring on a {b} bench", "is the rubber seal torn",
                  "is this seal ring damaged or not", "does the rubber ring have a defect",
                  "check the seal ring for any damage", "can you see a tear in the seal"]
        if p["defect"]:
            return common + ["a torn rubber ring", "a rubber seal ring with a gap",
                             "a damaged seal, torn on one side", f"a broken rubber ring on a {b} bench",
                             "a defective rubber seal with a tear", "a seal ring with a visible defect"]
        return common + ["a black rubber ring", "an intact rubber seal", "an undamaged seal ring",
                         "a round rubber seal with no damage", "a seal ring in good condition"]
    if kind == "plate":
        k, defect = p["holes"], p["defect"]
        texts = [f"a metal plate with {_n(k)} {plural('hole', k)}",
                 f"a steel plate with {k} drilled {plural('hole', k)}",
                 f"a plate with {_n(k)} {plural('hole', k)} on a {b} bench",
                 f"{_n(k)} {plural('hole', k)} drilled in a metal plate",
                 f"the number of holes in the plate is {k}", "how many holes are in the plate",
                 "count the drilled holes in this metal plate", "tell me how many holes the plate has",
                 "is the metal plate damaged", "does the plate have any defect",
                 "is there a scratch, dent or crack on the plate"]
        if defect:
            adj = {"scratch": "scratched", "dent": "dented", "crack": "cracked"}[defect]
            texts += [f"a {adj} metal plate", f"a {adj} plate with {_n(k)} {plural('hole', k)}",
                      f"a metal plate with a {defect}", "a damaged metal plate",
                      f"a defective steel plate, it has a {defect}"]
        else:
            texts += ["an undamaged metal plate", "a clean plate with no defect"]
        return texts
    if kind == "cable":
        c = p["colour"]
        return [f"a {c} cable on a {b} bench", f"a {c} wire", f"a {c} cable",
                f"a {c} electric cable lying on the bench", f"the cable is {c}",
                f"a cable in {c} colour", f"a {c} color cable", "what colour is this wire",
                "which color is the wire", "tell me the colour of the wire",
                "name the cable color", "which colour of cable is in the image"]
    if kind == "label":
        d = p["direction"]
        words = {"up": ["an upright printed label", "a label the right way up", "a label facing up"],
                 "down": ["a label turned upside down", "an upside down printed label",
                          "a label rotated upside down"],
                 "left": ["a label rotated left", "a printed label turned to the left",
                          "a label facing left"],
                 "right": ["a label rotated right", "a printed label turned to the right",
                           "a label facing right"]}[d]
        return words + [f"a white label with a barcode on a {b} bench", "a printed label",
                        "which way is the label turned", "is the label upside down",
                        "how is the printed label oriented", "describe how the label is rotated",
                        "what orientation does the label show", f"the label points {d}"]
    if kind == "parts":
        parts = p["parts"]
        if len(parts) == 2:
            a, c = parts
            return [f"a {a} next to a {c}", f"a {a} and a {c} on a {b} bench", f"two parts: a {a} and a {c}",
                    "some loose hardware on the bench", "which parts are on the bench"]
        a = parts[0]
        return [f"a {a}", f"a metal {a}", f"a {a} on a {b} bench", f"a small {a}", f"a loose {a}",
                f"a piece of hardware, a {a}", "what kind of part is on the bench",
                "which type of hardware is this", "tell me what part you see",
                "what sort of hardware is on the bench", "is this part a bolt, a nut, a washer or a gear"]
    raise ValueError(f"unknown scene kind {kind!r}")


CAPTION_KINDS = ("shapes", "arrow", "ring", "plate", "cable", "label", "parts")


def caption_spec(seed: int, i: int) -> tuple[str, dict, str]:
    """(scene kind, params, text) of caption pair i, no image."""
    rng = np.random.default_rng([seed, 202, i, 0])
    kind = CAPTION_KINDS[i % len(CAPTION_KINDS)]
    p = sample_params(kind, rng)
    return kind, p, pick(rng, caption_texts(kind, p))


def generic_caption_pairs(seed: int, n: int) -> list[tuple[np.ndarray, str]]:
    """n (image, text) pairs; texts are captions or questions about the image's content."""
    out = []
    for i in range(n):
        kind, p, text = caption_spec(seed, i)
        out.append((RENDER[kind](np.random.default_rng([seed, 202, i, 1]), p), text))
    return out


def corpus_text(seed: int = 0, n: int = 4000) -> list[str]:
    """Every text the tokenizer is trained on, deduplicated, in a fixed order: all generic
    questions and answers, n sampled captions, and the stream's TRAIN phrasings and answers
    (never its test phrasings). Text only: no image is rendered."""
    texts: list[str] = [q for family in QUESTIONS.values() for q in family]
    texts += list(SHAPES) + list(R.COLOURS) + list(ARROW_ANGLES) + list(OBJECTS) + list(NUMBER_WORDS)
    texts += [str(k) for k in range(10)]
    for i in range(n):
        texts.append(instruction_spec(seed, i)[3])
        texts.append(caption_spec(seed, i)[2])
    for spec in SPECS.values():
        texts += list(spec.train_phrasings) + list(spec.answers)
    return list(dict.fromkeys(texts))
