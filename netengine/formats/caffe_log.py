"""Training logs (Caffe's or netengine's glog lines) → tables of train and test outputs, plots.

What is read, line by line (the phrases Caffe's solver writes, which netengine's solver writes
too):

* ``Iteration N`` anywhere in a line sets the current iteration; output lines before the first
  one are ignored;
* ``Train net output #k: NAME = VALUE`` and ``Test net output #k: NAME = VALUE`` add column
  NAME to the current train/test row; a row holds the outputs of one iteration (a new row
  starts when the iteration changes or NAME repeats, e.g. a second test net);
* ``Iteration N, lr = VALUE`` gives the learning rate of iteration N;
* the glog prefix ``I1105 00:37:55.565062`` gives the wall time. Seconds count from the
  ``Solving`` line (else from the first time stamp). Newer glog versions write the year too
  (``I20261105 00:37:55.565062``); older ones omit it: it is then taken from the file's
  modification time (the end of the log), minus one for each month wrap-around (December →
  January) inside the log.

Each row gets ``NumIters``, ``Seconds`` (time of its first output line) and ``LearningRate``,
then one column per output name, as Caffe's ``tools/extra/parse_log.py`` writes them. One
difference: Caffe's script gives a train row the rate logged at the *previous* display
iteration (the lr line follows the outputs); here a row takes the rate logged for its own
iteration, else the rate in effect before it. Numbers also parse as ``nan``/``inf`` (a
diverged run), which Caffe's regular expressions skip.
"""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from netengine.errors import NetEngineError
from netengine.formats.prototxt import write_atomic

_NUMBER = r"[-+]?(?:nan|inf|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
# the year is optional: glog >= 0.7 writes I20261105, older versions I1105
_STAMP = re.compile(r"^[IWEF](?P<year>\d{4})?(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{1,6})\b")
_ITERATION = re.compile(r"\bIteration (\d+)")
_OUTPUT = re.compile(rf"\b(Train|Test) net output #(\d+): (\S+) = ({_NUMBER})")
_LR = re.compile(rf"\bIteration (\d+), lr = ({_NUMBER})")
_RUN_BOUNDARY = ("Solving ", "Optimization Done")
BASE_COLUMNS = ("NumIters", "Seconds", "LearningRate")


@dataclass
class LogTables:
    """The parsed outputs: one row (a dict) per iteration that logged train / test outputs."""

    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)

    @staticmethod
    def columns(rows: list[dict]) -> list[str]:
        """NumIters, Seconds, LearningRate, then every output name in first-seen order."""
        names = dict.fromkeys(BASE_COLUMNS)
        for row in rows:
            names.update(dict.fromkeys(row))
        return list(names)


def _stamps(lines: list[str], end_year: int) -> list[datetime | None]:
    """The wall time of each line (None where the line has no glog prefix)."""
    raw = [_STAMP.match(line) for line in lines]
    months = [int(m.group(2)) for m in raw if m and not m.group("year")]
    wraps = sum(1 for a, b in zip(months, months[1:]) if b < a)
    year, last_month, times = end_year - wraps, None, []
    for match in raw:
        if not match:
            times.append(None)
            continue
        month, day, hour, minute, second = (int(g) for g in match.groups()[1:6])
        if match.group("year"):
            year = int(match.group("year"))
        elif last_month is not None and month < last_month:
            year += 1
        last_month = month
        micros = int(match.group(7).ljust(6, "0"))
        try:
            times.append(datetime(year, month, day, hour, minute, second, micros))
        except ValueError:  # e.g. 29 February in a guessed non-leap year
            times.append(None)
    return times


