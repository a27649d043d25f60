"""What a ``kd`` run prints: kd's own lines, progress bars and the table, not the chatter
of the libraries under it.

:func:`quiet` is called once per run (:func:`kd.runs.train`, :func:`kd.runs.evaluate`). It
drops, from Lightning's loggers only:

* the banners every ``Trainer`` prints ("GPU available", "TPU available", the litlogger
  tip) — a run builds several trainers (teacher, baseline, student), so they repeated;
* the "Restoring states" / "Loaded model weights" lines of cached sub-runs reloading their
  best checkpoint (kd says in one line what it builds or reuses, :mod:`kd.cache`);

and ignores deprecation warnings (``DeprecationWarning``, ``FutureWarning``) raised in
third-party modules, which a user cannot act on. kd's own warnings, every warning of
another kind, and every log record of level WARNING or above pass. ``KD_VERBOSE=1`` keeps
everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

#: Lightning's INFO lines that kd drops (matched at the start of the message)
DROPPED = re.compile(r"(GPU available|TPU available|HPU available|IPU available|💡 Tip|Restoring states from the "
                     r"checkpoint|Loaded model weights from the checkpoint|You are using a CUDA device)")

#: the loggers Lightning prints through
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.pytorch.accelerators.cuda", "lightning.pytorch", "lightning.fabric")


class _Chatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return DROPPED.match(str(record.getMessage()).lstrip()) is None


_FILTER = _Chatter()


def quiet() -> None:
    """Silence the libraries' banners and deprecation notices (idempotent)."""
    if os.environ.get("KD_VERBOSE", "") not in ("", "0"):
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for category in (DeprecationWarning, FutureWarning):
        # third-party modules only: a module name not under kd or recipes
        warnings.filterwarnings("ignore", category=category, module=r"^(?!kd\b|recipes\b)")
    # Lightning's own deprecation notices arrive as its rank_zero_deprecation (a UserWarning subclass)
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", module=r"^lightning")
    warnings.filterwarnings("ignore", message=r"`weights_only` was not set")


@contextlib.contextmanager
def progress(description: str, total: int, unit: str = "examples", console: Any = None
             ) -> Iterator[Callable[[int], None]]:
    """A progress bar for a long pass (the teacher's logit cache, its generations), with the
    count, the rate and the time left, on stderr when it is a terminal (none in log files).
    Yields ``advance(n)``."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = console or Console(stderr=True)
    live = console.is_terminal or console.is_jupyter
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not live) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            if speed:
                bar.update(task, rate=f"{speed:,.1f} {unit}/s")

        yield advance
