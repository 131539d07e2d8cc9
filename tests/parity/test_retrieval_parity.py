"""Retrieval against the upstream golden fixtures (stage a0 patches, stage a CLIP embeddings and ranking)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from colorflow_core.retrieval import ReferencePool, ReleaseClipEncoder, exact_search, query_patches, reference_patches

SIZE = (64, 96)


def _assert_rel(got: torch.Tensor, ref: torch.Tensor) -> None:
    """README 'rel': |got - ref| <= 1e-5 + 1e-5 * max|ref|."""
    assert got.shape == ref.shape
    bound = 1e-5 + 1e-5 * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= bound


@pytest.fixture(scope="module")
def stage_a0(parity_dir):
    with np.load(parity_dir / "stages" / "stage_a0_preprocess.npz") as data:
        return {key: data[key].copy() for key in data.files}


@pytest.fixture(scope="module")
def stage_a(parity_dir):
    with np.load(parity_dir / "stages" / "stage_a_retrieval.npz") as data:
        arrays = {key: data[key].copy() for key in data.files}
    tensors = {key: value.clone() for key, value in load_file(parity_dir / "stages" / "stage_a_retrieval.safetensors").items()}
    return arrays, tensors


@pytest.fixture(scope="module")
def encoder(parity_dir):
    return ReleaseClipEncoder.from_pretrained(parity_dir / "colorflow" / "image_encoder")


def _images(arrays, prefix: str, count: int) -> list[Image.Image]:
    return [Image.fromarray(arrays[f"{prefix}{i:02d}"]) for i in range(count)]


def test_stage_a0_patch_helpers_exact(stage_a0):
    processed = Image.fromarray(stage_a0["process_image_64x96"])
    for i, patch in enumerate(query_patches(processed, SIZE)):
        assert np.array_equal(np.asarray(patch), stage_a0[f"Q_varres_{i}"])
    for i, patch in enumerate(reference_patches(processed, SIZE)):
        assert np.array_equal(np.asarray(patch), stage_a0[f"ref_varres_{i}"])


def test_stage_a_patches_exact(stage_a):
    arrays, _ = stage_a
    query = Image.fromarray(arrays["query_image_bw"])
    for got, ref in zip(query_patches(query, SIZE), _images(arrays, "query_patch_", 4)):
        assert np.array_equal(np.asarray(got), np.asarray(ref))
    got_refs = [p for i in range(3) for p in reference_patches(Image.fromarray(arrays[f"reference_image_{i}"]), SIZE)]
    for got, ref in zip(got_refs, _images(arrays, "ref_patch_", 15)):
        assert np.array_equal(np.asarray(got), np.asarray(ref))


def test_stage_a_pixel_values_embeddings_and_ranking(stage_a, encoder):
    arrays, tensors = stage_a
    queries, refs = _images(arrays, "query_patch_", 4), _images(arrays, "ref_patch_", 15)
    _assert_rel(encoder.pixel_values(queries[:1])[0], tensors["query_pixel_values_0"])
    query_embeds, reference_embeds = encoder.encode(queries), encoder.encode(refs)
    _assert_rel(query_embeds, tensors["query_embeds"])
    _assert_rel(reference_embeds, tensors["reference_embeds"])
    indices, scores = exact_search(query_embeds, reference_embeds, k=15)
    assert torch.equal(indices, tensors["sorted_indices"])
    assert torch.equal(indices[:, :3], tensors["top3_indices"])
    _assert_rel(scores, tensors["cosine_similarities"].gather(1, tensors["sorted_indices"]))


def test_pool_end_to_end_top3(stage_a, encoder):
    arrays, tensors = stage_a
    pool = ReferencePool(encoder)
    assert pool.add([arrays[f"reference_image_{i}"] for i in range(3)]) == 3
    result = pool.search(Image.fromarray(arrays["query_image_bw"]), size=SIZE, k=3)
    assert result.indices.tolist() == [[3, 5, 6], [4, 7, 6], [4, 6, 7], [4, 6, 5]]
    assert torch.equal(result.indices, tensors["top3_indices"])
    for got, ref in zip(result.candidates, _images(arrays, "ref_patch_", 15)):
        assert np.array_equal(np.asarray(got), np.asarray(ref))
