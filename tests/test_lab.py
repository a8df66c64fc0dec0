"""The labs (docs/lab1.md, docs/lab2.md) as a student meets them: tools/cifar10_to_jpeg.py on a fixture in
CIFAR-10's own pickle format (offline), then every command of the lab in sequence as written, on that converted fixture,
with only the sizes made tiny (epochs, subsets, batch). The plotting command runs where matplotlib is
installed (an optional extra) and is skipped, said so, where it is not."""
import os
import pickle
import re
import shlex
import subprocess
import sys
import unittest

import numpy as np

from helpers import ROOT, tmpdir

sys.path.insert(0, os.path.join(ROOT, "tools"))
import cifar10_to_jpeg  # noqa: E402

import common  # noqa: E402

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar_fixture(root, per_batch=10, test=20):
    """root/cifar-10-batches-py/ as torchvision unpacks it: data_batch_1..5 and test_batch ({'data':
    uint8 (N, 3072) in CHW order, 'labels': [N]}) and batches.meta. Image i of a split is a smooth,
    distinct picture (a colour ramp, JPEG keeps it); labels cycle through the classes. Returns
    {split: (images (N, 3, 32, 32), labels)} in file order."""
    d = os.path.join(root, cifar10_to_jpeg.FOLDER)
    os.makedirs(d)
    ramp = np.linspace(0, 1, 32)[None, :, None] * np.linspace(0.5, 1, 32)[None, None, :]  # (1, 32, 32)
    made = {}
    for split, names, n in (("train", cifar10_to_jpeg.BATCHES["train"], per_batch),
                            ("test", cifar10_to_jpeg.BATCHES["test"], test)):
        xs, ys = [], []
        for b, name in enumerate(names):
            idx = np.arange(n) + b * n
            colour = np.stack([(idx * 37) % 200, (idx * 71) % 200, (idx * 13) % 200], 1) + 40.0  # (n, 3)
            x = (colour[:, :, None, None] * (0.4 + 0.6 * ramp[None])).round().astype(np.uint8)
            y = [(int(i) + b) % 10 for i in idx]
            with open(os.path.join(d, name), "wb") as f:
                pickle.dump({"data": x.reshape(n, 3072), "labels": y}, f)
            xs.append(x)
            ys += y
        made[split] = (np.concatenate(xs), np.array(ys))
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    return made


def convert(root, out):
    with open(os.devnull, "w") as null:
        stdout, sys.stdout = sys.stdout, null
        try:
            return cifar10_to_jpeg.main([root, out])
        finally:
            sys.stdout = stdout


class Converter(unittest.TestCase):
    def test_folder_layout_order_and_pixels(self):
        root = tmpdir(self)
        made = write_cifar_fixture(root)
        out = os.path.join(root, "cifar10-jpeg")
        self.assertEqual(convert(root, out), {"train": 50, "test": 20})
        for split, (x, y) in made.items():
            got, labels, classes = common._folder(out, split)  # the loader --dataset folder uses
            self.assertEqual(classes, CLASSES, "class folders named by batches.meta")
            # the k-th image of class c in the batches is <class>/<k>.jpg: the folder's order
            order = np.argsort(y, kind="stable")
            self.assertEqual(labels.tolist(), y[order].tolist())
            diff = np.abs(got.numpy().astype(float) - x[order].astype(float)).mean(axis=(1, 2, 3))
            self.assertLess(diff.max(), 4.0, f"{split}: a JPEG is not the image of its place (CHW kept, "
                                             f"quality {cifar10_to_jpeg.QUALITY})")
        names = sorted(os.listdir(os.path.join(out, "train", "cat")))
        self.assertEqual(names, ["0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg", "0004.jpg"])
        self.assertFalse(os.path.exists(out + ".partial"))
        self.assertEqual(convert(root, out), {"train": 0, "test": 0}, "a complete folder is left alone")

    def test_missing_batch_is_one_line_and_writes_nothing(self):
        root = tmpdir(self)
        write_cifar_fixture(root)
        os.remove(os.path.join(root, cifar10_to_jpeg.FOLDER, "data_batch_3"))
        out = os.path.join(root, "cifar10-jpeg")
        with self.assertRaises(SystemExit) as e:
            convert(root, out)
        msg = str(e.exception)
        self.assertTrue(msg.startswith("error: ") and "data_batch_3" in msg and "\n" not in msg, msg)
        self.assertFalse([n for n in os.listdir(root) if n.startswith("cifar10-jpeg")])


def lab_commands(page):
    """The shell commands of the page's first ```bash block, comments dropped, lines joined."""
    with open(os.path.join(ROOT, "docs", page)) as f:
        block = re.search(r"```bash\n(.*?)```", f.read(), re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


TINY = {"--epochs": "1", "--subset": "50", "--test-subset": "20", "--batch-size": "16"}


def tiny(argv):
    """The command with only its sizes made tiny (flags absent stay absent)."""
    return [TINY.get(prev, a) if prev in TINY else a for prev, a in zip([""] + argv, argv)]


class LabCommands(unittest.TestCase):
    def test_lab1_commands_run_in_sequence_as_written(self):
        self.run_lab("lab1.md", ["baseline", "baseline-augment", "dml", "one", "okddip"])

    def test_lab2_commands_run_in_sequence_as_written(self):
        self.run_lab("lab2.md", ["baseline", "pcl", "pcl-beta0.999"])

    def run_lab(self, page, runs):
        """In a fresh folder holding a CIFAR-10 download (the fixture): the converter, the training runs
        (each its own --out: none may refuse to start), the plot. The first lines start the student's
        data (`tools/cifar10_to_jpeg.py`), the runs read it (`--dataset folder`)."""
        cwd = tmpdir(self)
        write_cifar_fixture(os.path.join(cwd, "data"))
        commands = lab_commands(page)
        self.assertIn("tools/cifar10_to_jpeg.py", commands[0])
        outs = []
        for line in commands:
            argv = tiny(shlex.split(line))
            self.assertEqual(argv[0], "python", line)
            if argv[1] == "tools/plot.py" and not HAVE_MPL:
                print("\n  test_lab: plot command skipped (no matplotlib)", file=sys.stderr)
                continue
            if "--dataset" in argv:
                self.assertEqual(argv[argv.index("--dataset") + 1], "folder", line)
                outs.append(argv[argv.index("--out") + 1])
            p = subprocess.run([sys.executable, os.path.join(ROOT, argv[1]), *argv[2:]], cwd=cwd,
                               capture_output=True, text=True, timeout=600,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            self.assertEqual(p.returncode, 0, f"{line}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            if argv[1] == "tools/plot.py":
                for out in argv[2:]:
                    if out in outs:
                        self.assertIn(os.path.basename(out), p.stdout)
                pngs = [w for w in p.stdout.split() if w.endswith(".png")]
                self.assertTrue(pngs and all(os.path.isfile(os.path.join(cwd, w)) for w in pngs), p.stdout)
        self.assertEqual([os.path.basename(o) for o in outs], runs)
        self.assertEqual(len(set(outs)), len(outs), "every run has its own --out")
        for out in outs:
            self.assertTrue(os.path.isfile(os.path.join(cwd, out, "final.json")), out)


if __name__ == "__main__":
    unittest.main()
