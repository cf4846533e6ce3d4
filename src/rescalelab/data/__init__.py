"""Datasets. Each ``conf/data/<name>.yaml`` names one class here by ``_target_``."""

from rescalelab.data.base import TensorDataModule
from rescalelab.data.synthetic import SyntheticImages
from rescalelab.data.tensor_batches import TensorBatches

__all__ = ["SyntheticImages", "TensorBatches", "TensorDataModule"]
