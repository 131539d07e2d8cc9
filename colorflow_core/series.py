"""A whole series: every chapter folder of a series against one reference pool, resumable page by page.

The plan is the same in one process and on Ray (`series_ray`): the driver embeds the series pool once into a store,
a `SeriesWorker` loads the model once and colours whole chapters through the page loop, and a chapter's manifest
records each finished page with the settings that made it, so a rerun — or another worker taking over a chapter
whose worker died — redoes only what is missing or was made differently.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from PIL import UnidentifiedImageError

from .cli_options import make_encoder
from .errors import ColorFlowError
from .imaging import list_images, load_image
from .loading import load_colorflow
from .model import ColorFlowModel
from .options import ColorizeOptions
from .pipelines.t5_prompt import fingerprint_folders
from .retrieval import ReferencePool
from .retrieval.store import write_json, write_png
from .sequence import colorize_pages
from .settings import page_size

#: A chapter's record of finished pages, in its output folder.
MANIFEST = ".colorflow-manifest.json"
#: Where the series pool is persisted unless --pool names a folder.
POOL_FOLDER = ".pool"
#: Errors that mean a chapter's input is bad: the chapter is reported, the others go on.
BAD_INPUT = (ColorFlowError, OSError, UnidentifiedImageError, ValueError)


@dataclass(frozen=True)
class SeriesJob:
    """What every worker needs, as plain data (it travels to worker processes)."""

    out: Path
    model: dict  # load_colorflow's arguments
    options: ColorizeOptions
    pool: Path  # the persisted series pool, embedded by the driver
    encoder: str = "release"
    feed_back: bool = False


@dataclass(frozen=True)
class Chapter:
    name: str
    source: Path


@dataclass
class ChapterReport:
    """How one chapter went: pages coloured now, pages already finished, or why it failed."""

    name: str
    pages: int = 0
    coloured: int = 0
    skipped: int = 0
    error: str | None = None
    worker: str = ""
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.error is None and self.coloured + self.skipped == self.pages


PageDone = Callable[[str, str, str], None]  # (chapter, page, worker)


def find_chapters(series: Path) -> list[Chapter]:
    """Each folder directly inside `series` (hidden ones aside), sorted by name."""
    if not series.is_dir():
        raise ColorFlowError(f"series folder not found: {series}")
    chapters = [Chapter(p.name, p) for p in sorted(series.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not chapters:
        raise ColorFlowError(f"no chapter folders in {series}")
    return chapters


def chapter_pages(chapter: Chapter) -> list[Path]:
    """The chapter's page files in order; output names are their stems, so two pages may not share one."""
    pages = list_images(chapter.source)
    stems = [p.stem for p in pages]
    if len(set(stems)) != len(stems):
        raise ColorFlowError(f"two pages of chapter '{chapter.name}' share a file name stem")
    return pages


