"""Every shipped workflow is checked against the node definitions and run end to end on tiny weights."""
from __future__ import annotations

import copy
import json
import re
import tomllib

import pytest
from PIL import Image

from ..nodes.clip_stub import StubClipVision
from ..nodes.conftest import BASE, PIXART, SIZE
from ..pack import ROOT
from .core_nodes import CORE_DEFINITIONS, DEFINITION_ONLY, SNAPSHOT, core_nodes
from .executor import (
    FRONTEND_ONLY,
    WorkflowError,
    check_workflow,
    execute,
    to_prompt,
    validate_prompt,
    widget_layout,
)
from .layout import overlaps

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
INTERFACE = json.loads((ROOT / "tests" / "nodes" / "node_interface.json").read_text())
CORE_VERSION = SNAPSHOT["comfyui_version"]
#: Combos that list files on the user's machine: checked when the tiny prompt is validated, not in the shipped file.
FILE_COMBOS = {
    ("LoadImage", "image"), ("CLIPVisionLoader", "clip_name"),
    ("ColorFlowModelLoader", "snapshot"), ("ColorFlowModelLoader", "base"), ("ColorFlowModelLoader", "pixart_base"),
    ("ColorFlowEncoderLoader", "encoder"), ("ColorFlowScreenStyle", "release"), ("ColorFlowLineExtract", "line_extractor"),
    ("ColorFlowSketchShading", "line_extractor"),
    ("CheckpointLoaderSimple", "ckpt_name"), ("ControlNetLoader", "control_net_name"), ("ColorFlowPatchLoader", "release"),
    ("ColorFlowLoRALoader", "release"),
}
#: Nodes whose saved workflow entry lists the files they need (the frontend offers to download missing ones).
MODEL_NODES = {"ColorFlowModelLoader", "CLIPVisionLoader", "ColorFlowScreenStyle", "ColorFlowLineExtract", "ColorFlowSketchShading"}
W, H = SIZE
#: Widget values changed to run on tiny weights in seconds.
TINY = {
    "ColorFlowModelLoader": {"base": BASE, "pixart_base": PIXART, "dtype": "float32", "device": "cpu"},
    "ColorFlowScreenStyle": {"device": "cpu"},
    "ColorFlowLineExtract": {"device": "cpu"},
    "ColorFlowSketchShading": {"device": "cpu"},
    "ColorFlowStitchCanvas": {"size": "custom", "width": W, "height": H},
    "ColorFlowColorizeSequence": {"size": "custom", "width": W, "height": H, "steps": 1},
    "ColorFlowSampler": {"steps": 1},
    "ImageScale": {"width": 2 * W, "height": 2 * H},
}
FINAL = (int(1.5 * H), int(1.5 * W), 3)
CANVAS = (1, 2 * H, 2 * W, 3)
#: The retrieval preview: 4 quadrant rows × 3 ranks of 192-px cells, each with a 14-px label.
GRID = (1, 4 * (round(192 * H / W) + 14), 3 * 192, 3)
#: The input page of the preprocessor workflow (tests/nodes/conftest.py writes it at 128×192).
PAGE = (1, 192, 128, 3)
#: What each workflow saves / previews on tiny weights: node class → shapes of the images it received, in order.
EXPECTED = {
    "colorflow_one_page_staged": {"SaveImage": [(1, *FINAL)], "PreviewImage": sorted([CANVAS, CANVAS, CANVAS, GRID])},
    "colorflow_chapter": {"SaveImage": [(2, *FINAL)]},
    "colorflow_with_core_nodes": {"SaveImage": [(2, *FINAL)]},
    "colorflow_preprocessors": {"SaveImage": [], "PreviewImage": [PAGE] * 4},
    "colorflow_sketch": {"SaveImage": [(1, *FINAL)], "PreviewImage": sorted([CANVAS, CANVAS, GRID, (1, *FINAL)])},
    # Core KSampler & co. run only in a real ComfyUI: tests/comfyui runs these (COLORFLOW_COMFYUI).
    "colorflow_native_ksampler": None,
    "colorflow_native_controlnet": None,
}


@pytest.fixture
def saved() -> list:
    return []


