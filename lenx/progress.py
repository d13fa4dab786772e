"""Progress displays: one for train, eval and sweep, and a transient count bar for tokenising a split and
training a BPE tokenizer."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text


class FieldsColumn(ProgressColumn):
    """Whatever short strings a task carries in its fields (loss, tokens/s, ...). Kept on one line: on a narrow
    terminal the bar gives up the room, so that a figure never wraps onto a second line."""

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


class CountBar:
    """A rich progress bar (units: documents or rows) as a context manager yielding `advance(n)`."""

    def __init__(self, description: str, total: int, enabled: bool):
        self.description, self.total, self.enabled, self.bar = description, total, enabled, None

    def __enter__(self):
        from rich.console import Console

        if self.enabled and Console().is_terminal:  # transient: on a pipe or a log it would leave only blank lines
            from rich.errors import LiveError
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           transient=True)
            try:
                bar.start()
            except LiveError:  # an older rich with another live display running: go without
                bar = None
            if bar is not None:
                self.bar, self.task = bar, bar.add_task(self.description, total=self.total)
        return self.advance

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
