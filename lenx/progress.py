"""One progress display for train, eval and sweep."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class FieldsColumn(ProgressColumn):
    """Whatever short strings a task carries in its fields (loss, tokens/s, ...)."""

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
