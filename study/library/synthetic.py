"""Procedurally generated offline domains, materialized as Hugging Face datasets.

Two worlds stand in for real data when there is no network:

* ``shapes`` - the *general* domain: coloured geometric objects on plain
  backgrounds, with compositional captions ("two small red circles on the left").
  The project pretrains its small CLIP on it; its benchmark is shape classification.
* ``micrographs`` - the *specialized* domain: stained smears of bacteria of
  several morphologies and densities, captioned in microbiology vocabulary that
  the general domain never uses. Some (morphology, stain) combinations are held
  out of the fine-tuning split, so the benchmark is truly zero-shot.

Every image is a pure function of ``(seed, split, index)``, so a dataset is
reproducible bit for bit, and the first ``n`` rows of a split never change when
the split grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 32

# ---------------------------------------------------------------- general domain
SHAPES = ("circle", "square", "triangle", "cross", "ring")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
                 "cross": "crosses", "ring": "rings"}
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
    "yellow": (235, 215, 40), "purple": (150, 50, 190), "orange": (245, 140, 30),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3),
             "bottom": (0.5, 0.7), "center": (0.5, 0.5)}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
GENERAL_PREFIXES = ("", "", "a picture of ", "an image of ", "a photo of ", "a drawing of ")

# ------------------------------------------------------------ specialized domain
MORPHOLOGIES = ("cocci", "bacilli", "diplococci", "spirochetes")
STAINS = {  # name -> (background rgb, cell rgb)
    "fuchsin": ((238, 214, 222), (170, 20, 80)),
    "safranin": ((240, 228, 200), (190, 70, 40)),
    "auramine": ((12, 14, 10), (120, 250, 90)),
    "methylene": ((220, 232, 240), (30, 60, 150)),
}
DENSITIES = {"sparse": (2, 4), "dense": (9, 14)}
MICRO_TEMPLATES = ("{density} {morph} with {stain} stain", "micrograph of {density} {morph}, {stain} stained",
                   "{stain} smear showing {morph}", "{morph} in a {density} {stain} preparation",
                   "{morph}")
# (morphology index, stain index) pairs never shown in fine-tuning captions.
HELD_OUT_COMBOS = frozenset({(0, 0), (1, 1), (2, 2), (3, 3)})


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, sum(map(ord, split)), index])


def _jitter(rgb, rng, amount=25):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        w = max(2.0, r * 0.45)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=int(round(w)))
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        t = r * 0.35
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def general_example(seed: int, split: str, index: int) -> dict:
    """One general-domain example: ``{"image": PIL, "caption": str, "label": int}``."""
    rng = _rng(seed, split, index)
    label = int(rng.integers(len(SHAPES)))
    shape = SHAPES[label]
    color = list(COLORS)[rng.integers(len(COLORS))]
    count = int(rng.choice([1, 1, 2, 3]))
    size = "small" if rng.random() < 0.5 else "large"
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    fill = _jitter(COLORS[color], rng)
    bg = rng.integers(0, 256, size=3)
    while np.abs(bg - np.array(fill)).sum() < 150:  # keep objects visible
        bg = rng.integers(0, 256, size=3)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(img)
    r = (4.0 if size == "small" else 7.0) * (1 + 0.15 * rng.standard_normal()) if count == 1 else 4.0
    if count == 1:
        px, py = POSITIONS[position]
        _draw_shape(draw, shape, px * IMAGE_SIZE + rng.normal(0, 1), py * IMAGE_SIZE + rng.normal(0, 1), r, fill)
    else:
        slots = rng.permutation([(8, 8), (24, 8), (8, 24), (24, 24), (16, 16)])[:count]
        for sx, sy in slots:
            _draw_shape(draw, shape, sx + rng.normal(0, 1), sy + rng.normal(0, 1), r, fill)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    # Compositional caption; attributes are dropped at random so that short
    # phrases ("a circle") are as familiar to the model as long ones.
    noun = shape if count == 1 else SHAPE_PLURALS[shape]
    words = [COUNT_WORDS[count]]
    if count == 1 and rng.random() < 0.6:
        words.append(size)
    if rng.random() < 0.7:
        words.append(color)
    words.append(noun)
    if count == 1 and rng.random() < 0.5:
        words.append("in the center" if position == "center" else f"on the {position}")
    prefix = GENERAL_PREFIXES[rng.integers(len(GENERAL_PREFIXES))]
    caption = prefix + " ".join(words)
    return {"image": img, "caption": caption, "label": label}


def _cell_polygon(morph: str, cx: float, cy: float, angle: float, rng) -> list[list[tuple[float, float]]]:
    """Outline(s) of one cell as polygons in pixel coordinates."""
    def ellipse(x, y, a, b, th, n=14):
        return [(x + a * math.cos(t) * math.cos(th) - b * math.sin(t) * math.sin(th),
                 y + a * math.cos(t) * math.sin(th) + b * math.sin(t) * math.cos(th))
                for t in np.linspace(0, 2 * math.pi, n, endpoint=False)]
    if morph == "cocci":
        return [ellipse(cx, cy, 1.6, 1.6, 0)]
    if morph == "bacilli":
        return [ellipse(cx, cy, 4.2, 1.3, angle)]
    if morph == "diplococci":
        dx, dy = 1.7 * math.cos(angle), 1.7 * math.sin(angle)
        return [ellipse(cx - dx, cy - dy, 1.5, 1.5, 0), ellipse(cx + dx, cy + dy, 1.5, 1.5, 0)]
    if morph == "spirochetes":
        pts = []
        for t in np.linspace(-7, 7, 15):
            w = 1.6 * math.sin(t * 1.3)
            pts.append((cx + t * math.cos(angle) - w * math.sin(angle), cy + t * math.sin(angle) + w * math.cos(angle)))
        return [pts]  # drawn as a line
    raise ValueError(morph)  # pragma: no cover


def micrograph_example(seed: int, split: str, index: int) -> dict:
    """One specialized-domain example: ``{"image": PIL, "caption": str, "label": int}``.

    The ``train`` split never contains a (morphology, stain) pair in
    ``HELD_OUT_COMBOS``; other splits draw from every combination.
    """
    rng = _rng(seed + 1_000_003, split, index)
    while True:
        label = int(rng.integers(len(MORPHOLOGIES)))
        stain_i = int(rng.integers(len(STAINS)))
        if split != "train" or (label, stain_i) not in HELD_OUT_COMBOS:
            break
    morph, stain = MORPHOLOGIES[label], list(STAINS)[stain_i]
    density = list(DENSITIES)[rng.integers(len(DENSITIES))]
    bg_rgb, cell_rgb = STAINS[stain]
    bg = np.array(_jitter(bg_rgb, rng, 12), dtype=np.float32)
    # Mottled background texture, unlike the flat general-domain backgrounds.
    tex = rng.normal(0, 1, size=(IMAGE_SIZE // 4, IMAGE_SIZE // 4))
    tex = np.kron(tex, np.ones((4, 4)))[..., None] * 10
    arr = np.clip(bg + tex, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    lo, hi = DENSITIES[density]
    for _ in range(int(rng.integers(lo, hi + 1))):
        cx, cy = rng.uniform(3, IMAGE_SIZE - 3, size=2)
        fill = _jitter(cell_rgb, rng, 20)
        for poly in _cell_polygon(morph, cx, cy, rng.uniform(0, math.pi), rng):
            if morph == "spirochetes":
                draw.line(poly, fill=fill, width=1)
            else:
                draw.polygon(poly, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(0.5))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 5, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    template = MICRO_TEMPLATES[rng.integers(len(MICRO_TEMPLATES))]
    return {"image": img, "caption": template.format(density=density, morph=morph, stain=stain), "label": label}


@dataclass(frozen=True)
class SyntheticDomain:
    """How to generate one offline domain."""

    name: str
    example: Callable[[int, str, int], dict]
    classnames: tuple[str, ...]
    split_sizes: dict


DOMAINS = {
    "shapes": SyntheticDomain("shapes", general_example, SHAPES,
                              {"train": 24000, "validation": 500, "test": 1000}),
    "micrographs": SyntheticDomain("micrographs", micrograph_example, MORPHOLOGIES,
                                   {"train": 3000, "validation": 400, "test": 800}),
}


def build_domain(name: str, out_dir: Path, seed: int = 0, scale: float = 1.0):
    """Materialize domain ``name`` as a ``datasets.DatasetDict`` saved under ``out_dir``.

    ``scale`` shrinks every split (for smoke tests); the rows kept are a prefix of
    the full-size split, so small and large builds agree on shared rows.
    Returns the loaded ``DatasetDict``.
    """
    import datasets

    domain = DOMAINS[name]
    features = datasets.Features({
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(domain.classnames)),
    })
    splits = {}
    for split, size in domain.split_sizes.items():
        n = max(8, int(size * scale))
        rows = [domain.example(seed, split, i) for i in range(n)]
        splits[split] = datasets.Dataset.from_dict(
            {k: [r[k] for r in rows] for k in ("image", "caption", "label")}, features=features)
    dd = datasets.DatasetDict(splits)
    dd.save_to_disk(str(out_dir))
    return dd
