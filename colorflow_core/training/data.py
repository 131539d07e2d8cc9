"""Training data from coloured chapters: per frame a same-chapter pool, the cached top-k retrieval, the input styles.

Layout of DATA_DIR (every file written atomically; `data.json` last, after each chapter)::

    data.json                               settings, release, encoder, one record per frame (pool + retrieval)
    chapters/<chapter>/pool/                the chapter's ReferencePool store (colour pages, CLIP embeddings)
    frames/<chapter>/<stem>/color.png       the colour page at 1.5W x 1.5H (GSRP target; its W x H resize is ICP's)
    frames/<chapter>/<stem>/<style>.png     the page in each input style at 1.5W x 1.5H (ICP context, GSRP guide)

A rerun with the same settings adds new chapters, new pages and new styles; what is recorded is never recomputed.
Retrieval runs the inference code (`ReferencePool.search`) with the release's CLIP image encoder on the luma page.
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..errors import ColorFlowError, InvalidInputError
from ..imaging import IMAGE_SUFFIXES, check_query_size, gray_rgb, load_image, process_image
from ..preprocessors import Preprocessors, screen_blend, shade_lines
from ..retrieval import ReferencePool, Retrieval, content_hash, reference_patches
from ..retrieval.store import write_json, write_png
from ..retrieval import ReleaseClipEncoder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DATA_FILE = "data.json"
STYLES = ("gray", "screen", "sketch", "sketch_shading")
#: The guide GSRP gets per context style (Sketch_Shading's guide is the pure line art, as at inference).
GUIDE_STYLE = {"gray": "gray", "screen": "screen", "sketch": "sketch", "sketch_shading": "sketch"}
#: Share of pixels with a chroma (max - min channel) above `_CHROMA` a colour page must have.
_MIN_COLOR_SHARE, _CHROMA = 0.002, 16
#: Settings a rerun must repeat (a change would mix incompatible frames in one DATA_DIR).
_FIXED = ("width", "height", "pool_size", "top_k", "seed")

Warn = Callable[[str], None]


@dataclass(frozen=True)
class PrepSettings:
    """What `prepare_training` makes: page size W x H, per-frame pool size, top-k patches, styles, seed."""
    width: int = 512
    height: int = 800
    pool_size: int = 20
    top_k: int = 12
    styles: tuple[str, ...] = STYLES
    seed: int = 0

    def __post_init__(self):
        check_query_size(self.width, self.height)
        unknown = sorted(set(self.styles) - set(STYLES))
        if unknown or not self.styles:
            raise InvalidInputError(f"unknown style(s) {unknown or '(none)'}: choose from {', '.join(STYLES)}")
        if self.top_k < 4 or self.top_k % 4:
            raise InvalidInputError("--top-k must be a positive multiple of 4 (top-k/4 patches per query quadrant)")
        if self.pool_size < 1:
            raise InvalidInputError("--pool-size must be at least 1")

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of a page."""
        return (self.width, self.height)

    @property
    def guide_size(self) -> tuple[int, int]:
        """(1.5 W, 1.5 H): the prepared page, as inference's `prepare_page` makes it."""
        return (int(1.5 * self.width), int(1.5 * self.height))


