#!/usr/bin/env python
"""Does the input pipeline keep up with training? (same as ``python -m rescalelab.bench.data``)."""

from rescalelab.bench.data import main

if __name__ == "__main__":
    main()
