"""rescalelab: experiments on how neural networks are rescaled while they train."""

__version__ = "0.1.0"
