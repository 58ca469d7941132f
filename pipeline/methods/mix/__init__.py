"""Mixing for fine-tuning: input mixers (mixup, CutMix, ...), losses for mixed batches, and the
recipe that puts a mixer and a loss together for one model. MIXERS and MIX_LOSSES are the registries."""
from pipeline.methods.mix.losses import MIX_LOSSES
from pipeline.methods.mix.mixers import MIXERS
from pipeline.methods.mix.recipe import MixRecipe

__all__ = ["MIXERS", "MIX_LOSSES", "MixRecipe"]
