"""ImageReward custom nodes for ComfyUI.

Install: ``<ComfyUI python> -m pip install --no-deps <path to this project>`` (the ``ImageReward`` library),
then copy or symlink this folder into ``ComfyUI/custom_nodes/`` (any folder name) and restart ComfyUI. The nodes
appear under the "ImageReward" category; ``example_workflows/`` holds workflows that run as they are (ComfyUI
lists them under Workflow > Browse Templates). They import the *installed* ``ImageReward`` package, never
project paths. Importing registers ``ComfyUI/models/image_reward`` as the folder for scorer weights.
"""

from .image_reward_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folder

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