@pytest.fixture
def classes(pack, comfy_base, tiny_release, saved):
    """Our nodes plus stand-ins for the core ones (their real ComfyUI definitions)."""
    clip_vision = lambda _name: StubClipVision.from_folder(tiny_release[0] / "image_encoder")  # noqa: E731
    return {**pack.NODE_CLASS_MAPPINGS, **core_nodes(comfy_base / "input", clip_vision, saved)}


def load(path) -> dict:
    return json.loads(path.read_text())


def test_workflows_are_shipped_with_thumbnails():
    assert {path.stem for path in WORKFLOWS} == set(EXPECTED)
    for path in WORKFLOWS:
        with Image.open(path.with_suffix(".jpg")) as thumbnail:
            assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 200
    assert not (ROOT / "example_workflows").exists(), "workflows/ is the one folder (both would break template serving)"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_the_node_definitions(path, classes):
    workflow = load(path)
    check_workflow(workflow, classes, FILE_COMBOS)
    types = {node["type"] for node in workflow["nodes"]}
    assert types - set(classes) <= FRONTEND_ONLY
    assert all(t in CORE_DEFINITIONS or t.startswith("ColorFlow") for t in types - FRONTEND_ONLY), "core nodes must be real ComfyUI ones"
    assert workflow["last_node_id"] >= max(node["id"] for node in workflow["nodes"])
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_node_covers_another(path, classes):
    """As the frontend draws them (title bars, nodes grown to fit their widgets), no two nodes overlap."""
    assert overlaps(load(path), classes) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_metadata(path):
    workflow = load(path)
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        properties = node["properties"]
        ours = node["type"].startswith("ColorFlow")
        assert properties["cnr_id"] == (PROJECT["name"] if ours else "comfy-core")
        assert properties["ver"] == (PROJECT["version"] if ours else CORE_VERSION)
        if node["type"] in MODEL_NODES:
            assert properties["models"] and all(
                set(model) == {"name", "url", "directory"} and model["url"].startswith("https://huggingface.co/")
                for model in properties["models"]
            )
    strings = [value for node in workflow["nodes"] for value in node.get("widgets_values", []) if isinstance(value, str)]
    assert not [s for s in strings if re.match(r"^(/|~|[A-Za-z]:[\\/])", s)], "no absolute paths"


def tiny_prompt(workflow: dict, classes: dict) -> dict:
    prompt = to_prompt(workflow, classes)
    for entry in prompt.values():
        entry["inputs"].update(TINY.get(entry["class_type"], {}))
    validate_prompt(prompt, classes)
    return prompt


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_on_tiny_weights(path, classes, saved, user_dir):
    if EXPECTED[path.stem] is None:
        workflow = load(path)
        assert {n["type"] for n in workflow["nodes"]} & set(DEFINITION_ONLY)
        validate_prompt(tiny_prompt(workflow, classes), classes)
        pytest.skip("core KSampler/VAE nodes: run on a real server by tests/comfyui (set COLORFLOW_COMFYUI)")
    execute(tiny_prompt(load(path), classes), classes)
    received: dict[str, list] = {}
    for node_class, images in saved:
        received.setdefault(node_class, []).append(tuple(images.shape))
    expected = EXPECTED[path.stem]
    assert received.get("SaveImage", []) == expected["SaveImage"]
    assert sorted(received.get("PreviewImage", [])) == expected.get("PreviewImage", [])


def test_staged_and_chapter_workflows_agree(classes, saved, user_dir):
    """The staged graph and the one-node chapter path give the same page for the same seed and settings."""
    staged = tiny_prompt(load(ROOT / "workflows" / "colorflow_one_page_staged.json"), classes)
    execute(staged, classes)
    chapter = copy.deepcopy(tiny_prompt(load(ROOT / "workflows" / "colorflow_chapter.json"), classes))
    sequence = next(entry for entry in chapter.values() if entry["class_type"] == "ColorFlowColorizeSequence")
    sequence["inputs"].update(steps=1, feed_back=False)
    pages = next(key for key, entry in chapter.items() if entry["class_type"] == "ColorFlowLoadPages")
    page_loader = next(key for key, entry in staged.items() if entry["class_type"] == "LoadImage")
    chapter[pages] = {"class_type": "LoadImage", "inputs": {"image": staged[page_loader]["inputs"]["image"]}}
    pool = next(entry for entry in chapter.values() if entry["class_type"] == "ColorFlowReferencePool")
    pool["inputs"]["pool_name"] = "example"
    execute(chapter, classes)
    (_, from_stages), (_, from_chapter) = [item for item in saved if item[0] == "SaveImage"]
    assert from_stages.shape == from_chapter.shape and (from_stages == from_chapter).all()


