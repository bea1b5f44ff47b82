"""The library's console lines (structure events, schedule notes) on their own line, never inside a progress bar.

Python's fallback handler writes a warning straight to stderr, into the middle of a tqdm bar (`Trainer`'s). This
handler writes through `tqdm.write`, which clears the bar, prints the line and redraws it. It stands back as soon
as the application configures logging itself (a handler on the root logger, or pytest's caplog), so nothing
is printed twice and `logging` settings keep working.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm


class TqdmConsoleHandler(logging.Handler):
    """Warnings and above of the `lor2c_hf` logger, one line each, through `tqdm.write` (stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # the application's own logging set-up takes the record
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging must never raise into training)
            self.handleError(record)


def install(name: str = "lor2c_hf") -> None:
    """Give the library's logger its console handler once (importing lor2c_hf twice adds nothing)."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, TqdmConsoleHandler) for h in logger.handlers):
        logger.addHandler(TqdmConsoleHandler(logging.WARNING))
