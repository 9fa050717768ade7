#!/usr/bin/env python3
"""GPU benchmark: netengine on CuPy against PyTorch (CUDA, eager) in the same run.

  python bench/gpu_bench.py --out OUTDIR [--budget SECONDS] [--quick]

Measures, each side by side with PyTorch where it applies:
  1. LeNet training images/s at batch 64 and 256 (SGD step on fixed synthetic data);
     netengine's per-layer forward/backward ms at batch 64.
  2. The 10,000-iteration MNIST run: ``tools/train --solver nets/mnist_solver.prototxt
     --gpu 0`` wall time and final test accuracy (PyTorch: the same LeNet, data and schedule);
     it leaves ``--reserve`` seconds for part 3 and is extrapolated when cut short.
  3. GoogLeNet (BVLC deploy) and ResNet-50 (Kaiming He's deploy) forward+backward ms at
     batch 32, random weights (BatchNorm statistics taken from the batch); PyTorch mirrors the
     net layer by layer with the same weights and the outputs are compared.
  4. GPU memory peak of every netengine run (CuPy pool) and of PyTorch's allocator.

Writes OUTDIR/gpu_bench.json and OUTDIR/gpu_bench.txt (the table also goes to stdout). Each
part is time-boxed by --budget (seconds, whole script) and skipped with a note when the budget
is spent; without CuPy or a GPU the script says why and exits 0. PyTorch is optional.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ACCEPTANCE = REPO.parent / "shared" / "acceptance"
NETS = {
    "googlenet": ACCEPTANCE / "nets/bvlc_caffe/models/bvlc_googlenet/deploy.prototxt",
    "resnet50": ACCEPTANCE / "nets/kaiminghe_deep-residual-networks/prototxt/"
                             "ResNet-50-deploy.prototxt",
}

sys.path.insert(0, str(REPO / "bench"))
from lenet_cpu import LENET, SOLVER  # noqa: E402  (the same LeNet and solver as the CPU bench)

import netengine  # noqa: E402
from netengine import backend  # noqa: E402

START = time.perf_counter()
# The same 10,000-iteration run on CPU (netengine on NumPy, tools/train without --gpu, seed
# 1701), measured once on a 2-core development machine: the accuracy the GPU run should reach.
CPU_MNIST_REFERENCE = {"final_accuracy": 0.979, "wall_s": 1622.6,
                       "where": "netengine CPU (NumPy), 2-core development machine"}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = START + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


# -- helpers -----------------------------------------------------------------------------------
def _torch():
    try:
        import torch
    except Exception as err:  # not installed, or a broken install
        return None, f"PyTorch unavailable: {type(err).__name__}: {err}"
    if not torch.cuda.is_available():
        return None, "PyTorch has no CUDA device"
    return torch, None


def _sync(torch=None) -> None:
    backend.synchronize()
    if torch is not None:
        torch.cuda.synchronize()


def _timed(step, iters: int, repeats: int, sync) -> float:
    """Median seconds per call of ``step`` (after 3 warm-up calls)."""
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def _track_memory(fn):
    """(result of fn(), netengine device peak bytes during it)."""
    backend.reset_device_memory_peak()
    backend.track_device_memory(True)
    try:
        result = fn()
    finally:
        backend.track_device_memory(False)
    return result, backend.device_memory_peak()


# -- 1. LeNet images/s -------------------------------------------------------------------------
def _lenet_solver(batch: int, tmp: Path):
    from google.protobuf import text_format

    from netengine.proto import caffe_pb2
    from netengine.solvers import get_solver

    param = text_format.Parse(SOLVER.replace("solver_mode: CPU", "solver_mode: GPU"),
                              caffe_pb2.SolverParameter())
    text_format.Parse(LENET % {"n": batch}, param.net_param)
    path = tmp / f"lenet_{batch}.prototxt"
    path.write_text(text_format.MessageToString(param))
    solver = get_solver(str(path))
    rng = np.random.default_rng(0)
    solver.net.blobs["data"].data[...] = rng.random((batch, 1, 28, 28)).astype(np.float32)
    solver.net.blobs["label"].data[...] = rng.integers(0, 10, batch).astype(np.float32)
    return solver


def _per_layer_ms(net, iters: int = 20) -> list:
    n = len(net.layers)
    fwd, bwd, mark = [0.0] * n, [0.0] * n, {}

    def start(key):
        def cb(i):
            backend.synchronize()
            mark[key] = time.perf_counter()
        return cb

    def stop(key, acc):
        def cb(i):
            backend.synchronize()
            acc[i] += time.perf_counter() - mark[key]
        return cb

    net.before_forward(start("f"))
    net.after_forward(stop("f", fwd))
    net.before_backward(start("b"))
    net.after_backward(stop("b", bwd))
    for _ in range(iters):
        net.forward_backward()
    return [(layer.name, layer.type, round(1e3 * fwd[i] / iters, 4),
             round(1e3 * bwd[i] / iters, 4)) for i, layer in enumerate(net.layers)]


def _torch_lenet_rate(torch, batch: int, iters: int, repeats: int) -> tuple[float, int]:
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 20, 5), torch.nn.MaxPool2d(2, 2, ceil_mode=True),
        torch.nn.Conv2d(20, 50, 5), torch.nn.MaxPool2d(2, 2, ceil_mode=True),
        torch.nn.Flatten(), torch.nn.Linear(800, 500), torch.nn.ReLU(),
        torch.nn.Linear(500, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    seconds = _timed(step, iters, repeats, lambda: torch.cuda.synchronize())
    return batch / seconds, int(torch.cuda.max_memory_allocated())


def bench_lenet(args, out: dict, budget: Budget, torch) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (64, 256):
            if budget.left() < 20:
                out[f"lenet_train_{batch}"] = {"skipped": "time budget spent"}
                continue
            iters = args.iters if batch == 64 else max(args.iters // 2, 10)
            solver = _lenet_solver(batch, Path(tmp))
            seconds, peak = _track_memory(
                lambda s=solver, n=iters: _timed(lambda: s.step(1), n, args.repeats, _sync))
            row = {"netengine_images_per_s": batch / seconds, "netengine_ms_per_iter":
                   1e3 * seconds, "netengine_peak_bytes": peak}
            if torch is not None:
                rate, tpeak = _torch_lenet_rate(torch, batch, iters, args.repeats)
                row.update(torch_images_per_s=rate, torch_peak_bytes=tpeak,
                           ratio_vs_torch=row["netengine_images_per_s"] / rate)
            out[f"lenet_train_{batch}"] = row
            if batch == 64:
                out["lenet_layers_ms_batch64"] = _per_layer_ms(solver.net)


# -- 2. GoogLeNet / ResNet-50 forward+backward -----------------------------------------------------
def _deploy_net(path: Path, batch: int):
    from netengine.formats.prototxt import read_text_proto
    from netengine.proto import caffe_pb2

    param, _ = read_text_proto(path, caffe_pb2.NetParameter())
    param.force_backward = True
    net = netengine.Net(param, netengine.TEST)
    net.blobs["data"].reshape(batch, 3, 224, 224)
    net.reshape()
    rng = np.random.default_rng(0)
    for layer in net.layers:
        blobs = layer.blobs
        if layer.type == "BatchNorm":
            blobs[0].data[...] = 0.0
            blobs[1].data[...] = 1.0
            blobs[2].data[...] = 1.0
        elif layer.type == "Scale":
            blobs[0].data[...] = 1.0
            if len(blobs) > 1:
                blobs[1].data[...] = 0.0
        elif blobs:
            fan_in = int(np.prod(blobs[0].shape[1:]))
            blobs[0].data[...] = rng.normal(0, np.sqrt(2.0 / fan_in), blobs[0].shape) \
                .astype(np.float32)
            for extra in blobs[1:]:
                extra.data[...] = 0.0
    net.blobs["data"].data[...] = rng.normal(size=net.blobs["data"].shape).astype(np.float32)
    _calibrate_batchnorm(net)
    return net


def _calibrate_batchnorm(net) -> None:
    """Give each BatchNorm the statistics of its input on this batch (as a trained net has),
    so activations stay in range through ResNet's 50 layers; one forward pass."""
    for i, layer in enumerate(net.layers):
        if layer.type == "BatchNorm":
            x = net.bottom_vecs[i][0].data
            xp = net.bottom_vecs[i][0].xp
            axes = (0,) + tuple(range(2, x.ndim))
            layer.blobs[0].data[...] = x.mean(axis=axes)
            layer.blobs[1].data[...] = x.var(axis=axes)
            layer.blobs[2].data[...] = xp.ones(1, dtype=x.dtype)
        net.forward_from_to(i, i)


