"""ImageReward custom nodes for ComfyUI.

Install: ``<ComfyUI python> -m pip install <path to this project>`` (the ``ImageReward`` library), then copy
or symlink this folder into ``ComfyUI/custom_nodes/`` (any folder name) and restart ComfyUI. The nodes appear
under the "ImageReward" category. They import the *installed* ``ImageReward`` package, never project paths.
"""

from .image_reward_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
