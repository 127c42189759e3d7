"""Tensor names as text: what a name may contain, and how anything printed is escaped.

A name is a ``state_dict`` key that ends up in terminals (``prunekit inspect``),
logs and error messages, so it must be plain text:

* valid Unicode that UTF-8 can carry (no lone surrogates, which JSON would
  otherwise smuggle in as ``\\udc80`` escapes);
* no control characters: C0 (U+0000-U+001F), DEL (U+007F) and C1
  (U+0080-U+009F), which move the cursor, clear screens or forge table rows;
* no line or paragraph separators (U+2028, U+2029), which split lines in editors;
* no bidirectional formatting characters (U+061C, U+200E, U+200F,
  U+202A-U+202E, U+2066-U+2069), which reorder what is displayed so that one
  name can look like another ("Trojan Source").

Everything else (any script, emoji, zero-width joiners) is allowed. The writer
refuses other names with ``ValueError``, the reader with ``FormatError``.
Whatever is printed goes through :func:`escape` or :func:`show` anyway, so even
text that never passed this check (a path, a message of another library) prints
on one line without reaching the terminal as control codes.
"""

from __future__ import annotations

import re

__all__ = ["BAD_CHARACTERS", "problem", "escape", "show"]

BAD_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_LIMIT = 200  # characters of a name shown in a message; names may have 4096


def problem(name: str) -> str | None:
    """Why ``name`` is not acceptable text, or ``None`` when it is.

    Example:
        >>> problem("fc.weight") is None
        True
        >>> problem("fc\\x1b[2J.weight")
        'contains the control character U+001B'
    """
    found = BAD_CHARACTERS.search(name)
    if found is None:
        return None
    code = ord(found.group())
    if 0xD800 <= code <= 0xDFFF:
        return f"is not valid Unicode text (lone surrogate U+{code:04X})"
    kind = "bidirectional formatting" if code > 0x9F and code not in (0x2028, 0x2029) else "control"
    return f"contains the {kind} character U+{code:04X}"


def escape(text: str, limit: int = _LIMIT) -> str:
    """``text`` safe to print on one line, without quotes: non-printable characters and backslashes escaped.

    At most ``limit`` characters of ``text`` are shown; a longer text ends in ``...``.

    Example:
        >>> escape("fc.weight")
        'fc.weight'
        >>> print(escape("a\\nb\\u202ec"))
        a\\nb\\u202ec
    """
    cut = text[:limit]
    if not (cut.isprintable() and "\\" not in cut):
        cut = repr(cut)[1:-1]
    return cut + ("..." if len(text) > limit else "")


def show(text: str, limit: int = _LIMIT) -> str:
    """``text`` quoted for an error message, escaped as by :func:`escape`.

    Example:
        >>> show("fc.weight")
        "'fc.weight'"
        >>> print(show("x\\x1b[31m"))
        'x\\x1b[31m'
    """
    return f"'{escape(text, limit)}'"
