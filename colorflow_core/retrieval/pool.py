"""The chapter-wide reference pool: dedup, per-size embedding cache, exact faiss search, atomic persistence.

Store layout (all writes atomic)::

    store/pool.json                          format version, generation, encoder name and dim, ordered references
    store/refs/<hash>.png                    each reference, lossless
    store/embeddings/<encoder>/<hash>_<W>x<H>.npy   raw [5, dim] embeddings of its candidates at W×H
    store/index_<W>x<H>_<signature>.faiss    IndexFlatIP over all 5N normalised candidates at W×H
    store/.lock                              advisory lock held by every write

Many processes may share a store: every write happens under the lock, and adding re-reads `pool.json` and merges
with it, so no writer drops another's references. Each write of `pool.json` raises its generation; a pool object
that sees a generation other than its own reloads the reference list before adding or searching. Searching never
writes `pool.json`, only content-addressed caches (embeddings, indexes), and skips them when the store is read-only.
Opening a store removes the temporary files of saves that were killed.

Opening a store made by another encoder discards its embeddings and indexes and re-embeds on demand.
A pool.json that cannot be read raises `PoolStoreError`; a corrupt embedding or index file is a cache miss
and is rebuilt.

Why this module is long: the pool's in-memory state and its store are one consistency unit (the references, their
per-size embeddings and indexes, and when each is stale); split, every module would need the others' invariants.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np
import torch
from filelock import FileLock, Timeout
from PIL import Image

from ..errors import ColorFlowError, IncompatibleWeightsError, InvalidInputError
from ..imaging import ImageLike, list_images, load_image, process_image, to_rgb
from .encoders import ImageEncoder
from .patches import PATCHES_PER_REFERENCE, patch_boxes, query_patches, reference_patches
from .search import build_index, load_faiss, prefilter_keys, search_index
from .store import write_faiss_index, write_json, write_npy, write_png

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
POOL_FILE = "pool.json"
LOCK_FILE = ".lock"
#: Seconds a writer waits for another process's write of the same store before giving up.
LOCK_TIMEOUT = 120.0
#: Modes a PNG holds losslessly; other modes are stored (and used) as the RGB that `process_image` makes of them.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})
#: References embedded per encoder call (×5 candidate images).
_REFS_PER_BATCH = 8
_HASH = re.compile(r"[0-9a-f]{64}")

Progress = Callable[[int, int], None]
Size = tuple[int, int]
Items = Union[ImageLike, Iterable[ImageLike]]


class PoolStoreError(ColorFlowError):
    """A persisted reference pool that cannot be read."""


@dataclass
class _Reference:
    digest: str
    name: str | None
    image: Image.Image | None  # None until loaded from the store

    @property
    def label(self) -> str:
        return self.name or self.digest[:12]


@dataclass(frozen=True, eq=False)
class Retrieval:
    """Top-k candidates per query quadrant (TL, TR, BL, BR); index = reference_position * 5 + patch_index."""

    indices: torch.Tensor
    scores: torch.Tensor
    candidates: list[Image.Image]
    size: Size
    references: list[str] = field(default_factory=list)

    def patches(self) -> list[list[Image.Image]]:
        """The chosen candidate images, best first, for each of the 4 quadrants."""
        return [[self.candidates[i] for i in row] for row in self.indices.tolist()]

    def to_json(self) -> dict[str, Any]:
        """Sizes, top-k indices and cosine scores per quadrant, and the reference labels, as plain JSON."""
        return {
            "size": list(self.size),
            "k": int(self.indices.shape[1]),
            "indices": self.indices.tolist(),
            "scores": self.scores.tolist(),
            "references": list(self.references),
        }


def content_hash(image: Image.Image) -> str:
    """sha256 of the decoded pixels, mode, size (and palette): the identity of a reference."""
    digest = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    if image.mode in ("P", "PA"):
        digest.update(bytes(image.getpalette() or []))
    digest.update(image.tobytes())
    return digest.hexdigest()


def _storable(image: Image.Image) -> Image.Image:
    """The image in a PNG-safe mode, so a reopened pool sees exactly the pixels a fresh one used."""
    return image if image.mode in _PNG_MODES else to_rgb(image)


def _expand(items: Items) -> list[tuple[ImageLike, str | None]]:
    """Flatten images, arrays, files and folders into (item, original name) pairs."""
    if isinstance(items, (str, Path, Image.Image, np.ndarray)):
        items = [items]
    expanded: list[tuple[ImageLike, str | None]] = []
    for item in items:
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            expanded.extend((path, path.name) for path in list_images(Path(item)))
        elif isinstance(item, (str, Path)):
            expanded.append((item, Path(item).name))
        else:
            expanded.append((item, Path(getattr(item, "filename", "") or "").name or None))
    return expanded


def _size_key(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


class ReferencePool:
    """References shared by a chapter; embeds each (reference, size) once and searches them exactly."""

    def __init__(self, encoder: ImageEncoder, store: str | Path | None = None):
        self.encoder = encoder
        self.store = Path(store) if store is not None else None
        #: Reference candidate images run through the encoder by this pool (query patches not counted).
        self.embedded_count = 0
        self._refs: list[_Reference] = []
        self._embeddings: dict[tuple[str, str, int, int], np.ndarray] = {}
        self._candidates: dict[tuple[str, int, int], list[Image.Image]] = {}
        self._indexes: dict[Size, tuple[str, Any, Any]] = {}
        self._parent: ReferencePool | None = None
        #: Generation of the store's pool.json this pool's reference list reflects (-1: none read yet).
        self._generation = -1
        self._lock = FileLock(self.store / LOCK_FILE) if self.store is not None else None
        if self.store is not None and (self.store / POOL_FILE).exists():
            self._load()

    @classmethod
    def open(cls, store: str | Path, encoder: ImageEncoder) -> "ReferencePool":
        """The pool persisted in `store` (empty if there is none yet), bound to `encoder`."""
        return cls(encoder, store)

    @staticmethod
    def stored_encoder(store: str | Path) -> tuple[str, int] | None:
        """(encoder name, dim) recorded by the pool persisted in `store`, or None when there is none."""
        path = Path(store) / POOL_FILE
        if not path.is_file():
            return None
        manifest = read_manifest(Path(store))
        return manifest["encoder"], manifest["dim"]

    def fork(self, hashes: Iterable[str] | None = None) -> "ReferencePool":
        """An unpersisted copy to grow (e.g. with fed-back pages) without changing this pool; it reuses
        this pool's embeddings, in memory and on disk, so nothing already embedded is embedded again.

        `hashes` (content hashes of this pool's references) keeps only those, in that order (a per-page pool)."""
        twin = ReferencePool(self.encoder)
        refs = self._refs
        if hashes is not None:
            by_hash = {ref.digest: ref for ref in self._refs}
            unknown = [digest for digest in hashes if digest not in by_hash]
            if unknown:
                raise InvalidInputError(f"fork: {len(unknown)} hash(es) are not in this pool, e.g. {unknown[0][:12]}")
            refs = [by_hash[digest] for digest in hashes]
        twin._refs = [_Reference(ref.digest, ref.name, self._image(ref)) for ref in refs]
        # Shared on purpose: entries are keyed by (encoder, content hash, size), so they are never stale.
        twin._embeddings = self._embeddings
        twin._candidates = self._candidates
        twin._parent = self
        return twin

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def references(self) -> list[str]:
        """Label (original file name, else short hash) of each reference, in pool order."""
        return [ref.label for ref in self._refs]

    @property
    def hashes(self) -> list[str]:
        """Content hash of each reference, in pool order."""
        return [ref.digest for ref in self._refs]

    # ----------------------------------------------------------------------------------------- adding
    def add(self, items: Items, progress: Progress | None = None) -> int:
        """Add images, arrays, files or folders (sorted by name); returns how many were new (not duplicates)."""
        sources = _expand(items)
        self._sync()
        known = {ref.digest for ref in self._refs}
        new: list[_Reference] = []
        for done, (item, name) in enumerate(sources, 1):
            image = load_image(item)
            digest = content_hash(image)
            if digest not in known:
                known.add(digest)
                new.append(_Reference(digest, name, _storable(image)))
            if progress is not None:
                progress(done, len(sources))
        if new:
            self._commit(new)
        return len(new)

    def _commit(self, new: list[_Reference]) -> None:
        """Append `new`; a persisted pool merges them into the store's current list under its lock."""
        if self.store is None:
            self._refs.extend(new)
            return
        try:
            with self._locked():
                manifest = self._read_store()
                stored = _manifest_refs(manifest) if manifest is not None else []
                present = {ref.digest for ref in stored}
                fresh = [ref for ref in new if ref.digest not in present]
                for ref in fresh:
                    write_png(self._ref_path(ref.digest), ref.image)
                generation = (manifest or {}).get("generation", 0) + 1
                self._write_manifest(stored + fresh, generation)
        except OSError as exc:
            raise PoolStoreError(f"cannot write reference pool {self.store}: {exc.strerror or exc}") from exc
        self._adopt(stored + fresh, generation)

    # ----------------------------------------------------------------------------------------- search
    def search(self, query: Image.Image, size: Size | None = None, k: int = 3, progress: Progress | None = None) -> Retrieval:
        """Top-`k` reference candidates at `size` for each of the query's 4 patches (exact cosine)."""
        size = (int(size[0]), int(size[1])) if size is not None else query.size
        self._sync()
        total = len(self._refs) * PATCHES_PER_REFERENCE
        if total == 0:
            raise InvalidInputError("the reference pool is empty: add at least one reference image before searching")
        if not 1 <= k <= total:
            raise InvalidInputError(f"k={k} is out of range: {len(self._refs)} reference(s) give {total} candidates")
        patch_boxes(*size)
        index, prefilter = self._index(size, progress)
        indices, scores = search_index(index, self._encode(query_patches(query, size)), k, prefilter)
        return Retrieval(indices, scores, self.candidates(size), size, self.references)

    def candidates(self, size: Size) -> list[Image.Image]:
        """All 5N candidate patch images at `size`, [whole, TL, TR, BL, BR] per reference in pool order."""
        return [patch for ref in self._refs for patch in self._candidates_of(ref, size)]

    def embeddings(self, size: Size, progress: Progress | None = None) -> np.ndarray:
        """Raw [5N, dim] candidate embeddings at `size`; only references neither cache holds are encoded."""
        missing = [ref for ref in self._refs if not self._cached(ref, size)]
        for start in range(0, len(missing), _REFS_PER_BATCH):
            batch = missing[start : start + _REFS_PER_BATCH]
            vectors = self._encode([patch for ref in batch for patch in self._candidates_of(ref, size)])
            self.embedded_count += len(vectors)
            for position, ref in enumerate(batch):
                rows = vectors[position * PATCHES_PER_REFERENCE : (position + 1) * PATCHES_PER_REFERENCE]
                self._remember(ref, size, rows)
            if progress is not None:
                progress(min(start + _REFS_PER_BATCH, len(missing)), len(missing))
        return np.concatenate([self._embeddings[self._embedding_key(ref, size)] for ref in self._refs])

    def _encode(self, images: list[Image.Image]) -> np.ndarray:
        vectors = self.encoder.encode(images).detach().to("cpu", torch.float32).numpy()
        if vectors.shape != (len(images), self.encoder.dim):
            raise IncompatibleWeightsError(
                f"encoder '{self.encoder.name}' returned shape {vectors.shape}, expected ({len(images)}, {self.encoder.dim})"
            )
        return vectors

    def _candidates_of(self, ref: _Reference, size: Size) -> list[Image.Image]:
        key = (ref.digest, *size)
        if key not in self._candidates:
            try:
                page = process_image(self._image(ref), *size)
            except InvalidInputError as exc:
                raise InvalidInputError(f"reference {ref.label}: {exc}") from exc
            self._candidates[key] = reference_patches(page, size)
        return self._candidates[key]

    def _image(self, ref: _Reference) -> Image.Image:
        if ref.image is None:
            ref.image = load_image(self._ref_path(ref.digest))
        return ref.image

    # ----------------------------------------------------------------------------------------- caches
    def _embedding_key(self, ref: _Reference, size: Size) -> tuple[str, str, int, int]:
        return (self.encoder.name, ref.digest, *size)

    def _cached(self, ref: _Reference, size: Size) -> bool:
        key = self._embedding_key(ref, size)
        if key in self._embeddings or (self._parent is not None and self._parent._cached(ref, size)):
            return True
        path = self._embedding_path(ref, size)
        if path is None or not path.is_file():
            return False
        try:
            rows = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            log.warning("ignoring unreadable embedding file %s (%s); re-embedding", path, exc)
            return False
        if rows.shape != (PATCHES_PER_REFERENCE, self.encoder.dim) or rows.dtype != np.float32:
            log.warning("ignoring embedding file %s of shape %s; re-embedding", path, rows.shape)
            return False
        self._embeddings[key] = rows
        return True

    def _remember(self, ref: _Reference, size: Size, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        self._embeddings[self._embedding_key(ref, size)] = rows
        path = self._embedding_path(ref, size)
        if path is not None:
            self._write_cache(path, lambda: write_npy(path, rows))

    def _signature(self, size: Size) -> str:
        """Identity of an index's content: encoder, size and the ordered reference hashes."""
        payload = json.dumps([self.encoder.name, list(size), [ref.digest for ref in self._refs]])
        return hashlib.sha256(payload.encode()).hexdigest()

    def _index(self, size: Size, progress: Progress | None) -> tuple[Any, Any]:
        """(faiss index, its bf16 prefilter or None) at `size`, built or loaded once per pool content."""
        signature = self._signature(size)
        cached = self._indexes.get(size)
        if cached is not None and cached[0] == signature:
            return cached[1:]
        index = self._load_index(size, signature)
        if index is None:
            index = build_index(self.embeddings(size, progress))
            self._save_index(size, signature, index)
        self._indexes[size] = (signature, index, prefilter_keys(index))
        return index, self._indexes[size][2]

    def _load_index(self, size: Size, signature: str) -> Any:
        if self.store is None or not self._index_path(size, signature).is_file():
            return None
        path = self._index_path(size, signature)
        try:
            index = load_faiss().read_index(str(path))
        except RuntimeError as exc:
            log.warning("rebuilding unreadable index %s (%s)", path, exc)
            return None
        if index.ntotal != len(self._refs) * PATCHES_PER_REFERENCE or index.d != self.encoder.dim:
            log.warning("rebuilding index %s: it holds %d vectors of dim %d", path, index.ntotal, index.d)
            return None
        return index

    def _save_index(self, size: Size, signature: str, index: Any) -> None:
        if self.store is None:
            return
        path = self._index_path(size, signature)

        def replace_stale() -> None:
            legacy = self.store / f"index_{_size_key(size)}.faiss"  # named without a signature by earlier versions
            for stale in [legacy, *self.store.glob(f"index_{_size_key(size)}_*.faiss")]:
                stale.unlink(missing_ok=True)
            write_faiss_index(path, index)

        self._write_cache(path, replace_stale)

    def _write_cache(self, path: Path, write: Callable[[], None]) -> None:
        """Write a cache file under the store's lock; a store that cannot be written is searched without caching."""
        try:
            with self._locked():
                write()
        except OSError as exc:
            log.warning("not caching %s: %s", path, exc.strerror or exc)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's advisory lock (one read-modify-write at a time, across processes; released on any exit)."""
        self.store.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=LOCK_TIMEOUT)
        except Timeout as exc:
            raise PoolStoreError(
                f"reference pool {self.store} stayed locked by another process for {LOCK_TIMEOUT:.0f} s; try again"
            ) from exc
        try:
            yield
        finally:
            self._lock.release()

    # ----------------------------------------------------------------------------------------- store
    def _ref_path(self, digest: str) -> Path:
        return self.store / "refs" / f"{digest}.png"

    def _encoder_folder(self) -> Path:
        return self.store / "embeddings" / hashlib.sha256(self.encoder.name.encode()).hexdigest()[:16]

    def _embedding_path(self, ref: _Reference, size: Size) -> Path | None:
        if self.store is None:
            return None
        return self._encoder_folder() / f"{ref.digest}_{_size_key(size)}.npy"

    def _index_path(self, size: Size, signature: str) -> Path:
        return self.store / f"index_{_size_key(size)}_{signature[:16]}.faiss"

    def _write_manifest(self, refs: list[_Reference], generation: int) -> None:
        write_json(
            self.store / POOL_FILE,
            {
                "format_version": FORMAT_VERSION,
                "generation": generation,
                "encoder": self.encoder.name,
                "dim": self.encoder.dim,
                "references": [{"hash": ref.digest, "name": ref.name} for ref in refs],
            },
        )

    def _read_store(self) -> dict[str, Any] | None:
        """The store's pool.json as it is now, or None when there is none."""
        return read_manifest(self.store) if (self.store / POOL_FILE).is_file() else None

    def _sync(self) -> None:
        """Reload the reference list when another writer changed the store since this pool last read or wrote it."""
        if self.store is None:
            return
        manifest = self._read_store()
        if manifest is not None and manifest.get("generation", 0) != self._generation:
            self._adopt(_manifest_refs(manifest), manifest.get("generation", 0))

    def _adopt(self, refs: list[_Reference], generation: int) -> None:
        """Take `refs` as the reference list (images already in memory kept) at the store's `generation`."""
        loaded = {ref.digest: ref for ref in self._refs if ref.image is not None}
        loaded.update((ref.digest, ref) for ref in refs if ref.image is not None)
        adopted = []
        for ref in refs:
            if ref.digest not in loaded and not self._ref_path(ref.digest).is_file():
                raise PoolStoreError(f"reference pool {self.store} lists {ref.label} but {self._ref_path(ref.digest)} is missing")
            adopted.append(loaded.get(ref.digest, ref))
        self._refs, self._generation = list({ref.digest: ref for ref in adopted}.values()), generation

    def _load(self) -> None:
        manifest = read_manifest(self.store)
        self._adopt(_manifest_refs(manifest), manifest.get("generation", 0))
        try:
            with self._locked():
                for stray in self.store.rglob(".*.tmp"):  # left by saves that were killed
                    stray.unlink(missing_ok=True)
                if manifest["encoder"] != self.encoder.name or manifest["dim"] != self.encoder.dim:
                    log.info("pool %s was embedded by '%s'; rebuilding for '%s'", self.store, manifest["encoder"], self.encoder.name)
                    self._discard_vectors()
                    current = self._read_store() or manifest
                    self._adopt(_manifest_refs(current), current.get("generation", 0) + 1)
                    self._write_manifest(self._refs, self._generation)
        except OSError as exc:
            log.warning("reference pool %s is read-only here (%s); searching it without caching", self.store, exc.strerror or exc)

    def _discard_vectors(self) -> None:
        """Delete every other encoder's embeddings and all indexes, so vectors of two encoders never mix."""
        embeddings = self.store / "embeddings"
        if embeddings.is_dir():
            for folder in embeddings.iterdir():
                if folder == self._encoder_folder():
                    continue
                if folder.is_dir():
                    shutil.rmtree(folder)
                else:
                    folder.unlink()
        for path in self.store.glob("index_*.faiss"):
            path.unlink()


def read_manifest(store: Path) -> dict[str, Any]:
    """The parsed `pool.json` of a persisted pool; PoolStoreError when it is unreadable or of another version."""
    path = store / POOL_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PoolStoreError(f"cannot read reference pool file {path}: {exc}; delete the store folder to start over") from exc
    if not _valid_manifest(manifest):
        raise PoolStoreError(f"{path} is not a version-{FORMAT_VERSION} reference pool file; delete the store folder to start over")
    return manifest


def _manifest_refs(manifest: dict[str, Any]) -> list[_Reference]:
    """The references a parsed pool.json lists, in order, images not loaded."""
    return [_Reference(entry["hash"], entry.get("name"), None) for entry in manifest["references"]]


def _valid_manifest(manifest: Any) -> bool:
    """Whether a parsed pool.json has the fields and types this version writes."""
    return (
        isinstance(manifest, dict)
        and manifest.get("format_version") == FORMAT_VERSION
        and isinstance(manifest.get("encoder"), str)
        and isinstance(manifest.get("dim"), int)
        and isinstance(manifest.get("generation", 0), int)
        and isinstance(manifest.get("references"), list)
        and all(isinstance(entry, dict) and _HASH.fullmatch(str(entry.get("hash"))) for entry in manifest["references"])
    )
