"""The training report: one self-contained HTML page with a run's curves, built from its log.

The page is built from glog lines (Caffe's or netengine's), read with the same parser as
``parse_log``/``plot_log`` (:mod:`netengine.formats.caffe_log`): one chart per output name
(train and test curves together where both phases have it, as DIGITS showed them) and one of
the learning rate, each a ``<figure data-series="<name>">`` with inline SVG; elapsed time,
iterations per second and the solver's settings (from the log's ``Initializing solver from
parameters`` block, or given). While a run is alive the page reloads itself every few seconds.

:class:`LiveReport` is a logging handler that keeps a training run's lines and rewrites the
page (atomically) after every display and test step; ``tools/train --report`` installs it.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from google.protobuf import text_format

from netengine.errors import NetEngineError
from netengine.formats import caffe_log
from netengine.formats.prototxt import write_atomic
from netengine.html.svg import esc, line_chart, page
from netengine.logging_glog import LOGGER_NAME, GlogFormatter, fmt
from netengine.proto import caffe_pb2

RELOAD_SECONDS = 5
_SETTINGS = "Initializing solver from parameters:"
_GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ")
_SOLVING = re.compile(r"\bSolving (.+)$")
_ITERATION = re.compile(r"\bIteration (\d+)")
_DONE = ("Optimization Done", "Optimization stopped early")
log = logging.getLogger("netengine.report")


def solver_settings(lines: list[str]) -> caffe_pb2.SolverParameter | None:
    """The SolverParameter a log prints as a run starts (Caffe: one field a line after the glog
    line; netengine: all on the glog line), of the log's last run; None where it is absent or
    unreadable."""
    for k in range(len(lines) - 1, -1, -1):
        line = lines[k]
        if _SETTINGS not in line:
            continue
        text = [line.split(_SETTINGS, 1)[1]]
        for following in lines[k + 1:]:
            if _GLOG.match(following):
                break
            text.append(following)
        try:
            return text_format.Parse("\n".join(text), caffe_pb2.SolverParameter())
        except text_format.ParseError:
            return None
    return None


def _settings_table(param: caffe_pb2.SolverParameter | None) -> str:
    if param is None:
        return '<p class="muted">The log does not show the solver\'s settings.</p>'
    rows = []
    for descriptor, value in param.ListFields():
        if descriptor.message_type is not None:
            values = value if descriptor.is_repeated else [value]
            shown = "; ".join(text_format.MessageToString(v, as_one_line=True) for v in values)
        elif descriptor.enum_type is not None:
            values = value if descriptor.is_repeated else [value]
            shown = ", ".join(descriptor.enum_type.values_by_number[v].name for v in values)
        else:  # floats as Caffe prints them (6 significant digits), not as float32's tail
            values = value if descriptor.is_repeated else [value]
            shown = ", ".join(fmt(v) if isinstance(v, float) else str(v) for v in values)
        rows.append(f"<tr><th>{esc(descriptor.name)}</th><td><code>{esc(shown)}</code></td></tr>")
    return f'<table class="settings">{"".join(rows)}</table>'


def _points(rows: list[dict], column: str) -> list[tuple[float, float]]:
    return [(float(r["NumIters"]), float(r[column])) for r in rows
            if column in r and math.isfinite(r[column])]


def charts(tables: caffe_log.LogTables) -> list[str]:
    """One chart per output name (train and test curves together), then the learning rate."""
    train_names = [c for c in caffe_log.LogTables.columns(tables.train)
                   if c not in caffe_log.BASE_COLUMNS]
    test_names = [c for c in caffe_log.LogTables.columns(tables.test)
                  if c not in caffe_log.BASE_COLUMNS]
    out = []
    for name in dict.fromkeys(train_names + test_names):
        lines = [(f"train {name}", "train", _points(tables.train, name))] \
            if name in train_names else []
        if name in test_names:
            lines.append((f"test {name}", "test", _points(tables.test, name)))
        phases = ", ".join(label.split()[0] for label, _, _ in lines)
        out.append(line_chart(name, f"{name} ({phases})", lines))
    rate = _points(tables.train, "LearningRate")
    if rate:
        out.append(line_chart("LearningRate", "learning rate", [("lr", "rate", rate)]))
    return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60}:{rest % 60:02d}"


def _speed(tables: caffe_log.LogTables) -> float:
    """Training iterations per second between the first and the last train output."""
    train = [r for r in tables.train if math.isfinite(r["Seconds"])]
    span = train[-1]["Seconds"] - train[0]["Seconds"] if len(train) > 1 else 0.0
    return (train[-1]["NumIters"] - train[0]["NumIters"]) / span if span > 0 else math.nan


def last_iteration(lines: list[str]) -> int:
    """The last ``Iteration N`` a log mentions (0 before the first)."""
    for line in reversed(lines):
        found = _ITERATION.search(line)
        if found:
            return int(found.group(1))
    return 0


REPORT_STYLE = """
.settings th { font-weight: 600; white-space: nowrap; }
.settings td code { word-break: break-all; }
.state.running { color: var(--rate); }
"""


def _facts(state: str, last: int, elapsed: float, tables: caffe_log.LogTables,
           settings) -> list[tuple[str, str]]:
    """The header line: state, iteration (of max_iter), elapsed, speed, time of writing."""
    speed = _speed(tables)
    max_iter = settings.max_iter if settings is not None and settings.HasField("max_iter") \
        else None
    return [("state", state),
            ("iteration", f"{last:,}" + (f" of {max_iter:,}" if max_iter else "")),
            ("elapsed", _duration(elapsed)),
            ("iterations/s", fmt(speed) if math.isfinite(speed) else "n/a"),
            ("updated", datetime.now().strftime("%Y-%m-%d %H:%M:%S"))]


def _state(alive: bool, finished: bool) -> str:
    return "running" if alive else "finished" if finished else "ended"


def render_report(tables: caffe_log.LogTables, facts: list[tuple[str, str]], *, title: str,
                  net: str | None, settings, alive: bool) -> str:
    """The page: header (``net``: the name a ``Solving`` line gave), charts, solver table."""
    drawn = charts(tables)
    heading = f"Training {net}" if net else title
    body = (f"<header><h1>{esc(heading)}</h1><div class=\"muted\">{esc(title)}</div>"
            '<ul class="totals">' + "".join(
                f'<li>{esc(k)}: <b class="{"state " + v if k == "state" else ""}">'
                f"{esc(v)}</b></li>" for k, v in facts) + "</ul></header>"
            + (f'<section class="charts">{"".join(drawn)}</section>' if drawn else
               '<p class="muted">No train or test outputs logged yet.</p>')
            + f"<h2>Solver</h2>{_settings_table(settings)}")
    head = f'<meta http-equiv="refresh" content="{RELOAD_SECONDS}">\n' if alive else ""
    return page(f"{heading}: training report", body, head=head, style=REPORT_STYLE)


def build_report(lines: list[str], *, title: str, alive: bool = False,
                 settings: caffe_pb2.SolverParameter | None = None,
                 end_year: int | None = None) -> str:
    """The report page of a log's lines (``alive``: the run goes on; the page reloads)."""
    tables = caffe_log.parse_lines(lines, end_year)
    settings = settings if settings is not None else solver_settings(lines)
    finished = any(marker in line for line in lines[-50:] for marker in _DONE)
    facts = _facts(_state(alive, finished), last_iteration(lines),
                   caffe_log.span_seconds(lines, end_year), tables, settings)
    solving = next((m for m in map(_SOLVING.search, reversed(lines)) if m), None)
    return render_report(tables, facts, title=title, settings=settings, alive=alive,
                         net=solving.group(1).strip() if solving else None)