def as_saved_before(workflow: dict, classes: dict, first_interface: dict) -> dict:
    """The workflow as an older pack version saved it: our nodes with only the inputs, widgets and outputs of `first_interface`."""
    for node in workflow["nodes"]:
        if node["type"] in first_interface:
            interface = first_interface[node["type"]]
            layout = widget_layout(classes[node["type"]])
            node["widgets_values"] = [v for (name, _), v in zip(layout, node["widgets_values"]) if name in interface["inputs"]]
            node["inputs"] = [slot for slot in node["inputs"] if slot["name"] in interface["inputs"]]
            node["outputs"] = node["outputs"][: len(interface["outputs"])]
    return workflow


def test_workflows_saved_before_the_appended_inputs_run_unchanged(classes, saved, user_dir):
    """Inputs appended later are optional: a workflow (or API prompt) without them runs, and gives the same page."""
    first = {
        "ColorFlowModelLoader": {"inputs": dict.fromkeys(["snapshot", "base", "style", "dtype", "device", "auto_download"]), "outputs": [0, 1]},
        "ColorFlowStitchCanvas": {"inputs": dict.fromkeys(["page", "pool", "size", "width", "height", "preprocess"]), "outputs": [0, 1, 2]},
        "ColorFlowGuidedUpscale": {
            "inputs": dict.fromkeys(["model", "page", "gray", "seed", "sampler_guidance", "preprocess", "sample_posterior"]), "outputs": [0],
        },
    }
    assert all(list(first[k]["inputs"]) == list(INTERFACE[k]["inputs"])[: len(first[k]["inputs"])] for k in first)
    current = tiny_prompt(load(ROOT / "workflows" / "colorflow_one_page_staged.json"), classes)
    execute(current, classes)
    old = to_prompt(as_saved_before(load(ROOT / "workflows" / "colorflow_one_page_staged.json"), classes, first), classes)
    for entry in old.values():
        entry["inputs"].update({k: v for k, v in TINY.get(entry["class_type"], {}).items() if k != "pixart_base"})
    assert "pixart_base" not in next(e for e in old.values() if e["class_type"] == "ColorFlowModelLoader")["inputs"]
    validate_prompt(old, classes)
    execute(old, classes)
    (_, now), (_, before) = [item for item in saved if item[0] == "SaveImage"]
    assert (now == before).all()


def break_workflow(change: str) -> dict:
    workflow = load(ROOT / "workflows" / "colorflow_one_page_staged.json")
    nodes = {node["type"]: node for node in workflow["nodes"]}
    if change == "link type":
        workflow["links"][0][5] = "IMAGE"
    elif change == "range":
        nodes["ColorFlowSampler"]["widgets_values"][2] = 0
    elif change == "combo":
        nodes["ColorFlowStitchCanvas"]["widgets_values"][3] = "sepia"
    elif change == "widget count":
        nodes["ColorFlowSampler"]["widgets_values"].pop(1)
    elif change == "unknown node":
        nodes["ColorFlowSampler"]["type"] = "ColorFlowSamplerV2"
    elif change == "missing input":
        nodes["ColorFlowSampler"]["inputs"][2]["link"] = None
    return workflow


@pytest.mark.parametrize("change, message", [
    ("link type", "link 1"), ("range", "below the minimum"), ("combo", "'sepia' is not one of"),
    ("widget count", "widget values"), ("unknown node", "unknown node type"), ("missing input", "not connected"),
])
def test_checker_rejects_broken_workflows(classes, change, message):
    with pytest.raises(WorkflowError, match=message):
        check_workflow(break_workflow(change), classes, FILE_COMBOS)
