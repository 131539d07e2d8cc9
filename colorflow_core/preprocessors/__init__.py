"""Page preprocessors of ColorFlow's three input styles (upstream §6), PIL in and PIL out.

* GrayImage(ScreenStyle) — `ScreenStyle` (method "screen"): screentone rendering blended 50/50 with the page.
* Sketch — `LineExtractor` (method "sketch"): the manga line extractor's output is context and guide.
* Sketch_Shading — `shade_lines` (method "sketch_shading"): lines plus thresholded shading as context,
  the pure lines as guide.

Networks load lazily (only the method that needs them) and are cached per process, keyed by file,
modification time and device; `Preprocessors` bundles them for one release folder.
"""
from __future__ import annotations

import threading
from pathlib import Path

from PIL import Image

from ..errors import InvalidInputError, MissingWeightsError
from ..imaging import gray_rgb, to_rgb
from ..styles import check_preprocess
from ..weights import COLORFLOW_REPO
from .line_extractor import LineExtractor, opencv_rgb2gray
from .screen_style import DECODER_FILE, GENERATOR_FILE, ScreenStyle, screen_blend
from .sketch_shading import shade_lines, sketch_input, sketch_shading_input

#: The networks each method of `styles.PREPROCESS_METHODS` needs.
NEEDS = {"screen": "screen_style", "sketch": "line_extractor", "sketch_shading": "line_extractor"}
#: Where the line extractor lives in the release.
ERIKA_FILE = "LE/erika.pth"
#: Files each network needs from the release (for partial downloads).
RELEASE_FILES = {"screen_style": [GENERATOR_FILE, DECODER_FILE], "line_extractor": [ERIKA_FILE]}
PREPROCESSOR_FILES = [GENERATOR_FILE, DECODER_FILE, ERIKA_FILE]

__all__ = [
    "RELEASE_FILES", "PREPROCESSOR_FILES", "LineExtractor", "ScreenStyle", "Preprocessors", "find_erika",
    "load_line_extractor", "load_screen_style", "preprocess_image", "shade_lines", "screen_blend",
    "sketch_input", "sketch_shading_input", "opencv_rgb2gray", "clear_cache",
]

_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _cached(key: tuple, build):
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def clear_cache() -> None:
    """Forget every cached preprocessing network (frees their memory once no one else holds them)."""
    with _LOCK:
        _CACHE.clear()


def find_erika(release: str | Path | None = None, candidates: tuple[str | Path, ...] = ()) -> Path:
    """The first existing `erika.pth`: explicit `candidates` (files, or folders holding erika.pth) in
    order, then `<release>/LE/erika.pth`. A clear error naming every place looked at otherwise."""
    looked = []
    for candidate in candidates:
        path = Path(candidate).expanduser()
        path = path / "erika.pth" if path.is_dir() else path
        looked.append(str(path))
        if path.is_file():
            return path
    if release is not None:
        path = Path(release).expanduser() / ERIKA_FILE
        looked.append(str(path))
        if path.is_file():
            return path
    raise MissingWeightsError(
        "erika.pth", looked[-1].rsplit("/", 1)[0] if looked else ERIKA_FILE,
        f"the line extractor, from {COLORFLOW_REPO} ({ERIKA_FILE}) or lllyasviel/Annotators; looked at: {', '.join(looked) or 'nowhere'}",
    )


def load_line_extractor(path: str | Path, device="cpu") -> LineExtractor:
    """`LineExtractor.from_file`, cached per process (file, mtime, size, device)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(path.name, path.parent, f"the line extractor, from {COLORFLOW_REPO} ({ERIKA_FILE})")
    return _cached(("lines", _file_key(path), str(device)), lambda: LineExtractor.from_file(path, device))


def load_screen_style(release: str | Path, device="cpu") -> ScreenStyle:
    """`ScreenStyle.from_release`, cached per process (both files, mtimes, sizes, device)."""
    root = Path(release)
    paths = [root / name for name in (GENERATOR_FILE, DECODER_FILE)]
    if not all(p.is_file() for p in paths):
        return ScreenStyle.from_release(root, device)  # raises MissingWeightsError naming the file
    key = ("screen", *(_file_key(p) for p in paths), str(device))
    return _cached(key, lambda: ScreenStyle.from_release(root, device))


class Preprocessors:
    """The preprocessing networks of one release folder, each loaded on first use and then kept.

    `erika` overrides where the line extractor comes from (a file, or a folder holding erika.pth);
    without it `<release>/LE/erika.pth` is used.
    """

    def __init__(self, release: str | Path | None, *, erika: str | Path | None = None, device="cpu"):
        self.release = Path(release) if release is not None else None
        self.erika = erika
        self.device = device
        self._nets: dict[str, object] = {}

    @property
    def line_extractor(self) -> LineExtractor:
        if "lines" not in self._nets:
            path = find_erika(self.release, (self.erika,) if self.erika is not None else ())
            self._nets["lines"] = load_line_extractor(path, self.device)
        return self._nets["lines"]

    @property
    def screen_style(self) -> ScreenStyle:
        if "screen" not in self._nets:
            if self.release is None:
                raise InvalidInputError("the ScreenStyle preprocessor needs the ColorFlow release folder")
            self._nets["screen"] = load_screen_style(self.release, self.device)
        return self._nets["screen"]

    def __call__(self, image: Image.Image, method: str, *, seed: int = 0, deterministic: bool = False):
        return preprocess_image(image, method, self, seed=seed, deterministic=deterministic)


def preprocess_image(
    image: Image.Image, method: str, preprocessors: Preprocessors | None = None, *, seed: int = 0,
    deterministic: bool = False,
) -> tuple[Image.Image, Image.Image]:
    """(input_context, guide) for one image at its own size, both RGB.

    screen: ScreenStyle blend (seeded; see `ScreenStyle`); gray: Pillow L → RGB; none: RGB as given;
    sketch: extracted lines for both; sketch_shading: shaded lines as context, pure lines as guide.
    """
    check_preprocess(method)
    if method == "gray":
        image = gray_rgb(image)
        return image, image
    if method == "none":
        image = to_rgb(image)
        return image, image
    if preprocessors is None:
        raise InvalidInputError(f"the '{method}' preprocessor needs its networks (pass the ColorFlow release)")
    if method == "screen":
        blended = preprocessors.screen_style(image, seed=seed, deterministic=deterministic)
        return blended, blended
    if method == "sketch":
        return sketch_input(image, preprocessors.line_extractor)
    return sketch_shading_input(image, preprocessors.line_extractor)
