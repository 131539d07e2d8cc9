"""ReferencePool, encoders and exact search: behaviour, caching, persistence and atomic writes."""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from colorflow_core.errors import ColorFlowError, InvalidInputError, MissingWeightsError
from colorflow_core.imaging import process_image
from colorflow_core.retrieval import (
    ImageEncoder,
    OpenClipEncoder,
    PoolStoreError,
    ReferencePool,
    ReleaseClipEncoder,
    build_index,
    exact_search,
    query_patches,
)
from colorflow_core.retrieval import search as search_module
from colorflow_core.retrieval import store as store_module

SIZE = (64, 96)


class FakeEncoder:
    """Deterministic 12-d embedding (2x2 RGB thumbnail); counts the images it encodes."""

    def __init__(self, name: str = "fake:v1", sign: float = 1.0):
        self.name, self.dim, self.sign, self.seen = name, 12, sign, 0

    def encode(self, images):
        self.seen += len(images)
        rows = [np.asarray(im.convert("RGB").resize((2, 2), Image.BILINEAR), np.float32).ravel() / 255 for im in images]
        return torch.from_numpy(self.sign * np.stack(rows) - 0.5)


class ConstantEncoder(FakeEncoder):
    """Every image gets the same vector: every candidate ties."""

    def encode(self, images):
        self.seen += len(images)
        return F.one_hot(torch.zeros(len(images), dtype=torch.long), self.dim).float()


def _image(seed: int, size=(80, 120), mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _query() -> Image.Image:
    return _image(99, SIZE).convert("L").convert("RGB")


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    def build(seed: int, folder_name: str):
        torch.manual_seed(seed)
        config = CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=224, patch_size=14, projection_dim=16,
        )
        folder = tmp_path_factory.mktemp(folder_name)
        CLIPVisionModelWithProjection(config).half().save_pretrained(folder)  # fp16 on disk, like the release
        return folder

    return build(0, "clip_a"), build(1, "clip_b")


# ------------------------------------------------------------------------------------------------ encoders
def test_release_clip_from_pretrained(tiny_clip_folder, tmp_path):
    folder_a, folder_b = tiny_clip_folder
    encoder = ReleaseClipEncoder.from_pretrained(folder_a)
    assert isinstance(encoder, ImageEncoder)
    assert next(encoder.model.parameters()).dtype == torch.float32 and not encoder.model.training
    assert type(encoder.processor).__name__ == "CLIPImageProcessorPil"
    embeds = encoder.encode([_image(1), _image(2, (50, 30), "L"), _image(3)])
    assert embeds.shape == (3, 16) and embeds.dtype == torch.float32 and not embeds.requires_grad
    assert torch.allclose(encoder.encode([_image(2, (50, 30), "L")]), embeds[1:2], atol=1e-5)
    copy = shutil.copytree(folder_a, tmp_path / "copy")
    assert encoder.name.startswith("release-clip:")
    assert ReleaseClipEncoder.from_pretrained(copy).name == encoder.name
    assert ReleaseClipEncoder.from_pretrained(folder_b).name != encoder.name


