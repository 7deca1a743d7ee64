// Shows the scores of "ImageReward: show scores" in the node itself: ComfyUI's frontend draws a node's
// `ui.text` only for the nodes it knows, so this extension (served from WEB_DIRECTORY) puts the text the node
// returns into a read-only multiline widget, as the frontend's own Preview Any does.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
  name: "ImageReward.ShowScores",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "ImageRewardShowScores") return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      const widget = ComfyWidgets.STRING(this, "scores_text", ["STRING", { multiline: true }], app).widget;
      widget.element.readOnly = true;
      widget.serialize = false; // display only: not part of the saved workflow's widget values
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === "scores_text");
      if (widget && message?.text) widget.value = message.text.join("\n");
    };
  },
});
