"""The one table renderer (``esem.tables``): plain, aligned text without ANSI codes off a
terminal, styled output on one, untrusted cells printed as the characters they are
(never as rich markup, never as raw escape sequences), and every command's table
printer going through it.
"""

from __future__ import annotations

import io
import re

import pytest

from esem.attack.base import Outcome
from esem.attack.runner import print_table as print_attack_table
from esem.bench.common import Table as BenchTable
from esem.cli import _table as cli_table
from esem.demo import _print_rows
from esem.tables import Table, print_table
from esem.vault.cli import _print_listing
from esem.vault.client import FileInfo
from esem.vault.workload import Row

ANSI = re.compile(r"\x1b\[")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_text_is_aligned_with_a_rule_and_no_trailing_spaces() -> None:
    t = Table("title", ["name", "value", "note"], [["a", "1", "x"], ["long-name", "12345", ""]],
              ["a note"], right=[1])
    lines = t.text().splitlines()
    assert lines == ["title",
                     "name       value  note",
                     "----------------------",
                     "a              1  x",
                     "long-name  12345",
                     "a note"]
    out = io.StringIO()
    t.print(out)  # not a terminal: exactly the plain text
    assert out.getvalue() == t.text() + "\n"


def test_untrusted_cells_print_as_their_characters() -> None:
    evil = "[bold red]x[/bold red]\x1b[2J\nforged line"
    out = io.StringIO()
    print_table(["NAME", "VALUE"], [[evil, "1"]], title=evil, notes=[evil], file=out)
    text = out.getvalue()
    assert not ANSI.search(text) and "\x1b" not in text
    assert "[bold red]x[/bold red]\\x1b[2J\\nforged line" in text  # markup kept literally
    assert len(text.splitlines()) == 5  # title, header, rule, row, note: nothing forged
    tty = _Tty()
    print_table(["NAME"], [[evil]], file=tty)
    assert "\x1b[2J" not in tty.getvalue() and "[bold red]x[/bold red]" in tty.getvalue()


def test_a_terminal_gets_bold_headers() -> None:
    tty = _Tty()
    Table("", ["NAME", "VALUE"], [["a", "1"]]).print(tty)
    assert "\x1b[1m" in tty.getvalue() and "NAME" in tty.getvalue()


def test_long_cells_wrap_inside_their_column() -> None:
    words = " ".join(["word"] * 40)
    lines = Table("", ["id", "evidence"], [["A1", words]], right=[], wrap={1: 30}).text()
    body = lines.splitlines()[2:]
    assert len(body) > 1 and all(len(line) <= len("id  ") + 30 for line in body)
    assert body[0].startswith("A1  word") and body[1].startswith("    word")


def test_rows_must_fit_the_header() -> None:
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        Table("", ["a", "b", "c"], [["1", "2"]])


def test_markdown_escapes_pipes_and_aligns_numbers() -> None:
    md = Table("t", ["case", "value"], [["a|b", "1.0"]]).markdown()
    assert md.splitlines() == ["### t", "", "| case | value |", "| --- | ---: |",
                               "| a\\|b | 1.0 |"]


def test_every_command_prints_through_the_renderer(capsys: pytest.CaptureFixture[str]) -> None:
    assert BenchTable is Table
    cli_table(("NAME", "VALUE"), [("/jobs\x1b[31m", "1")])
    _print_listing([FileInfo("report[b].pdf\n", 10, 0.0)])
    _print_rows([Row("esem", "none", 96, 96, 0, 0, 101.7)])
    print_attack_table([Outcome("A1 state tamper", "esem", "defended", "word " * 40)])
    out = capsys.readouterr().out
    assert not ANSI.search(out)
    assert "/jobs\\x1b[31m" in out and "report[b].pdf\\n" in out
    assert re.search(r"^NAME +VALUE$", out, re.M) and re.search(r"^NAME +SIZE  CREATED$", out,
                                                                  re.M)
    assert "esem     none" in out and "101.7" in out
    attack_lines = [line for line in out.splitlines() if "word" in line]
    assert len(attack_lines) > 1 and all(len(line) < 140 for line in attack_lines)