def test_release_clip_missing_weights(tiny_clip_folder, tmp_path):
    with pytest.raises(MissingWeightsError, match="config.json"):
        ReleaseClipEncoder.from_pretrained(tmp_path / "nowhere")
    shutil.copy(tiny_clip_folder[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(MissingWeightsError) as info:
        ReleaseClipEncoder.from_pretrained(tmp_path)
    assert info.value.file == "model.safetensors" and info.value.folder == str(tmp_path)


def test_open_clip_encoder(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "colorflow-test-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "colorflow-test-vit.json")
    encoder = OpenClipEncoder("colorflow-test-vit")
    assert encoder.dim == 16 and encoder.name.startswith("open_clip:colorflow-test-vit:random:")
    embeds = encoder.encode([_image(1), _image(2, mode="L")])
    assert embeds.shape == (2, 16) and embeds.dtype == torch.float32
    torch.save(encoder.model.state_dict(), tmp_path / "weights.pt")
    from_file = OpenClipEncoder("colorflow-test-vit", pretrained=tmp_path / "weights.pt")
    assert from_file.name.startswith("open_clip:colorflow-test-vit:weights.pt:")
    assert torch.allclose(from_file.encode([_image(1)]), embeds[:1], atol=1e-6)
    with pytest.raises(MissingWeightsError):
        OpenClipEncoder("colorflow-test-vit", pretrained=tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------ search
def test_exact_search_equals_torch_argsort():
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(4, 16, generator=generator), torch.randn(37, 16, generator=generator)
    cosine = F.cosine_similarity(queries[:, None], keys[None], dim=-1)
    indices, scores = exact_search(queries, keys, k=37)
    assert torch.equal(indices, torch.argsort(cosine, descending=True, dim=1))
    assert torch.allclose(scores, cosine.gather(1, indices), atol=1e-6)
    top, _ = exact_search(queries, keys, k=3)
    assert torch.equal(top, indices[:, :3])
    with pytest.raises(InvalidInputError):
        exact_search(queries, keys, k=38)


def test_exact_search_ties_go_to_lowest_index_even_across_the_kth_position():
    query = torch.tensor([[1.0, 0.0]])
    tied = [0.6, 0.8]
    keys = torch.tensor([[0.0, 1.0], tied, [1.0, 0.0], tied, tied, [0.0, 1.0]] + [tied] * 40 + [[1.0, 0.0]])
    assert exact_search(query, keys, k=1)[0].tolist() == [[2]]
    assert exact_search(query, keys, k=2)[0].tolist() == [[2, 46]]
    assert exact_search(query, keys, k=4)[0].tolist() == [[2, 46, 1, 3]]
    order = torch.sort(F.cosine_similarity(query[:, None], keys[None], -1), descending=True, stable=True).indices
    assert torch.equal(exact_search(query, keys, k=len(keys))[0], order)


def _bf16_keys(index) -> torch.Tensor:
    return torch.from_numpy(search_module.index_vectors(index)).to(torch.bfloat16)


def test_prefiltered_search_equals_the_float32_search_even_among_near_and_exact_copies():
    generator = torch.Generator().manual_seed(0)
    # Blank-panel-like pools: exact copies (ties go to the lowest index) and copies differing below bf16's and near
    # float32's resolution, where the two scans round differently; the result must not depend on the scan.
    base = torch.randn(600, 512, generator=generator)
    keys = torch.cat([base, base[:200], base[:300] + 1e-4 * torch.randn(300, 512, generator=generator),
                      torch.randn(1500, 512, generator=generator)])
    index = build_index(keys)
    prefilter = _bf16_keys(index)
    for trial in range(8):
        picks = torch.randint(0, 200, (6,), generator=generator)
        queries = keys[picks] + 0.3 * torch.randn(6, 512, generator=generator)
        for k in (5, 3, 1):
            plain = search_module.search_index(index, queries, k)
            twice = search_module.search_index(index, queries, k, prefilter)
            assert torch.equal(twice[0], plain[0]) and torch.equal(twice[1], plain[1])
            if k == 3:  # the picked key, its exact copy right after it, and its near copy
                for pick, row in zip(picks.tolist(), plain[0].tolist()):
                    assert set(row) == {pick, 600 + pick, 800 + pick} and row.index(600 + pick) == row.index(pick) + 1
    cosine = F.cosine_similarity(queries[:, None], keys[None], dim=-1)
    assert torch.allclose(plain[1], cosine.gather(1, plain[0]), atol=1e-6)


def test_prefiltered_search_keeps_lowest_index_ties_and_falls_back_when_nothing_is_ruled_out(monkeypatch):
    tied = [[0.6, 0.8]] * 40
    keys = torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.6, 0.8], *tied, [1.0, 0.0]])
    index, query = build_index(keys), torch.tensor([[1.0, 0.0]])
    assert search_module.search_index(index, query, 4, _bf16_keys(index))[0].tolist() == [[2, 44, 1, 3]]
    scans = []
    monkeypatch.setattr(index, "search", lambda *a: scans.append(1) or faiss.IndexFlatIP.search(index, *a), raising=False)
    same = build_index(torch.ones(50, 4))
    monkeypatch.setattr(same, "search", lambda *a: scans.append(1) or faiss.IndexFlatIP.search(same, *a), raising=False)
    assert search_module.search_index(same, torch.ones(1, 4), 3, _bf16_keys(same))[0].tolist() == [[0, 1, 2]]
    assert scans, "every key is a candidate: the float32 search runs instead"


def test_large_pools_on_a_bf16_cpu_get_the_prefilter_and_the_same_results(monkeypatch):
    monkeypatch.setattr(search_module, "PREFILTER_MIN_VECTORS", 10)
    encoder = FakeEncoder()
    pool = ReferencePool(encoder)
    pool.add([_image(i) for i in range(4)])
    monkeypatch.setattr(search_module, "cpu_has_native_bf16", lambda: False)
    plain = pool.search(_query(), SIZE, k=7)
    assert search_module.prefilter_keys(pool._index(SIZE, None)[0]) is None
    monkeypatch.setattr(search_module, "cpu_has_native_bf16", lambda: True)
    pool._indexes.clear()
    assert pool._index(SIZE, None)[1].dtype == torch.bfloat16
    twice = pool.search(_query(), SIZE, k=7)
    assert torch.equal(twice.indices, plain.indices) and torch.allclose(twice.scores, plain.scores, atol=1e-6)


def test_pool_ties_resolved_to_lowest_candidates():
    pool = ReferencePool(ConstantEncoder())
    pool.add([_image(1), _image(2)])
    result = pool.search(_query(), SIZE, k=3)
    assert result.indices.tolist() == [[0, 1, 2]] * 4
    assert torch.equal(result.scores, torch.ones(4, 3))


# ------------------------------------------------------------------------------------------------ pool
def test_one_reference_pool_with_release_clip(tiny_clip_folder):
    pool = ReferencePool(ReleaseClipEncoder.from_pretrained(tiny_clip_folder[0]))
    assert pool.add(_image(1)) == 1
    result = pool.search(_query(), SIZE, k=3)
    assert result.indices.shape == (4, 3) and result.indices.dtype == torch.int64
    assert result.scores.dtype == torch.float32
    assert set(result.indices.flatten().tolist()) <= set(range(5))
    assert len(result.candidates) == 5 and result.candidates[0].size == SIZE
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all()
    with pytest.raises(InvalidInputError, match="5 candidates"):
        pool.search(_query(), SIZE, k=6)


def test_empty_pool_raises():
    with pytest.raises(InvalidInputError, match="empty"):
        ReferencePool(FakeEncoder()).search(_query(), SIZE)


def test_search_matches_torch_reference_on_fake_embeddings():
    encoder = FakeEncoder()
    pool = ReferencePool(encoder)
    pool.add([_image(i) for i in range(4)])
    result = pool.search(_query(), SIZE, k=7)
    queries, keys = encoder.encode(query_patches(_query(), SIZE)), encoder.encode(result.candidates)
    cosine = F.cosine_similarity(queries[:, None], keys[None], dim=-1)
    assert torch.equal(result.indices, torch.argsort(cosine, descending=True, dim=1)[:, :7])
    assert torch.allclose(result.scores, cosine.gather(1, result.indices), atol=1e-6)


def test_duplicates_are_not_added_again():
    pool = ReferencePool(FakeEncoder())
    image = _image(1)
    assert pool.add([image, _image(2)]) == 2
    assert pool.add([image.copy(), np.asarray(image), _image(2)]) == 0
    assert pool.add([image, _image(3), _image(3)]) == 1
    assert len(pool) == 3


def test_retrieval_patches_and_json():
    pool = ReferencePool(FakeEncoder())
    pool.add([_image(1), _image(2)])
    result = pool.search(_query(), SIZE, k=2)
    chosen = result.patches()
    assert len(chosen) == 4 and all(len(row) == 2 for row in chosen)
    assert chosen[1][1] is result.candidates[int(result.indices[1, 1])]
    payload = json.loads(json.dumps(result.to_json()))
    assert payload["indices"] == result.indices.tolist() and payload["size"] == list(SIZE)
    assert np.allclose(payload["scores"], result.scores.numpy())


def test_embeddings_cached_per_size():
    encoder = FakeEncoder()
    pool = ReferencePool(encoder)
    pool.add([_image(1), _image(2)])
    pool.search(_query(), SIZE)
    assert pool.embedded_count == 10
    pool.search(_image(5, (96, 64)), (96, 64))
    assert pool.embedded_count == 20
    pool.search(_query(), SIZE)
    pool.search(_image(5, (96, 64)), (96, 64))
    pool.add(_image(3))
    progress = []
    pool.search(_query(), SIZE, progress=lambda done, total: progress.append((done, total)))
    assert pool.embedded_count == 25 and progress == [(1, 1)]


def test_any_mode_and_arrays_are_accepted_and_survive_the_store(tmp_path):
    base = _image(1)
    gray16 = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257))
    items = [
        base.convert("L"), base.convert("LA"), base.convert("P"), base.convert("RGBA"), gray16,
        base.convert("CMYK"), base.convert("1"), Image.fromarray(np.asarray(base.convert("L"), np.float32) / 255),
        np.asarray(_image(2)), np.random.default_rng(3).random((90, 60)),
    ]
    assert gray16.mode == "I;16" and items[7].mode == "F"
    pool = ReferencePool(FakeEncoder(), tmp_path / "store")
    assert pool.add(items) == len(items)
    fresh = pool.search(_query(), SIZE, k=5)
    for position, item in enumerate(items[:8]):  # what process_image makes of the original, whatever its mode
        whole = fresh.candidates[position * 5]
        assert np.array_equal(np.asarray(whole), np.asarray(process_image(item, *SIZE))), item.mode
    reopened = ReferencePool.open(tmp_path / "store", FakeEncoder()).search(_query(), SIZE, k=5)
    assert torch.equal(fresh.indices, reopened.indices)
    for a, b in zip(fresh.candidates, reopened.candidates):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_folder_input_sorted_by_name(tmp_path):
    _image(1).save(tmp_path / "b.png")
    _image(2).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    _image(3).save(tmp_path / "sub" / "c.png")
    pool = ReferencePool(FakeEncoder())
    progress = []
    assert pool.add(tmp_path, progress=lambda done, total: progress.append((done, total))) == 2
    assert pool.references == ["a.jpg", "b.png"] and progress == [(1, 2), (2, 2)]
    with pytest.raises(InvalidInputError, match="cannot read image"):
        pool.add(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no image files"):
        pool.add(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ persistence
def _stored_pool(store, encoder=None) -> ReferencePool:
    pool = ReferencePool(encoder or FakeEncoder(), store)
    _image(1).save(store.parent / "ref1.png")
    pool.add([store.parent / "ref1.png", _image(2)])
    return pool


def _index_file(store):
    (path,) = store.glob("index_64x96_*.faiss")
    return path


def test_persistence_round_trip_embeds_nothing_twice(tmp_path):
    store = tmp_path / "store"
    first = _stored_pool(store).search(_query(), SIZE)
    manifest = json.loads((store / "pool.json").read_text())
    assert manifest["encoder"] == "fake:v1" and manifest["dim"] == 12
    assert [ref["name"] for ref in manifest["references"]] == ["ref1.png", None]
    assert all((store / "refs" / f"{ref['hash']}.png").is_file() for ref in manifest["references"])
    assert len(list(store.glob("index_64x96_*.faiss"))) == 1 and len(list((store / "embeddings").rglob("*.npy"))) == 2

    encoder = FakeEncoder()
    reopened = ReferencePool.open(store, encoder)
    again = reopened.search(_query(), SIZE)
    assert torch.equal(again.indices, first.indices) and torch.equal(again.scores, first.scores)
    assert reopened.embedded_count == 0 and encoder.seen == 4  # only the query patches
    assert reopened.references == ["ref1.png", manifest["references"][1]["hash"][:12]]
    assert reopened.hashes == [ref["hash"] for ref in manifest["references"]]

    _index_file(store).unlink()
    rebuilt = ReferencePool.open(store, FakeEncoder())
    assert torch.equal(rebuilt.search(_query(), SIZE).indices, first.indices) and rebuilt.embedded_count == 0


def test_corrupt_index_and_embeddings_are_rebuilt(tmp_path):
    store = tmp_path / "store"
    first = _stored_pool(store).search(_query(), SIZE)
    index_file = _index_file(store)
    index_file.write_bytes(b"garbage")
    next((store / "embeddings").rglob("*.npy")).write_bytes(b"\x93NUMPY truncated")
    pool = ReferencePool.open(store, FakeEncoder())
    assert torch.equal(pool.search(_query(), SIZE).indices, first.indices)
    assert pool.embedded_count == 5
    assert ReferencePool.open(store, FakeEncoder()).search(_query(), SIZE).indices.tolist() == first.indices.tolist()
    faiss.write_index(build_index(torch.ones(3, 12)), str(index_file))  # readable, wrong content
    again = ReferencePool.open(store, FakeEncoder())
    assert torch.equal(again.search(_query(), SIZE).indices, first.indices) and again.embedded_count == 0
    assert faiss.read_index(str(_index_file(store))).ntotal == 10


def test_corrupt_pool_file_raises_a_clear_error(tmp_path):
    store = tmp_path / "store"
    _stored_pool(store)
    text = (store / "pool.json").read_text()
    (store / "pool.json").write_text(text[: len(text) // 2])
    with pytest.raises(PoolStoreError, match="pool.json"):
        ReferencePool.open(store, FakeEncoder())
    (store / "pool.json").write_text(json.dumps({"format_version": 1, "references": [{"hash": "../x"}]}))
    with pytest.raises(ColorFlowError):
        ReferencePool.open(store, FakeEncoder())


def test_encoder_change_rebuilds_and_never_mixes_vectors(tmp_path):
    store = tmp_path / "store"
    _stored_pool(store).search(_query(), SIZE)
    old_files = set((store / "embeddings").rglob("*.npy"))
    other = FakeEncoder("fake:v2", sign=-1.0)
    pool = ReferencePool.open(store, other)
    assert json.loads((store / "pool.json").read_text())["encoder"] == "fake:v2"
    assert not any(path.exists() for path in old_files) and not list(store.glob("index_*.faiss"))
    result = pool.search(_query(), SIZE, k=10)
    assert pool.embedded_count == 10
    expected = ReferencePool(FakeEncoder("fake:v2", sign=-1.0))
    expected.add([Image.open(tmp_path / "ref1.png"), _image(2)])
    reference = expected.search(_query(), SIZE, k=10)
    assert torch.equal(result.indices, reference.indices) and torch.allclose(result.scores, reference.scores)
    back = ReferencePool.open(store, FakeEncoder())
    back.search(_query(), SIZE)
    assert back.embedded_count == 10


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old content")

    def half_then_crash(tmp):
        tmp.write_bytes(b"new con")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store_module.atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old content" and list(tmp_path.iterdir()) == [target]


def test_pool_write_failure_leaves_the_persisted_pool_intact(tmp_path, monkeypatch):
    store = tmp_path / "store"
    pool = _stored_pool(store)
    before = (store / "pool.json").read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store_module.os, "replace", failing_replace)
    with pytest.raises(PoolStoreError, match="disk full"):
        pool.add(_image(3))
    monkeypatch.undo()
    assert (store / "pool.json").read_text() == before and len(pool) == 2
    assert not [p for p in store.rglob("*") if p.name.endswith(".tmp")]
    assert len(ReferencePool.open(store, FakeEncoder())) == 2


def test_fork_reuses_embeddings_and_leaves_the_store_alone(tmp_path):
    encoder = FakeEncoder()
    store = tmp_path / "pool"
    pool = ReferencePool(encoder, store)
    pool.add([_image(1), _image(2)])
    pool.search(_query(), size=SIZE)
    manifest = (store / "pool.json").read_bytes()
    reopened = ReferencePool.open(store, encoder)
    twin = reopened.fork()
    twin.add([_image(4)])
    twin.search(_query(), size=SIZE)
    assert twin.embedded_count == 5  # only the new reference's 5 patches
    assert len(twin) == 3 and len(reopened) == 2
    assert (store / "pool.json").read_bytes() == manifest
    assert ReferencePool.stored_encoder(store) == (encoder.name, encoder.dim)
    assert ReferencePool.stored_encoder(tmp_path / "none") is None


def test_importing_the_pool_does_not_import_faiss():
    import subprocess
    import sys

    code = "import sys, colorflow_core.retrieval; print('faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
