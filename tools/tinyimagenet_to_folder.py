"""Turn Tiny-ImageNet's own layout into the `--dataset folder` layout (train/<class>/*, test/...).

Tiny-ImageNet (tiny-imagenet-200.zip, unzipped: 200 classes of 64x64 JPEGs):
    SRC/train/<wnid>/images/*.JPEG      500 per class (the boxes file beside them is not needed)
    SRC/val/images/*.JPEG               50 per class, all in one folder
    SRC/val/val_annotations.txt         one line per val image: file <TAB> wnid <TAB> x0 y0 x1 y1
    SRC/test/images/*.JPEG              no labels: skipped
Output: DST/train/<wnid>/<file> and DST/test/<wnid>/<file> (the labelled val images are this
repository's test split), copied, or hard-linked with --link (no extra disk; one file system only).
Everything is written into DST.tmp, renamed to DST at the end: DST is either complete or absent.

    python tools/tinyimagenet_to_folder.py tiny-imagenet-200 data/tiny-imagenet
    python baseline.py --dataset folder --data-dir data/tiny-imagenet --arch resnet18 ...
"""
import argparse
import os
import shutil
import sys


def fail(msg):
    raise SystemExit(f"error: {msg}")


def plan(src):
    """[(source file, split, wnid, name)] for every labelled image; one-line errors otherwise."""
    train, val = os.path.join(src, "train"), os.path.join(src, "val")
    notes = os.path.join(val, "val_annotations.txt")
    for path in (train, os.path.join(val, "images"), notes):
        if not os.path.exists(path):
            fail(f"{path!r} not found; {src!r} should be the unzipped tiny-imagenet-200 folder "
                 f"(train/<wnid>/images/, val/images/, val/val_annotations.txt)")
    wnids = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
    if not wnids:
        fail(f"{train!r} has no class folders (train/<wnid>/images/*.JPEG)")
    files = []
    for wnid in wnids:
        images = os.path.join(train, wnid, "images")
        if not os.path.isdir(images):
            fail(f"{images!r} not found (Tiny-ImageNet keeps a class's images in <wnid>/images/)")
        for name in sorted(os.listdir(images)):
            files.append((os.path.join(images, name), "train", wnid, name))
    with open(notes) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                fail(f"{notes!r} line {number}: expected 'file<TAB>wnid<TAB>box', got "
                     f"{line.strip()!r}")
            name, wnid = parts[0].strip(), parts[1].strip()
            if wnid not in wnids:
                fail(f"{notes!r} line {number}: class {wnid!r} has no train/{wnid}/ folder")
            path = os.path.join(val, "images", name)
            if not os.path.isfile(path):
                fail(f"{notes!r} line {number}: {path!r} not found")
            files.append((path, "test", wnid, name))
    return wnids, files


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="the unzipped tiny-imagenet-200 folder")
    p.add_argument("dst", help="the folder to create (must not exist)")
    p.add_argument("--link", action="store_true", help="hard-link the images instead of copying")
    args = p.parse_args(argv)
    if os.path.exists(args.dst):
        fail(f"{args.dst!r} already exists; choose a new folder")
    wnids, files = plan(args.src)
    tmp = args.dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted earlier conversion
    try:
        for split in ("train", "test"):
            for wnid in wnids:
                os.makedirs(os.path.join(tmp, split, wnid))
        for path, split, wnid, name in files:
            (os.link if args.link else shutil.copyfile)(path, os.path.join(tmp, split, wnid, name))
        os.replace(tmp, args.dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        hint = "; try without --link" if args.link else ""
        fail(f"cannot write {args.dst!r} ({e.strerror}: {e.filename}){hint}")
    n_test = sum(split == "test" for _, split, _, _ in files)
    print(f"{args.dst}: {len(wnids)} classes, {len(files) - n_test} train / {n_test} test images")


if __name__ == "__main__":
    sys.exit(main())