class LogParser:
    """The reading of a log, a line at a time (a live run's report feeds it as lines come):
    :meth:`tables` gives the tables of the lines fed so far, as :func:`parse_lines` would."""

    def __init__(self) -> None:
        self._tables = LogTables()
        self._current: dict[str, dict | None] = {"Train": None, "Test": None}
        self._row_times: dict[int, datetime | None] = {}
        self._pending: list[dict] = []  # rows still waiting for their learning rate
        self._iteration: int | None = None
        self._last_lr = math.nan
        self.start: datetime | None = None  # the first ``Solving`` line's time
        self.first: datetime | None = None  # the first time stamp
        self.now: datetime | None = None  # the last time stamp

    def _settle(self, lr_iteration: int | None, rate: float) -> None:
        for row in self._pending:
            row["LearningRate"] = rate if row["NumIters"] == lr_iteration or \
                math.isnan(self._last_lr) else self._last_lr
        self._pending.clear()

    def clock(self, line: str, stamp: datetime | None) -> None:
        """Note a line's wall time: the first, the last and the first ``Solving`` line's."""
        if stamp is None:
            return
        self.now = stamp
        self.first = self.first or stamp
        if self.start is None and "Solving " in line:
            self.start = stamp

    def feed(self, line: str, stamp: datetime | None) -> None:
        """Read one line, stamped with its wall time (None where it has none)."""
        self.clock(line, stamp)
        if any(marker in line for marker in _RUN_BOUNDARY):
            self._settle(None, self._last_lr)
            self._current = {"Train": None, "Test": None}
        found = _LR.search(line)
        if found:
            rate = float(found.group(2))
            self._settle(int(found.group(1)), rate)
            self._last_lr = rate
        found = _ITERATION.search(line)
        if found:
            self._iteration = int(found.group(1))
        found = _OUTPUT.search(line)
        if found is None or self._iteration is None:
            return
        kind, _, name, value = found.groups()
        row = self._current[kind]
        if row is None or row["NumIters"] != self._iteration or name in row:
            row = {"NumIters": self._iteration, "Seconds": math.nan, "LearningRate": math.nan}
            self._row_times[id(row)] = self.now
            (self._tables.train if kind == "Train" else self._tables.test).append(row)
            self._pending.append(row)
            self._current[kind] = row
        row[name] = float(value)

    def tables(self) -> LogTables:
        """The rows so far (the parser's own: feeding more lines updates them). Rows still
        waiting for a learning rate show the rate in effect."""
        for row in self._pending:
            row["LearningRate"] = self._last_lr
        start = self.start or self.first
        for row in self._tables.train + self._tables.test:
            stamp = self._row_times[id(row)]
            if stamp is not None and start is not None:
                row["Seconds"] = round((stamp - start).total_seconds(), 6)
        return self._tables

    def elapsed(self) -> float:
        """Seconds from the start (the ``Solving`` line, else the first stamp) to the last."""
        start = self.start or self.first
        return max(0.0, (self.now - start).total_seconds()) if start and self.now else 0.0


def parse_lines(lines: list[str], end_year: int | None = None) -> LogTables:
    """Parse log lines; ``end_year`` is the calendar year of the log's last line."""
    parser = LogParser()
    for line, stamp in zip(lines, _stamps(lines, end_year or datetime.now().year)):
        parser.feed(line, stamp)
    return parser.tables()


def span_seconds(lines: list[str], end_year: int | None = None) -> float:
    """Seconds from the run's start (its ``Solving`` line, else the first time stamp) to the
    last time stamp: a log's elapsed time (0 without stamps)."""
    parser = LogParser()
    for line, stamp in zip(lines, _stamps(lines, end_year or datetime.now().year)):
        parser.clock(line, stamp)  # the times are all it needs
    return parser.elapsed()


def parse_log(path, end_year: int | None = None) -> LogTables:
    """Parse a log file; the year defaults to that of the file's modification time."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
        year = end_year or datetime.fromtimestamp(os.path.getmtime(path)).year
    except FileNotFoundError:
        raise NetEngineError(f"log file not found: {path}") from None
    except OSError as err:
        raise NetEngineError(f"cannot read log {path}: {err}") from None
    return parse_lines(text.splitlines(), year)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def write_csv(path, rows: list[dict], delimiter: str = ",") -> None:
    """Write ``rows`` with a header line (just the base columns when there are no rows)."""
    columns = LogTables.columns(rows)
    lines = [delimiter.join(columns)]
    lines += [delimiter.join(_cell(row.get(c)) for c in columns) for row in rows]
    write_atomic(path, "\n".join(lines) + "\n")


def write_tables(log_path, out_dir, delimiter: str = ",") -> tuple[Path, Path, LogTables]:
    """Parse ``log_path``; write ``<log name>.train`` and ``.test`` into ``out_dir``."""
    tables = parse_log(log_path)
    out_dir = Path(out_dir)
    name = Path(log_path).name
    train, test = out_dir / f"{name}.train", out_dir / f"{name}.test"
    write_csv(train, tables.train, delimiter)
    write_csv(test, tables.test, delimiter)
    return train, test, tables


def read_csv(path, delimiter: str = ",") -> list[dict]:
    """Read a table written by :func:`write_csv` back (numbers as floats, NumIters as int)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = []
        for raw in csv.DictReader(handle, delimiter=delimiter):
            row = {k: (float(v) if v != "" else math.nan) for k, v in raw.items()}
            row["NumIters"] = int(row["NumIters"])
            rows.append(row)
    return rows


