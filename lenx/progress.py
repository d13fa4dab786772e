"""One progress display for train, eval and sweep."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text


class FieldsColumn(ProgressColumn):
    """Whatever short strings a task carries in its fields (loss, tokens/s, ...). Kept on one line: on a narrow
    terminal the bar gives up the room (at 80 columns "12,345 tok/s" used to wrap onto a second line)."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task) -> Text:
        return Text("  ".join(str(v) for v in task.fields.values() if v != ""))


def progress(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        FieldsColumn(),
        disable=disable,
    )
