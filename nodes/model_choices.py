"""Dropdown choices for the loaders and preprocessors, and where each choice lives on disk.

Release snapshots are folders under `models/colorflow/`; the SD1.5 base is a diffusers folder under
`models/diffusers/` or `models/colorflow/`, or a single checkpoint file under `models/checkpoints/`;
the PixArt-α base of the sketch styles is a diffusers folder (with `transformer/`) in the same two
places. The line extractor (`erika.pth`) is any such file under `models/colorflow/` (a release's
`LE/erika.pth`, or `LE/erika.pth` on its own), or the copy the ControlNet auxiliary preprocessors
(comfyui_controlnet_aux) keep as `ckpts/lllyasviel/Annotators/erika.pth` (or under $AUX_ANNOTATOR_CKPTS_PATH, or an
annotator model folder registered with ComfyUI).
The canonical names are always offered, so shipped workflows validate and a missing download gives
a message that names the folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..colorflow_core.errors import MissingWeightsError
from ..colorflow_core.styles import STYLES
from ..colorflow_core.preprocessors import ERIKA_FILE
from . import comfy_bridge

#: Folder name of the TencentARC/ColorFlow release under models/colorflow/.
RELEASE_NAME = "ColorFlow"
#: The SD1.5 checkpoint most ComfyUI users already have in models/checkpoints/.
BASE_NAME = "checkpoints/v1-5-pruned-emaonly.safetensors"
#: Folder kinds searched for diffusers-layout SD1.5 and PixArt-α bases, as shown in the dropdown prefix.
BASE_FOLDER_KINDS = ("diffusers", comfy_bridge.MODEL_FOLDER)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
ENCODER_FOLDER = "image_encoder"
#: The PixArt-α base of the sketch styles (PixArt-alpha/PixArt-XL-2-1024-MS, diffusers layout) in models/diffusers/.
PIXART_NAME = "diffusers/PixArt-XL-2-1024-MS"
#: Preprocessor folders of a release (ScreenStyle networks, line extractor).
PREPROCESSOR_FOLDERS = ("ScreenStyle", "LE")
#: The line extractor's file name, and where the canonical one sits (the release's LE/erika.pth).
ERIKA = "erika.pth"
LINE_EXTRACTOR_NAME = f"{comfy_bridge.MODEL_FOLDER}/{RELEASE_NAME}/{ERIKA_FILE}"
#: Dropdown prefix of the ControlNet auxiliary preprocessors' copy, and where that pack keeps it.
AUX_PREFIX = "controlnet_aux"
AUX_REPO = "lllyasviel/Annotators"
#: comfyui_controlnet_aux reads its checkpoint folder from this variable (set from its config.yaml), else `<pack>/ckpts`.
AUX_ENV = "AUX_ANNOTATOR_CKPTS_PATH"
#: ComfyUI model-folder kinds some setups register for annotator checkpoints (e.g. in extra_model_paths.yaml).
AUX_FOLDER_KINDS = ("annotator_checkpoints", "annotators", "controlnet_ckpts")
#: The `annotator_ckpts_path: "./ckpts"` line of its config.yaml (relative to the pack folder, or absolute).
_AUX_CONFIG = re.compile(r"^annotator_ckpts_path:\s*[\"']?([^\"'#\n]+?)[\"']?\s*(#.*)?$", re.MULTILINE)


def _subfolders(kind: str) -> list[tuple[str, Path]]:
    """(name, path) of every folder directly inside the `kind` model folders."""
    found = []
    for root in comfy_bridge.model_folders(kind):
        if root.is_dir():
            found += [(path.name, path) for path in sorted(root.iterdir()) if path.is_dir()]
    return found


def _is_release(folder: Path) -> bool:
    subfolders = (ENCODER_FOLDER, *(style.folder for style in STYLES.values()), *PREPROCESSOR_FOLDERS)
    return any((folder / sub).is_dir() for sub in subfolders)


def _is_pixart(folder: Path) -> bool:
    return (folder / "transformer").is_dir()


def _is_diffusers(folder: Path) -> bool:
    """An SD1.5 diffusers folder (a PixArt-α folder, with transformer/, is not one)."""
    return ((folder / "model_index.json").is_file() or (folder / "unet").is_dir()) and not _is_pixart(folder)


def _with_canonical(canonical: str, names: list[str]) -> list[str]:
    return list(dict.fromkeys([*names, canonical]))


def release_choices() -> list[str]:
    """Release snapshot folders found under models/colorflow/, plus the canonical 'ColorFlow'."""
    return _with_canonical(RELEASE_NAME, [name for name, path in _subfolders(comfy_bridge.MODEL_FOLDER) if _is_release(path)])


def release_path(choice: str) -> Path | None:
    """The folder of a release choice, or None when it is not on disk."""
    return next((path for name, path in _subfolders(comfy_bridge.MODEL_FOLDER) if name == choice and _is_release(path)), None)


def encoder_choices() -> list[str]:
    """`<release>/image_encoder` for every release snapshot."""
    return [f"{name}/{ENCODER_FOLDER}" for name in release_choices()]


def encoder_path(choice: str) -> Path:
    """The image encoder folder of an encoder choice (its release folder may be missing)."""
    release = choice.split("/")[0]
    folder = release_path(release)
    if folder is None:
        folder = comfy_bridge.model_folders(comfy_bridge.MODEL_FOLDER)[0] / release
    return folder / ENCODER_FOLDER


def base_choices() -> list[str]:
    """SD1.5 bases: '<kind>/<folder>' diffusers folders and 'checkpoints/<file>' checkpoints, plus the canonical one."""
    folders = [f"{kind}/{name}" for kind in BASE_FOLDER_KINDS for name, path in _subfolders(kind) if _is_diffusers(path)]
    files = [f"checkpoints/{name}" for name in comfy_bridge.model_files("checkpoints") if name.lower().endswith(CHECKPOINT_SUFFIXES)]
    return _with_canonical(BASE_NAME, folders + files)


def base_path(choice: str) -> Path | None:
    """The folder or checkpoint file of a base choice, or None when it is not on disk."""
    kind, _, name = choice.partition("/")
    if kind == "checkpoints":
        return comfy_bridge.model_file("checkpoints", name)
    return next((path for path_name, path in _subfolders(kind) if path_name == name and _is_diffusers(path)), None)


def pixart_choices() -> list[str]:
    """PixArt-α bases: '<kind>/<folder>' diffusers folders with a transformer/, plus the canonical one."""
    folders = [f"{kind}/{name}" for kind in BASE_FOLDER_KINDS for name, path in _subfolders(kind) if _is_pixart(path)]
    return _with_canonical(PIXART_NAME, folders)


def pixart_path(choice: str) -> Path | None:
    """The folder of a PixArt-α base choice, or None when it is not on disk."""
    kind, _, name = choice.partition("/")
    return next((path for path_name, path in _subfolders(kind) if path_name == name and _is_pixart(path)), None)


def _aux_roots() -> list[Path]:
    """Checkpoint folders of the ControlNet auxiliary preprocessors: $AUX_ANNOTATOR_CKPTS_PATH, the annotator model
    folders registered with ComfyUI, then for every comfyui_controlnet_aux folder in custom_nodes/ the
    `annotator_ckpts_path` of its config.yaml and its ckpts/."""
    roots = [Path(os.environ[AUX_ENV]).expanduser()] if os.environ.get(AUX_ENV) else []
    roots += [folder for kind in AUX_FOLDER_KINDS for folder in comfy_bridge.model_folders(kind)]
    for folder in comfy_bridge.custom_node_folders():
        try:
            packs = sorted(path for path in folder.iterdir() if path.is_dir())
        except OSError:  # missing or unreadable: nothing to find there (the dropdown must still list)
            continue
        for pack in packs:
            if "controlnet_aux" not in pack.name.lower().replace("-", "_"):
                continue
            try:
                found = _AUX_CONFIG.search((pack / "config.yaml").read_text(errors="replace"))
            except OSError:
                found = None
            if found:
                roots.append(pack / Path(found.group(1).strip()).expanduser())
            roots.append(pack / "ckpts")
    return list(dict.fromkeys(roots))


def aux_line_extractor() -> Path | None:
    """The ControlNet auxiliary preprocessors' erika.pth (lllyasviel/Annotators), if they have downloaded it."""
    for root in _aux_roots():
        candidates = [root / AUX_REPO / ERIKA, root / ERIKA]
        # older versions kept the Hugging Face cache layout
        candidates += sorted(root.glob(f"models--{AUX_REPO.replace('/', '--')}/snapshots/*/{ERIKA}"))
        found = next((path for path in candidates if path.is_file()), None)
        if found is not None:
            return found
    return None


