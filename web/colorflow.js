// ColorFlow frontend extension: a version badge on every ColorFlow node, and the pool / retrieval
// summary (sent by the Python node as ui.colorflow_info) shown in a read-only box on the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

// Kept equal to [project].version in pyproject.toml (tests/nodes/test_web.py checks it).
const VERSION = "0.1.0";
const INFO_WIDGET = "colorflow_info";
const INFO_NODES = new Set(["ColorFlowReferencePool", "ColorFlowStitchCanvas"]);

function addInfoWidget(node) {
  const widget = ComfyWidgets.STRING(node, INFO_WIDGET, ["STRING", { multiline: true }], app).widget;
  widget.element.readOnly = true;
  widget.element.placeholder = "runs show the pool / retrieval summary here";
  widget.serialize = false; // not part of the saved workflow's widgets_values
  widget.options.serialize = false; // not sent with the prompt
}

function showInfo(node, message) {
  const widget = node.widgets?.find((w) => w.name === INFO_WIDGET);
  if (widget && Array.isArray(message?.colorflow_info)) {
    widget.value = message.colorflow_info.join("\n");
  }
}

app.registerExtension({
  name: "ColorFlow.NodeInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!INFO_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      addInfoWidget(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      showInfo(this, message);
    };
  },
  nodeCreated(node) {
    if (!node.comfyClass?.startsWith("ColorFlow") || !window.LGraphBadge || !Array.isArray(node.badges)) return;
    node.badges.push(new window.LGraphBadge({ text: `v${VERSION}`, fgColor: "#ffffff", bgColor: "#7a4fbf" }));
  },
});
