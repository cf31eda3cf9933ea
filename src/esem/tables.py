"""The one table renderer of every ``esem`` command: ``ls``, ``demo``, ``attack``,
``vault ls`` and the benchmarks all print through ``Table``.

Built on ``rich``. On a terminal a table gets bold headers and fits the terminal's width
(long cells wrap inside their column). Anywhere else (a pipe, a file, a CI log) it is
plain text: no ANSI codes, no box-drawing characters, columns at their natural width and
no trailing spaces, so it stays readable and diff-able. ``--json`` output never comes
here.

Every cell, title and note goes through ``esem.safe_text.printable`` and is handed to
rich as ``Text``, never as markup: a semaphore name such as ``[bold]x`` or one holding
an escape sequence prints as exactly the characters it is.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from rich import box
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from esem.safe_text import printable

# No edges and no column rules: a gap of two spaces between columns and one line of '-'
# under the header, the look of the hand-written tables this module replaced.
PLAIN_BOX = box.Box(
    "    \n"
    "    \n"
    " -- \n"
    "    \n"
    "    \n"
    "    \n"
    "    \n"
    "    \n",
    ascii=True,
)
_PLAIN_WIDTH = 100_000  # off a terminal nothing wraps, except columns given a max width


def _safe(value: object) -> str:
    return printable(str(value))


@dataclass
class Table:
    """A titled table with notes below it.

    ``right``: indices of right-aligned columns (None: every column but the first, the
    numeric layout of the benchmarks). ``wrap``: column index -> the most characters a
    line of that column may take; longer cells wrap inside the column.
    """

    title: str
    header: Sequence[str]
    body: Sequence[Sequence[object]]
    notes: Sequence[str] = field(default_factory=list)
    right: Sequence[int] | None = None
    wrap: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for r in self.body:
            if len(r) != len(self.header):
                raise ValueError(f"a row has {len(r)} cells for {len(self.header)} columns")

    def _right(self) -> set[int]:
        return set(range(1, len(self.header)) if self.right is None else self.right)

    def rich(self, styled: bool) -> RichTable:
        """The table as a rich renderable; ``styled``: bold header (for terminals)."""
        t = RichTable(box=PLAIN_BOX, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                      title=Text(_safe(self.title)) if self.title else None,
                      title_justify="left", title_style="bold" if styled else "",
                      header_style="bold" if styled else "", safe_box=True)
        right = self._right()
        for i, h in enumerate(self.header):
            t.add_column(Text(_safe(h)), justify="right" if i in right else "left",
                         max_width=self.wrap.get(i), overflow="fold",
                         no_wrap=i not in self.wrap)
        for r in self.body:
            t.add_row(*(Text(_safe(c)) for c in r))
        return t

    def text(self) -> str:
        """Plain text: what a pipe or a log gets."""
        buf = io.StringIO()
        console = Console(file=buf, width=_PLAIN_WIDTH, force_terminal=False,
                          color_system=None, highlight=False, soft_wrap=False)
        console.print(self.rich(styled=False))
        lines = [line.rstrip() for line in buf.getvalue().splitlines()]
        lines += [_safe(n) for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        """A Markdown table (for report files), title as a heading."""
        def cell(v: object) -> str:
            return _safe(v).replace("|", "\\|")

        right = self._right()
        lines = [f"### {cell(self.title)}", ""] if self.title else []
        lines += ["| " + " | ".join(cell(h) for h in self.header) + " |",
                  "| " + " | ".join("---:" if i in right else "---"
                                    for i in range(len(self.header))) + " |"]
        lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in self.body]
        if self.notes:
            lines += ["", *(_safe(n) for n in self.notes)]
        return "\n".join(lines) + "\n"

    def print(self, file: IO[str] | None = None, *, fit: bool = True) -> None:
        """Render to ``file`` (default stdout): styled on a terminal, plain elsewhere.
        ``fit=False``: plain even on a terminal, no cell cut to the terminal's width."""
        out = sys.stdout if file is None else file
        console = Console(file=out, highlight=False)
        if not console.is_terminal or not fit:
            out.write(self.text() + "\n")
            out.flush()
            return
        console.print(self.rich(styled=True))
        for n in self.notes:
            console.print(Text(_safe(n)), style="dim")


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]], *,
                title: str = "", notes: Sequence[str] = (), right: Sequence[int] = (),
                wrap: Mapping[int, int] | None = None, file: IO[str] | None = None,
                fit: bool = True) -> None:
    """Print one table; columns are left-aligned unless listed in ``right``; ``fit=False``
    never cuts a cell to the terminal's width (``esem ls --wide``)."""
    Table(title, header, rows, list(notes), right=right, wrap=wrap or {}).print(file, fit=fit)