def _torch_mirror(torch, net, device: str = "cuda"):
    """A function running ``net``'s layers in torch.nn.functional with its weights."""
    import torch.nn.functional as F

    def t(array, grad=False):
        tensor = torch.as_tensor(backend.to_host(array), device=device).contiguous()
        return tensor.requires_grad_(grad)

    weights = {layer.name: [t(b.data, True) for b in layer.blobs] for layer in net.layers}
    params = [w for ws in weights.values() for w in ws if w.requires_grad]

    def pair(values, default):
        values = list(values)
        return tuple(values) * 2 if len(values) == 1 else tuple(values) or (default, default)

    def run(data, record=None):
        """The net's output; ``record`` (a dict) also gets every top tensor by blob name."""
        blobs = {"data": data}
        for layer, bottoms, tops in zip(net.layers, net.bottom_ids, net.top_ids):
            xs, p, w = [blobs[b] for b in bottoms], layer.layer_param, weights[layer.name]
            kind = layer.type
            if kind == "Input":
                continue
            if kind == "Convolution":
                c = p.convolution_param
                kernel = (c.kernel_h, c.kernel_w) if c.kernel_h else pair(c.kernel_size, 1)
                stride = (c.stride_h, c.stride_w) if c.stride_h else pair(c.stride, 1)
                pad = (c.pad_h, c.pad_w) if c.pad_h or c.pad_w else pair(c.pad, 0)
                assert tuple(w[0].shape[2:]) == kernel
                y = F.conv2d(xs[0], w[0], w[1] if len(w) > 1 else None, stride=stride,
                             padding=pad, dilation=pair(c.dilation, 1), groups=c.group)
            elif kind == "Pooling":
                q = p.pooling_param
                k = xs[0].shape[2:] if q.global_pooling else \
                    (q.kernel_h, q.kernel_w) if q.kernel_h else (q.kernel_size,) * 2
                s = 1 if q.global_pooling else (q.stride_h, q.stride_w) if q.stride_h \
                    else q.stride
                pad = (q.pad_h, q.pad_w) if q.pad_h or q.pad_w else q.pad
                pool = F.max_pool2d if q.pool == 0 else F.avg_pool2d
                y = pool(xs[0], k, s, pad, ceil_mode=True)
            elif kind == "ReLU":
                y = F.relu(xs[0]) if not p.relu_param.negative_slope else \
                    F.leaky_relu(xs[0], p.relu_param.negative_slope)
            elif kind == "LRN":
                q = p.lrn_param
                y = F.local_response_norm(xs[0], q.local_size, q.alpha, q.beta, q.k)
            elif kind == "Concat":
                y = torch.cat(xs, p.concat_param.axis)
            elif kind == "InnerProduct":
                y = F.linear(xs[0].flatten(1), w[0], w[1] if len(w) > 1 else None)
            elif kind == "Softmax":
                y = F.softmax(xs[0], 1)
            elif kind == "BatchNorm":
                factor = float(w[2].detach().reshape(-1)[0])
                factor = 1.0 / factor if factor else 0.0
                y = F.batch_norm(xs[0], w[0].detach() * factor, w[1].detach() * factor,
                                 training=False, eps=p.batch_norm_param.eps)
            elif kind == "Scale":
                shape = (1, -1, 1, 1)
                y = xs[0] * w[0].reshape(shape)
                if len(w) > 1:
                    y = y + w[1].reshape(shape)
            elif kind == "Eltwise":
                y = xs[0]
                for other in xs[1:]:
                    y = y + other
            elif kind in ("Dropout", "Split"):
                y = xs[0]
            else:
                raise RuntimeError(f"no torch mirror for layer type {kind}")
            for top in tops:
                blobs[top] = y
            if record is not None:
                if y.requires_grad:
                    y.retain_grad()
                record.update((top, y) for top in tops)
        return blobs[net.top_ids[-1][0]]

    return run, params


