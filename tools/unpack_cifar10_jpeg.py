"""Unpack a CIFAR-10 JPEG archive (.npz) into the image-folder layout `--dataset folder` reads.

    python tools/unpack_cifar10_jpeg.py local/cifar10_jpeg.npz data/cifar10-jpeg

writes OUT/train/<class>/NNNN.jpg and OUT/test/<class>/NNNN.jpg, NNNN counting the images of that
class in that split from 0000, in archive order. The archive holds each split's JPEG files back to
back: `classes` (the class names, in label order), and for the splits train and test
`<split>_jpeg` (uint8: every file, concatenated), `<split>_offsets` (N + 1 byte offsets: image i is
jpeg[offsets[i]:offsets[i + 1]]) and `<split>_labels` (N labels). The bytes are written unchanged
(no decoding, no re-encoding).

The tree is written into OUT.partial and renamed to OUT at the end, so OUT is complete or absent;
an OUT that already holds the archive's image counts is left as it is.
"""
import argparse
import os
import shutil

import numpy as np

SPLITS = ("train", "test")


def fail(msg):
    raise SystemExit(f"error: {msg}")


def read_archive(path):
    """{"classes": [str], split: (blob uint8, offsets int64 (N+1,), labels int64 (N,))}, checked."""
    try:
        z = np.load(path)
    except FileNotFoundError:
        fail(f"no archive at {path!r}")
    except Exception as e:  # not a zip / npz, a truncated copy
        fail(f"cannot read {path!r} as an .npz archive ({type(e).__name__})")
    need = ["classes"] + [f"{s}_{k}" for s in SPLITS for k in ("jpeg", "offsets", "labels")]
    missing = [k for k in need if k not in z.files]
    if missing:
        fail(f"{path!r} lacks {', '.join(missing)}; expected the keys {', '.join(need)}")
    out = {"classes": [str(c) for c in z["classes"]]}
    for s in SPLITS:
        blob = z[f"{s}_jpeg"]
        off, lab = z[f"{s}_offsets"].astype(np.int64), z[f"{s}_labels"].astype(np.int64)
        rising = len(off) == len(lab) + 1 and off[0] == 0 and np.all(np.diff(off) > 0)
        if not rising or off[-1] != len(blob):
            fail(f"{path!r}: {s}_offsets must rise from 0 to len({s}_jpeg) = {len(blob)}, one "
                 f"entry per image plus one ({len(lab) + 1}); got {len(off)} entries")
        if len(lab) and (lab.min() < 0 or lab.max() >= len(out["classes"])):
            fail(f"{path!r}: {s}_labels outside 0..{len(out['classes']) - 1}")
        out[s] = (blob, off, lab)
    return out


def expected_counts(archive):
    """{split: {class name: images}}: what the unpacked tree holds."""
    return {s: {c: int(np.sum(archive[s][2] == i)) for i, c in enumerate(archive["classes"])}
            for s in SPLITS}


def counts_on_disk(root):
    found = {}
    for s in SPLITS:
        d = os.path.join(root, s)
        if not os.path.isdir(d):
            return None
        found[s] = {c: len(os.listdir(os.path.join(d, c))) for c in sorted(os.listdir(d))
                    if os.path.isdir(os.path.join(d, c))}
    return found


def write_split(archive, split, root, source):
    blob, off, lab = archive[split]
    seen = [0] * len(archive["classes"])
    for c in archive["classes"]:
        os.makedirs(os.path.join(root, split, c))
    for i, y in enumerate(lab.tolist()):
        data = blob[off[i]:off[i + 1]].tobytes()
        if data[:2] != b"\xff\xd8":  # every JPEG file starts with the SOI marker
            fail(f"{source!r}: {split} image {i} is not a JPEG file (no FF D8 start marker)")
        name = os.path.join(root, split, archive["classes"][y], f"{seen[y]:04d}.jpg")
        with open(name, "wb") as f:
            f.write(data)
        seen[y] += 1
    print(f"{split}: {len(lab)} images, {len(archive['classes'])} classes", flush=True)
    return len(lab)


def unpack(npz, out):
    """Write the tree; returns {split: images written} (0 each when OUT was complete already)."""
    return write_tree(read_archive(npz), out, npz)


def write_tree(archive, out, source):
    """Write an archive as read_archive returns it (also built by cifar10_to_jpeg.py) into OUT, via
    OUT.partial; `source` names it in errors. Returns {split: images written}."""
    want = expected_counts(archive)
    if os.path.isdir(out):
        if counts_on_disk(out) == want:
            total = sum(sum(v.values()) for v in want.values())
            print(f"{out} already holds the archive's {total} images")
            return {s: 0 for s in SPLITS}
        fail(f"{out!r} exists and does not hold the images of {source!r}; remove it or choose another")
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = {s: write_split(archive, s, tmp, source) for s in SPLITS}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written tree left behind
        raise
    os.replace(tmp, out)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("npz", help="the archive: classes, {train,test}_{jpeg,offsets,labels}")
    p.add_argument("out", help="the folder to create: OUT/{train,test}/<class>/NNNN.jpg")
    a = p.parse_args(argv)
    return unpack(a.npz, a.out)


if __name__ == "__main__":
    main()
