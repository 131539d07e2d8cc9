"""Shared training fixtures: tiny colour chapters and one prepared DATA_DIR per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from ..nodes.conftest import one_thread  # noqa: F401  (autouse: tiny models run fastest on one thread)

#: Prepared page size (canvas 2x) and the page size inside a training crop: small enough for a CPU test.
PAGE = (64, 96)


def write_chapters(folder: Path, seeds: tuple[int, ...], pages: int = 2) -> Path:
    """One folder of `pages` colour pages per seed (synthetic chapters of the evaluation module)."""
    from colorflow_core.evaluation.synthetic import make_chapter

    for seed in seeds:
        chapter = make_chapter(seed, n_references=0, n_pages=pages, size=(96, 144))
        target = folder / f"ch{seed}"
        target.mkdir(parents=True, exist_ok=True)
        for page in chapter.pages:
            page.color.save(target / f"{page.name}.png")
    return folder


@pytest.fixture(scope="session")
def prepared(tiny_release, tmp_path_factory):
    """(DATA_DIR, release, base, chapters folder): two 2-page chapters in every style."""
    from colorflow_core.training.data import STYLES, PrepSettings, prepare_training

    release, base = tiny_release
    root = tmp_path_factory.mktemp("training")
    chapters = write_chapters(root / "chapters", (0, 1))
    prepare_training(chapters, root / "data", release, PrepSettings(*PAGE, styles=STYLES), warn=lambda m: None)
    return root / "data", release, base, chapters
