"""An example rescalelab plugin: ``model=tiny_mlp`` and ``optim=sign_sgd``."""

from rescalelab_example_plugin.models import TinyMLP
from rescalelab_example_plugin.optim import SignSGD

__all__ = ["SignSGD", "TinyMLP"]