# -- plots (Caffe's tools/extra/plot_training_log.py chart types) ---------------------------------
CHART_TYPES = {
    0: ("test", "accuracy", "NumIters"),
    1: ("test", "accuracy", "Seconds"),
    2: ("test", "loss", "NumIters"),
    3: ("test", "loss", "Seconds"),
    4: ("train", "LearningRate", "NumIters"),
    5: ("train", "LearningRate", "Seconds"),
    6: ("train", "loss", "NumIters"),
    7: ("train", "loss", "Seconds"),
}
_AXIS_NAMES = {"NumIters": "Iters", "Seconds": "Seconds", "LearningRate": "learning rate",
               "accuracy": "accuracy", "loss": "loss"}


def chart_title(chart_type: int) -> str:
    phase, quantity, x = CHART_TYPES[chart_type]
    return f"{phase.capitalize()} {_AXIS_NAMES[quantity]} vs. {_AXIS_NAMES[x]}"


def chart_columns(rows: list[dict], quantity: str) -> list[str]:
    """The columns a chart of ``quantity`` plots: LearningRate, or every output column whose
    name contains ``loss`` / ``accuracy`` (``acc`` and ``top-k`` names, such as GoogLeNet's
    ``loss3/top-1``, are accuracies)."""
    if quantity == "LearningRate":
        return ["LearningRate"]
    names = [c for c in LogTables.columns(rows) if c not in BASE_COLUMNS]
    accuracy = [c for c in names if "acc" in c.lower() or "top-" in c.lower()]
    if quantity == "accuracy":
        return accuracy
    return [c for c in names if "loss" in c.lower() and c not in accuracy]


def plot_logs(chart_type: int, out_path, log_paths) -> list[tuple[str, str]]:
    """Draw one chart of every log to ``out_path`` (format from its suffix) with matplotlib.

    Returns the (log, column) curves drawn; raises NetEngineError when there is nothing to plot.
    """
    if chart_type not in CHART_TYPES:
        raise NetEngineError(f"chart type must be 0-7, got {chart_type}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NetEngineError("plotting needs matplotlib, which is not installed "
                             "(pip install matplotlib)") from None
    phase, quantity, x = CHART_TYPES[chart_type]
    curves = []
    figure, axes = plt.subplots(figsize=(8, 5))
    try:
        for log in log_paths:
            rows = getattr(parse_log(log), phase)
            for column in chart_columns(rows, quantity):
                points = [(r[x], r[column]) for r in rows
                          if column in r and not math.isnan(r[x]) and not math.isnan(r[column])]
                if not points:
                    continue
                label = Path(log).name if column == quantity else f"{Path(log).name}: {column}"
                axes.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                          linewidth=1, label=label)
                curves.append((str(log), column))
        if not curves:
            raise NetEngineError(f"nothing to plot: no {phase} '{quantity}' values in "
                                 f"{', '.join(str(p) for p in log_paths)}")
        axes.set_title(chart_title(chart_type))
        axes.set_xlabel(_AXIS_NAMES[x])
        axes.set_ylabel(_AXIS_NAMES[quantity])
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best", fontsize="small")
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            figure.savefig(out_path)
        except ValueError as err:  # unknown image format
            raise NetEngineError(f"cannot write {out_path}: {err}") from None
    finally:
        plt.close(figure)
    return curves