def model_fingerprint(arguments: dict) -> str:
    """Identity of the weights and how they are loaded: local folders by their files, repo ids by name."""
    payload = {
        key: fingerprint_folders(Path(value)) if isinstance(value, (str, Path)) and Path(value).is_dir() else value
        for key, value in arguments.items() if key not in ("device", "allow_download")
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pool_fingerprint(pool: ReferencePool) -> str:
    """Identity of the references and the encoder that embeds them."""
    return hashlib.sha256(json.dumps([pool.encoder.name, pool.hashes]).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def prepare_pool(job: SeriesJob, encoder, refs: list[str], chapters: list[Chapter]) -> ReferencePool:
    """The series pool in `job.pool` with `refs` added and embedded at every page size of the series, once."""
    pool = ReferencePool(encoder, store=job.pool)
    pool.add(refs)
    sizes = set()
    for chapter in chapters:
        try:
            sizes |= {page_size(job.options, load_image(page)) for page in chapter_pages(chapter)}
        except BAD_INPUT:
            continue  # reported by name when the chapter runs
    for size in sorted(sizes):
        pool.embeddings(size)
    return pool


class SeriesWorker:
    """Loads the model once and colours whole chapters; a Ray actor in `series_ray`, a plain object otherwise."""

    def __init__(self, job: SeriesJob, model: ColorFlowModel | None = None, pool: ReferencePool | None = None):
        self.job = job
        self.model = model if model is not None else load_colorflow(**job.model)
        self.pool = pool if pool is not None else ReferencePool.open(job.pool, make_encoder(job.encoder, self.model))
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.settings = json.loads(json.dumps({  # as the manifest reads back (tuples become lists)
            "options": asdict(self.job.options), "feed_back": job.feed_back,
            "model": model_fingerprint(job.model), "pool": pool_fingerprint(self.pool),
        }))

    def pid(self) -> int:
        return os.getpid()

    def colorize(self, chapter: Chapter, page_done: PageDone | None = None) -> ChapterReport:
        """Colour the pages of `chapter` not yet finished with these settings; a bad input becomes the report's error."""
        report = ChapterReport(chapter.name, worker=self.name)
        start = time.perf_counter()
        try:
            self._colorize(chapter, report, page_done or _print_page)
        except BAD_INPUT as exc:
            report.error = f"{type(exc).__name__}: {exc}"
        report.seconds = time.perf_counter() - start
        return report

    def _colorize(self, chapter: Chapter, report: ChapterReport, page_done: PageDone) -> None:
        pages = chapter_pages(chapter)
        report.pages = len(pages)
        folder = self.job.out / chapter.name
        for stale in folder.glob(".*.tmp"):  # a write cut short by a dead worker (one worker per chapter at a time)
            stale.unlink()
        manifest = _read_manifest(folder / MANIFEST)
        records = {page.stem: {"source": _file_hash(page), "settings": self.settings} for page in pages}
        finished = [
            manifest.get(page.stem, {}).get("record") == records[page.stem] and (folder / f"{page.stem}.png").is_file()
            for page in pages
        ]
        if self.job.feed_back:  # each page saw the ones before it: from the first page to redo, all are redone
            first = finished.index(False) if False in finished else len(pages)
            finished = [i < first for i in range(len(pages))]
        todo = [page for page, done in zip(pages, finished) if not done]
        report.skipped = len(pages) - len(todo)
        if not todo:
            return
        pool = self.pool
        if self.job.feed_back:  # rebuild what the finished pages fed back, in their order
            pool = self.pool.fork()
            pool.add([folder / f"{page.stem}.png" for page, done in zip(pages, finished) if done])
        for result in colorize_pages(self.model, todo, pool, self.job.options, feed_back=self.job.feed_back):
            write_png(folder / f"{result.name}.png", result.final)
            manifest[result.name] = {"record": records[result.name], "worker": self.name}
            write_json(folder / MANIFEST, manifest)
            report.coloured += 1
            page_done(chapter.name, result.name, self.name)


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _print_page(chapter: str, page: str, worker: str) -> None:
    print(f"[{worker}] {chapter}/{page} done", file=sys.stderr, flush=True)


@dataclass
class SeriesProgress:
    """Chapters and pages done of the whole job, pages/s and ETA, on stderr."""

    chapters: int
    pages: int
    chapters_done: int = 0
    pages_done: int = 0
    coloured: int = 0
    start: float = field(default_factory=time.perf_counter)

    def rate(self) -> float:
        return self.coloured / max(time.perf_counter() - self.start, 1e-9)

    def page(self, chapter: str, page: str, worker: str) -> None:
        self.pages_done += 1
        self.coloured += 1
        self._print(f"{chapter}/{page} [{worker}]")

    def chapter(self, report: ChapterReport, pages_counted: bool) -> None:
        self.chapters_done += 1
        if not pages_counted:
            self.pages_done += report.coloured
            self.coloured += report.coloured
        self.pages_done += report.skipped
        status = f"failed: {report.error}" if report.error else f"{report.coloured} coloured, {report.skipped} skipped"
        self._print(f"chapter {report.name} [{report.worker}] {status}")

    def _print(self, what: str) -> None:
        rate = self.rate()
        left = max(self.pages - self.pages_done, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        print(f"chapters {self.chapters_done}/{self.chapters}, pages {self.pages_done}/{self.pages}, "
              f"{rate:.2f} pages/s, ETA {eta} — {what}", file=sys.stderr, flush=True)


def run_in_process(worker: SeriesWorker, chapters: list[Chapter], progress: SeriesProgress) -> list[ChapterReport]:
    """The plan in this process: chapter after chapter on one worker."""
    reports = []
    for chapter in chapters:
        reports.append(worker.colorize(chapter, progress.page))
        progress.chapter(reports[-1], pages_counted=True)
    return reports


def count_pages(chapters: list[Chapter]) -> int:
    """Pages of the series (a chapter whose folder cannot be listed counts none)."""
    total = 0
    for chapter in chapters:
        try:
            total += len(chapter_pages(chapter))
        except BAD_INPUT:
            pass
    return total


def summary(reports: list[ChapterReport], progress: SeriesProgress, **extra) -> dict:
    """The JSON summary of a run."""
    return {
        "chapters": len(reports),
        "finished": sum(r.finished for r in reports),
        "failed": {r.name: r.error or "unfinished" for r in reports if not r.finished},
        "pages": sum(r.pages for r in reports),
        "coloured": sum(r.coloured for r in reports),
        "skipped": sum(r.skipped for r in reports),
        "seconds": round(time.perf_counter() - progress.start, 3),
        "pages_per_s": round(progress.rate(), 4),
        **extra,
    }
