"""A minimal progress protocol so the library reports long work without depending on a UI."""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Task: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class NullProgress:
    """Reports nothing."""

    def task(self, description: str, total: int | None) -> Task:
        return _NullTask()


class RichProgress:
    """Progress bars on stderr (rich, which typer already depends on)."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as _P, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._p = _P(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled, transient=False,
        )
        self._started = False

    def task(self, description: str, total: int | None) -> Task:
        if not self._started:
            self._p.start()
            self._started = True
        tid = self._p.add_task(description, total=total)
        p = self._p

        class _T:
            def advance(self, n: int = 1) -> None:
                p.advance(tid, n)

            def close(self) -> None:
                t = p.tasks[[x.id for x in p.tasks].index(tid)]
                if t.total is None or t.completed < t.total:
                    p.update(tid, total=t.completed)

        return _T()

    def stop(self) -> None:
        if self._started:
            self._p.stop()
            self._started = False


class LineProgress:
    """One line per task on stderr when it finishes (for logs and pipes, where bars would be noise)."""

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stderr

    def task(self, description: str, total: int | None) -> Task:
        import time

        stream = self.stream
        start = time.perf_counter()

        class _T:
            done = 0

            def advance(self, n: int = 1) -> None:
                self.done += n

            def close(self) -> None:
                print(f"{description}: {self.done} in {time.perf_counter() - start:.1f}s", file=stream, flush=True)

        return _T()

    def stop(self) -> None:
        pass


def make_progress(quiet: bool = False):
    """Bars on a terminal, one line per task otherwise, nothing when quiet."""
    import sys

    if quiet:
        return NullProgress()
    if sys.stderr.isatty():
        return RichProgress()
    return LineProgress()
