"""ReFL launcher with the original's name: ``python refl.py`` or ``accelerate launch refl.py [options]``.

Defaults are the original's (CompVis/stable-diffusion-v1-4, data/refl_data.json); every option is listed by
``python refl.py --help``. The logic lives in ``ImageReward.finetune``.
"""

from ImageReward.finetune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
