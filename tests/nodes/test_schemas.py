"""Every node definition is valid for ComfyUI's validator, documented, and keeps its committed interface."""
from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ..pack import ROOT

INTERFACE = json.loads((Path(__file__).parent / "node_interface.json").read_text())
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
#: ComfyUI's own socket types; anything else must be one of ours.
CORE_TYPES = {"IMAGE", "MASK", "CLIP_VISION", "MODEL", "VAE", "LATENT", "INT", "FLOAT", "STRING", "BOOLEAN"}
OUR_TYPES = {"COLORFLOW_MODEL", "COLORFLOW_ENCODER", "COLORFLOW_POOL", "COLORFLOW_SAMPLE", "COLORFLOW_PATCH"}


def input_specs(node_class) -> dict[str, tuple]:
    """Required and optional inputs, in declaration order."""
    types = node_class.INPUT_TYPES()
    return {name: spec for section in ("required", "optional") for name, spec in types.get(section, {}).items()}


def spec_problems(name: str, spec: tuple) -> list[str]:
    """What ComfyUI's validator (execution.validate_inputs) or the frontend would reject in one input spec."""
    if not isinstance(spec, tuple) or not 1 <= len(spec) <= 2:
        return [f"{name}: spec must be a 1- or 2-tuple"]
    kind, options = spec[0], spec[1] if len(spec) == 2 else {}
    problems = [] if options.get("tooltip") else [f"{name}: no tooltip"]
    if isinstance(kind, list):
        if not kind or not all(isinstance(v, str) for v in kind):
            problems.append(f"{name}: combo options must be non-empty strings")
        if options.get("default", kind[0] if kind else None) not in kind:
            problems.append(f"{name}: combo default {options.get('default')!r} not among its options")
        return problems
    if kind not in CORE_TYPES | OUR_TYPES:
        problems.append(f"{name}: unknown type {kind}")
    if kind in WIDGET_TYPES:
        python_type = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
        default = options.get("default")
        if not isinstance(default, python_type) or (kind == "INT" and isinstance(default, bool)):
            problems.append(f"{name}: default {default!r} is not a {kind}")
        elif kind in ("INT", "FLOAT"):
            low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
            if not low <= default <= high:
                problems.append(f"{name}: default {default} outside [{low}, {high}]")
            if kind == "INT" and "step" in options and (default - options.get("min", 0)) % options["step"]:
                problems.append(f"{name}: default {default} is not on the step grid")
    return problems


def test_every_node_is_registered_and_named(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert all(re.fullmatch(r"ColorFlow[A-Z]\w+", node_id) for node_id in pack.NODE_CLASS_MAPPINGS)
    assert pack.WEB_DIRECTORY == "./web" and (ROOT / "web").is_dir()


@pytest.mark.parametrize("node_id", sorted(INTERFACE))
def test_node_definition_is_valid(pack, node_id):
    node_class = pack.NODE_CLASS_MAPPINGS[node_id]
    specs = input_specs(node_class)
    problems = [problem for name, spec in specs.items() for problem in spec_problems(name, spec)]
    assert not problems, problems
    assert node_class.CATEGORY.split("/")[0] == "ColorFlow"
    assert node_class.DESCRIPTION and node_class.__doc__
    returns = node_class.RETURN_TYPES
    assert isinstance(returns, tuple) and all(isinstance(t, str) and t in CORE_TYPES | OUR_TYPES for t in returns)
    assert len(node_class.RETURN_NAMES) == len(returns)
    assert len(getattr(node_class, "OUTPUT_IS_LIST", returns)) == len(returns)
    function = getattr(node_class(), node_class.FUNCTION)
    parameters = inspect.signature(function).parameters
    assert list(parameters)[: len(specs)] == list(specs), "FUNCTION takes the inputs under their names"
    optional = node_class.INPUT_TYPES().get("optional", {})
    assert all(parameters[name].default is None for name in optional), "optional inputs default to None"


@pytest.mark.parametrize("node_id", sorted(INTERFACE))
def test_committed_interface_is_kept(pack, node_id):
    """Ids, input names/order/types and outputs are workflow identity: they may grow at the end, never change."""
    node_class = pack.NODE_CLASS_MAPPINGS[node_id]
    current = {name: spec[0] if isinstance(spec[0], str) else "COMBO" for name, spec in input_specs(node_class).items()}
    committed = INTERFACE[node_id]
    assert list(current.items())[: len(committed["inputs"])] == list(committed["inputs"].items())
    assert list(node_class.RETURN_TYPES[: len(committed["outputs"])]) == committed["outputs"]


def test_new_nodes_are_added_to_the_committed_interface(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(INTERFACE)


def test_spec_checker_rejects_bad_specs():
    assert spec_problems("x", ("INT", {"default": 5, "min": 6, "max": 9, "tooltip": "t"}))
    assert spec_problems("x", (["a", "b"], {"default": "c", "tooltip": "t"}))
    assert spec_problems("x", ("FLOAT", {"default": 1.0}))
    assert spec_problems("x", ("INT", {"default": 96, "min": 64, "step": 64, "tooltip": "t"}))
    assert not spec_problems("x", ("INT", {"default": 96, "min": 64, "step": 32, "tooltip": "t"}))


def test_importing_the_pack_has_no_side_effects():
    """No GPU, no sys.path or environment edit, no ComfyUI module name taken."""
    script = f"""
import os, sys, importlib.util, torch
path, env = list(sys.path), dict(os.environ)
spec = importlib.util.spec_from_file_location("pack_under_test", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
module = importlib.util.module_from_spec(spec); sys.modules["pack_under_test"] = module; spec.loader.exec_module(module)
assert sys.path == path, "sys.path changed"
assert dict(os.environ) == env, "environment changed"
assert not torch.cuda.is_initialized(), "CUDA initialised"
assert not {{"nodes", "folder_paths", "comfy", "server"}} & set(sys.modules), "took a ComfyUI module name"
print(len(module.NODE_CLASS_MAPPINGS))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(INTERFACE))


#: Lines of glue a node's FUNCTION may have (docstring excluded): everything else belongs in the core.
NODE_BODY_LINES = 15


def test_every_node_function_is_a_few_lines_of_glue(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        function = getattr(cls, cls.FUNCTION)
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        body = tree.body[0].body
        if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            body = body[1:]  # the docstring
        lines = body[-1].end_lineno - body[0].lineno + 1
        assert lines <= NODE_BODY_LINES, f"{node_id}.{cls.FUNCTION}: {lines} lines"
