#!/usr/bin/env python3
"""Makes the bundled Fashion-MNIST subset and the sample pictures from Debian's
dataset-fashion-mnist package (the real data; nothing synthetic).

Subset: the first PER_CLASS images of each class, by index, from the *test* split, kept in test
order, written as gzipped idx files. Samples: the first test image of each class as a 28x28 PNG.
Standard library only, so it runs anywhere:  python3 assets/make_subset.py
"""
import gzip
import os
import struct
import zlib

SRC = "/usr/share/datasets/fashion-mnist"
HERE = os.path.dirname(os.path.abspath(__file__))
PER_CLASS = 100
NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return dims, data[4 + 4 * ndim:]


def write_idx(path, dims, body):
    header = bytes([0, 0, 8, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)
    # mtime=0 keeps the file byte-identical between runs.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + body)


def write_png(path, width, height, grey):
    def chunk(kind, payload):
        c = kind + payload
        return struct.pack(">I", len(payload)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + grey[y * width:(y + 1) * width] for y in range(height))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def main():
    (n, h, w), images = read_idx(os.path.join(SRC, "t10k-images-idx3-ubyte.gz"))
    (n_lab,), labels = read_idx(os.path.join(SRC, "t10k-labels-idx1-ubyte.gz"))
    assert n == n_lab == 10000
    taken = {c: [] for c in range(10)}
    for i, label in enumerate(labels):
        if len(taken[label]) < PER_CLASS:
            taken[label].append(i)
    keep = sorted(i for idx in taken.values() for i in idx)
    size = h * w
    out = os.path.join(HERE, "fashion-mnist-subset")
    os.makedirs(out, exist_ok=True)
    write_idx(os.path.join(out, "t10k-images-idx3-ubyte.gz"), (len(keep), h, w),
              b"".join(images[i * size:(i + 1) * size] for i in keep))
    write_idx(os.path.join(out, "t10k-labels-idx1-ubyte.gz"), (len(keep),), bytes(labels[i] for i in keep))
    samples = os.path.join(HERE, "samples")
    os.makedirs(samples, exist_ok=True)
    for c in range(10):
        i = taken[c][0]
        write_png(os.path.join(samples, f"{c}-{NAMES[c]}-test{i}.png"), w, h, images[i * size:(i + 1) * size])
    print(f"{len(keep)} images ({PER_CLASS} per class) from the test split; samples in {samples}")


if __name__ == "__main__":
    main()
