"""Baseline scorers (CLIP, BLIP, Aesthetic) register themselves with the factory here.

(Filled in by the baselines work; importing this module must stay cheap.)
"""
