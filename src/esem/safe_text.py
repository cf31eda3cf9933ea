"""Untrusted text made safe to print: for logs and terminals.

Semaphore names, refusal messages and peer-supplied strings come from other tenants.
Printed raw, a newline in a name forges whole log lines and an escape sequence rewrites
an operator's terminal. ``printable`` keeps every ordinary character (UTF-8 names stay
readable) and writes every control or formatting character as a backslash escape, so
the printed text is one line and means exactly what it shows.
"""

from __future__ import annotations

import unicodedata

# Unicode categories that print nothing visible or move the cursor: controls (C0, C1,
# DEL), format characters (bidirectional overrides, zero-width joiners), separators
# other than the plain space, surrogates, private use and unassigned code points.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(ch: str) -> bool:
    if ch == " ":
        return False
    if ch in _NAMED:
        return True
    return unicodedata.category(ch) in _UNSAFE_CATEGORIES or (
        unicodedata.category(ch) == "Zs"  # odd spaces (NBSP, ...) that can hide text
    )


def printable(text: str, *, limit: int | None = None) -> str:
    """``text`` with every control, format or odd-space character (and the backslash)
    backslash-escaped; cut to ``limit`` characters of output (with ``...``) if given."""
    if text.isprintable() and "\\" not in text and text.isascii():
        out = text  # the common case: plain ASCII names, nothing to do
    else:
        out = "".join(_escape(ch) if _unsafe(ch) else ch for ch in text)
    if limit is not None and len(out) > limit:
        out = out[: max(limit - 3, 0)] + "..."
    return out


def printable_bytes(raw: bytes, *, limit: int | None = None) -> str:
    """``printable`` for bytes that may not be UTF-8 (invalid bytes become ``\\xNN``)."""
    return printable(raw.decode("utf-8", "surrogateescape"), limit=limit)
