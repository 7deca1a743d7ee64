"""Human-preference data, shared by evaluation (``ImageReward/eval``) and reward-model training
(``ImageReward/rm_training``), which both import it (and never each other's data code):

* :mod:`.groups`: the grouped format ``{id, prompt, generations, ranking}``, its one validator
  (:func:`~.groups.validate_groups`), JSON read/write, and the non-tie pairs a ranking defines;
* :mod:`.imagerewarddb`: the ImageRewardDB reader (parquet metadata + image archives from the Hub) and its
  conversion to the grouped format (needs ``pyarrow``, imported when a parquet file is read);
* :mod:`.archives`: the one safe zip extractor.

Image file extensions for folder listings are :data:`ImageReward.image_io.IMAGE_EXTENSIONS`.
"""
