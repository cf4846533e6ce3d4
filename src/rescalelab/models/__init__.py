"""Models. Each takes ``input_shape`` and ``num_classes`` from the data and a norm plug."""

from rescalelab.models.alexnet import AlexNet
from rescalelab.models.geometry import LayerGeometry, layer_geometry, rescalable_layers
from rescalelab.models.linear import LinearModel
from rescalelab.models.resnet import ResNet20
from rescalelab.models.small_cnn import LeNet, SmallCNN

__all__ = [
    "AlexNet",
    "LayerGeometry",
    "LeNet",
    "LinearModel",
    "ResNet20",
    "SmallCNN",
    "layer_geometry",
    "rescalable_layers",
]
