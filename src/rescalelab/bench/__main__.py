"""``python -m rescalelab.bench``: the ``rescalelab-bench`` command."""

from rescalelab.bench.cli import main

main()