def bench_big_nets(args, out: dict, budget: Budget, torch) -> None:
    batch = args.big_batch
    for name, path in NETS.items():
        key = f"{name}_fwd_bwd_batch{batch}"
        if not path.exists():
            out[key] = {"skipped": f"{path} absent"}
            continue
        if budget.left() < 45:
            out[key] = {"skipped": "time budget spent"}
            continue
        row: dict = {}
        out[key] = row
        net = _deploy_net(path, batch)
        output = net.top_ids[-1][0]
        rng = np.random.default_rng(1)
        top_diff = rng.normal(size=net.blobs[output].shape).astype(np.float32)

        def step(net=net, output=output, top_diff=top_diff):
            net.forward()
            net.blobs[output].diff[...] = top_diff
            net.clear_param_diffs()
            net.backward()

        seconds, peak = _track_memory(lambda s=step: _timed(s, args.big_iters, 3, _sync))
        row.update(netengine_ms=1e3 * seconds, netengine_peak_bytes=peak)
        if torch is None:
            continue
        run, params = _torch_mirror(torch, net)
        data = torch.as_tensor(net.blobs["data"].host_data(), device="cuda").requires_grad_()
        grad = torch.as_tensor(top_diff, device="cuda")
        with torch.no_grad():
            got = run(data).cpu().numpy()
        net.forward()
        row["max_abs_diff_vs_torch"] = float(np.max(np.abs(got - net.blobs[output].host_data())))

        def torch_step(run=run, params=params, data=data, grad=grad):
            for p in params:
                p.grad = None
            data.grad = None
            run(data).backward(grad)

        for tf32 in (False, True):  # PyTorch's default lets cuDNN convolutions use TF32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.cuda.reset_peak_memory_stats()
            t_seconds = _timed(torch_step, args.big_iters, 3, lambda: torch.cuda.synchronize())
            tag = "torch_tf32" if tf32 else "torch_fp32"
            row[f"{tag}_ms"] = 1e3 * t_seconds
            row[f"{tag}_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        torch.backends.cudnn.allow_tf32 = True
        row["ratio_vs_torch_fp32"] = row["netengine_ms"] / row["torch_fp32_ms"]
        del net, run, params


# -- 3. the 10,000-iteration MNIST run -----------------------------------------------------------
def _mnist_solver(tmp: Path, max_iter: int) -> Path:
    text = (REPO / "nets" / "mnist_solver.prototxt").read_text()
    text = text.replace('net: "nets/mnist_train_test.prototxt"',
                        f'net: "{REPO / "nets" / "mnist_train_test.prototxt"}"')
    text += (f"\nmax_iter: {max_iter}\nsnapshot: 0\nsnapshot_after_train: false\n"
             f'snapshot_prefix: "{tmp / "lenet"}"\n')
    path = tmp / "mnist_solver.prototxt"
    path.write_text(text)
    return path


def bench_mnist_run(args, out: dict, budget: Budget, torch) -> None:
    row: dict = {"max_iter": args.mnist_iters}
    if args.mnist_iters == 10000:
        row["cpu_reference"] = CPU_MNIST_REFERENCE
    out["mnist_10k_run"] = row
    # Leave time for what follows (PyTorch's run, then the big nets).
    limit = budget.left() - args.reserve - (25 if torch is not None else 0)
    if limit < 30:
        row["skipped"] = "time budget spent"
        return
    with tempfile.TemporaryDirectory() as tmp:
        solver = _mnist_solver(Path(tmp), args.mnist_iters)
        cmd = [sys.executable, str(REPO / "tools" / "train"), "--solver", str(solver),
               "--gpu", "0"]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
            log, finished = proc.stderr, proc.returncode == 0
            if not finished:
                row["error"] = log.strip().splitlines()[-1:] if log else proc.returncode
        except subprocess.TimeoutExpired as err:
            log = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
            finished = False
            row["timed_out_after_s"] = round(limit, 1)
        wall = time.perf_counter() - start
        (Path(args.out) / "mnist_10k_train.log").write_text(log)
    iters = [int(m) for m in re.findall(r"Iteration (\d+)", log)]
    accuracy = re.findall(r"Test net output #\d+: accuracy = ([0-9.]+)", log)
    row.update(wall_s=round(wall, 2), finished=finished, last_iteration=max(iters, default=0),
               final_accuracy=float(accuracy[-1]) if accuracy else None)
    if not finished and iters and max(iters) > 0:
        row["extrapolated_wall_s"] = round(wall * args.mnist_iters / max(iters), 1)
    if torch is not None and budget.left() - args.reserve > 10:
        row["torch"] = _torch_mnist_run(torch, args.mnist_iters,
                                        min(25.0, budget.left() - args.reserve))


def _torch_mnist_run(torch, max_iter: int, limit: float, device: str = "cuda") -> dict:
    """The same LeNet schedule in PyTorch eager: lr inv policy, momentum 0.9, wd 5e-4, batch 64
    from the embedded 8,000 training digits, 20×100 test digits every 500 iterations."""
    import torch.nn.functional as F

    from netengine.data.idx import read_idx

    def load(stem: str):
        images = read_idx(str(REPO / "data" / "mnist" / f"{stem}-images-idx3-ubyte.gz"))
        labels = read_idx(str(REPO / "data" / "mnist" / f"{stem}-labels-idx1-ubyte.gz"))
        x = torch.as_tensor(np.asarray(images, np.float32)[:, None] * 0.00390625, device=device)
        return x, torch.as_tensor(np.asarray(labels, np.int64), device=device)

    try:
        train_x, train_y = load("train")
        test_x, test_y = load("t10k")
    except Exception as err:
        return {"skipped": f"cannot read data/mnist with netengine.data.sources: {err}"}
    torch.manual_seed(1701)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 20, 5), torch.nn.MaxPool2d(2, 2, ceil_mode=True),
        torch.nn.Conv2d(20, 50, 5), torch.nn.MaxPool2d(2, 2, ceil_mode=True),
        torch.nn.Flatten(), torch.nn.Linear(800, 500), torch.nn.ReLU(),
        torch.nn.Linear(500, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 + 1e-4 * it) ** -0.75)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n, accuracy = train_x.shape[0], None
    sync()
    start = time.perf_counter()
    for it in range(max_iter):
        lo = (it * 64) % n
        xb, yb = train_x[lo:lo + 64], train_y[lo:lo + 64]
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        sched.step()
        if (it + 1) % 500 == 0 or it + 1 == max_iter:
            with torch.no_grad():
                hits = sum(int((model(test_x[b:b + 100]).argmax(1) == test_y[b:b + 100]).sum())
                           for b in range(0, 2000, 100))
            accuracy = hits / 2000
            if time.perf_counter() - start > limit:
                return {"timed_out_at_iteration": it + 1, "accuracy": accuracy}
    sync()
    return {"wall_s": round(time.perf_counter() - start, 2), "final_accuracy": accuracy}


