#!/usr/bin/env python3
"""CPU benchmark: netengine against PyTorch on Caffe's LeNet (and GoogLeNet forward), one run.

Every measurement runs in its own worker process (so peak RSS is per engine and thread
settings apply from the start); the parent prints one table with ratios. PyTorch is optional
(`pip install torch==2.13.0`, CPU build): without it only netengine's figures print.

Threads: each worker gets OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = MKL_NUM_THREADS = N (and
torch.set_num_threads(N)) for N in --threads. netengine's own loops are single-threaded; N
only reaches its GEMMs (OpenBLAS). Without these variables a user gets OpenBLAS's default, one
thread per CPU (2 here); on a busy machine 2 BLAS threads can be much slower than 1.

  python bench/lenet_cpu.py                      # full table: threads 1 and 2
  python bench/lenet_cpu.py --quick              # fewer repeats, threads 2 only
  python bench/lenet_cpu.py --rounds 3           # alternate the engines 3 times, medians
  python bench/lenet_cpu.py --googlenet          # also GoogLeNet forward, batch 8
  python bench/lenet_cpu.py --fashion-mnist      # also one real training epoch (60,000 images)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOOGLENET = REPO.parent / "shared/acceptance/nets/bvlc_caffe/models/bvlc_googlenet/deploy.prototxt"
FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
CAFFE_IMAGES_S = 3100.0  # real BVLC Caffe, LeNet batch 64 train, this machine (issue 6)

LENET = """
name: "LeNet"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: %(n)d dim: 1 dim: 28 dim: 28 } shape { dim: %(n)d } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 20 kernel_size: 5 stride: 1
          weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 50 kernel_size: 5 stride: 1
          weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
        param { lr_mult: 1 } param { lr_mult: 2 }
        inner_product_param { num_output: 500
          weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        param { lr_mult: 1 } param { lr_mult: 2 }
        inner_product_param { num_output: 10
          weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

SOLVER = """
base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "inv" gamma: 0.0001 power: 0.75
max_iter: 100000 display: 0 snapshot: 0 solver_mode: CPU random_seed: 1701
"""


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- workers ---------------------------------------------------------------------------------------
def _median_rate(step, images: int, iters: int, repeats: int) -> float:
    step()
    step()  # warm-up: buffers, BLAS threads, allocator
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            step()
        rates.append(images * iters / (time.perf_counter() - start))
    return statistics.median(rates)


def _lenet_net(batch: int, phase_train: bool = True):
    import numpy as np
    from google.protobuf import text_format

    import netengine
    from netengine.proto import caffe_pb2

    param = text_format.Parse(LENET % {"n": batch}, caffe_pb2.NetParameter())
    if not phase_train:
        del param.layer[-1]
    netengine.set_random_seed(1701)
    net = netengine.Net(param, netengine.TRAIN if phase_train else netengine.TEST)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.random((batch, 1, 28, 28)) * 0.996
    if phase_train:
        net.blobs["label"].data[...] = rng.integers(0, 10, batch)
    return net


def _netengine_solver(batch: int, tmp: Path):
    from google.protobuf import text_format

    import netengine
    from netengine.proto import caffe_pb2

    solver_param = text_format.Parse(SOLVER, caffe_pb2.SolverParameter())
    text_format.Parse(LENET % {"n": batch}, solver_param.net_param)
    path = tmp / f"lenet_solver_{batch}.prototxt"
    path.write_text(text_format.MessageToString(solver_param))
    solver = netengine.SGDSolver(str(path))
    net = _lenet_net(batch)
    for name in ("data", "label"):
        solver.net.blobs[name].data[...] = net.blobs[name].data
    return solver


def _per_layer_ms(net, iters: int = 20) -> list[tuple[str, str, float, float]]:
    fwd = [0.0] * len(net.layers)
    bwd = [0.0] * len(net.layers)
    marks: dict[str, float] = {}
    net.before_forward(lambda i: marks.__setitem__("f", time.perf_counter()))
    net.after_forward(lambda i: fwd.__setitem__(i, fwd[i] + time.perf_counter() - marks["f"]))
    net.before_backward(lambda i: marks.__setitem__("b", time.perf_counter()))
    net.after_backward(lambda i: bwd.__setitem__(i, bwd[i] + time.perf_counter() - marks["b"]))
    for _ in range(iters):
        net.forward()
        net.backward()
    return [(layer.name, layer.type, 1e3 * fwd[i] / iters, 1e3 * bwd[i] / iters)
            for i, layer in enumerate(net.layers)]


def _fashion_arrays(name: str):
    """Fashion-MNIST images (N, 1, 28, 28) scaled by 1/256 as float32, and labels."""
    import numpy as np

    from netengine.data.idx import read_idx

    images = read_idx(FASHION / f"{name}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / f"{name}-labels-idx1-ubyte.gz")
    x = (images.reshape(-1, 1, 28, 28).astype(np.float32) * np.float32(0.00390625))
    return x, labels.astype(np.float32)


def _fashion_netengine(tmp: Path) -> dict:
    """One epoch (938 steps of 64: 60,032 images) through a Data layer reading the IDX file,
    then test accuracy on the 10,000 test images."""
    import numpy as np
    from google.protobuf import text_format

    import netengine
    from netengine.proto import caffe_pb2

    param = text_format.Parse(LENET % {"n": 64}, caffe_pb2.NetParameter())
    data = param.layer[0]
    data.ClearField("input_param")
    data.type = "Data"
    data.data_param.source = str(FASHION / "train-images-idx3-ubyte.gz")
    data.data_param.batch_size = 64
    data.transform_param.scale = 0.00390625
    solver_param = text_format.Parse(SOLVER, caffe_pb2.SolverParameter())
    solver_param.net_param.CopyFrom(param)
    path = tmp / "fashion_solver.prototxt"
    path.write_text(text_format.MessageToString(solver_param))
    solver = netengine.SGDSolver(str(path))
    steps = -(-60000 // 64)
    start = time.perf_counter()
    solver.step(steps)
    seconds = time.perf_counter() - start
    test = _lenet_net(1000, phase_train=False)
    for src, dst in zip(solver.net.params.values(), test.params.values()):
        for a, b in zip(src, dst):
            b.data[...] = a.data
    x, y = _fashion_arrays("t10k")
    correct = 0
    for i in range(0, len(x), 1000):
        scores = test.forward(data=x[i:i + 1000])["ip2"]
        correct += int((np.argmax(scores, axis=1) == y[i:i + 1000]).sum())
    return {"epoch_s": seconds, "accuracy": correct / len(x), "steps": steps}


def _fashion_torch(model, opt) -> dict:
    """The same epoch in PyTorch over in-memory tensors (no data-loader cost), then accuracy."""
    import torch
    import torch.nn.functional as F

    x, y = _fashion_arrays("train")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    steps = -(-60000 // 64)
    start = time.perf_counter()
    for i in range(steps):
        first = (i * 64) % len(xt)
        xb, yb = xt[first:first + 64], yt[first:first + 64]
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    seconds = time.perf_counter() - start
    x, y = _fashion_arrays("t10k")
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return {"epoch_s": seconds, "accuracy": float((pred == y).mean()), "steps": steps}


def worker_netengine(args) -> dict:
    import tempfile

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            solver = _netengine_solver(batch, Path(tmp))
            out[f"train_{batch}"] = _median_rate(lambda s=solver: s.step(1), batch, args.iters,
                                                 args.repeats)
    infer = _lenet_net(64, phase_train=False)
    out["infer_64"] = _median_rate(lambda: infer.forward(), 64, args.iters, args.repeats)
    single = _lenet_net(1, phase_train=False)
    out["latency_1_ms"] = 1e3 / _median_rate(lambda: single.forward(), 1, 50, args.repeats)
    out["layers"] = _per_layer_ms(_lenet_net(64))
    out["rss_mib"] = _peak_rss_mib()  # LeNet only: before the larger extras below
    if args.googlenet and GOOGLENET.exists():
        out["googlenet_fwd_ms"] = _googlenet_netengine(args)
    if args.fashion_mnist:
        with tempfile.TemporaryDirectory() as tmp:
            out["fashion"] = _fashion_netengine(Path(tmp))
    return out


def _googlenet_net():
    import numpy as np

    import netengine

    netengine.set_random_seed(1)
    net = netengine.Net(str(GOOGLENET), netengine.TEST)
    net.blobs["data"].reshape(8, 3, 224, 224)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.01, blob.shape)
    net.blobs["data"].data[...] = rng.normal(size=(8, 3, 224, 224))
    net.reshape()
    return net


def _googlenet_netengine(args) -> float:
    net = _googlenet_net()
    net.forward()
    times = []
    for _ in range(max(3, args.repeats // 2)):
        start = time.perf_counter()
        net.forward()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def worker_torch(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(int(args.threads))
    torch.manual_seed(0)
    out: dict = {"version": torch.__version__}

    def model(channels_last: bool):
        m = torch.nn.Sequential(
            torch.nn.Conv2d(1, 20, 5), torch.nn.MaxPool2d(2, 2, ceil_mode=True),
            torch.nn.Conv2d(20, 50, 5), torch.nn.MaxPool2d(2, 2, ceil_mode=True),
            torch.nn.Flatten(), torch.nn.Linear(800, 500), torch.nn.ReLU(),
            torch.nn.Linear(500, 10))
        return m.to(memory_format=torch.channels_last) if channels_last else m

    for mode in ("default", "channels_last"):
        cl = mode == "channels_last"
        for batch in args.batches:
            m = model(cl)
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            x = torch.rand(batch, 1, 28, 28)
            x = x.to(memory_format=torch.channels_last) if cl else x
            y = torch.randint(0, 10, (batch,))

            def step(m=m, opt=opt, x=x, y=y):
                opt.zero_grad(set_to_none=False)
                F.cross_entropy(m(x), y).backward()
                opt.step()

            out[f"{mode}_train_{batch}"] = _median_rate(step, batch, args.iters, args.repeats)
        m = model(cl).eval()
        x = torch.rand(64, 1, 28, 28)
        x1 = torch.rand(1, 1, 28, 28)
        if cl:
            x = x.to(memory_format=torch.channels_last)
            x1 = x1.to(memory_format=torch.channels_last)
        with torch.no_grad():
            out[f"{mode}_infer_64"] = _median_rate(lambda m=m, x=x: m(x), 64, args.iters,
                                                   args.repeats)
            out[f"{mode}_latency_1_ms"] = 1e3 / _median_rate(lambda m=m, x=x1: m(x), 1, 50,
                                                             args.repeats)
    out["rss_mib"] = _peak_rss_mib()  # LeNet only: before the larger extras below
    if args.googlenet and GOOGLENET.exists():
        out["googlenet_fwd_ms"], out["googlenet_max_abs_diff"] = _googlenet_torch(args)
    if args.fashion_mnist:
        m = model(True)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        out["fashion"] = _fashion_torch(m, opt)
    return out


def _googlenet_torch(args) -> tuple[float, float]:
    """GoogLeNet mirrored layer by layer in torch.nn.functional with netengine's weights."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    net = _googlenet_net()
    reference = net.forward()["prob"].copy()
    t = {k: torch.from_numpy(np.ascontiguousarray(v.data)) for k, v in net.blobs.items()}
    w = {k: [torch.from_numpy(np.ascontiguousarray(b.data)) for b in v]
         for k, v in net.params.items()}

    def run():
        blobs = {"data": t["data"]}
        for layer, bottoms, tops in zip(net.layers, net.bottom_ids, net.top_ids):
            xs = [blobs[b] for b in bottoms]
            p = layer.layer_param
            if layer.type == "Convolution":
                c = p.convolution_param
                y = F.conv2d(xs[0], w[layer.name][0], w[layer.name][1] if c.bias_term else None,
                             stride=(c.stride or [1])[0], padding=(c.pad or [0])[0],
                             groups=c.group)
            elif layer.type == "Pooling":
                q = p.pooling_param
                if q.pool == 0:
                    y = F.max_pool2d(xs[0], q.kernel_size, q.stride, q.pad, ceil_mode=True)
                else:
                    y = F.avg_pool2d(xs[0], q.kernel_size, q.stride, q.pad, ceil_mode=True)
            elif layer.type == "ReLU":
                y = F.relu(xs[0])
            elif layer.type == "LRN":
                q = p.lrn_param
                y = F.local_response_norm(xs[0], q.local_size, q.alpha, q.beta, q.k)
            elif layer.type == "Concat":
                y = torch.cat(xs, 1)
            elif layer.type == "InnerProduct":
                y = F.linear(xs[0].flatten(1), w[layer.name][0], w[layer.name][1])
            elif layer.type == "Softmax":
                y = F.softmax(xs[0], 1)
            elif layer.type in ("Dropout", "Split"):
                y = xs[0]
            elif layer.type == "Input":
                continue
            else:
                raise RuntimeError(f"no torch mirror for {layer.type}")
            for top in tops:
                blobs[top] = y
        return blobs["prob"]

    with torch.no_grad():
        got = run().numpy()
        run()
        times = []
        for _ in range(max(3, args.repeats // 2)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), float(np.max(np.abs(got - reference)))


# -- parent ----------------------------------------------------------------------------------------
def run_worker(engine: str, threads: int, args, extras: bool = True) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--worker", engine, "--threads", str(threads),
           "--iters", str(args.iters), "--repeats", str(args.repeats),
           "--batches", ",".join(map(str, args.batches))]
    cmd += ["--googlenet"] if args.googlenet and extras else []
    cmd += ["--fashion-mnist"] if args.fashion_mnist and extras else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[{engine}, {threads} thread(s)] failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_results(runs: list[dict]) -> dict:
    """Per-measure medians over several worker runs (rates, times, per-layer rows)."""
    runs = [r for r in runs if r]
    if len(runs) <= 1:
        return runs[0] if runs else None
    out = {}
    for run in reversed(runs):  # extras (only in some runs) kept as they are
        out.update(run)
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            out[key] = statistics.median(r[key] for r in runs if key in r)
        elif key == "layers":
            out[key] = [(name, kind, statistics.median(r[key][i][2] for r in runs),
                         statistics.median(r[key][i][3] for r in runs))
                        for i, (name, kind, _, _) in enumerate(value)]
    return out


def report(threads: int, ne: dict, pt: dict | None, rounds: int) -> None:
    print(f"\n== {threads} thread(s) (OMP/OPENBLAS/MKL_NUM_THREADS={threads}; medians of "
          f"{rounds} round(s)) ==")
    print(f"{'measure':34s} {'netengine':>11s} {'torch':>11s} {'torch CL':>11s} {'ne/best':>8s}")

    def row(label, a, b, c, higher_better=True):
        best = None if b is None else (max(b, c) if higher_better else min(b, c))
        ratio = "" if best is None else f"{(a / best if higher_better else best / a):.2f}x"
        fmt = lambda v: "-" if v is None else f"{v:11.1f}"  # noqa: E731
        print(f"{label:34s} {fmt(a)} {fmt(b)} {fmt(c)} {ratio:>8s}")

    g = (lambda k: pt.get(k)) if pt else (lambda k: None)
    for batch in sorted(int(k.split("_")[1]) for k in ne if k.startswith("train_")):
        row(f"train images/s, batch {batch}", ne[f"train_{batch}"], g(f"default_train_{batch}"),
            g(f"channels_last_train_{batch}"))
    row("inference images/s, batch 64", ne["infer_64"], g("default_infer_64"),
        g("channels_last_infer_64"))
    row("latency ms, batch 1", ne["latency_1_ms"], g("default_latency_1_ms"),
        g("channels_last_latency_1_ms"), higher_better=False)
    row("peak RSS MiB (LeNet part)", ne["rss_mib"], g("rss_mib"),
        None if pt is None else g("rss_mib"), higher_better=False)
    if "googlenet_fwd_ms" in ne:
        row("GoogLeNet fwd ms, batch 8", ne["googlenet_fwd_ms"], g("googlenet_fwd_ms"),
            g("googlenet_fwd_ms"), higher_better=False)
        if pt and "googlenet_max_abs_diff" in pt:
            print(f"  (GoogLeNet outputs agree with torch to {pt['googlenet_max_abs_diff']:.2e})")
    if "train_64" in ne:
        print(f"train batch 64 vs real Caffe ({CAFFE_IMAGES_S:,.0f} images/s): "
              f"{ne['train_64'] / CAFFE_IMAGES_S:.2f}x")
        best = max(g("default_train_64") or 0, g("channels_last_train_64") or 0)
        print(f"Fashion-MNIST epoch estimate (60,000 images at the batch-64 rate): netengine "
              f"{60000 / ne['train_64']:.1f} s" + (f", torch best {60000 / best:.1f} s"
                                                   if best else ""))
    for name, res in (("netengine", ne), ("torch CL", pt or {})):
        if "fashion" in res:
            f = res["fashion"]
            print(f"Fashion-MNIST real epoch, {name}: {f['epoch_s']:.1f} s for {f['steps']} "
                  f"steps of 64 ({f['steps'] * 64 / f['epoch_s']:,.0f} images/s), test "
                  f"accuracy {100 * f['accuracy']:.1f}%")
    print("netengine per layer, batch 64 (ms):  forward  backward")
    for name, kind, f, b in ne["layers"]:
        print(f"  {name:10s} {kind:16s} {f:8.3f} {b:8.3f}")
    total_f = sum(r[2] for r in ne["layers"])
    total_b = sum(r[3] for r in ne["layers"])
    print(f"  {'total':10s} {'':16s} {total_f:8.3f} {total_b:8.3f}")


def _environment() -> None:
    print(f"LeNet (batch 64: 0.84 GFLOP per train step), python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    try:
        import numpy

        line = f"numpy {numpy.__version__}"
        try:
            from threadpoolctl import threadpool_info

            blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
                    for i in threadpool_info() if i.get("user_api") == "blas"]
            line += f", BLAS {', '.join(blas)}"
        except ImportError:
            pass
        print(line + "; " + ", ".join(f"{k}={os.environ.get(k)}" for k in
                                     ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")))
    except ImportError:
        pass
    sys.path.insert(0, str(REPO))
    from netengine.ops import jit

    state = "on" if jit.enabled() else ("off (NETENGINE_JIT=0)" if jit.available() else
                                        "off (Numba not installed: pip install -e '.[fast]')")
    print(f"netengine compiled CPU loops (Numba: pooling, im2col/col2im, SGD update): {state}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["netengine", "torch"])
    parser.add_argument("--threads", type=str, default="1,2")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the two engines' workers this many times, alternating")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")],
                        default=[16, 64, 256])
    parser.add_argument("--googlenet", action="store_true", help="also GoogLeNet forward, batch 8")
    parser.add_argument("--fashion-mnist", action="store_true",
                        help=f"also one real training epoch on {FASHION} (test accuracy too)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        result = worker_netengine(args) if args.worker == "netengine" else worker_torch(args)
        result.setdefault("rss_mib", _peak_rss_mib())
        print(json.dumps(result))
        return
    if args.quick:
        args.threads, args.repeats, args.iters = "2", 5, 10
    if args.fashion_mnist and not (FASHION / "train-images-idx3-ubyte.gz").exists():
        print(f"no Fashion-MNIST in {FASHION} (apt-get install dataset-fashion-mnist); "
              "skipping the real epoch")
        args.fashion_mnist = False
    _environment()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    for threads in [int(t) for t in str(args.threads).split(",")]:
        ne_runs, pt_runs = [], []
        for i in range(args.rounds):  # the slow extras (GoogLeNet, epoch) in round 1 only
            ne_runs.append(run_worker("netengine", threads, args, extras=i == 0))
            pt_runs.append(run_worker("torch", threads, args, extras=i == 0))
        ne, pt = _median_results(ne_runs), _median_results(pt_runs)
        if ne:
            report(threads, ne, pt, args.rounds)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
