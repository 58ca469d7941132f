"""Networks: the architectures (a registry), running a model for logits or features, BatchNorm
recalibration. Pure code."""