def write_log_report(log_path, out_path) -> caffe_log.LogTables:
    """``plot_log --html``: write the report of a log file (finished or still growing)."""
    path = Path(log_path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        year = datetime.fromtimestamp(path.stat().st_mtime).year
    except FileNotFoundError:
        raise NetEngineError(f"log file not found: {path}") from None
    except OSError as err:
        raise NetEngineError(f"cannot read log {path}: {err}") from None
    write_atomic(out_path, build_report(lines, title=path.name, end_year=year))
    return caffe_log.parse_lines(lines, year)


_REFRESH_AFTER = re.compile(r"net output #|, lr = |Testing net|Optimization|Snapshotting to")


class LiveReport(logging.Handler):
    """Reads a run's log records as they come; :meth:`refresh` rewrites the page when outputs
    arrived. Each record is parsed once (the page costs the same at iteration 10 and 10^6
    but for its charts); a refresh waits until the run has gone on for at least 1/BUDGET
    times what the last one cost, so the page never takes more than about 2% of training."""

    BUDGET = 0.02

    def __init__(self, path, title: str, settings: caffe_pb2.SolverParameter | None = None):
        super().__init__(logging.INFO)
        self.path, self.title, self.settings = Path(path), title, settings
        self.setFormatter(GlogFormatter())
        self.parser = caffe_log.LogParser()
        self.net: str | None = None
        self.last_iteration, self.finished = 0, False
        self.dirty = True  # the first refresh writes the page at once
        self.refreshes, self.seconds = 0, 0.0
        self._next = 0.0  # perf_counter() before which a refresh waits

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._read(record.getMessage(), datetime.fromtimestamp(record.created))
        except Exception:  # noqa: BLE001 - the report must never take training down
            self.handleError(record)

    def _read(self, message: str, stamp: datetime) -> None:
        self.parser.feed(message, stamp)
        self.dirty = self.dirty or bool(_REFRESH_AFTER.search(message))
        found = _ITERATION.search(message)
        if found:
            self.last_iteration = int(found.group(1))
        found = _SOLVING.search(message)
        if found:
            self.net, self.finished = found.group(1).strip(), False
        if any(marker in message for marker in _DONE):
            self.finished = True
        if self.settings is None and _SETTINGS in message:
            self.settings = solver_settings([message])

    def refresh(self, alive: bool = True) -> None:
        """Rewrite the page if new outputs were logged (called between iterations)."""
        start = time.perf_counter()
        if alive and (not self.dirty or start < self._next):
            return
        tables = self.parser.tables()
        facts = _facts(_state(alive, self.finished), self.last_iteration,
                       self.parser.elapsed(), tables, self.settings)
        write_atomic(self.path, render_report(tables, facts, title=self.title, net=self.net,
                                              settings=self.settings, alive=alive))
        self.dirty = False
        self.refreshes += 1
        cost = time.perf_counter() - start
        self.seconds += cost
        self._next = start + cost / self.BUDGET


class _NoReport:
    def refresh(self, alive: bool = True) -> None:
        pass


@contextmanager
def live_report(path, title: str, settings: caffe_pb2.SolverParameter | None = None
                ) -> Iterator[LiveReport | _NoReport]:
    """Attach a LiveReport to the netengine logger for the block (nothing when ``path`` is
    empty); the last write, when the block ends however it ends, stops the page's reloading."""
    if not path:
        yield _NoReport()
        return
    report = LiveReport(path, title, settings)
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(report)
    try:
        report.refresh()
        yield report
    finally:
        logger.removeHandler(report)
        report.refresh(alive=False)
        log.info("Report %s: %d refreshes, %.3f s in all", report.path, report.refreshes,
                 report.seconds)
