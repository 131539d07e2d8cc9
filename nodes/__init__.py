"""ComfyUI nodes over colorflow_core; `comfy_bridge` and `native_bridge` (the native path's model system) are the only
modules that import ComfyUI."""
