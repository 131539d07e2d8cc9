"""Synthetic comic chapters with exact colour ground truth: deterministic by seed, numpy + Pillow only.

A chapter has a cast of recurring characters whose parts (skin, hair, eyes, clothes) keep one colour
on every page, coloured reference pages, and query pages. Each page comes with:

* `color`  – the RGB ground truth: flat cel colours, a darker cel shadow on the side away from the
  light, ink lines, white speech bubbles with text-like strokes, coloured backgrounds;
* `labels` – a uint8 map: `part_label(c, part)` on the lit pixels of character c's part, the same
  + `SHADED` on its shadowed pixels, `BACKGROUND` (0), `GUTTER`, `BUBBLE` and `INK` elsewhere.
  `expected_colors(labels, chapter)` rebuilds every character pixel of `color` from the labels;
* `inputs` – black-and-white pages in the three styles of `STYLES`:
  `screentone` (gray page turned into a clustered-dot screentone), `lineart` (ink only) and
  `lineart_shading` (ink + flat gray shadows).

`write_chapter` puts a chapter on disk (PNG + chapter.json); nothing is committed as binaries.

Why this module is long: the chapter generator is one deterministic random stream (cast, layout, shading, inputs);
split across modules its draw order — which the seeds' reproducibility rests on — would be spread out of sight.
"""
from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PARTS = ("skin", "hair", "eyes", "clothes")
STYLES = ("screentone", "lineart", "lineart_shading")
BACKGROUND, GUTTER, BUBBLE, INK = 0, 253, 254, 255
#: Added to a part's label on its shadowed pixels.
SHADED = 128
#: Shadowed pixels are the part colour times this.
SHADOW_FACTOR = 0.7
INK_RGB = (24, 24, 24)
PAPER_RGB = (255, 255, 255)
#: Gray of the shadows in the `lineart_shading` input.
SHADING_GRAY = 165
MAX_CHARACTERS = (SHADED - 1) // len(PARTS)
HAIR_STYLES = ("short", "long", "spiky", "bob")
_SKIN_TONES = ((255, 224, 196), (241, 194, 160), (224, 172, 135), (198, 140, 100), (255, 236, 218), (160, 110, 80))
_NAMES = ("Aki", "Bea", "Cho", "Dan", "Emi", "Fin", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mio", "Noa", "Oto", "Pia")


def part_label(character: int, part: str) -> int:
    """The label of the lit pixels of `part` of character `character` (0-based)."""
    if not 0 <= character < MAX_CHARACTERS:
        raise ValueError(f"character index {character} out of range (0..{MAX_CHARACTERS - 1})")
    return 1 + character * len(PARTS) + PARTS.index(part)


def decode_label(label: int) -> tuple[int, str, bool] | None:
    """(character, part, shaded) of a part label; None for background, gutter, bubble and ink."""
    shaded = label > SHADED
    base = label - SHADED if shaded else label
    if not 1 <= base <= MAX_CHARACTERS * len(PARTS):
        return None
    return (base - 1) // len(PARTS), PARTS[(base - 1) % len(PARTS)], shaded


def shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The shadow tone of a part colour."""
    return tuple(int(round(c * SHADOW_FACTOR)) for c in rgb)


@dataclass(frozen=True)
class Character:
    """A recurring character: fixed part colours and hairstyle."""

    index: int
    name: str
    colors: dict[str, tuple[int, int, int]]
    hair_style: str

    def to_json(self) -> dict:
        return {"index": self.index, "name": self.name, "hair_style": self.hair_style,
                "colors": {part: list(rgb) for part, rgb in self.colors.items()}}


@dataclass
class SyntheticPage:
    """One page: ground truth colour, label map, the B/W inputs and who appears."""

    name: str
    color: Image.Image
    labels: np.ndarray
    inputs: dict[str, Image.Image]
    characters: tuple[int, ...]

    def input(self, style: str) -> Image.Image:
        """The black-and-white page in `style` (one of STYLES)."""
        if style not in self.inputs:
            raise ValueError(f"unknown input style '{style}' (choose {', '.join(STYLES)})")
        return self.inputs[style]


@dataclass
class Chapter:
    """Reference pages (coloured, as a user would supply them) and query pages of one cast."""

    seed: int
    size: tuple[int, int]
    characters: list[Character]
    references: list[SyntheticPage]
    pages: list[SyntheticPage]
    meta: dict = field(default_factory=dict)

    def label_table(self) -> dict[int, dict]:
        """label → {character, name, part, color} for the lit label of every character part."""
        return {
            part_label(c.index, part): {"character": c.index, "name": c.name, "part": part, "color": list(c.colors[part])}
            for c in self.characters
            for part in PARTS
        }

    def to_json(self) -> dict:
        return {
            "generator": "colorflow_core.evaluation.synthetic",
            "seed": self.seed,
            "size": list(self.size),
            "parts": list(PARTS),
            "styles": list(STYLES),
            "special_labels": {"background": BACKGROUND, "gutter": GUTTER, "bubble": BUBBLE, "ink": INK},
            "shaded_offset": SHADED,
            "shadow_factor": SHADOW_FACTOR,
            "characters": [c.to_json() for c in self.characters],
            "labels": {str(k): v for k, v in self.label_table().items()},
            "references": [{"name": p.name, "characters": list(p.characters)} for p in self.references],
            "pages": [{"name": p.name, "characters": list(p.characters)} for p in self.pages],
            **self.meta,
        }


# --------------------------------------------------------------------------------------------- colours
def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h % 1.0, s, v))


def make_cast(rng: np.random.Generator, count: int) -> list[Character]:
    """`count` characters with well separated hair, eye and clothes hues."""
    if not 1 <= count <= min(MAX_CHARACTERS, len(_NAMES)):
        raise ValueError(f"a chapter has 1..{min(MAX_CHARACTERS, len(_NAMES))} characters, not {count}")
    offset = rng.random()
    cast = []
    for i in range(count):
        base = offset + i / count
        colors = {
            "skin": _SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))],
            "hair": _hsv(base + rng.uniform(-0.03, 0.03), rng.uniform(0.55, 0.9), rng.uniform(0.45, 0.9)),
            "eyes": _hsv(base + 0.5 + rng.uniform(-0.05, 0.05), rng.uniform(0.7, 1.0), rng.uniform(0.55, 0.95)),
            "clothes": _hsv(base + 0.25 + rng.uniform(-0.05, 0.05), rng.uniform(0.4, 0.85), rng.uniform(0.5, 0.95)),
        }
        cast.append(Character(i, _NAMES[i], colors, HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]))
    return cast


# --------------------------------------------------------------------------------------------- drawing
class _Layer:
    """Label, background colour, ink and lit/shaded state of one panel, composed shape by shape."""

    def __init__(self, width: int, height: int, rgb: tuple[int, int, int]):
        self.size = (width, height)
        self.labels = np.full((height, width), BACKGROUND, np.uint8)
        self.rgb = np.empty((height, width, 3), np.uint8)
        self.rgb[:] = rgb
        self.ink = np.zeros((height, width), bool)
        self.shaded = np.zeros((height, width), bool)
        self.xs = np.arange(width)[None, :]

    def mask(self, draw) -> np.ndarray:
        scratch = Image.new("L", self.size, 0)
        draw(ImageDraw.Draw(scratch))
        return np.asarray(scratch) > 0

    def fill(self, draw, label: int, rgb=None, outline=None, shadow_x: float | None = None) -> None:
        """Paint a shape over everything below it (its ink included), then its own outline."""
        area = self.mask(draw)
        self.labels[area] = label
        if rgb is not None:
            self.rgb[area] = rgb
        self.ink[area] = False
        self.shaded[area] = False
        if shadow_x is not None:
            self.shaded[area & (self.xs > shadow_x)] = True
        if outline is not None:
            self.ink |= self.mask(outline)

    def stroke(self, draw) -> None:
        self.ink |= self.mask(draw)


def _pastel(rng: np.random.Generator) -> tuple[int, int, int]:
    return _hsv(rng.random(), rng.uniform(0.08, 0.35), rng.uniform(0.8, 0.97))


def _background(layer: _Layer, rng: np.random.Generator, lw: int) -> None:
    width, height = layer.size
    horizon = int(height * rng.uniform(0.55, 0.8))
    ground = _hsv(rng.random(), rng.uniform(0.15, 0.45), rng.uniform(0.55, 0.85))
    layer.fill(lambda d: d.rectangle((0, horizon, width, height), fill=255), BACKGROUND, ground,
               outline=lambda d: d.line((0, horizon, width, horizon), fill=255, width=max(1, lw // 2)))
    for _ in range(int(rng.integers(1, 4))):
        w, h = int(width * rng.uniform(0.12, 0.3)), int(height * rng.uniform(0.15, 0.45))
        x0, y1 = int(rng.uniform(-0.1, 0.95) * width), horizon
        box = (x0, y1 - h, x0 + w, y1)
        layer.fill(lambda d: d.rectangle(box, fill=255), BACKGROUND, _pastel(rng),
                   outline=lambda d: d.rectangle(box, outline=255, width=max(1, lw // 2)))


def _ellipse(box, lw: int):
    return (lambda d: d.ellipse(box, fill=255)), (lambda d: d.ellipse(box, outline=255, width=lw))


def _polygon(points, lw: int):
    return (lambda d: d.polygon(points, fill=255)), (lambda d: d.polygon(points, outline=255, width=lw))


def _fill(layer: _Layer, shape, label: int, rgb=None, shadow_x: float | None = None) -> None:
    fill, outline = shape
    layer.fill(fill, label, rgb, outline=outline, shadow_x=shadow_x)


def _draw_character(layer: _Layer, character: Character, cx: float, cy: float, r: float, lw: int) -> None:
    """Body, neck, head, hair and eyes of one character with head radius `r` centred on (cx, cy)."""
    idx = character.index
    label = {part: part_label(idx, part) for part in PARTS}
    shadow_x = cx + 0.3 * r
    style = character.hair_style
    if style == "long":
        fill, outline = _ellipse((cx - 1.25 * r, cy - 1.3 * r, cx + 1.25 * r, cy + 2.2 * r), lw)
        layer.fill(fill, label["hair"], outline=outline, shadow_x=shadow_x)
    torso = [(cx - 1.6 * r, cy + 4.5 * r), (cx - 1.3 * r, cy + 1.3 * r), (cx - 0.4 * r, cy + 0.95 * r),
             (cx + 0.4 * r, cy + 0.95 * r), (cx + 1.3 * r, cy + 1.3 * r), (cx + 1.6 * r, cy + 4.5 * r)]
    _fill(layer, _polygon(torso, lw), label["clothes"], shadow_x=shadow_x)
    neck = (cx - 0.32 * r, cy + 0.6 * r, cx + 0.32 * r, cy + 1.15 * r)
    layer.fill(lambda d: d.rectangle(neck, fill=255), label["skin"],
               outline=lambda d: d.rectangle(neck, outline=255, width=lw), shadow_x=shadow_x)
    head = (cx - r, cy - 1.1 * r, cx + r, cy + 1.05 * r)
    _fill(layer, _ellipse(head, lw), label["skin"], shadow_x=shadow_x)
    cap = (cx - 1.12 * r, cy - 1.3 * r, cx + 1.12 * r, cy + 0.45 * r)
    layer.fill(lambda d: d.chord(cap, 180, 360, fill=255), label["hair"],
               outline=lambda d: d.chord(cap, 180, 360, outline=255, width=lw), shadow_x=shadow_x)
    if style == "spiky":
        for k in range(5):
            x = cx - r + k * 0.5 * r
            spike = [(x - 0.3 * r, cy - 0.9 * r), (x + 0.05 * r, cy - 1.75 * r), (x + 0.35 * r, cy - 0.9 * r)]
            _fill(layer, _polygon(spike, lw), label["hair"], shadow_x=shadow_x)
    elif style == "bob":
        for side in (-1, 1):
            x0, x1 = sorted((cx + side * 1.12 * r, cx + side * 0.72 * r))
            box = (x0, cy - 0.5 * r, x1, cy + 0.75 * r)
            layer.fill(lambda d, b=box: d.rectangle(b, fill=255), label["hair"],
                       outline=lambda d, b=box: d.rectangle(b, outline=255, width=lw), shadow_x=shadow_x)
    ew, eh = max(1.2, 0.2 * r), max(1.5, 0.26 * r)
    for side in (-1, 1):
        ex, ey = cx + side * 0.4 * r, cy + 0.15 * r
        box = (ex - ew, ey - eh, ex + ew, ey + eh)
        outline = (lambda d, b=box: d.ellipse(b, outline=255, width=1)) if r >= 14 else None
        layer.fill(lambda d, b=box: d.ellipse(b, fill=255), label["eyes"], outline=outline)
    if r >= 8:
        layer.stroke(lambda d: d.line((cx - 0.2 * r, cy + 0.62 * r, cx + 0.2 * r, cy + 0.62 * r), fill=255, width=1))


def _bubble(layer: _Layer, rng: np.random.Generator, lw: int) -> None:
    width, height = layer.size
    bw, bh = width * rng.uniform(0.3, 0.5), height * rng.uniform(0.16, 0.26)
    x0 = rng.uniform(0.02, 0.98) * (width - bw)
    y0 = rng.uniform(0.02, 0.12) * height
    box = (x0, y0, x0 + bw, y0 + bh)
    tx = x0 + bw * rng.uniform(0.3, 0.7)
    tail = [(tx - bw * 0.08, y0 + bh * 0.8), (tx + bw * 0.08, y0 + bh * 0.8), (tx + bw * rng.uniform(-0.2, 0.2), y0 + bh * 1.35)]
    _fill(layer, _polygon(tail, lw), BUBBLE, PAPER_RGB)
    _fill(layer, _ellipse(box, lw), BUBBLE, PAPER_RGB)
    # Text-like strokes: rows of word-length dashes inside the ellipse's inner box.
    ix0, ix1 = x0 + bw * 0.2, x0 + bw * 0.8
    row_gap = max(3.0, bh / 5)
    y = y0 + bh * 0.3
    while y < y0 + bh * 0.72:
        x = ix0 + rng.uniform(0, bw * 0.05)
        while x < ix1:
            length = min(ix1 - x, bw * rng.uniform(0.05, 0.16))
            if length >= 1:
                layer.stroke(lambda d, a=(x, y, x + length, y): d.line(a, fill=255, width=1))
            x += length + max(2.0, bw * 0.04)
        y += row_gap


def _panel_boxes(rng: np.random.Generator, width: int, height: int) -> list[tuple[int, int, int, int]]:
    margin, gutter = max(2, round(0.04 * width)), max(2, round(0.025 * width))
    rows = int(rng.integers(2, 4))
    weights = rng.uniform(0.8, 1.2, rows)
    usable = height - 2 * margin - (rows - 1) * gutter
    heights = np.floor(usable * weights / weights.sum()).astype(int)
    boxes, y = [], margin
    for row_h in heights:
        if rng.random() < 0.6:
            split = int((width - 2 * margin - gutter) * rng.uniform(0.35, 0.65))
            boxes += [(margin, y, margin + split, y + row_h), (margin + split + gutter, y, width - margin, y + row_h)]
        else:
            boxes.append((margin, y, width - margin, y + row_h))
        y += row_h + gutter
    return boxes


def _render_panel(rng: np.random.Generator, cast: list[Character], who: list[int], width: int, height: int, lw: int) -> _Layer:
    layer = _Layer(width, height, _pastel(rng))
    _background(layer, rng, lw)
    count = len(who)
    r = min(height * rng.uniform(0.14, 0.22), width / (2.8 * count + 0.4))
    for slot, index in enumerate(who):
        cx = width * (slot + 0.5) / count + rng.uniform(-0.08, 0.08) * width / count
        cy = height * rng.uniform(0.4, 0.55)
        _draw_character(layer, cast[index], cx, cy, r, max(1, round(r / 10)))
    if rng.random() < 0.7:
        _bubble(layer, rng, lw)
    return layer


def _screentone(gray: np.ndarray, period: float) -> np.ndarray:
    """Clustered-dot halftone at 45°: darker tones give bigger ink dots (0 = ink, 255 = paper)."""
    height, width = gray.shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = (x + y) / math.sqrt(2), (x - y) / math.sqrt(2)
    threshold = 0.5 + 0.25 * (np.cos(2 * math.pi * u / period) + np.cos(2 * math.pi * v / period))
    return np.where(gray.astype(np.float64) / 255.0 < threshold, 0, 255).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's integer ITU-R 601 luma."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


def render_page(
    rng: np.random.Generator, cast: list[Character], size: tuple[int, int], name: str, who: list[list[int]] | None = None
) -> SyntheticPage:
    """A page of panels; `who[i]` = character indices in panel i (random when None)."""
    width, height = size
    if width < 64 or height < 64:
        raise ValueError(f"page size {width}x{height} is too small (minimum 64x64)")
    lw = max(1, round(width / 170))
    boxes = _panel_boxes(rng, width, height)
    labels = np.full((height, width), GUTTER, np.uint8)
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = PAPER_RGB
    ink = np.zeros((height, width), bool)
    shaded = np.zeros((height, width), bool)
    present: set[int] = set()
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if who is not None and i < len(who):
            members = list(who[i])
        else:
            members = sorted(int(c) for c in rng.choice(len(cast), size=min(len(cast), int(rng.integers(1, 3))), replace=False))
        present.update(members)
        layer = _render_panel(rng, cast, members, x1 - x0, y1 - y0, lw) if members else _Layer(x1 - x0, y1 - y0, _pastel(rng))
        labels[y0:y1, x0:x1] = layer.labels
        rgb[y0:y1, x0:x1] = layer.rgb
        ink[y0:y1, x0:x1] = layer.ink
        shaded[y0:y1, x0:x1] = layer.shaded
        border = np.zeros((y1 - y0, x1 - x0), bool)
        border[:lw], border[-lw:], border[:, :lw], border[:, -lw:] = True, True, True, True
        ink[y0:y1, x0:x1] |= border
    is_part = (labels >= 1) & (labels < SHADED)
    shaded &= is_part & (_eyes_mask(labels) == 0)
    labels = np.where(shaded, labels + SHADED, labels).astype(np.uint8)
    labels[ink] = INK
    color = expected_colors(labels, cast, rgb)
    gray = _luma(color)
    line = np.where(ink, 0, 255).astype(np.uint8)
    tone = np.where(ink, 0, _screentone(gray, max(3.0, width / 110))).astype(np.uint8)
    shading = np.where((labels > SHADED) & (labels < GUTTER), SHADING_GRAY, 255)
    shading = np.where(labels == INK, 0, shading).astype(np.uint8)
    inputs = {
        "screentone": Image.fromarray(tone, "L"),
        "lineart": Image.fromarray(line, "L"),
        "lineart_shading": Image.fromarray(shading, "L"),
    }
    return SyntheticPage(name, Image.fromarray(color, "RGB"), labels, inputs, tuple(sorted(present)))


def _eyes_mask(labels: np.ndarray) -> np.ndarray:
    """1 where a (lit) label is an eyes label, else 0 (eyes get no cel shadow)."""
    base = labels.astype(np.int32)
    return ((base >= 1) & (base < SHADED) & ((base - 1) % len(PARTS) == PARTS.index("eyes"))).astype(np.uint8)


def expected_colors(labels: np.ndarray, cast: list[Character] | Chapter, background: np.ndarray | None = None) -> np.ndarray:
    """The RGB a page must have given its labels: part colours (shadowed ones darker), ink, paper.

    Background pixels (label 0) take `background` (white if None): scenery colours are free.
    """
    if isinstance(cast, Chapter):
        cast = cast.characters
    lut = np.zeros((256, 3), np.uint8)
    lut[GUTTER] = lut[BUBBLE] = PAPER_RGB
    lut[INK] = INK_RGB
    for character in cast:
        for part in PARTS:
            lit = part_label(character.index, part)
            lut[lit] = character.colors[part]
            lut[lit + SHADED] = shade(character.colors[part])
    out = lut[labels]
    bg = labels == BACKGROUND
    out[bg] = background[bg] if background is not None else PAPER_RGB
    return out


def make_chapter(
    seed: int = 0,
    *,
    n_references: int = 3,
    n_pages: int = 4,
    n_characters: int = 3,
    size: tuple[int, int] = (512, 768),
) -> Chapter:
    """A chapter: `n_references` coloured reference pages (which between them show every character) and
    `n_pages` query pages. Same arguments → the same pixels."""
    if n_references < 0 or n_pages < 0:
        raise ValueError("page counts must be non-negative")
    rng = np.random.default_rng(seed)
    cast = make_cast(rng, n_characters)
    references = []
    for i in range(n_references):
        # Round-robin so that every character appears on some reference.
        first = [[(i + j) % n_characters] for j in range(max(1, math.ceil(n_characters / max(1, n_references))))]
        references.append(render_page(rng, cast, size, f"ref_{i:03d}", who=first))
    pages = [render_page(rng, cast, size, f"page_{i:03d}") for i in range(n_pages)]
    return Chapter(seed, tuple(size), cast, references, pages)


def write_chapter(chapter: Chapter, folder: str | Path) -> Path:
    """Write a chapter::

        folder/chapter.json                   cast, label table, page lists
        folder/references/ref_NNN.png         coloured references
        folder/gt/page_NNN.png                colour ground truth of the query pages
        folder/labels/page_NNN.png            uint8 label maps (+ labels/labels.json, the label table)
        folder/input/<style>/page_NNN.png     black-and-white query pages per style
        folder/references_labels/ref_NNN.png  label maps of the references
    """
    folder = Path(folder)
    meta = chapter.to_json()
    for sub in ("references", "gt", "labels", "references_labels", *(f"input/{s}" for s in STYLES)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for page in chapter.references:
        page.color.save(folder / "references" / f"{page.name}.png")
        Image.fromarray(page.labels, "L").save(folder / "references_labels" / f"{page.name}.png")
    for page in chapter.pages:
        page.color.save(folder / "gt" / f"{page.name}.png")
        Image.fromarray(page.labels, "L").save(folder / "labels" / f"{page.name}.png")
        for style in STYLES:
            page.inputs[style].save(folder / "input" / style / f"{page.name}.png")
    (folder / "chapter.json").write_text(json.dumps(meta, indent=2))
    (folder / "labels" / "labels.json").write_text(json.dumps(
        {"labels": meta["labels"], "shaded_offset": SHADED, "special_labels": meta["special_labels"]}, indent=2))
    return folder
