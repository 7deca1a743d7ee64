"""ImageReward custom nodes for ComfyUI.

Install: ``<ComfyUI python> -m pip install --no-deps <path to this project>`` (the ``ImageReward`` library),
then copy or symlink this folder into ``ComfyUI/custom_nodes/`` (any folder name) and restart ComfyUI. The nodes
appear under the "ImageReward" category; ``example_workflows/`` holds workflows that run as they are (ComfyUI
lists them under Workflow > Browse Templates). They import the *installed* ``ImageReward`` package, never
project paths. Importing registers ``ComfyUI/models/image_reward`` as the folder for scorer weights.
``WEB_DIRECTORY``: ComfyUI serves ``js/`` under ``/extensions/<folder name>/``; ``js/show_scores.js`` shows the
*show scores* node's text in the node (the frontend draws ``ui.text`` only for nodes it knows). The library
itself needs no JS.
"""

from .image_reward_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folder

register_model_folder()

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
