"""A small stand-in for ComfyUI's frontend and executor, for UI-format (schema 0.4) workflows.

`check_workflow` validates a saved workflow against node definitions the way the frontend and
ComfyUI's validator would (types, widget values in order and in range, links), `to_prompt` converts
it to an API prompt as the frontend does on queueing, and `execute` runs the prompt following its
links, with ComfyUI's list semantics (INPUT_IS_LIST, OUTPUT_IS_LIST, per-item mapping).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: Nodes that exist only in the frontend (resolved away before queueing).
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


class WorkflowError(AssertionError):
    """A workflow that the frontend or ComfyUI's validator would reject."""


@dataclass(frozen=True)
class Input:
    name: str
    kind: str | list
    options: dict
    optional: bool

    @property
    def is_widget(self) -> bool:
        return isinstance(self.kind, list) or (self.kind in WIDGET_TYPES and not self.options.get("forceInput"))

    @property
    def socket_type(self) -> str:
        return "COMBO" if isinstance(self.kind, list) else self.kind


def inputs_of(node_class) -> list[Input]:
    """Required then optional inputs, in declaration order (hidden ones excluded)."""
    types = node_class.INPUT_TYPES()
    return [
        Input(name, spec[0], spec[1] if len(spec) > 1 else {}, section == "optional")
        for section in ("required", "optional")
        for name, spec in types.get(section, {}).items()
    ]


def widget_layout(node_class) -> list[tuple[str, str]]:
    """(input name, role) behind each `widgets_values` position; role 'value', or the frontend's extra 'control' / 'upload'."""
    layout: list[tuple[str, str]] = []
    for item in inputs_of(node_class):
        if item.is_widget:
            layout.append((item.name, "value"))
            if item.kind == "INT" and (item.options.get("control_after_generate") or item.name in ("seed", "noise_seed")):
                layout.append((item.name, "control"))
    uploads = [(item.name, "upload") for item in inputs_of(node_class) if item.options.get("image_upload")]
    return layout + uploads  # the upload button comes after all other widgets


def value_problem(item: Input, value: Any, check_combo: bool = True) -> str | None:
    """Why ComfyUI's validate_inputs would refuse `value` for a widget input, or None."""
    if isinstance(item.kind, list):
        return None if not check_combo or value in item.kind else f"{value!r} is not one of {item.kind}"
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[item.kind]
    if not isinstance(value, expected) or (item.kind != "BOOLEAN" and isinstance(value, bool)):
        return f"{value!r} is not a {item.kind}"
    if item.kind in ("INT", "FLOAT"):
        if "min" in item.options and value < item.options["min"]:
            return f"{value} is below the minimum {item.options['min']}"
        if "max" in item.options and value > item.options["max"]:
            return f"{value} is above the maximum {item.options['max']}"
    return None


def _compatible(output_type: str, input_type: str) -> bool:
    return output_type == input_type or "*" in (output_type, input_type)


def check_workflow(workflow: dict, classes: dict[str, type], file_combos: set[tuple[str, str]] = frozenset()) -> None:
    """Raise WorkflowError naming every problem; `file_combos` are (node type, input) combos listing files, not checked here."""
    problems: list[str] = []
    if workflow.get("version") != 0.4:
        problems.append(f"schema version {workflow.get('version')} is not 0.4")
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY:
            continue
        if node["type"] not in classes:
            problems.append(f"{where}: unknown node type")
            continue
        node_class = classes[node["type"]]
        declared = {item.name: item for item in inputs_of(node_class)}
        outputs = [(o["name"], o["type"]) for o in node["outputs"]]
        defined = list(zip(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES), node_class.RETURN_TYPES))
        # A workflow saved before an output was added lists the earlier ones (the frontend appends the new slot).
        if outputs != defined[: len(outputs)] or not outputs and defined:
            problems.append(f"{where}: outputs {outputs} differ from the definition")
        for slot in node["inputs"]:
            item = declared.get(slot["name"])
            if item is None or slot["type"] != item.socket_type:
                problems.append(f"{where}: input {slot['name']}:{slot['type']} is not declared so")
            elif item.is_widget and slot.get("link") is not None and "widget" not in slot:
                problems.append(f"{where}: linked widget input {slot['name']} lacks its widget entry")
        linked = {slot["name"] for slot in node["inputs"] if slot.get("link") is not None}
        for item in declared.values():
            if not item.is_widget and not item.optional and item.name not in linked:
                problems.append(f"{where}: required input {item.name} is not connected")
        layout = widget_layout(node_class)
        values = node.get("widgets_values", [])
        if len(values) != len(layout):
            problems.append(f"{where}: {len(values)} widget values for the widgets {layout}")
            continue
        for (name, role), value in zip(layout, values):
            if role == "control" and value not in CONTROL_VALUES:
                problems.append(f"{where}: {name} control_after_generate {value!r}")
            elif role == "value":
                reason = value_problem(declared[name], value, (node["type"], name) not in file_combos)
                if reason:
                    problems.append(f"{where}: widget {name}: {reason}")
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        where = f"link {link_id}"
        if origin not in nodes or target not in nodes:
            problems.append(f"{where}: joins a missing node")
            continue
        outputs, inputs = nodes[origin]["outputs"], nodes[target]["inputs"]
        if origin_slot >= len(outputs) or target_slot >= len(inputs):
            problems.append(f"{where}: slot out of range")
            continue
        if link_id not in (outputs[origin_slot].get("links") or []) or inputs[target_slot].get("link") != link_id:
            problems.append(f"{where}: not recorded on both of its nodes")
        if not (_compatible(outputs[origin_slot]["type"], kind) and _compatible(kind, inputs[target_slot]["type"])):
            problems.append(f"{where}: {outputs[origin_slot]['type']} → {inputs[target_slot]['type']} (link says {kind})")
    for node in workflow["nodes"]:
        for slot in node["inputs"]:
            if slot.get("link") is not None and slot["link"] not in links:
                problems.append(f"node {node['id']}: input {slot['name']} names missing link {slot['link']}")
    if problems:
        raise WorkflowError("\n".join(problems))


