"""Models. Each takes ``input_shape`` and ``num_classes`` from the data and a norm plug.

Their layer geometry (share, fanin) is ``rescalelab.geometry``, shared with the plugs and the
optimizer.
"""

from rescalelab.models.alexnet import AlexNet
from rescalelab.models.linear import LinearModel
from rescalelab.models.resnet import ResNet20
from rescalelab.models.small_cnn import LeNet, SmallCNN

__all__ = ["AlexNet", "LeNet", "LinearModel", "ResNet20", "SmallCNN"]
