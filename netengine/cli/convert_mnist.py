"""convert_mnist: write MNIST IDX files as Caffe's LMDB or LevelDB of Datum records
(convert_mnist_data).

    tools/convert_mnist IMAGES LABELS DB_PATH [--backend lmdb|leveldb]

IMAGES/LABELS are MNIST IDX files (…-idx3-ubyte / …-idx1-ubyte, plain or .gz). DB_PATH is a
new database folder (LevelDB needs the plyvel package). Each record i is stored under the key
``%08d`` % i as a serialized Datum (channels 1, height and width from the file, uint8 pixel
bytes, integer label): the layout Caffe's examples/mnist/create_mnist.sh writes, so Caffe's
own lenet_train_test.prototxt reads it unmodified. Errors print one line and exit 1.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from netengine.cli import one_line_errors, parse_caffe_args
from netengine.data.db import array_to_datum, lmdb_key, write_leveldb, write_lmdb
from netengine.data.idx import read_idx
from netengine.errors import NetEngineError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_mnist",
        description="Convert MNIST IDX images and labels into Caffe's LMDB (or LevelDB) of "
                    "Datum records.",
        epilog="Example: tools/convert_mnist data/mnist/train-images-idx3-ubyte.gz "
               "data/mnist/train-labels-idx1-ubyte.gz examples/mnist/mnist_train_lmdb")
    parser.add_argument("images", help="IDX images file (magic 2051; plain or .gz)")
    parser.add_argument("labels", help="IDX labels file (magic 2049; plain or .gz)")
    parser.add_argument("db_path", help="the database folder to create (must not hold one)")
    parser.add_argument("--backend", default="lmdb", type=str.lower, choices=["lmdb", "leveldb"],
                        help="database backend (default lmdb; leveldb needs plyvel)")
    return parse_caffe_args(parser, argv)


def convert(images_path: str, labels_path: str, db_path: str,
            backend: str = "lmdb") -> tuple[int, int, int]:
    """Write the database; returns (items, rows, cols)."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise NetEngineError(f"{images_path}: expected MNIST images (uint8, N x rows x cols), "
                             f"got {images.dtype} of shape {images.shape}")
    if labels.ndim != 1:
        raise NetEngineError(f"{labels_path}: expected MNIST labels (1-D), got shape "
                             f"{labels.shape}")
    if len(images) != len(labels):
        raise NetEngineError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                             f"{len(labels)} labels")

    def records():
        for i, (image, label) in enumerate(zip(images, labels)):
            datum = array_to_datum(image[None], int(label))
            yield lmdb_key(i), datum.SerializeToString()

    write = write_leveldb if backend == "leveldb" else write_lmdb
    count = write(db_path, records())
    return count, images.shape[1], images.shape[2]


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        count, rows, cols = convert(args.images, args.labels, args.db_path, args.backend)
    except NetEngineError as err:
        print(f"convert_mnist: error: {err}", file=sys.stderr)
        return 1
    print(f"A total of {count} items.")
    print(f"Rows: {rows} Cols: {cols}")
    kind = "LevelDB" if args.backend == "leveldb" else "LMDB"
    print(f"Wrote {args.db_path} ({kind}, keys %08d, Datum 1x{rows}x{cols} uint8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
