"""Caffe-style (glog) log lines, so Caffe's ``parse_log.py`` and log habits work unchanged.

Every line looks like glog's::

    I1126 06:12:34.567890 12345 solver.cpp:243] Iteration 100 (63.2 iter/s, 1.58s/100 iters), ...

i.e. severity letter, month and day, wall time with microseconds, thread id, a source location
and ``]``. netengine code logs through the standard :mod:`logging` module (logger
``netengine``); a call may name its Caffe-like source location with ``extra={"where":
"solver.cpp:243"}``. As pycaffe does, ``import netengine`` routes these lines to stderr
(:func:`install_default`, unless the ``netengine`` logger already has a handler); the
command-line tools :func:`install` the same handler. ``GLOG_minloglevel`` (0 INFO, 1 WARNING,
2 ERROR, 3 FATAL) sets the threshold, as for Caffe; :func:`set_log_level` changes it later.

While a tqdm progress bar is open (:func:`progress`), log lines are written above the bar.
"""
from __future__ import annotations

import logging
import os
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


# glog's numbered severities (GLOG_minloglevel) as logging levels
GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}


def level_from_env(default: int = logging.INFO) -> int:
    """The threshold ``GLOG_minloglevel`` asks for (``default`` where unset or not a number)."""
    raw = os.environ.get("GLOG_minloglevel", "").strip()
    try:
        return GLOG_LEVELS[min(max(int(raw), 0), 3)]
    except ValueError:
        return default


def set_log_level(level: int | str) -> None:
    """Show only lines at ``level`` and above: glog's 0-3 (as ``GLOG_minloglevel``), or a
    :mod:`logging` level (``logging.WARNING``, ``"WARNING"``)."""
    if isinstance(level, str) and level.strip().isdigit():
        level = int(level)
    if isinstance(level, str):
        value = logging.getLevelName(level.upper())
        if not isinstance(value, int):
            raise ValueError(f"unknown log level '{level}': give 0-3 or INFO, WARNING, ERROR")
        level = value
    logging.getLogger(LOGGER_NAME).setLevel(GLOG_LEVELS.get(level, level))


def install(level: int | None = None, stream=None) -> GlogHandler:
    """Route the ``netengine`` logger to a glog handler (replacing an earlier one); the level
    defaults to what ``GLOG_minloglevel`` asks for (INFO where unset)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if isinstance(handler, GlogHandler):
            logger.removeHandler(handler)
    handler = GlogHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(level_from_env() if level is None else level)
    logger.propagate = False
    return handler


def install_default() -> None:
    """pycaffe's behaviour for library users: glog lines on stderr, unless the application
    already gave the ``netengine`` logger a handler of its own."""
    if not logging.getLogger(LOGGER_NAME).handlers:
        install()


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