def to_prompt(workflow: dict, classes: dict[str, type]) -> dict[str, dict]:
    """The API prompt the frontend queues: {id: {class_type, inputs}}, linked inputs as [origin id, slot]."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        layout = widget_layout(classes[node["type"]])
        values = {name: value for (name, role), value in zip(layout, node.get("widgets_values", [])) if role == "value"}
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                values[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": values}
    return prompt


def validate_prompt(prompt: dict[str, dict], classes: dict[str, type]) -> None:
    """ComfyUI's queue-time validation: every widget value in range/options, every link to an output of the right type."""
    problems = []
    for node_id, entry in prompt.items():
        node_class = classes[entry["class_type"]]
        for item in inputs_of(node_class):
            value = entry["inputs"].get(item.name)
            if value is None:
                if not item.optional:
                    problems.append(f"{node_id}: missing {item.name}")
            elif isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                origin = classes[prompt[value[0]]["class_type"]]
                if not _compatible(origin.RETURN_TYPES[value[1]], item.socket_type):
                    problems.append(f"{node_id}: {item.name} gets {origin.RETURN_TYPES[value[1]]}")
            elif item.is_widget:
                reason = value_problem(item, value)
                if reason:
                    problems.append(f"{node_id}: {item.name}: {reason}")
    if problems:
        raise WorkflowError("\n".join(problems))


def _call(node_class, arguments: dict[str, list]) -> list[list]:
    """Run one node over its input lists as ComfyUI does; each output becomes a list of items."""
    instance = node_class()
    function = getattr(instance, node_class.FUNCTION)
    if getattr(node_class, "INPUT_IS_LIST", False):
        calls = [arguments]
    else:
        count = max((len(values) for values in arguments.values()), default=1)
        calls = [{name: values[min(i, len(values) - 1)] for name, values in arguments.items()} for i in range(count)]
    list_outputs = getattr(node_class, "OUTPUT_IS_LIST", (False,) * len(node_class.RETURN_TYPES))
    outputs: list[list] = [[] for _ in node_class.RETURN_TYPES]
    for call in calls:
        result = function(**call)
        if isinstance(result, dict):
            result = result.get("result", ())
        for position, value in enumerate(result):
            outputs[position].extend(value if list_outputs[position] else [value])
    return outputs


def execute(prompt: dict[str, dict], classes: dict[str, type]) -> dict[str, list[list]]:
    """Run every node that leads to an output node, upstream first; returns each executed node's outputs."""
    results: dict[str, list[list]] = {}

    def evaluate(node_id: str) -> list[list]:
        if node_id not in results:
            entry = prompt[node_id]
            arguments = {}
            for name, value in entry["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    arguments[name] = evaluate(value[0])[value[1]]
                else:
                    arguments[name] = [value]
            results[node_id] = _call(classes[entry["class_type"]], arguments)
        return results[node_id]

    with torch.inference_mode():  # as ComfyUI's executor runs every prompt
        for node_id, entry in prompt.items():
            if getattr(classes[entry["class_type"]], "OUTPUT_NODE", False):
                evaluate(node_id)
    return results