def line_extractor_choices() -> list[str]:
    """Every erika.pth found: 'colorflow/<path>' under models/colorflow/ and 'controlnet_aux/lllyasviel/Annotators/erika.pth'."""
    names = [f"{comfy_bridge.MODEL_FOLDER}/{name}" for name in comfy_bridge.model_files(comfy_bridge.MODEL_FOLDER)
             if Path(name).name == ERIKA]
    if aux_line_extractor() is not None:
        names.append(f"{AUX_PREFIX}/{AUX_REPO}/{ERIKA}")
    return _with_canonical(LINE_EXTRACTOR_NAME, names)


def line_extractor_path(choice: str) -> Path | None:
    """The erika.pth of a line-extractor choice, or None when it is not on disk."""
    kind, _, name = choice.partition("/")
    if kind == AUX_PREFIX:
        return aux_line_extractor()
    return comfy_bridge.model_file(comfy_bridge.MODEL_FOLDER, name) if kind == comfy_bridge.MODEL_FOLDER else None


def line_extractor_file(choice: str) -> Path:
    """The erika.pth to load for a choice. The canonical choice falls back to any other erika.pth found (the same
    weights), so shipped workflows run for users who keep only the ControlNet auxiliary preprocessors' copy."""
    found = line_extractor_path(choice)
    if found is None and choice == LINE_EXTRACTOR_NAME:
        found = next((path for other in line_extractor_choices() if (path := line_extractor_path(other)) is not None), None)
    if found is not None:
        return found
    kind, _, name = choice.partition("/")
    folder = comfy_bridge.model_folders(comfy_bridge.MODEL_FOLDER) or [comfy_bridge.fallback_base() / "models" / comfy_bridge.MODEL_FOLDER]
    parent = folder[0] / Path(name).parent if kind == comfy_bridge.MODEL_FOLDER else folder[0] / RELEASE_NAME / "LE"
    raise MissingWeightsError(
        ERIKA, parent,
        f"the line extractor: LE/erika.pth of huggingface.co/TencentARC/ColorFlow, or erika.pth of huggingface.co/{AUX_REPO} "
        "as the ControlNet auxiliary preprocessors keep it",
    )


def any_line_extractor() -> Path | None:
    """The first erika.pth found anywhere (for a release that lacks its own LE/erika.pth)."""
    return next((path for choice in line_extractor_choices() if (path := line_extractor_path(choice)) is not None), None)


def release_folder(choice: str) -> Path:
    """The folder of a release choice; a missing one raises an error naming the folder it belongs in."""
    folder = release_path(choice)
    if folder is None:
        missing, where = missing_location(choice)
        raise MissingWeightsError(missing, where, "from huggingface.co/TencentARC/ColorFlow", kind="folder")
    return folder


def missing_location(choice: str) -> tuple[str, Path]:
    """(what is missing, the folder it belongs in) for a release or base choice not on disk."""
    kind, _, name = choice.partition("/") if "/" in choice else (comfy_bridge.MODEL_FOLDER, "", choice)
    folders = comfy_bridge.model_folders(kind) or [comfy_bridge.fallback_base() / "models" / kind]
    return (name if kind == "checkpoints" else f"{name}/"), folders[0]
