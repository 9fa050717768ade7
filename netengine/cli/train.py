"""train: train a net from a solver prototxt, as ``caffe train``.

    tools/train --solver S.prototxt [--weights W.caffemodel[,W2...] | --snapshot X.solverstate]
                [--gpu ID] [--level N] [--stage a,b] [--sigint_effect stop|snapshot|none]
                [--sighup_effect stop|snapshot|none] [--max_iter N] [--report RUN.html]

Logs in Caffe's glog format on stderr (Caffe's tools/extra/parse_log.py reads them), with a
progress bar when stderr is a terminal and tqdm is installed.

Signals, as Caffe: SIGINT (Ctrl-C) defaults to ``stop`` and SIGHUP to ``snapshot``. A signal
only sets a flag that the solver reads between iterations (and between test batches): ``stop``
snapshots and ends the run cleanly (exit status 0), ``snapshot`` writes a snapshot and goes on,
``none`` ignores the signal. A second Ctrl-C while a stop is pending aborts at once (exit 130).

Device: ``--gpu ID`` (or ``all`` = 0) runs on that GPU and fails with a one-line error where
CuPy or the GPU is missing. Without ``--gpu``, a solver file's explicit ``solver_mode: GPU``
(Caffe's lenet_solver has one) uses ``device_id`` when a GPU is usable and falls back to CPU
with a warning otherwise, so Caffe's own solver files run unmodified on CPU-only machines.

``--report RUN.html`` (netengine only) writes a self-contained HTML report of the run (loss,
test outputs and learning rate against iterations, speed, the solver's settings), rewritten at
every display and test step; it reloads itself in the browser until the run ends.

Data-parallel (``netengine.parallel``): under ``mpiexec -n N`` (N > 1) each process trains
as one rank: ``batch_size`` is per rank, gradients are averaged over the ranks every step,
rank 0 alone logs and snapshots, a failing rank ends the job (``error: rank r of N: ...``).
``--gpu 0,1`` (Caffe's list) re-launches this command under ``mpiexec`` with one rank per
listed GPU; under ``mpiexec``, ``--gpu all`` or a list gives each rank its local rank's GPU.

``--max_iter`` (netengine only) overrides the solver's max_iter, e.g. for a short check run.
As ``caffe train`` does, ``--level`` (default 0) replaces the solver's train_state level and
``--stage`` adds to its stages. Caffe's single-dash spelling (``-solver S``) works too.
"""
from __future__ import annotations

import argparse
import logging
import signal

from netengine import backend, parallel
from netengine.cli import (
    add_common_flags,
    gpu_id,
    parse_caffe_args,
    require,
    run,
    stages,
    use_device,
)
from netengine.errors import NetEngineError
from netengine.html.run_report import live_report
from netengine.logging_glog import at, progress
from netengine.parallel import launch, threads
from netengine.proto import caffe_pb2

log = logging.getLogger("netengine.cli")
EFFECTS = ("stop", "snapshot", "none")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train", description="Train a net with a solver prototxt (like `caffe train`).",
        epilog="Ctrl-C snapshots and stops (see --sigint_effect); SIGHUP snapshots. Logs use "
               "Caffe's glog format on stderr.")
    parser.add_argument("--solver", default="", help="the solver prototxt (required)")
    parser.add_argument("--weights", default="",
                        help="caffemodel(s) to fine-tune from, comma-separated (binary or "
                             ".h5); overrides the solver's 'weights'")
    parser.add_argument("--snapshot", default="",
                        help="a .solverstate (or .solverstate.h5) to resume training from")
    add_common_flags(parser, gpu_help="run on this GPU id (needs CuPy); 'all' means GPU 0 here. "
                                      "Default: the solver's solver_mode/device_id")
    parser.add_argument("--sigint_effect", default="stop", choices=EFFECTS,
                        help="what SIGINT (Ctrl-C) does (default stop: snapshot, then stop)")
    parser.add_argument("--sighup_effect", default="snapshot", choices=EFFECTS,
                        help="what SIGHUP does (default snapshot)")
    parser.add_argument("--max_iter", type=int, default=None,
                        help="override the solver's max_iter (netengine extension)")
    parser.add_argument("--report", default="", metavar="RUN.html",
                        help="write a live HTML report of the run (netengine extension)")
    args = parse_caffe_args(parser, argv, gpu_lists=True)
    require(parser, args.solver, "need a solver definition to train: give --solver")
    if args.snapshot and args.weights:
        parser.error("give a snapshot to resume training (--snapshot) or weights to fine-tune "
                     "(--weights), not both")
    if args.max_iter is not None and args.max_iter < 0:
        parser.error(f"--max_iter must be >= 0, got {args.max_iter}")
    return args


