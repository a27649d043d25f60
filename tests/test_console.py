"""A quiet console (kd/console.py): Lightning's banners and checkpoint-restoring lines are
dropped, its warnings and kd's own lines pass; long passes show a bar with a rate and an ETA."""

from __future__ import annotations

import io
import logging

from kd.console import progress, quiet


def test_banners_are_dropped_and_warnings_and_kd_lines_pass(monkeypatch):
    monkeypatch.delenv("KD_VERBOSE", raising=False)
    quiet()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep()
    lightning = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    ours = logging.getLogger("kd.cache")
    for logger in (lightning, ours):
        logger.addHandler(keep)
        monkeypatch.setattr(logger, "level", logging.INFO)
    try:
        lightning.info("GPU available: False, used: False")
        lightning.info("TPU available: False, using: 0 TPU cores")
        lightning.info("💡 Tip: For seamless cloud logging ... litlogger")
        lightning.info("Restoring states from the checkpoint path at /x/epoch001.ckpt")
        lightning.info("`Trainer.fit` stopped: `max_epochs=2` reached.")
        lightning.warning("GPU available but not used.")
        ours.info("building the teacher once (cached afterwards in /c/teachers/x)")
    finally:
        for logger in (lightning, ours):
            logger.removeHandler(keep)
    assert seen == ["`Trainer.fit` stopped: `max_epochs=2` reached.", "GPU available but not used.",
                    "building the teacher once (cached afterwards in /c/teachers/x)"]


def test_a_long_pass_shows_its_count_rate_and_time_left_on_a_terminal():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with progress("teacher logit cache", 40, unit="examples", console=console) as advance:
        for _ in range(4):
            advance(10)
            console.file.flush()
    text = out.getvalue()
    assert "teacher logit cache" in text and "40/40" in text and "eta" in text
    assert "examples/s" in text
    quiet_out = io.StringIO()
    with progress("teacher logit cache", 4, console=Console(file=quiet_out, force_terminal=False)) as advance:
        advance(4)
    assert quiet_out.getvalue() == ""  # no bar in a log file
