"""Reference retrieval: upstream's patches, CLIP/open_clip encoders and a persistent, exact reference pool."""
from .encoders import ImageEncoder, OpenClipEncoder, ReleaseClipEncoder, default_image_processor, weight_fingerprint
from .patches import PATCHES_PER_REFERENCE, patch_boxes, query_patches, reference_patches
from .pool import PoolStoreError, ReferencePool, Retrieval, content_hash
from .search import build_index, exact_search, search_index

__all__ = [
    "ImageEncoder",
    "OpenClipEncoder",
    "PATCHES_PER_REFERENCE",
    "PoolStoreError",
    "ReferencePool",
    "ReleaseClipEncoder",
    "Retrieval",
    "build_index",
    "content_hash",
    "default_image_processor",
    "exact_search",
    "patch_boxes",
    "query_patches",
    "reference_patches",
    "search_index",
    "weight_fingerprint",
]
