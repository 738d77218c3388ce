"""The exceptions convify raises. Each message is one line that says what went wrong and what to do."""


class ConvifyError(Exception):
    """Base class: anything convify refuses, with a message meant for the user."""


class ConversionError(ConvifyError):
    """The model cannot be made fully convolutional, or the result does not equal the original."""


class ModelLoadError(ConvifyError):
    """A model, architecture name, weights file or converted file cannot be loaded."""


class ImageError(ConvifyError):
    """An image cannot be read or used."""


class LimitError(ConvifyError):
    """A size, count or memory limit would be exceeded; the message names the limit and how to change it."""


class OutputError(ConvifyError):
    """An output cannot be written (unwritable or full location, or it would overwrite an input)."""


class OutputExistsError(OutputError):
    """An output file exists and overwriting was not asked for (use force=True / --force)."""


class MapStoreError(ConvifyError):
    """A score-map store cannot be written as asked, or a store on disk is not a valid convify map."""
