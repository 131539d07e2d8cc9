"""How much room the frontend (LiteGraph) gives a node, to check that no shipped node covers another's widgets.

LiteGraph draws a node's title bar (30 px) above `pos` and grows a node to fit its rows: one 20-px row per socket
(the larger of inputs and outputs), 24 px per widget (+ 4 spacing), more for a multiline text box.
"""
from __future__ import annotations

import re

from ..pack import ROOT
from .executor import inputs_of, widget_layout

TITLE, SLOT, WIDGET, MULTILINE, MARGIN = 30, 20, 24, 80, 16
#: Nodes our web extension gives an extra multiline info box (INFO_NODES in web/colorflow.js).
INFO_NODES = set(re.findall(r'"(\w+)"', re.search(r"INFO_NODES = new Set\(\[(.*?)\]", (ROOT / "web" / "colorflow.js").read_text())[1]))


def min_height(node_class) -> int:
    """The body height the frontend grows this node to, at least."""
    items = inputs_of(node_class)
    sockets = max(sum(not i.is_widget for i in items), len(node_class.RETURN_TYPES), 1)
    multiline = sum(1 for i in items if i.is_widget and i.options.get("multiline")) + (node_class.__name__ in INFO_NODES)
    return sockets * SLOT + len(widget_layout(node_class)) * WIDGET + multiline * MULTILINE + MARGIN


def box(node: dict, classes: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node as drawn: title bar included, body grown to its minimum height."""
    (x, y), (w, h) = node["pos"], node["size"]
    if node["type"] in classes:
        h = max(h, min_height(classes[node["type"]]))
    return x, y - TITLE, x + w, y + h


def overlaps(workflow: dict, classes: dict) -> list[str]:
    """Pairs of nodes whose drawn boxes intersect."""
    boxes = [(node["id"], node["type"], box(node, classes)) for node in workflow["nodes"]]
    found = []
    for i, (id_a, type_a, a) in enumerate(boxes):
        for id_b, type_b, b in boxes[i + 1 :]:
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                found.append(f"{id_a} {type_a} and {id_b} {type_b}")
    return found
