"""Model definitions: the compact BLIP and the scorers built on it."""
