"""Command-line tools shaped like Caffe's ``caffe train|test|time|device_query`` (the umbrella
``netengine <command>``, the tools/ wrappers and the ``netengine-*`` console scripts).

Shared here: the flags every tool takes (``--gpu``, ``--level``, ``--stage``, ``--debug``), the
flag spellings every tool accepts (Caffe's ``-solver x`` and ``-solver=x``, and both
``--max_iter`` and ``--max-iter``), the device choice, and the exit rule: 2 for a usage error
(argparse's message), 1 for a file or net error (one line ``error: ...`` on stderr, never a
traceback; ``--debug`` or ``NETENGINE_DEBUG=1`` adds it back).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable

from netengine import backend
from netengine.errors import NetEngineError
from netengine.logging_glog import at, emit_error, install

log = logging.getLogger("netengine.cli")
PROG_PREFIX = ""  # "netengine " while the umbrella command runs a tool: usage says so


def add_common_flags(parser: argparse.ArgumentParser, phase_default: str | None = None,
                     gpu_help: str = "run on this GPU id (needs CuPy); 'all' means GPU 0 "
                                     "here (default: CPU)") -> None:
    parser.add_argument("--gpu", default="", help=gpu_help)
    parser.add_argument("--level", type=int, default=0,
                        help="NetState level of the net(s) (default 0)")
    parser.add_argument("--stage", action="append", default=[],
                        help="NetState stage(s): comma-separated and/or the flag repeated "
                             "(default none)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the Python traceback too (as "
                             "NETENGINE_DEBUG=1 does)")
    if phase_default is not None:
        parser.add_argument("--phase", default=phase_default, choices=["TRAIN", "TEST"],
                            help=f"net phase (default {phase_default})")


def stages(flags: list[str] | str) -> list[str]:
    """The stages of ``--stage`` flags: each comma-separated, the flag repeatable."""
    flags = [flags] if isinstance(flags, str) else flags
    return [s for flag in flags for s in (part.strip() for part in flag.split(",")) if s]


_FLAG = re.compile(r"(--?)([A-Za-z][\w-]*)(=.*)?")


def caffe_spelling(token: str, known: set[str]) -> str:
    """``token`` rewritten to the parser's own spelling of a long flag: Caffe's single dash
    (``-solver``, ``-solver=x``) and either of ``_``/``-`` between words (``--max-iter``)."""
    match = _FLAG.fullmatch(token)
    if not match or token.split("=", 1)[0] in known:
        return token
    dashes, name, value = match.groups()
    if dashes == "-" and len(name) == 1:
        return token  # a short option's cluster (-o x), not a long flag
    for candidate in (name, name.replace("-", "_"), name.replace("_", "-")):
        if f"--{candidate}" in known:
            return f"--{candidate}{value or ''}"
    return token


def parse_caffe_args(parser: argparse.ArgumentParser, argv=None,
                     gpu_lists: bool = False) -> argparse.Namespace:
    """``parser.parse_args`` that also takes Caffe's gflags spelling of long options and both
    word separators, so command lines copied from Caffe's docs work. ``gpu_lists``: ``--gpu``
    may list several devices (train's data-parallel ``--gpu 0,1``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if PROG_PREFIX and not parser.prog.startswith(PROG_PREFIX):
        parser.prog = PROG_PREFIX + parser.prog
    known = {opt for action in parser._actions for opt in action.option_strings}
    end = argv.index("--") if "--" in argv else len(argv)
    argv[:end] = [caffe_spelling(token, known) for token in argv[:end]]
    args = parser.parse_args(argv)
    if getattr(args, "gpu", ""):
        try:
            gpu_flag_ids(args.gpu) if gpu_lists else gpu_id(args.gpu)
        except NetEngineError as err:
            parser.error(str(err))
    return args


def gpu_flag_ids(flag: str) -> list[int] | None:
    """The ids of a ``--gpu`` list (``0,1``), [] for ``all``, None for no flag; a usage check
    only (whether the devices exist is asked when they are used)."""
    flag = flag.strip()
    if not flag:
        return None
    if flag == "all":
        return []
    ids = [part.strip() for part in flag.split(",")]
    if not all(part.isdigit() for part in ids):
        raise NetEngineError(f"--gpu takes device ids separated by commas (e.g. 0,1) or 'all', "
                             f"got '{flag}'")
    return [int(part) for part in ids]


def require(parser: argparse.ArgumentParser, value, message: str) -> None:
    """A usage error (argparse's message, exit status 2) where a needed flag is missing."""
    if not value:
        parser.error(message)


def gpu_id(flag: str) -> int | None:
    """The device id a ``--gpu`` flag names (None: CPU); netengine trains on one GPU."""
    flag = flag.strip()
    if not flag:
        return None
    if flag == "all":
        return 0
    ids = [part.strip() for part in flag.split(",") if part.strip()]
    if len(ids) != 1 or not ids[0].isdigit():
        raise NetEngineError(f"--gpu takes one device id (or 'all'), got '{flag}': netengine "
                             "trains on a single GPU")
    return int(ids[0])


def use_device(device: int | None) -> None:
    """Switch to GPU ``device`` (a one-line NetEngineError where CuPy or the GPU is missing),
    or CPU for None."""
    if device is None:
        backend.set_mode_cpu()
        log.info("Use CPU.", extra=at("caffe.cpp:220"))
        return
    backend.set_device(device)
    backend.set_mode_gpu()
    log.info("Use GPU with device ID %d", device, extra=at("caffe.cpp:225"))


def debug_requested(argv: list[str] | None = None) -> bool:
    """True under ``--debug`` (or gflags' ``-debug``) or ``NETENGINE_DEBUG`` set to a true
    value: errors then carry their Python traceback."""
    argv = sys.argv[1:] if argv is None else argv
    flag = os.environ.get("NETENGINE_DEBUG", "").strip().lower()
    return flag not in ("", "0", "false", "no") or "--debug" in argv or "-debug" in argv


def run(main: Callable[[], int]) -> int:
    """Run a tool body with glog logging on stderr; any error → one line ``error: ...`` and
    exit 1 (130 for Ctrl-C), the traceback only under ``--debug``/``NETENGINE_DEBUG=1``."""
    install()
    try:
        return _in_one_line(main, debug_requested())
    finally:
        sys.stderr.flush()


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """For a tool's ``main(argv)`` that reports its own NetEngineErrors: whatever else escapes
    still ends as one line ``error: ...`` and exit 1 (130 for Ctrl-C), the traceback only under
    ``NETENGINE_DEBUG=1``/``--debug``."""

    @functools.wraps(main)
    def guarded(argv=None) -> int:
        return _in_one_line(lambda: main(argv), debug_requested(argv))

    return guarded


def _in_one_line(call: Callable[[], int], debug: bool) -> int:
    """``call()``, with every failure turned into one line ``error: ...`` and its exit status."""
    try:
        return call()
    except KeyboardInterrupt:
        emit_error(NetEngineError("interrupted"))
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every failure becomes one line
        if debug:
            traceback.print_exc(file=sys.stderr)
        emit_error(_as_engine_error(err))
        return 1


def _as_engine_error(err: Exception) -> NetEngineError:
    if isinstance(err, NetEngineError):
        return err
    if isinstance(err, MemoryError):
        return NetEngineError("out of memory (try a smaller batch_size)")
    # A failure no check foresaw: still one line, and the way to the details.
    return NetEngineError(f"internal error: {type(err).__name__}: {err} (rerun with --debug or "
                          "NETENGINE_DEBUG=1 for the traceback, and please report it)")
