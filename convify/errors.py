"""The exceptions convify raises. Each message is one line that says what went wrong and what to do."""

from .text import one_line


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


def failure_line(error: BaseException) -> str:
    """Why something failed, as data (an image's :class:`convify.Failure` and table row; escaped, the CLI's
    ``Error:`` lines): a convify error's own message (whole: a stranger's file name in it may hold a newline,
    which printing escapes), out of memory, or an unexpected error's type and first line."""
    if isinstance(error, ConvifyError):
        return str(error)[:2000]
    if isinstance(error, MemoryError):
        return "out of memory (lower --size or --max-pixels)"
    text = str(error).strip()
    return f"unexpected {type(error).__name__}" + (f": {one_line(error)}" if text else "")
