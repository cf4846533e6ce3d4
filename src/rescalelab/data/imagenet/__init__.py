"""``data=imagenet_subset``: a deterministic, stratified subset of an ImageNet-style image folder.

**Layout.** ``data.root`` holds ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (torchvision's
ImageFolder layout; ILSVRC-2012's flat ``val/`` must first be sorted into class folders).

The package follows the path of an image:

* :mod:`.subset` — which images: ``data.classes`` or ``data.num_classes`` drawn from the seed,
  and ⌊f·n_c + ½⌋ (at least 1) of the n_c images of every class c, f = ``data.fraction`` in
  train/ and ``data.val_fraction`` in val/ (``fraction=0.1`` over the 1000 classes is the
  lecture's "10 % of ImageNet"); the exact list is the artifact ``subset_files.tsv`` and its
  sha256 the param ``data.subset_hash``.
* :mod:`.files` — the pixels: every image decoded once the same way (RGB, shorter side resized
  to S = ``data.resize_size``, centre square S×S, uint8), the file check (``data.check``,
  ``data.skip_corrupt``) and the raw-folder ``Dataset``;
* :mod:`.pool` — the chunks of that work over a process pool, with a progress bar;
* :mod:`.cache` — the decoded cache (``data.cache``): built once and resumably, refused when
  built for another request, memory-mapped by runs;
* :mod:`.datamodule` — :class:`ImageNetSubset`, which serves the cache as
  :class:`~rescalelab.data.tensor_batches.TensorBatches` or decodes the folder with DataLoader
  workers, then crops, flips and normalizes whole batches on the device;
* :mod:`.prepare` — ``rescalelab-prepare-imagenet``, which builds the cache.
"""

from rescalelab.data.imagenet.cache import CacheSpec, build_cache, open_cache
from rescalelab.data.imagenet.datamodule import ImageNetSubset, default_resize
from rescalelab.data.imagenet.files import check_files, decode_image
from rescalelab.data.imagenet.subset import Subset, keep_count, select_subset

__all__ = [
    "CacheSpec",
    "ImageNetSubset",
    "Subset",
    "build_cache",
    "check_files",
    "decode_image",
    "default_resize",
    "keep_count",
    "open_cache",
    "select_subset",
]
