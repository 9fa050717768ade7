"""Command-line tools shaped like Caffe's ``caffe train|test|time`` (tools/ wrappers and the
``netengine-train``/``-test``/``-time`` console scripts).

Shared here: the flags every tool takes (``--gpu``, ``--level``, ``--stage``), the device
choice, and the error rule: a NetEngineError prints one line ``error: ...`` on stderr and the
tool exits 1, never with a traceback.
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


def add_common_flags(parser: argparse.ArgumentParser, phase_default: str | None = None) -> None:
    parser.add_argument("--gpu", default="",
                        help="run on this GPU id (needs CuPy); 'all' means GPU 0 here. Empty: "
                             "the solver's solver_mode/device_id (train), else CPU")
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


_GFLAG = re.compile(r"-([A-Za-z_][\w-]+)(=.*)?")


def parse_caffe_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args`` that also takes Caffe's gflags spelling of long options
    (``-solver x``, ``-solver=x``), so command lines copied from Caffe's docs work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known = {opt for action in parser._actions for opt in action.option_strings}
    for i, token in enumerate(argv):
        match = _GFLAG.fullmatch(token)
        if match and f"--{match.group(1)}" in known and f"-{match.group(1)}" not in known:
            argv[i] = "-" + token
    return parser.parse_args(argv)


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
