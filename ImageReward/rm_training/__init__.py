"""Reward-model training: ImageRewardDB reader, grouped data and pairs, model init/freezing, trainer, export.

The pipeline of the original ``train/`` folder, on accelerate::

    groups (JSON {id, prompt, generations, ranking})  ->  pairs (better, worse)  ->  PairDataset (decoded in
    DataLoader workers)  ->  ImageReward (BLIP init, fix_rate freezing)  ->  -log sigmoid(r_better - r_worse)
    ->  best-by-validation  ->  export (safetensors folder + .pt, mean/std on a reference set)

>>> from ImageReward.rm_training.config import load_config          # doctest: +SKIP
>>> from ImageReward.rm_training.trainer import train_reward_model  # doctest: +SKIP
>>> result = train_reward_model(load_config("train/src/config/config.yaml"))  # doctest: +SKIP

Submodules are imported on demand; importing this package pulls in neither accelerate nor pyarrow.
"""
