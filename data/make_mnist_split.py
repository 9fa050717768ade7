#!/usr/bin/env python3
"""One-off: build data/mnist/ (8,000 train / 2,000 test IDX files) from the 10,000 MNIST digits
of mnist-npm10k (see data/mnist/README.md for provenance and attribution).

The source records are grouped by label, so they are shuffled once with a fixed seed
(NumPy's PCG64 ``default_rng(SEED).permutation``): the first 8,000 of the permutation become the
training set, the last 2,000 the test set, each kept in permuted order (the Data layer reads
records sequentially, so the training file must not be sorted by label). Output is gzip with
mtime 0 and no file name, so running this again reproduces the committed files byte for byte.

    python3 data/make_mnist_split.py [--source ../shared/data/mnist-npm10k] [--out data/mnist]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from netengine.data.idx import read_idx, write_idx  # noqa: E402

SEED = 1701
NUM_TRAIN = 8000
SOURCE_SHA256 = {
    "images-idx3-ubyte.gz": "6a946977e2d18a1d30309689d66c4a726f8947ebf1e28ac8cf29e77944f37acd",
    "labels-idx1-ubyte.gz": "3c9febfe37133a546879f8509a79abfa06824c3e027ef4d575f43837e1017952",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared/data/mnist-npm10k")
    parser.add_argument("--out", type=Path, default=REPO / "data/mnist")
    args = parser.parse_args(argv)
    for name, digest in SOURCE_SHA256.items():
        actual = hashlib.sha256((args.source / name).read_bytes()).hexdigest()
        if actual != digest:
            sys.exit(f"{args.source / name}: sha256 {actual}, expected {digest}")
    images = read_idx(args.source / "images-idx3-ubyte.gz")
    labels = read_idx(args.source / "labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    order = np.random.default_rng(SEED).permutation(len(images))
    train, test = order[:NUM_TRAIN], order[NUM_TRAIN:]
    outputs = {"train-images-idx3-ubyte.gz": images[train],
               "train-labels-idx1-ubyte.gz": labels[train],
               "t10k-images-idx3-ubyte.gz": images[test],
               "t10k-labels-idx1-ubyte.gz": labels[test]}
    for name, array in outputs.items():
        write_idx(args.out / name, array)
        digest = hashlib.sha256((args.out / name).read_bytes()).hexdigest()
        print(f"{name}: shape {array.shape}, {(args.out / name).stat().st_size} bytes, "
              f"sha256 {digest}")
    for split, idx in (("train", train), ("test", test)):
        counts = np.bincount(labels[idx], minlength=10)
        print(f"{split} counts per label 0..9: {' '.join(map(str, counts))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
