"""Pretraining objectives (supervised, contrastive, redundancy reduction), their pure losses
and the augmented views they train on. OBJECTIVES maps each method name to its builder."""
from pipeline.methods.pretrain.objectives import OBJECTIVES

__all__ = ["OBJECTIVES"]
