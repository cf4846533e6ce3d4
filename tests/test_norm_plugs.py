"""The plug interface: a Protocol any object can meet, the geometry computed once and handed to
the plugs, and no import cycle between ``rescalelab.models`` and ``rescalelab.norm``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from rescalelab.geometry import LayerGeometry, layer_geometry
from rescalelab.models import SmallCNN
from rescalelab.norm import BnWarmup, NoNorm, NormPlug, Whitening
from tests.helpers import cli_env

SHAPE = (3, 32, 32)


class Forbidden(nn.Module):
    """A network whose forward pass must not run (prepare gets its geometry instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("prepare ran a forward pass")


@pytest.mark.parametrize("make", [Whitening, lambda: BnWarmup(warmup_epochs=0)])
def test_prepare_takes_beta2_from_the_given_geometry_without_a_forward(make):
    model = Forbidden()
    geometry = {"conv": LayerGeometry("conv", 30 * 30, 27), "fc": LayerGeometry("fc", 1, 4)}
    make().prepare(model, geometry)
    assert float(model.conv.rescale_beta2) == pytest.approx((30 * 30 * 27) ** -0.5)
    assert float(model.fc.rescale_beta2) == pytest.approx(4**-0.5)


def test_bn_warmup_whitens_the_folded_layers_with_the_geometry_of_the_bn_network():
    torch.manual_seed(0)
    plug = BnWarmup(warmup_epochs=1, init_batches=1)
    model = SmallCNN(SHAPE, 10, plug)
    geometry = layer_geometry(model, SHAPE)
    plug.prepare(model, geometry)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    plug.switch_model(model, [(x, y)])
    for name, layer in model.named_modules():
        if name in geometry:
            assert float(layer.rescale_beta2) == pytest.approx(geometry[name].scale)
    assert geometry == layer_geometry(model, SHAPE)  # folding kept share and fanin


def test_any_object_with_the_members_is_a_plug():
    class Duck:  # no base class: the models only rely on the Protocol's members
        name, switched_at_step = "duck", None

        def conv(self, channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels)

        def linear(self, features: int) -> nn.Module:
            return nn.Identity()

    model = SmallCNN(SHAPE, 10, Duck())  # type: ignore[arg-type]
    assert isinstance(model.features[1], nn.BatchNorm2d)
    assert isinstance(NoNorm(), NormPlug) and isinstance(Whitening(), NormPlug)
    assert (
        NoNorm().callbacks() == [] and type(BnWarmup().callbacks()[0]).__name__ == "BnWarmupSwitch"
    )


def test_geometry_and_norm_import_without_the_models():
    code = (
        "import sys\n"
        "import rescalelab.geometry\n"
        "assert not [m for m in sys.modules if m.startswith(('rescalelab.models', 'rescalelab.norm'))]\n"
        "import rescalelab.norm\n"
        "assert not [m for m in sys.modules if m.startswith('rescalelab.models')], 'norm -> models'\n"
        "import rescalelab.models\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
