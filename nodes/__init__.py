"""ComfyUI nodes over colorflow_core; `comfy_bridge` is the only module that imports ComfyUI."""
