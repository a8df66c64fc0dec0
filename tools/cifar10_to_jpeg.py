"""Turn the torchvision CIFAR-10 download into the JPEG image folder `--dataset folder` reads: the data
the lab grids (`lab-fit`, `lab`) and the labs were measured on (every image re-encoded once as JPEG, quality 75).

    python tools/cifar10_to_jpeg.py data data/cifar10-jpeg

reads DATA/cifar-10-batches-py/ (the python pickle batches torchvision downloads; when that folder is
absent torchvision downloads it first, about 170 MB) and writes OUT/train/<class>/NNNN.jpg and
OUT/test/<class>/NNNN.jpg, NNNN counting the images of a class in a split from 0000 in the batches'
order (data_batch_1..5, then test_batch), class names from batches.meta. The tree is written into
OUT.partial and renamed at the end (tools/unpack_cifar10_jpeg.py's writer); an OUT that already holds
the same image counts is left as it is. About a minute on one core (estimate).

The encoder is torchvision's (libjpeg); the archive the `lab` grid used was made with quality 75 too,
but its encoder is not recorded, so a file may differ from it in the last bits of a few pixels.
"""
import argparse
import os
import pickle

import numpy as np

from unpack_cifar10_jpeg import fail, write_tree

QUALITY = 75
FOLDER = "cifar-10-batches-py"  # what torchvision's CIFAR10 unpacks into its root
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def load(path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        fail(f"{path!r} is missing: not a complete CIFAR-10 download; remove "
             f"{os.path.dirname(path)!r} and run again to download it")
    except Exception as e:  # truncated or not a pickle
        fail(f"cannot read {path!r} as a CIFAR-10 batch ({type(e).__name__})")


def download(root):
    import torchvision
    try:
        torchvision.datasets.CIFAR10(root, train=True, download=True)
    except Exception as e:  # no network, disk full
        fail(f"no {FOLDER} in {root!r} and the download failed ({type(e).__name__}); copy a "
             f"CIFAR-10 download there")


def encode_split(root, split):
    """(blob uint8, offsets int64 (N + 1,), labels int64 (N,)): every image of the split as a JPEG
    file, back to back, in the batches' order."""
    import torch
    from torchvision.io import encode_jpeg
    files, labels = [], []
    for name in BATCHES[split]:
        batch = load(os.path.join(root, FOLDER, name))
        images = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        files += [encode_jpeg(img, quality=QUALITY).numpy() for img in images]  # CHW, RGB
        labels += list(batch["labels"])
    offsets = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
    return np.concatenate(files), offsets, np.asarray(labels, dtype=np.int64)


def convert(root, out):
    """Write the tree; returns {split: images written} (0 each when OUT was complete already)."""
    if not os.path.isdir(os.path.join(root, FOLDER)):
        download(root)
    meta = load(os.path.join(root, FOLDER, "batches.meta"))
    archive = {"classes": list(meta["label_names"])}
    archive.update({split: encode_split(root, split) for split in BATCHES})
    return write_tree(archive, out, os.path.join(root, FOLDER))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help=f"torchvision's CIFAR-10 root: the folder holding {FOLDER}/ "
                                f"(downloaded there when absent)")
    p.add_argument("out", help="the folder to create: OUT/{train,test}/<class>/NNNN.jpg")
    a = p.parse_args(argv)
    return convert(a.root, a.out)


if __name__ == "__main__":
    main()
