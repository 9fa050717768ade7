"""Command-line tools shaped like Caffe's ``caffe train|test|time|device_query`` (the umbrella
``netengine <command>``, the tools/ wrappers and the ``netengine-*`` console scripts).

Shared here: the flags every tool takes (``--gpu``, ``--level``, ``--stage``), the flag
spellings every tool accepts (Caffe's ``-solver x`` and ``-solver=x``, and both ``--max_iter``
and ``--max-iter``), the device choice, and the exit rule: 2 for a usage error (argparse's
message), 1 for a file or net error (one line ``error: ...`` on stderr, never a traceback).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
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


def parse_caffe_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args`` that also takes Caffe's gflags spelling of long options and both
    word separators, so command lines copied from Caffe's docs work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if PROG_PREFIX and not parser.prog.startswith(PROG_PREFIX):
        parser.prog = PROG_PREFIX + parser.prog
    known = {opt for action in parser._actions for opt in action.option_strings}
    end = argv.index("--") if "--" in argv else len(argv)
    argv[:end] = [caffe_spelling(token, known) for token in argv[:end]]
    args = parser.parse_args(argv)
    if getattr(args, "gpu", ""):
        try:
            gpu_id(args.gpu)
        except NetEngineError as err:
            parser.error(str(err))
    return args


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


def run(main: Callable[[], int]) -> int:
    """Run a tool body with glog logging on stderr; NetEngineError → ``error: ...``, exit 1."""
    install()
    try:
        return main()
    except NetEngineError as err:
        emit_error(err)
        return 1
    except KeyboardInterrupt:
        emit_error(NetEngineError("interrupted"))
        return 130
    except MemoryError:
        emit_error(NetEngineError("out of memory (try a smaller batch_size)"))
        return 1
    finally:
        sys.stderr.flush()
