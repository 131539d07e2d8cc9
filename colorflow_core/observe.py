"""Measuring points of the page loop: what a benchmark or a host subscribes to instead of patching the library.

The page loop, the samplers and the upscaler open `observer.stage(name)` around each stage of a page (names in
`STAGES`) and call `observer.step_end(step, total)` after each denoising step, like diffusers' `callback_on_step_end`.
The base class does nothing; subclass it and override what you need.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

#: The stages of one page, in the order they run ("denoise" wraps the steps; "retrieval" includes embedding the
#: references on first use).
STAGES = ("preprocess", "retrieval", "canvas", "text_encode", "vae_encode", "denoise", "decode", "gsrp")


class PageObserver:
    """Receives the page loop's measuring points; every method is a no-op here."""

    def stage(self, name: str) -> ContextManager[None]:
        """A block around the stage `name` (one of `STAGES`)."""
        return contextlib.nullcontext()

    def step_end(self, step: int, total: int) -> None:
        """Called after denoising step `step` (1-based) of `total`."""


#: The observer used when none is given.
NO_OBSERVER = PageObserver()
