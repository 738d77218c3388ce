"""Text from files, made safe to print on one line of a terminal report.

Architecture names, class names, layer names and file names come from files that strangers write. Printed
raw, a newline in a class name forges a report line (``"\\nCheck: equals the original"``), an ANSI escape
recolours or erases the terminal, and a right-to-left override reorders what is shown. :func:`printable`
escapes all of them the way Python's ``repr`` does.
"""
from __future__ import annotations

import unicodedata

__all__ = ["printable", "one_line"]

# Control characters (C0, DEL, C1), format characters (bidi overrides, zero-width), line and paragraph
# separators, and lone surrogates (undecodable bytes of a file name).
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def printable(value: object, limit: int = 300) -> str:
    """``str(value)`` with every control or format character escaped (``\\n``, ``\\x1b``, ``\\u202e``), cut
    to ``limit`` characters (``...`` marks the cut).

    Examples::

        >>> printable("cat\\n\\x1b[31mCheck: forged")
        'cat\\\\n\\\\x1b[31mCheck: forged'
    """
    text = str(value)
    out = []
    length = 0
    for ch in text:
        if unicodedata.category(ch) in _ESCAPED_CATEGORIES:
            piece = ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        else:
            piece = ch
        out.append(piece)
        length += len(piece)
        if length > limit:
            break
    shown = "".join(out)
    return shown if len(shown) <= limit else shown[: max(0, limit - 3)] + "..."


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception as one short line: its first line, or its type when it has no message (not escaped: print
    it with :func:`printable`)."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