class SignalHandler:
    """Turns SIGINT/SIGHUP into solver actions polled between iterations (Caffe's
    SignalHandler); installs its handlers on enter and restores the old ones on exit."""

    def __init__(self, sigint_effect: str = "stop", sighup_effect: str = "snapshot") -> None:
        self.effects = {signal.SIGINT: sigint_effect}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        self.pending: list[int] = []
        self.stopping = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.stopping:
            raise KeyboardInterrupt
        if self.effects.get(signum) == "stop":
            self.stopping = True
        self.pending.append(signum)

    def action(self) -> str:
        """The next requested action: "stop", "snapshot" or "none"."""
        while self.pending:
            signum = self.pending.pop(0)
            effect = self.effects.get(signum, "none")
            name = signal.Signals(signum).name
            if effect == "none":
                log.info("Caught %s; ignored (effect none)", name,
                         extra=at("signal_handler.cpp:40"))
                continue
            verb = "stopping" if effect == "stop" else "snapshotting"
            tail = " (press Ctrl-C again to abort at once)" if effect == "stop" else ""
            log.info("Caught %s: %s after the current iteration%s", name, verb, tail,
                     extra=at("signal_handler.cpp:44"))
            return effect
        return "none"

    def __enter__(self) -> SignalHandler:
        for signum in self.effects:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _device(args, param) -> int | None:
    device = gpu_id(args.gpu)
    if device is not None:
        return device
    if param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU:
        if backend.cupy_available():
            return param.device_id
        log.warning("the solver asks for solver_mode: GPU, but CuPy or a CUDA GPU is not "
                    "available: training on CPU", extra=at("caffe.cpp:204"))
    return None


def _parallel_device(args, param, dp, relaunch: bool) -> int | None:
    """The GPU of this rank (``--gpu 0,1``: the local rank's), or of the one process; a list
    given to one process started from the command line (``relaunch``) starts one rank per GPU
    under mpiexec."""
    if dp is not None:
        ids = launch.gpu_list(args.gpu)
        if ids is None:
            return _device(args, param)
        return launch.rank_gpu(ids, dp.comm.local_rank, dp.comm.local_size)
    if "," in args.gpu:
        ids = launch.gpu_list(args.gpu)
        if len(ids) > 1:
            launch.check_gpus(args.gpu, ids)
            if not relaunch:
                raise NetEngineError(f"--gpu {args.gpu}: one rank per GPU; start them with "
                                     f"mpiexec -n {len(ids)} ... --gpu {args.gpu}")
            launch.relaunch(len(ids))
    return _device(args, param)


def train(args, relaunch: bool = False) -> int:
    """Train in this process; under mpiexec with N > 1 ranks, as one rank of a data-parallel
    run (``netengine.parallel``), where a failing rank ends the whole job. ``relaunch``: a
    ``--gpu`` list may re-run the command line under mpiexec."""
    comm = parallel.world()
    if comm is None:
        return _train(args, None, relaunch)
    dp = parallel.DataParallel(comm)
    try:
        return _train(args, dp, False)
    except BaseException as err:
        dp.fail(err, 130 if isinstance(err, KeyboardInterrupt) else 1)
        raise


def _train(args, dp, relaunch: bool) -> int:
    from netengine.solvers import get_solver, read_solver_param

    if dp is not None:
        dp.quiet_other_ranks()
        log.info("Data-parallel training on %d ranks; %s", dp.size,
                 threads.split_threads(dp.comm.local_size))
    param = read_solver_param(args.solver)
    param.train_state.level = args.level  # always, as caffe train does (default 0)
    if stages(args.stage):
        param.train_state.stage.extend(stages(args.stage))
    if args.max_iter is not None:
        param.max_iter = args.max_iter
    use_device(_parallel_device(args, param, dp, relaunch))
    if dp is not None:
        param.random_seed = dp.agree_seed(param.random_seed)
    if args.snapshot:
        param.ClearField("weights")
    elif args.weights:
        param.ClearField("weights")
        param.weights.append(args.weights)
    solver = get_solver(param, solver_file=args.solver)
    resume = args.snapshot or None
    if dp is not None:
        dp.attach(solver)
        if resume:
            dp.resume(solver, resume)
            resume = None
    with SignalHandler(args.sigint_effect, args.sighup_effect) as handler, \
            progress(param.max_iter, solver.iter) as bar, \
            live_report(args.report if dp is None or dp.is_root else "", args.solver,
                        param) as report:
        solver.set_action_function(dp.agree(handler.action) if dp else handler.action)
        solver.add_callback(lambda: None, lambda: bar.goto(solver.iter + 1,
                                                           loss=solver.smoothed_loss))
        solver.add_callback(report.refresh, lambda: None)
        if args.snapshot:
            log.info("Resuming from %s", args.snapshot, extra=at("caffe.cpp:250"))
        log.info("Starting Optimization", extra=at("caffe.cpp:254"))
        solver.solve(resume)
    if dp is not None:
        log.info("%s", dp.allreduce_summary())
        dp.close()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(lambda: train(args, relaunch=argv is None))


if __name__ == "__main__":
    raise SystemExit(main())
