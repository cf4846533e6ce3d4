"""Datasets. Each ``conf/data/<name>.yaml`` names one class here by ``_target_``."""

from rescalelab.data.base import TensorDataModule
from rescalelab.data.cifar10 import CIFAR10
from rescalelab.data.convex import LogisticData, QuadraticData
from rescalelab.data.digits import Digits
from rescalelab.data.imagenet import ImageNetSubset
from rescalelab.data.synthetic import SyntheticImages
from rescalelab.data.tensor_batches import TensorBatches

__all__ = [
    "CIFAR10",
    "Digits",
    "ImageNetSubset",
    "LogisticData",
    "QuadraticData",
    "SyntheticImages",
    "TensorBatches",
    "TensorDataModule",
]
