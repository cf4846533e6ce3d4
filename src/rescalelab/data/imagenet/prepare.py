"""``rescalelab-prepare-imagenet``: decode an ImageNet subset once into ``data.cache``.

It composes ``data=imagenet_subset`` with the same overrides a training run takes (and checks
them the same way: the rules, then :class:`ImageNetSubset`'s own key checks), so the cache is
exactly what the run will ask for; then :meth:`ImageNetSubset.prepare_cache` builds or
finishes it. ``python -m rescalelab.data.imagenet.prepare`` is the same command.
"""

from __future__ import annotations

import os
import sys

from rescalelab.data.imagenet.cache import read_manifest
from rescalelab.data.imagenet.datamodule import ImageNetSubset
from rescalelab.errors import ConfigError

USAGE = """usage: rescalelab-prepare-imagenet [data.KEY=VALUE ...] [seed=N]

Decode a subset of an ImageNet-style folder once into data.cache, for data=imagenet_subset.
Takes the same overrides as rescalelab-train, e.g.

  rescalelab-prepare-imagenet data.root=/data/imagenet data.cache=/data/cache/in10 \\
      data.fraction=0.1 data.image_size=224 data.num_workers=16

Interrupted builds resume when rerun; a folder built for another subset is refused.
"""


def main(argv: list[str] | None = None) -> int:
    """Compose ``data=imagenet_subset`` with the given overrides and build its cache."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from hydra.utils import instantiate

    from rescalelab.resolvers import composing
    from rescalelab.validate import check_targets, validate

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    cwd = os.getcwd()  # paths.* as the trainer would set them (nothing is written there)
    overrides = ["data=imagenet_subset", f"paths.root={cwd}", f"paths.output_dir={cwd}", *args]
    try:
        with composing(), initialize_config_module("rescalelab.conf", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        validate(cfg)
        check_targets(cfg)  # ImageNetSubset's own key checks, before it is built
        dm: ImageNetSubset = instantiate(cfg.data)
        counts = dm.prepare_cache()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except HydraException as e:
        cause = e.__cause__
        msg = str(cause) if isinstance(cause, ConfigError) else str(e).strip().splitlines()[-1]
        print(f"error: {msg}", file=sys.stderr)
        return 2
    manifest = read_manifest(dm.cache)  # type: ignore[arg-type]
    assert manifest is not None
    print(
        f"cache {dm.cache}: {manifest['counts']['train']} train + {manifest['counts']['val']} "
        f"val images of {len(manifest['classes'])} classes at {dm.resize_size}px, subset "
        f"{manifest['subset_hash']} ({counts['decoded']} decoded now, {counts['reused']} "
        f"reused, {len(manifest['skipped'])} skipped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
