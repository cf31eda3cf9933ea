"""esem.safe_text: untrusted text prints as one line that means what it shows."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from esem.safe_text import printable, printable_bytes


def test_plain_names_are_unchanged() -> None:
    assert printable("/jobs-1.queue") == "/jobs-1.queue"
    assert printable("/café") == "/café"


def test_newline_and_escape_sequences_are_escaped() -> None:
    forged = "/x\n2026-12-01 INFO session 1 start uid=0"
    assert printable(forged) == "/x\\n2026-12-01 INFO session 1 start uid=0"
    assert printable("/\x1b[2J\x1b]0;owned\x07") == "/\\x1b[2J\\x1b]0;owned\\x07"
    assert printable("/a\u202eb") == "/a\\u202eb"  # right-to-left override
    assert printable("\\n") == "\\\\n"  # a literal backslash cannot fake an escape


def test_limit_cuts_with_an_ellipsis() -> None:
    assert printable("/" + "a" * 100, limit=10) == "/aaaaaa..."


def test_undecodable_bytes() -> None:
    assert printable_bytes(b"/a\xff\n") == "/a\\xff\\n"


@given(st.text())
def test_output_is_one_printable_line(text: str) -> None:
    out = printable(text)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out
    assert all(ch == " " or ch.isprintable() for ch in out)
