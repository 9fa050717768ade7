"""get_mnist: download the full MNIST (60,000 train + 10,000 test IDX .gz files), checked.

    tools/get_mnist [--dir data/mnist-full] [--mirror URL ...] [--gunzip]

Each of the four files is fetched from the first mirror that answers, checked against its
published size, SHA-256 and MD5, and only then moved into place (a failed or partial download
never leaves a file behind). Files already present and correct are kept. Offline, it says so
in one line and exits 1: the embedded 8,000/2,000 digits in data/mnist/ need no download.
Caffe's data/mnist/get_mnist.sh, with checksums.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from netengine.cli import one_line_errors, parse_caffe_args
from netengine.errors import NetEngineError


@dataclass(frozen=True)
class FileSpec:
    name: str
    size: int
    sha256: str
    md5: str


FILES = (
    FileSpec("train-images-idx3-ubyte.gz", 9912422,
             "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
             "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    FileSpec("train-labels-idx1-ubyte.gz", 28881,
             "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
             "d53e105ee54ea40749a09fcbcd1e9432"),
    FileSpec("t10k-images-idx3-ubyte.gz", 1648877,
             "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
             "9fb629c4189551a2d022fa330f9573f3"),
    FileSpec("t10k-labels-idx1-ubyte.gz", 4542,
             "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
             "ec29112dd5afa0611ce80d1b7f02629c"),
)

# LeCun's original site first (often refuses scripted downloads), then well-known mirrors.
MIRRORS = (
    "https://yann.lecun.com/exdb/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
TIMEOUT_S = 30
_BLOCK = 1 << 20


def file_digests(path: str | os.PathLike) -> tuple[int, str, str]:
    """(size, sha256, md5) of a file."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            sha.update(block)
            md5.update(block)
            size += len(block)
    return size, sha.hexdigest(), md5.hexdigest()


def verify(path: str | os.PathLike, spec: FileSpec) -> str | None:
    """None when ``path`` is exactly ``spec``'s file, else what is wrong (one line)."""
    if not Path(path).is_file():
        return f"{path} is missing"
    size, sha, md5 = file_digests(path)
    if size != spec.size:
        return f"{path}: {size} bytes, expected {spec.size}"
    if sha != spec.sha256:
        return f"{path}: sha256 {sha}, expected {spec.sha256}"
    if md5 != spec.md5:
        return f"{path}: md5 {md5}, expected {spec.md5}"
    return None


def download(url: str, target: Path, timeout: float = TIMEOUT_S) -> None:
    """Copy ``url`` to ``target`` through a temporary file in the same folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "netengine-get_mnist"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as src:
            for block in iter(lambda: src.read(_BLOCK), b""):
                out.write(block)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(spec: FileSpec, folder: Path, mirrors=MIRRORS, log=print) -> Path:
    """``folder/spec.name``, verified; downloaded from the first mirror that serves it right."""
    target = folder / spec.name
    if verify(target, spec) is None:
        log(f"{spec.name}: already present, checksums match")
        return target
    problems = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + spec.name
        partial = folder / (spec.name + ".part")
        try:
            log(f"{spec.name}: downloading {url}")
            download(url, partial)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            problems.append(f"{url}: {reason}")
            continue
        wrong = verify(partial, spec)
        if wrong is not None:
            partial.unlink(missing_ok=True)
            problems.append(f"{url}: checksum mismatch ({wrong})")
            continue
        os.replace(partial, target)
        log(f"{spec.name}: {spec.size} bytes, sha256 and md5 verified")
        return target
    offline = all("checksum" not in p for p in problems)
    hint = (" (is the machine offline? the embedded digits in data/mnist/ need no download)"
            if offline else "")
    raise NetEngineError(f"cannot download {spec.name}{hint}: " + "; ".join(problems))


def gunzip(path: Path) -> Path:
    """Write the uncompressed twin of ``path`` (X.gz → X) beside it (for Caffe's own tools)."""
    from netengine.formats.prototxt import write_atomic

    out = path.with_name(path.name[:-3])
    write_atomic(out, gzip.decompress(path.read_bytes()))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="get_mnist",
        description="Download the full MNIST (60k train + 10k test IDX .gz files) and check "
                    "their size, SHA-256 and MD5.",
        epilog="Offline? nets/mnist_train_test.prototxt trains on the embedded digits in "
               "data/mnist/ without any download.")
    parser.add_argument("--dir", default="data/mnist-full", type=Path,
                        help="target folder (default data/mnist-full, from the current folder)")
    parser.add_argument("--mirror", action="append", metavar="URL",
                        help="base URL to try (repeatable; default: LeCun's site, then the "
                             "PyTorch and TensorFlow mirrors)")
    parser.add_argument("--gunzip", action="store_true",
                        help="also write uncompressed copies (netengine reads .gz directly)")
    return parse_caffe_args(parser, argv)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    mirrors = tuple(args.mirror) if args.mirror else MIRRORS
    try:
        for spec in FILES:
            path = fetch(spec, args.dir, mirrors)
            if args.gunzip:
                gunzip(path)
    except NetEngineError as err:
        print(f"get_mnist: error: {err}", file=sys.stderr)
        return 1
    print(f"MNIST is in {args.dir.resolve()} (60,000 train + 10,000 test); Data layers read the "
          "-idx3-ubyte.gz files directly, tools/convert_mnist writes Caffe's LMDBs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
