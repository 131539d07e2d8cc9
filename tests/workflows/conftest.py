"""The node tests' fixtures (pack, stand-in ComfyUI base folder with tiny weights), shared with the workflow tests."""
from ..nodes.conftest import comfy_base, one_thread, pack, user_dir  # noqa: F401
