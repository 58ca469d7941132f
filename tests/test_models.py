import pytest
import torch

from pipeline.nn.models import ARCHITECTURES, build


@pytest.mark.parametrize("arch,channels,size", [("small_cnn", 1, 8), ("small_cnn", 3, 32), ("resnet18_cifar", 3, 32)])
def test_forward_and_features(arch, channels, size):
    model = build(arch, channels, 10, 8)
    x = torch.randn(4, channels, size, size)
    feats = model.features(x)
    assert feats.shape == (4, model.feature_dim)
    assert model(x).shape == (4, 10)
    assert torch.allclose(model.classifier(feats), model(x))


def test_every_architecture_is_buildable():
    for name in ARCHITECTURES.names():
        assert sum(p.numel() for p in build(name, 3, 5, 8).parameters()) > 0


def test_resnet18_at_width_64_has_the_standard_size():
    n = sum(p.numel() for p in build("resnet18_cifar", 3, 10, 64).parameters())
    assert 11.1e6 < n < 11.2e6  # ResNet-18 for CIFAR-10: about 11.17M parameters
