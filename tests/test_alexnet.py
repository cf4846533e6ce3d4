"""model=alexnet: torchvision's network exactly at 224x224, the norm plug, small inputs."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn
from torchvision.models import alexnet as tv_alexnet

from rescalelab.errors import ConfigError
from rescalelab.geometry import layer_geometry, rescalable_layers
from rescalelab.models import AlexNet
from rescalelab.norm import BatchNorm, NoNorm
from rescalelab.validate import check_num_classes


def _copy_torchvision_weights(ours: AlexNet, theirs: nn.Module) -> None:
    mine = [m for _, m in rescalable_layers(ours)]
    tv = [m for m in theirs.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [type(m) for m in mine] == [type(m) for m in tv]
    for a, b in zip(mine, tv, strict=True):
        assert a.weight.shape == b.weight.shape and a.bias.shape == b.bias.shape
        a.weight.data.copy_(b.weight.data)
        a.bias.data.copy_(b.bias.data)


@pytest.mark.parametrize("size", [224, 64])
def test_same_function_as_torchvision_alexnet(size):
    torch.manual_seed(0)
    theirs = tv_alexnet(num_classes=7).eval()
    ours = AlexNet((3, size, size), 7, NoNorm()).eval()
    _copy_torchvision_weights(ours, theirs)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_geometry_at_224_is_the_paper_s():
    geo = layer_geometry(AlexNet((3, 224, 224), 1000), (3, 224, 224))
    convs = [g for g in geo.values() if g.share > 1]
    assert [g.share for g in convs] == [55 * 55, 27 * 27, 13 * 13, 13 * 13, 13 * 13]
    assert [g.fanin for g in convs] == [3 * 121, 64 * 25, 192 * 9, 384 * 9, 256 * 9]
    assert [g.fanin for g in geo.values() if g.share == 1] == [9216, 4096, 4096]


def test_norm_plug_follows_every_hidden_layer_but_not_the_output():
    model = AlexNet((3, 64, 64), 5, BatchNorm(), dropout=0.3)
    mods = list(model.modules())
    hidden = [
        i for i, m in enumerate(mods)
        if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and m.out_features != 5)
    ]  # fmt: skip
    assert len(hidden) == 7
    for i in hidden:  # module order: Conv/Linear, then its norm, then ReLU
        assert isinstance(mods[i + 1], (nn.BatchNorm2d, nn.BatchNorm1d)), mods[i]
        assert isinstance(mods[i + 2], nn.ReLU)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in mods) == 5
    assert sum(isinstance(m, nn.BatchNorm1d) for m in mods) == 2
    assert isinstance(model.classifier[-1], nn.Linear) and model.classifier[-1].out_features == 5
    assert [m.p for m in mods if isinstance(m, nn.Dropout)] == [0.3, 0.3]


@pytest.mark.parametrize("size", [32, 16])
def test_small_inputs_run_through_the_adaptive_pooling(size):
    model = AlexNet((3, size, size), 10, BatchNorm())
    out = model(torch.randn(4, 3, size, size))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="at least 7x7"):
        AlexNet((3, 6, 6), 10)


def test_model_num_classes_override_must_match_the_data():
    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=["model=alexnet", "+model.num_classes=5",
                                          "paths.root=/tmp/x", "paths.output_dir=/tmp/x"])  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"model.num_classes=5 is invalid: the data \(.*\) has 10"
    ):
        check_num_classes(cfg, 10)
    check_num_classes(cfg, 5)
