"""Caffe-style (glog) log lines, so Caffe's ``parse_log.py`` and log habits work unchanged.

Every line looks like glog's::

    I1126 06:12:34.567890 12345 solver.cpp:243] Iteration 100 (63.2 iter/s, 1.58s/100 iters), ...

i.e. severity letter, month and day, wall time with microseconds, thread id, a source location
and ``]``. netengine code logs through the standard :mod:`logging` module (logger
``netengine``); a call may name its Caffe-like source location with ``extra={"where":
"solver.cpp:243"}``. Nothing is printed until :func:`install` adds the glog handler (the
command-line tools do; a pycaffe-style script may call it too).

While a tqdm progress bar is open (:func:`progress`), log lines are written above the bar.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

LOGGER_NAME = "netengine"
_LETTERS = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
            logging.CRITICAL: "F"}
_active_bar: list = []


def fmt(value) -> str:
    """A number as C++'s ``ostream << float`` prints it (6 significant digits, %g style)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return f"{float(value):g}"


class GlogFormatter(logging.Formatter):
    """``I<MMDD> <HH:MM:SS.micro> <tid> <file:line>] message`` (one line per record)."""

    def format(self, record: logging.LogRecord) -> str:
        letter = _LETTERS.get(record.levelno, "I")
        stamp = time.localtime(record.created)
        micros = int((record.created - int(record.created)) * 1e6)
        where = getattr(record, "where", None) or f"{record.module}.py:{record.lineno}"
        tid = getattr(record, "thread_native", None) or threading.get_native_id()
        message = record.getMessage().replace("\n", " ")
        return (f"{letter}{stamp.tm_mon:02d}{stamp.tm_mday:02d} "
                f"{time.strftime('%H:%M:%S', stamp)}.{micros:06d} {tid} {where}] {message}")


class GlogHandler(logging.Handler):
    """Writes glog lines to a stream (stderr by default), above an open progress bar."""

    def __init__(self, stream=None) -> None:
        super().__init__()
        self.stream = stream
        self.setFormatter(GlogFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = self.stream if self.stream is not None else sys.stderr
            if _active_bar:
                _active_bar[-1].write(line, file=stream)
            else:
                stream.write(line + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take training down
            self.handleError(record)


def install(level: int = logging.INFO, stream=None) -> GlogHandler:
    """Route the ``netengine`` logger to a glog handler (replacing an earlier one)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if isinstance(handler, GlogHandler):
            logger.removeHandler(handler)
    handler = GlogHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def at(where: str) -> dict:
    """``extra`` for a log call naming its Caffe-like source location."""
    return {"where": where}


class _Progress:
    """A tqdm bar over iterations, or nothing where tqdm is missing or stderr is no terminal."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train") -> None:
        self.bar = None
        stream = sys.stderr
        if not (hasattr(stream, "isatty") and stream.isatty()):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="iter", file=stream,
                        dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def goto(self, n: int, **postfix) -> None:
        """Move the bar to ``n`` done (it may jump, e.g. after a resume)."""
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix({k: fmt(v) for k, v in postfix.items()}, refresh=False)
        if n != self.bar.n:
            self.bar.update(n - self.bar.n)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            _active_bar.append(self.bar)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            _active_bar.remove(self.bar)
            self.bar.close()


def progress(total: int, initial: int = 0, desc: str = "train") -> _Progress:
    """Context manager: a progress bar on a terminal (tqdm optional), else a no-op."""
    return _Progress(total, initial, desc)


def emit_error(err: BaseException, write: Callable[[str], object] | None = None) -> None:
    """Print ``error: <one line>`` for a tool (no traceback)."""
    lines = str(err).splitlines()
    text = f"error: {lines[0] if lines else type(err).__name__}"
    (write or (lambda s: print(s, file=sys.stderr, flush=True)))(text)
