"""Run rescalelab's benchmark suite (same as the ``rescalelab-bench`` console script)."""

from rescalelab.bench.cli import main

if __name__ == "__main__":
    main()
