#!/usr/bin/env python
"""Decode an ImageNet subset once into a cache for ``data=imagenet_subset data.cache=...``.

Takes the same overrides as ``rescalelab-train`` (it is ``rescalelab-prepare-imagenet``)::

    python scripts/prepare_imagenet_subset.py data.root=/data/imagenet \\
        data.cache=/data/cache/in10-224 data.fraction=0.1 data.num_workers=16
"""

import sys

from rescalelab.data.imagenet.prepare import main

if __name__ == "__main__":
    sys.exit(main())
