"""PixArt's T5 prompt embeddings, computed once and cached on disk so T5-XXL (~9 GB fp16) is never loaded again.

ColorFlow always prompts "manga" with an empty negative, so two [1, 120, 4096] tensors (+ masks) are all
the text encoder ever contributes. `T5PromptEncoder` loads T5 only when no valid cache entry exists,
writes the entry next to the model (or to the user cache when that folder is read-only), frees T5, and
serves every later call, in this process or the next, from memory or disk.
"""
from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import IncompatibleWeightsError, MissingWeightsError

logger = logging.getLogger(__name__)

#: Bump when the cache content or its key changes meaning.
CACHE_FORMAT = "colorflow-t5-prompt-v1"
CACHE_FOLDER = "colorflow_prompt_cache"
#: Files up to this size are fingerprinted by content; larger ones (weights) by name, size and the name of the
#: file they resolve to (the Hugging Face cache names blobs after their content hash) and mtime.
_CONTENT_HASH_LIMIT = 16 * 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class PromptEmbeddings:
    """T5 states and attention masks of one (prompt, negative prompt) pair, batch 1 each, on the CPU."""

    embeds: torch.Tensor
    mask: torch.Tensor
    negative_embeds: torch.Tensor
    negative_mask: torch.Tensor

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The four tensors by name (as stored in the cache file)."""
        return {
            "prompt_embeds": self.embeds.contiguous(),
            "prompt_attention_mask": self.mask.contiguous(),
            "negative_prompt_embeds": self.negative_embeds.contiguous(),
            "negative_prompt_attention_mask": self.negative_mask.contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "PromptEmbeddings":
        """Inverse of `to_tensors`; raises KeyError/ValueError on a malformed set."""
        out = cls(
            tensors["prompt_embeds"],
            tensors["prompt_attention_mask"],
            tensors["negative_prompt_embeds"],
            tensors["negative_prompt_attention_mask"],
        )
        for states, mask in ((out.embeds, out.mask), (out.negative_embeds, out.negative_mask)):
            if states.ndim != 3 or mask.shape != states.shape[:2] or states.shape[0] != 1:
                raise ValueError(f"bad cached shapes {tuple(states.shape)} / {tuple(mask.shape)}")
        return out


def preprocess_text(text: str) -> str:
    """Upstream's caption handling without bs4 (`clean_caption` then falls back to lower-case + strip).

    For the fixed prompts ("manga", "") the full cleaning gives the same text.
    """
    return text.lower().strip()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def user_cache_dir() -> Path:
    """$COLORFLOW_CACHE, else $XDG_CACHE_HOME/colorflow, else ~/.cache/colorflow."""
    if os.environ.get("COLORFLOW_CACHE"):
        return Path(os.environ["COLORFLOW_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "colorflow"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and CACHE_FOLDER not in p.parts) if folder.is_dir() else []


def fingerprint_folders(*folders: Path) -> str:
    """A hex digest identifying the text encoder + tokenizer files (content of small files, identity of large ones)."""
    digest = hashlib.sha256()
    for folder in folders:
        digest.update(f"[{folder.name}]".encode())
        for path in _files(folder):
            resolved = path.resolve()
            stat = resolved.stat()
            digest.update(f"{path.relative_to(folder).as_posix()}|{stat.st_size}|".encode())
            if stat.st_size <= _CONTENT_HASH_LIMIT:
                digest.update(hashlib.sha256(resolved.read_bytes()).digest())
            else:
                digest.update(f"{resolved.name}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class T5PromptEncoder:
    """Lazily loaded T5 text encoder with a persistent per-prompt embedding cache.

    `cache_dirs`: where entries are looked up, in order; new entries go to the first writable one.
    Default: `<text_encoder folder>/../colorflow_prompt_cache` (next to the model), then the user cache.
    `dtype`/`device`: what T5 runs in when it must run (None: what the caller of `encode` asks, else float32 CPU).
    """

    def __init__(
        self,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path,
        *,
        cache_dirs: list[str | Path] | None = None,
        max_sequence_length: int = 120,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.text_encoder_dir = Path(text_encoder_dir)
        self.tokenizer_dir = Path(tokenizer_dir)
        if cache_dirs is None:
            cache_dirs = [self.text_encoder_dir.parent / CACHE_FOLDER, user_cache_dir() / "prompt_embeds"]
        self.cache_dirs = [Path(d) for d in cache_dirs]
        self.max_sequence_length = max_sequence_length
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self._fingerprint: str | None = None
        self._memory: dict[tuple[str, str], PromptEmbeddings] = {}
        #: How many times T5 was loaded by this object (tests and logs).
        self.text_encoder_loads = 0

    # ---- cache key -----------------------------------------------------------------------------------

    def _has_weights(self) -> bool:
        return any(p.suffix in _WEIGHT_SUFFIXES for p in _files(self.text_encoder_dir))

    @property
    def fingerprint(self) -> str:
        """Identity of the text encoder + tokenizer files, computed once per object."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_folders(self.text_encoder_dir, self.tokenizer_dir)
        return self._fingerprint

    def cache_key(self, prompt: str, negative_prompt: str) -> str:
        """The cache file stem of (prompt, negative) under this encoder and sequence length."""
        payload = json.dumps([CACHE_FORMAT, self.fingerprint, prompt, negative_prompt, self.max_sequence_length])
        return "t5_" + hashlib.sha256(payload.encode()).hexdigest()[:32]

    def _metadata(self, prompt: str, negative_prompt: str) -> dict[str, str]:
        return {
            "format": CACHE_FORMAT,
            "fingerprint": self.fingerprint,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "max_sequence_length": str(self.max_sequence_length),
        }

    # ---- disk ----------------------------------------------------------------------------------------

    def _read(self, path: Path, expected: dict[str, str] | None) -> PromptEmbeddings | None:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if expected is not None and any(metadata.get(k) != v for k, v in expected.items()):
                return None
            return PromptEmbeddings.from_tensors(load_file(str(path)))
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            logger.warning("ignoring unreadable prompt cache %s (%s)", path, exc)
            return None

    def _lookup_disk(self, prompt: str, negative_prompt: str) -> PromptEmbeddings | None:
        if not self._has_weights():
            return self._lookup_without_encoder(prompt, negative_prompt)
        name = self.cache_key(prompt, negative_prompt) + ".safetensors"
        expected = self._metadata(prompt, negative_prompt)
        for folder in self.cache_dirs:
            if (folder / name).is_file():
                found = self._read(folder / name, expected)
                if found is not None:
                    return found
        return None

    def _lookup_without_encoder(self, prompt: str, negative_prompt: str) -> PromptEmbeddings | None:
        """No T5 weights here (deleted after caching?): the newest entry for this prompt pair, whatever encoder made it."""
        wanted = {"format": CACHE_FORMAT, "prompt": prompt, "negative_prompt": negative_prompt,
                  "max_sequence_length": str(self.max_sequence_length)}
        candidates = [p for folder in self.cache_dirs if folder.is_dir() for p in folder.glob("t5_*.safetensors")]
        for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
            found = self._read(path, wanted)
            if found is not None:
                return found
        return None

    def _write(self, prompt: str, negative_prompt: str, embeddings: PromptEmbeddings) -> Path | None:
        name = self.cache_key(prompt, negative_prompt) + ".safetensors"
        for folder in self.cache_dirs:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                handle, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".safetensors")
                os.close(handle)
                try:
                    save_file(embeddings.to_tensors(), tmp, metadata=self._metadata(prompt, negative_prompt))
                    os.replace(tmp, folder / name)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                return folder / name
            except OSError as exc:
                logger.info("prompt cache folder %s is not writable (%s); trying the next", folder, exc)
        logger.warning("could not write the T5 prompt cache anywhere; T5 will be loaded again next run")
        return None

    # ---- T5 ------------------------------------------------------------------------------------------

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        folder = self.tokenizer_dir
        if not (folder / "tokenizer.json").is_file() and (folder / "spiece.model").is_file():
            missing = [name for name in ("sentencepiece", "google.protobuf") if not _importable(name)]
            if missing:
                raise IncompatibleWeightsError(
                    f"the T5 tokenizer in {folder} is a SentencePiece model (spiece.model); reading it needs "
                    "'pip install sentencepiece protobuf' (only once: the prompt embeddings are cached afterwards)"
                )
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, ImportError) as exc:
            raise IncompatibleWeightsError(
                f"cannot load the T5 tokenizer from {self.tokenizer_dir}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                " (a folder with only spiece.model needs the 'sentencepiece' and 'protobuf' packages)"
            ) from exc

    def _encode_with_t5(
        self, prompt: str, negative_prompt: str, device: torch.device, dtype: torch.dtype
    ) -> PromptEmbeddings:
        from transformers import T5EncoderModel

        if not (self.text_encoder_dir / "config.json").is_file() or not self._has_weights():
            raise MissingWeightsError(
                "text_encoder (T5 config.json + weights)", self.text_encoder_dir,
                "needed once to compute the prompt embeddings; afterwards the cache is used",
            )
        tokenizer = self._load_tokenizer()
        logger.info("loading T5 from %s to encode %r / %r (cached afterwards)", self.text_encoder_dir, prompt, negative_prompt)
        model = T5EncoderModel.from_pretrained(self.text_encoder_dir, dtype=dtype).to(device).eval()
        self.text_encoder_loads += 1
        try:
            rows = []
            with torch.no_grad():
                for text in (prompt, negative_prompt):
                    tokens = tokenizer(
                        [text], padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt",
                    )
                    mask = tokens.attention_mask.to(device)
                    states = model(tokens.input_ids.to(device), attention_mask=mask)[0]
                    rows.append((states.float().cpu(), tokens.attention_mask.cpu()))
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        (embeds, mask), (negative_embeds, negative_mask) = rows
        return PromptEmbeddings(embeds, mask, negative_embeds, negative_mask)

    # ---- public --------------------------------------------------------------------------------------

    def encode(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> PromptEmbeddings:
        """Embeddings of (prompt, negative): from memory, else from the disk cache, else from T5 (then cached).

        `device`/`dtype`: where T5 runs on a cache miss unless the encoder was built with its own.
        """
        prompt, negative_prompt = preprocess_text(prompt), preprocess_text(negative_prompt)
        key = (prompt, negative_prompt)
        if key not in self._memory:
            found = self._lookup_disk(prompt, negative_prompt)
            if found is None:
                run_device = self.device or torch.device(device or "cpu")
                run_dtype = self.dtype or dtype or torch.float32
                found = self._encode_with_t5(prompt, negative_prompt, torch.device(run_device), run_dtype)
                self._write(prompt, negative_prompt, found)
            self._memory[key] = found
        return self._memory[key]

    def is_cached(self, prompt: str, negative_prompt: str = "") -> bool:
        """Whether `encode` would answer without loading T5."""
        prompt, negative_prompt = preprocess_text(prompt), preprocess_text(negative_prompt)
        return (prompt, negative_prompt) in self._memory or self._lookup_disk(prompt, negative_prompt) is not None
