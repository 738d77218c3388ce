"""convify: turn a CNN classifier into an exact fully-convolutional network that gives class score maps.

>>> fcn = convify.convert(torchvision.models.vgg16(), input_size=224)
>>> fcn(torch.randn(1, 3, 384, 384)).shape
torch.Size([1, 1000, 6, 6])
"""
from .batch import Failure, heatmaps
from .convert import convert
from .engine import HeatmapResult, Prediction, heatmap, load_image
from .errors import (ConversionError, ConvifyError, ImageError, LimitError, MapStoreError, ModelLoadError,
                     OutputError, OutputExistsError)
from .fcn import FullyConvNet, ModelMeta, load
from .geometry import Geometry
from .large import large_heatmap

__all__ = ["convert", "load", "heatmap", "heatmaps", "Failure", "HeatmapResult", "Prediction", "load_image", "FullyConvNet", "Geometry", "ModelMeta", "ConvifyError", "ConversionError",
           "ModelLoadError", "OutputExistsError", "ImageError", "LimitError", "OutputError", "MapStoreError", "large_heatmap"]
__version__ = "0.1.0"
