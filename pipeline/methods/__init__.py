"""Method families, one package each (partition, pretrain, mix, merge), each with its registry.
Pure code: tensors and modules in, tensors and modules out."""