# -- report ----------------------------------------------------------------------------------------
def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def report(out: dict) -> str:
    lines = [f"# netengine GPU benchmark ({out.get('device')})",
             f"# PyTorch: {out.get('torch')}", ""]
    for batch in (64, 256):
        row = out.get(f"lenet_train_{batch}", {})
        if "netengine_images_per_s" in row:
            torch_part = (f", PyTorch {row['torch_images_per_s']:.0f} images/s "
                          f"({row['ratio_vs_torch']:.2f}x)" if "torch_images_per_s" in row
                          else "")
            rate = row["netengine_images_per_s"]
            lines.append(f"LeNet train, batch {batch}: netengine {rate:.0f}"
                         f" images/s{torch_part}; peak {_mib(row['netengine_peak_bytes'])} "
                         f"(PyTorch {_mib(row.get('torch_peak_bytes'))})")
        elif row:
            lines.append(f"LeNet train, batch {batch}: {row}")
    for name in NETS:
        key = next((k for k in out if k.startswith(f"{name}_fwd_bwd")), None)
        row = out.get(key, {}) if key else {}
        if "netengine_ms" in row:
            torch_part = ""
            if "torch_fp32_ms" in row:
                torch_part = (f", PyTorch {row['torch_fp32_ms']:.1f} ms fp32 / "
                              f"{row['torch_tf32_ms']:.1f} ms TF32 default "
                              f"({row['ratio_vs_torch_fp32']:.2f}x of fp32); outputs differ by "
                              f"{row['max_abs_diff_vs_torch']:.2e}")
            lines.append(f"{key}: netengine {row['netengine_ms']:.1f} ms{torch_part}; peak "
                         f"{_mib(row['netengine_peak_bytes'])} (PyTorch "
                         f"{_mib(row.get('torch_fp32_peak_bytes'))})")
        elif row:
            lines.append(f"{key}: {row}")
    row = out.get("mnist_10k_run", {})
    if row:
        lines.append(f"MNIST {row.get('max_iter')}-iteration run (tools/train --gpu 0): "
                     f"wall {row.get('wall_s')} s, finished {row.get('finished')}, final "
                     f"accuracy {row.get('final_accuracy')}"
                     + (f", extrapolated {row['extrapolated_wall_s']} s"
                        if "extrapolated_wall_s" in row else "")
                     + (f"; CPU reference accuracy {row['cpu_reference']['final_accuracy']}"
                        if "cpu_reference" in row else "")
                     + (f"; PyTorch {row['torch']}" if "torch" in row else ""))
    if out.get("lenet_layers_ms_batch64"):
        lines.append("netengine LeNet per layer, batch 64 (ms): forward backward")
        lines += [f"  {n:10s} {k:16s} {f:8.3f} {b:8.3f}"
                  for n, k, f, b in out["lenet_layers_ms_batch64"]]
    for key, err in out.get("errors", {}).items():
        lines.append(f"ERROR in {key}: {err.strip().splitlines()[-1]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for gpu_bench.json/.txt")
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds for the whole script (parts are skipped past it)")
    parser.add_argument("--iters", type=int, default=100, help="LeNet steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-batch", type=int, default=32)
    parser.add_argument("--big-iters", type=int, default=3)
    parser.add_argument("--mnist-iters", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="few iterations (a smoke run)")
    parser.add_argument("--parts", default="lenet,mnist,big",
                        help="comma-separated parts to run, in order: lenet, mnist, big")
    parser.add_argument("--reserve", type=float, default=60.0,
                        help="seconds the MNIST run leaves for the parts after it")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.repeats, args.big_iters, args.mnist_iters = 10, 1, 1, 200
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out: dict = {"device": backend.device_summary(), "errors": {}}
    reason = backend.gpu_unavailable_reason()
    if reason is not None:
        out["skipped"] = reason
    else:
        backend.select_gpu(0)
        torch, why = _torch()
        out["torch"] = why or f"{torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
        budget = Budget(args.budget)
        parts = {"lenet": bench_lenet, "big": bench_big_nets, "mnist": bench_mnist_run}
        for name in args.parts.split(","):
            try:
                parts[name.strip()](args, out, budget, torch)
            except Exception:
                out["errors"][name] = traceback.format_exc()
                print(out["errors"][name], file=sys.stderr)
        out["total_s"] = round(time.perf_counter() - START, 1)
    text = report(out) if "skipped" not in out else f"skipped: {out['skipped']}\n"
    (Path(args.out) / "gpu_bench.json").write_text(json.dumps(out, indent=2, default=str))
    (Path(args.out) / "gpu_bench.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
