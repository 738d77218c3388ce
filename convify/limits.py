"""Every bound convify puts on what a file, an image or an option may ask for, in one place.

Strangers' files and command lines must not make convify allocate without a bound. Each limit is a
constant here, documented with why its default is what it is; the functions that enforce them take an
argument of the same name where a user may need more (``max_pixels=``, ``--max-pixels``), and the error
says which. Exceeding one raises :class:`~convify.errors.LimitError`.
"""
from __future__ import annotations

__all__ = [
    "MAX_PARAMETERS", "MAX_CLASSES", "MAX_INPUT_SIZE", "MAX_IMAGE_PIXELS", "MAX_PIXELS", "MAX_SIDE",
    "MAX_HEADER_BYTES", "MAX_GRAPH_NODES", "MAX_TENSORS", "MAX_PICKLE_BYTES", "MAX_MODULE_DEPTH",
    "MAX_GRID_PANELS", "DEFAULT_MAX_MEMORY", "MAX_REGION_SOURCE_PIXELS", "MAX_TIFF_CHUNK_PIXELS",
    "MAX_STORE_BYTES", "MAX_ACTIVATION_RATIO", "MIN_ACTIVATION_BYTES", "MAX_PIECES",
]

# Weights in one model, counted as elements. The largest CNNs in torchvision and timm have under 10**9
# (timm's convnext_xxlarge: 0.85e9); 2e9 float32 weights are 8 GB.
MAX_PARAMETERS = 2_000_000_000
# Outputs of a classifier: ImageNet-22k has 21,843 classes, the largest common label sets under 100,000.
MAX_CLASSES = 100_000
# Native (training) input size of a model, in pixels; the largest timm CNN is trained at 800 px.
MAX_INPUT_SIZE = 4096
# Pixels Pillow may decode from one image file (its own default warns at 89 MP; convify refuses at this).
MAX_IMAGE_PIXELS = 200_000_000
# Pixels the network runs on in one whole-image pass, after the size policy: 40 MP is a 7700x5200 photo at
# full resolution; VGG16 needs about 770 bytes per input pixel, so this is ~30 GB for the largest network.
MAX_PIXELS = 40_000_000
# Longest side of the network's input after the size policy (an extreme aspect ratio must not explode).
MAX_SIDE = 16_384
# A converted file's JSON header (graph, geometry, metadata, class names).
MAX_HEADER_BYTES = 64 * 1024 * 1024
# Nodes in a converted file's graph (the largest timm CNNs trace to under 10,000).
MAX_GRAPH_NODES = 100_000
# Tensors in one checkpoint or converted file.
MAX_TENSORS = 100_000
# The pickle in a checkpoint (a torch.save zip's data.pkl, or the object pickle of the pre-1.6 format):
# the structure, not the weights. timm's largest CNNs pickle as whole models to a few MB; unpickling can
# take ~10x the pickle's size in memory.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# How deep the layers of a pickled whole model nest: torchvision and timm models are under 10 deep, and
# a much deeper one would hit Python's recursion limit in every walk over its layers.
MAX_MODULE_DEPTH = 100
# Overlays drawn side by side in one top-k grid image: each is the size of the photo, so ``--top-k 1000``
# must not ask for a thousand of them (the printed list and the JSON summary still take all k).
MAX_GRID_PANELS = 16
# Multi-scale fusion (heatmap(scales=)): how many scales, and the largest factor of the size (each scale is a
# full forward pass; MAX_PIXELS still bounds each one).
MAX_SCALES = 8
MAX_SCALE = 4.0
# Default memory budget for one forward pass's tensors (``max_memory=``, ``--max-memory``): larger images
# are cut into exact tiles that fit it (see convify.tiling).
DEFAULT_MAX_MEMORY = 2 * 1024 ** 3
# A streamed image (convify.stream) is read in strips of a few dozen rows; a tiled TIFF decodes whole tiles
# (typically 256-1024 rows), so each strip would decode its tile row again. Reads are made this many rows
# tall at least (within READ_AHEAD_BYTES of decoded pixels) and the strips served from them: every tile is
# decoded once per band.
READ_AHEAD_ROWS = 512
READ_AHEAD_BYTES = 64 * 1024 ** 2
# Pixels at full resolution of an image read region by region (a TIFF or a whole-slide image, see
# convify.sources): nothing is decoded whole, but the tiler's plans and maps grow with it. The largest slides
# scanned today are about 200,000 x 100,000 px (2e10); a 300k x 300k one is 9e10.
MAX_REGION_SOURCE_PIXELS = 100_000_000_000
# Pixels in one tile or strip of a TIFF read region by region: one read decodes whole tiles, so a crafted
# 100,000 x 100,000 tile would make a 1-pixel read decode 30 GB. 8192 x 8192 (64 MP, 256 MB as 16-bit RGBA);
# real tiles are 256-1024 px square, strips a few rows of the width.
MAX_TIFF_CHUNK_PIXELS = 8192 * 8192
# A score-map store (convify.mapstore), counted before compression: what it would take on disk at worst and
# what reading one of its arrays whole may allocate. The default arrays cost ~50 bytes per cell (top-5 classes,
# two kept classes), so this holds maps of 300 million cells (17,000 x 17,000); all classes of a 1000-class
# network at 3000 x 3000 cells are 36 GB and need a deliberate ``max_bytes=``.
MAX_STORE_BYTES = 16 * 1024**3
# What a converted file's graph may hold at once while it runs, as a multiple of the input's bytes: the
# tensors alive at any step (each storage once), and each tensor's own size (views included, so an
# expanded view cannot make a later step loop over 10**12 elements). Checked on the ``meta`` device before
# the real run. torchvision's CNNs peak under 50x (VGG16's first block: 43x; ResNet-50 11x); a graph from a
# stranger's file asking for more (``x.expand(40000, ...).contiguous()``, a pad of 20,000 px) is refused.
MAX_ACTIVATION_RATIO = 400
# ...but never less than this many bytes, so small inputs are not held to a tiny absolute bound.
MIN_ACTIVATION_BYTES = 256 * 1024 * 1024
# Tensors one operation of a converted file's graph may return (``x.split(1)`` on a 10**7-long view).
MAX_PIECES = 10_000
# Images `convify bench --images/--folder` times: it holds every one prepared in memory (about 3.5 MB each at
# the default size of a 224 px model) to time the bare forward on them.
MAX_BENCH_IMAGES = 512
