"""Unpack a CIFAR-10 JPEG archive (.npz) into the image-folder layout that `--dataset folder` reads.

    python tools/unpack_cifar10_jpeg.py local/cifar10_jpeg.npz data/cifar10-jpeg

writes OUT/train/<class>/NNNN.jpg and OUT/test/<class>/NNNN.jpg (NNNN counts the images of that class in
that split from 0000, in archive order). The archive holds every split's JPEG files back to back:
`classes` (class names, label order), `<split>_jpeg` (uint8, all files concatenated), `<split>_offsets`
(N + 1 byte offsets: image i is jpeg[offsets[i]:offsets[i + 1]]) and `<split>_labels` (N labels), for the
splits train and test. The bytes are written unchanged (no decoding, no re-encoding).

The tree is written into OUT.partial and renamed to OUT at the end, so OUT is complete or absent; an OUT
that already holds the archive's image counts is left as it is.
"""
import argparse
import os
import shutil
import sys

import numpy as np

SPLITS = ("train", "test")


def fail(msg):
    raise SystemExit(f"error: {msg}")


def read_archive(path):
    """{classes: [str], <split>: (blob uint8, offsets int64 (N+1,), labels int64 (N,))}, checked."""
    try:
        z = np.load(path)
    except FileNotFoundError:
        fail(f"no archive at {path!r}")
    except Exception as e:  # not a zip/npz, truncated copy
        fail(f"cannot read {path!r} as an .npz archive ({type(e).__name__})")
    need = ["classes"] + [f"{s}_{k}" for s in SPLITS for k in ("jpeg", "offsets", "labels")]
    missing = [k for k in need if k not in z.files]
    if missing:
        fail(f"{path!r} lacks {', '.join(missing)}; expected the keys {', '.join(need)}")
    out = {"classes": [str(c) for c in z["classes"]]}
    for s in SPLITS:
        blob, off, lab = z[f"{s}_jpeg"], z[f"{s}_offsets"].astype(np.int64), z[f"{s}_labels"].astype(np.int64)
        n = len(lab)
        if len(off) != n + 1 or off[0] != 0 or off[-1] != len(blob) or np.any(np.diff(off) <= 0):
            fail(f"{path!r}: {s}_offsets must rise from 0 to len({s}_jpeg) = {len(blob)} with one entry per "
                 f"image plus one ({n + 1}); got {len(off)} entries from {off[0] if len(off) else '?'} to "
                 f"{off[-1] if len(off) else '?'}")
        if n and (lab.min() < 0 or lab.max() >= len(out["classes"])):
            fail(f"{path!r}: {s}_labels outside 0..{len(out['classes']) - 1}")
        out[s] = (blob, off, lab)
    return out


def expected_counts(archive):
    """{split: {class name: images}} the unpacked tree must hold."""
    classes = archive["classes"]
    return {s: {c: int(np.sum(archive[s][2] == i)) for i, c in enumerate(classes)} for s in SPLITS}


def counts_on_disk(root):
    found = {}
    for s in SPLITS:
        d = os.path.join(root, s)
        if not os.path.isdir(d):
            return None
        found[s] = {c: len(os.listdir(os.path.join(d, c))) for c in sorted(os.listdir(d))
                    if os.path.isdir(os.path.join(d, c))}
    return found


def unpack(npz, out):
    """Write the tree; returns {split: images written} (0s when OUT was already complete)."""
    archive = read_archive(npz)
    want = expected_counts(archive)
    if os.path.isdir(out):
        if counts_on_disk(out) == want:
            print(f"{out} already holds the archive's {sum(map(sum, (v.values() for v in want.values())))} images")
            return {s: 0 for s in SPLITS}
        fail(f"{out!r} exists and does not hold this archive's images; remove it or choose another folder")
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = {s: write_split(archive, s, tmp, npz) for s in SPLITS}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written tree left behind
        raise
    os.replace(tmp, out)
    return written


def write_split(archive, split, root, npz):
    blob, off, lab = archive[split]
    seen = [0] * len(archive["classes"])
    for c in archive["classes"]:
        os.makedirs(os.path.join(root, split, c))
    for i, y in enumerate(lab.tolist()):
        data = blob[off[i]:off[i + 1]].tobytes()
        if data[:2] != b"\xff\xd8":  # every JPEG file starts with the SOI marker
            fail(f"{npz!r}: {split} image {i} is not a JPEG file (no FF D8 start marker)")
        with open(os.path.join(root, split, archive["classes"][y], f"{seen[y]:04d}.jpg"), "wb") as f:
            f.write(data)
        seen[y] += 1
    print(f"{split}: {len(lab)} images, {len(archive['classes'])} classes", flush=True)
    return len(lab)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("npz", help="the archive (.npz with classes, {train,test}_{jpeg,offsets,labels})")
    p.add_argument("out", help="folder to create: OUT/{train,test}/<class>/NNNN.jpg")
    a = p.parse_args(argv)
    return unpack(a.npz, a.out)


if __name__ == "__main__":
    main()