def is_grayscale(image: Image.Image) -> bool:
    """True when (almost) no pixel has colour: a black-and-white page filed among colour pages."""
    rgb = np.asarray(image.convert("RGB").reduce(max(1, min(image.size) // 256)), dtype=np.int16)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    return float((chroma > _CHROMA).mean()) < _MIN_COLOR_SHARE


def frame_seed(seed: int, frame_id: str) -> int:
    """A per-frame seed (ScreenStyle's dropout and noise, the blend ratio, the pool choice)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(frame_id.encode())]).generate_state(1)[0])


def screen_ratio(seed: int, frame_id: str) -> float:
    """The gray page's share in this frame's ScreenStyle blend: U(0, 1), fixed per (seed, frame)."""
    return float(np.random.default_rng(frame_seed(seed, frame_id)).uniform(0.0, 1.0))


def make_style(style: str, color: Image.Image, preprocessors: Preprocessors, seed: int, frame_id: str) -> Image.Image:
    """`color` (the 1.5x colour page) in one input style, with the inference preprocessors."""
    gray = gray_rgb(color)
    if style == "gray":
        return gray
    if style == "screen":
        screen = preprocessors.screen_style.screen(color, seed=frame_seed(seed, frame_id))
        return screen_blend(screen, color, screen_ratio(seed, frame_id))
    lines = preprocessors.line_extractor(gray).convert("L").convert("RGB")
    return lines if style == "sketch" else shade_lines(gray, lines)


def pool_for(frame_index: int, chapter_size: int, settings: PrepSettings, frame_id: str) -> list[int]:
    """Indices (in chapter order) of the other frames in this frame's reference pool: all of them when the chapter
    has at most `pool_size` others, else a seeded random choice of `pool_size`."""
    others = [i for i in range(chapter_size) if i != frame_index]
    if len(others) <= settings.pool_size:
        return others
    rng = np.random.default_rng(frame_seed(settings.seed, frame_id))
    return sorted(rng.choice(others, settings.pool_size, replace=False).tolist())


def retrieval_query(color: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The page retrieval searches with: the luma page at W x H (style-independent; inference uses the B/W page)."""
    return process_image(gray_rgb(color), *size)


class TrainingData:
    """A prepared DATA_DIR: settings, frame records and the images of a frame."""
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / DATA_FILE
        if not path.is_file():
            raise InvalidInputError(f"{self.folder} holds no prepared training data ({DATA_FILE}); run prepare-training first")
        try:
            self.meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ColorFlowError(f"cannot read {path}: {exc}") from exc
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ColorFlowError(f"{path} is not a version-{FORMAT_VERSION} training data file")
        self.frames: list[dict] = self.meta["frames"]
        self._refs: dict[tuple[str, str], Image.Image] = {}

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) the frames were prepared at."""
        return (self.meta["width"], self.meta["height"])

    @property
    def release(self) -> Path:
        """The release whose encoder and preprocessors made this data."""
        return Path(self.meta["release"])

    def frame_dir(self, frame: dict) -> Path:
        return self.folder / "frames" / frame["chapter"] / frame["name"]

    def image(self, frame: dict, kind: str) -> Image.Image:
        """'color' or a style of `frame` at 1.5W x 1.5H."""
        path = self.frame_dir(frame) / f"{kind}.png"
        if not path.is_file():
            raise InvalidInputError(f"frame {frame['id']} has no '{kind}' image; prepare it with --styles {kind}")
        return load_image(path).convert("RGB")

    def reference(self, chapter: str, digest: str) -> Image.Image:
        """A colour page of `chapter`'s pool by content hash."""
        key = (chapter, digest)
        if key not in self._refs:
            self._refs[key] = load_image(self.folder / "chapters" / chapter / "pool" / "refs" / f"{digest}.png")
        return self._refs[key]

    def retrieval(self, frame: dict) -> Retrieval:
        """The cached retrieval of `frame` with its candidate patches rebuilt (as `ReferencePool.search` returns it)."""
        size = self.size
        refs = [self.reference(frame["chapter"], digest) for digest in frame["pool"]]
        candidates = [patch for ref in refs for patch in reference_patches(process_image(ref, *size), size)]
        cached = frame["retrieval"]
        return Retrieval(
            torch.tensor(cached["indices"]), torch.tensor(cached["scores"]), candidates, size, cached["references"]
        )


def _chapter_pages(folder: Path, warn: Warn) -> list[tuple[str, Image.Image]]:
    """(stem, colour page) of every readable colour image in `folder`; corrupt and gray pages are skipped by name."""
    pages = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            image = load_image(path).convert("RGB")
        except InvalidInputError as exc:
            warn(f"skipping corrupt image {path}: {exc}")
            continue
        if is_grayscale(image):
            warn(f"skipping {path}: it has no colour (a black-and-white page among the colour pages)")
            continue
        pages.append((path.stem, image))
    return pages


def _load_meta(out: Path, settings: PrepSettings, release: Path, encoder_name: str) -> dict:
    path = out / DATA_FILE
    fresh = {
        "format_version": FORMAT_VERSION, **{k: getattr(settings, k) for k in _FIXED}, "styles": [],
        "release": str(release.resolve()), "encoder": encoder_name, "screen_ratio": "uniform(0, 1) per frame",
        "frames": [],
    }
    if not path.is_file():
        return fresh
    meta = TrainingData(out).meta
    changed = [k for k in _FIXED if meta.get(k) != getattr(settings, k)]
    if meta.get("encoder") != encoder_name:
        changed.append("encoder (another release's image encoder)")
    if changed:
        raise InvalidInputError(
            f"{out} was prepared with other settings ({', '.join(changed)}); a rerun extends it only with the same "
            "ones: repeat them, or prepare into a new folder"
        )
    return meta


def prepare_training(
    chapters_dir: str | Path,
    out: str | Path,
    release: str | Path,
    settings: PrepSettings = PrepSettings(),
    *,
    device: str = "cpu",
    warn: Warn = log.warning,
    progress: Callable[[str], None] | None = None,
) -> TrainingData:
    """Prepare (or extend) DATA_DIR `out` from `chapters_dir` (one folder of colour pages per chapter)."""
    chapters_dir, out, release = Path(chapters_dir), Path(out), Path(release)
    if not chapters_dir.is_dir():
        raise InvalidInputError(f"chapters folder not found: {chapters_dir}")
    chapters = sorted(p for p in chapters_dir.iterdir() if p.is_dir())
    if not chapters:
        raise InvalidInputError(f"{chapters_dir} holds no chapter folders (one folder of colour pages per chapter)")
    encoder = ReleaseClipEncoder.from_pretrained(release / "image_encoder", device=device)
    preprocessors = Preprocessors(release, device=device)
    meta = _load_meta(out, settings, release, encoder.name)
    meta["styles"] = sorted(set(meta["styles"]) | set(settings.styles), key=STYLES.index)
    known = {frame["id"]: frame for frame in meta["frames"]}
    usable = 0
    for chapter_dir in chapters:
        pages = _chapter_pages(chapter_dir, warn)
        if len(pages) < 2:
            warn(f"skipping chapter {chapter_dir.name}: {len(pages)} usable colour page(s); a frame needs at least one other page as reference")
            continue
        usable += 1
        if len(pages) - 1 < settings.pool_size:
            warn(f"chapter {chapter_dir.name} has {len(pages)} pages: pools of {len(pages) - 1} instead of {settings.pool_size}")
        _prepare_chapter(chapter_dir.name, pages, out, settings, encoder, preprocessors, known, meta, progress)
        write_json(out / DATA_FILE, meta)
    if usable == 0 and not meta["frames"]:
        raise InvalidInputError(f"no chapter in {chapters_dir} has 2 or more usable colour pages")
    write_json(out / DATA_FILE, meta)
    return TrainingData(out)


def _prepare_chapter(chapter, pages, out, settings, encoder, preprocessors, known, meta, progress) -> None:
    pool = ReferencePool(encoder, store=out / "chapters" / chapter / "pool")
    pool.add([image for _, image in pages])
    hashes = [content_hash(image) for _, image in pages]  # RGB pages are stored as they are
    for index, (stem, image) in enumerate(pages):
        frame_id = f"{chapter}/{stem}"
        frame = known.get(frame_id)
        folder = out / "frames" / chapter / stem
        color = None
        if frame is None:
            color = process_image(image, *settings.guide_size)
            write_png(folder / "color.png", color)
            members = [hashes[i] for i in pool_for(index, len(pages), settings, frame_id)]
            retrieval = pool.fork(members).search(retrieval_query(color, settings.size), settings.size, k=settings.top_k // 4)
            frame = {"id": frame_id, "chapter": chapter, "name": stem, "hash": hashes[index], "pool": members,
                     "retrieval": retrieval.to_json()}
            meta["frames"].append(frame)
            known[frame_id] = frame
        for style in settings.styles:
            if not (folder / f"{style}.png").is_file():
                color = color if color is not None else load_image(folder / "color.png").convert("RGB")
                write_png(folder / f"{style}.png", make_style(style, color, preprocessors, settings.seed, frame_id))
        if progress is not None:
            progress(f"{frame_id} ({index + 1}/{len(pages)})")

