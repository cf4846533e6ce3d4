"""``python -m rescalelab.data.imagenet``: ``rescalelab-prepare-imagenet``."""

import sys

from rescalelab.data.imagenet.prepare import main

sys.exit(main())
