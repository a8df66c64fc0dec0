"""Bad input gets one line on stderr naming the bad value (and the choices, where there are choices), a
non-zero exit status and no traceback.

Every case is a real process running `python <script> <flags>`: its exit status and stderr are the
interpreter's own. To avoid paying torch's import (~2-3 s of CPU) once per case, one helper process imports
torch and then forks one child per case; each child runs the script as __main__ with the case's argv and
nothing of ours around it (see `_fork_each` at the bottom).
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch
from torchvision.io import write_png

from helpers import ROOT

ARCHS = "'resnet8', 'resnet20', 'resnet32'"  # the start of the --arch choices list


def write_folder(root, size=32, classes=("cat", "dog"), extra=None):
    """root/{train,test}/<class>/0.png, 1.png; `extra` = (relative path, bytes) to add one more file."""
    for split in ("train", "test"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(2):
                write_png(torch.full((3, size, size), 40 * i, dtype=torch.uint8), os.path.join(root, split, c, f"{i}.png"))
    if extra:
        with open(os.path.join(root, extra[0]), "wb") as f:
            f.write(extra[1])
    return root


@unittest.skipUnless(hasattr(os, "fork"), "one process per case needs os.fork (Linux, macOS, WSL)")
class BadInput(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._dir = tempfile.TemporaryDirectory()
        d = cls._dir.name
        tiny = ["--arch", "resnet8", "--device", "cpu", "--epochs", "1"]
        # Folders: a missing one, one whose train/ holds files but no class folders, a 40x40 image, a text
        # file posing as an image, test classes that differ from train's.
        os.makedirs(os.path.join(d, "flat", "train"))
        open(os.path.join(d, "flat", "train", "img.png"), "wb").close()
        write_folder(os.path.join(d, "big"))
        write_png(torch.zeros(3, 40, 40, dtype=torch.uint8), os.path.join(d, "big", "train", "dog", "2.png"))
        write_folder(os.path.join(d, "text"), extra=("train/cat/notes.txt", b"not an image\n"))
        write_folder(os.path.join(d, "classes"))
        os.rename(os.path.join(d, "classes", "test", "dog"), os.path.join(d, "classes", "test", "bird"))
        open(os.path.join(d, "a_file"), "w").close()
        folder = lambda name: tiny + ["--dataset", "folder", "--data-dir", os.path.join(d, name),
                                      "--out", os.path.join(d, "out-" + name)]
        fake = tiny + ["--dataset", "fake", "--out", os.path.join(d, "out-fake")]
        # name: (argv, substrings the one stderr line must contain)
        cls.cases = {
            "arch": (["baseline.py", "--arch", "resnet9"], ["--arch", "'resnet9'", ARCHS, "'resnet110_basic'"]),
            "dataset": (["baseline.py", "--dataset", "imagenet"], ["--dataset", "'imagenet'", "'cifar10', 'cifar100', 'folder', 'fake'"]),
            "pad_mode": (["baseline.py", "--pad-mode", "mirror"], ["--pad-mode", "'mirror'", "'zero', 'reflect'"]),
            "dml_update": (["dml.py", "--update", "async"], ["--update", "'async'", "'joint', 'sequential'"]),
            "device": (["baseline.py", "--device", "tpu"], ["--device", "'tpu'", "'auto', 'cpu', 'cuda'"]),
            "epochs_zero": (["baseline.py", "--epochs", "0"], ["--epochs must be at least 1, got 0"]),
            "epochs_negative": (["baseline.py", "--epochs", "-3"], ["--epochs must be at least 1, got -3"]),
            "epochs_not_int": (["baseline.py", "--epochs", "ten"], ["--epochs", "invalid int value: 'ten'"]),
            "batch_zero": (["baseline.py", "--batch-size", "0"], ["--batch-size must be at least 1, got 0"]),
            "batch_negative": (["baseline.py", "--batch-size", "-8"], ["--batch-size must be at least 1, got -8"]),
            "subset_negative": (["baseline.py", "--subset", "-5"], ["--subset must be at least 0, got -5"]),
            "lr_zero": (["baseline.py", "--lr", "0"], ["--lr must be above 0, got 0.0"]),
            "stop_after_negative": (["baseline.py", "--stop-after", "-1"], ["--stop-after must be at least 0, got -1"]),
            "lr_decay_not_number": (["baseline.py", "--lr-decay-at", "0.5,x"], ["--lr-decay-at", "'0.5,x'", "fractions in (0, 1]"]),
            "lr_decay_above_1": (["baseline.py", "--lr-decay-at", "0.5,1.5"], ["--lr-decay-at", "'0.5,1.5'"]),
            "dml_one_peer": (["dml.py", *fake, "--num-peers", "1"], ["--num-peers must be at least 2, got 1"]),
            "one_temperature": (["one.py", "--temperature", "0"], ["--temperature must be above 0, got 0.0"]),
            "pcl_ema_decay": (["pcl.py", "--ema-decay", "1.5"], ["--ema-decay must be at most 1, got 1.5"]),
            "ffsd_one_student": (["ffsd.py", "--num-students", "1"], ["--num-students must be at least 2, got 1"]),
            "subset_too_large": (["baseline.py", *fake, "--subset", "20000"], ["--subset 20000 is larger than the split (10000 images)"]),
            "test_subset_too_large": (["baseline.py", *fake, "--test-subset", "5000"], ["--test-subset 5000 is larger than the split (2000 images)"]),
            "folder_missing": (["baseline.py", *folder("missing")], [f"--data-dir {os.path.join(d, 'missing')!r} has no train/ folder"]),
            "folder_no_classes": (["baseline.py", *folder("flat")], [os.path.join(d, "flat", "train"), "no class sub-folders"]),
            "folder_wrong_size": (["baseline.py", *folder("big")], [os.path.join(d, "big", "train", "dog", "2.png"), "40x40, expected 32x32"]),
            "folder_not_image": (["baseline.py", *folder("text")], ["cannot decode image", os.path.join(d, "text", "train", "cat", "notes.txt")]),
            "folder_test_classes": (["baseline.py", *folder("classes")], ["class folders", "['bird', 'cat']", "['cat', 'dog']"]),
            "out_under_file": (["baseline.py", *fake, "--out", os.path.join(d, "a_file", "run")], ["cannot write to --out", os.path.join(d, "a_file", "run")]),
            "cuda_without_gpu": (["baseline.py", *fake, "--device", "cuda"], ["--device cuda but no CUDA GPU is visible", "auto, cpu, cuda"]),
            "dml_arch_list_unknown": (["dml.py", *fake, "--arch", "resnet8,resnet9"],
                                      ["unknown --arch 'resnet9'", ARCHS.replace("'", "")]),
            "dml_arch_list_num_peers": (
                ["dml.py", *fake, "--arch", "resnet8,resnet20", "--num-peers", "3"],
                ["--arch 'resnet8,resnet20' names 2 networks but --num-peers is 3"]),
            "arch_list_not_dml": (["baseline.py", *fake, "--arch", "resnet8,resnet20"],
                                  ["--arch", "'resnet8,resnet20'"]),
        }
        if not torch.backends.mps.is_available():  # (on a Mac with Apple silicon it is valid)
            cls.cases["mps_unavailable"] = (
                ["baseline.py", *fake, "--device", "mps"],
                ["--device mps but Apple's MPS backend is not available", "auto, cpu, cuda, mps"])
        # The GPU case must fail even on a machine with a GPU: hide the GPUs from every case.
        cls.results = _run_cases({name: argv for name, (argv, _) in cls.cases.items()},
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})

    @classmethod
    def tearDownClass(cls):
        cls._dir.cleanup()

    def test_every_case_one_line_naming_the_value(self):
        self.assertEqual(set(self.results), set(self.cases))
        for name, (argv, needles) in self.cases.items():
            with self.subTest(name):
                status, err = self.results[name]
                self.assertNotEqual(status, 0, err)
                self.assertNotIn("Traceback", err)
                lines = err.splitlines()
                self.assertEqual(len(lines), 1, err)
                self.assertIn("error: ", lines[0])
                for needle in needles:
                    self.assertIn(needle, lines[0])

    def test_bad_data_or_arguments_leave_no_run_folder(self):
        # --out is created only when training starts: no case above (bad data too) leaves a folder.
        self.assertEqual([n for n in os.listdir(self._dir.name) if n.startswith("out-")], [])

    def test_a_good_command_passes_the_same_path(self):
        # The harness itself must not produce errors: a valid 1-epoch run exits 0 with nothing on stderr.
        out = os.path.join(self._dir.name, "good")
        res = _run_cases({"good": ["baseline.py", "--arch", "resnet8", "--dataset", "fake", "--subset", "32",
                                   "--test-subset", "20", "--batch-size", "16", "--epochs", "1", "--device", "cpu",
                                   "--out", out]}, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.assertEqual(res["good"], [0, ""])
        self.assertTrue(os.path.exists(os.path.join(out, "final.json")))


def _run_cases(cases, env):
    """{name: argv} -> {name: [exit status, stderr]}, each case its own process (see the module docstring)."""
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--fork-each"], input=json.dumps(cases),
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"case runner failed: {p.stderr}")
    return json.loads(p.stdout)


def _fork_each():
    """Read {name: argv} on stdin; for each, fork a child that runs argv[0] as __main__ with sys.argv = argv,
    its stderr going to a file; print {name: [exit status, stderr]}. In the child an exception is never caught
    by us: it reaches the interpreter, which prints it and sets the exit status exactly as for `python argv...`."""
    import gc
    import runpy
    cases, results = json.load(sys.stdin), {}
    gc.freeze()  # children skip collecting the parent's objects (torch's) at exit: ~1 s of CPU less per case
    sys.path[0] = ROOT
    for name, argv in cases.items():
        with tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # child: the script, as the interpreter would run it
                os.dup2(err.fileno(), 2)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                sys.argv = argv
                runpy.run_path(argv[0], run_name="__main__")
                raise SystemExit(0)
            _, status = os.waitpid(pid, 0)
            err.seek(0)
            results[name] = [os.waitstatus_to_exitcode(status), err.read().decode()]
    print(json.dumps(results))


if __name__ == "__main__" and sys.argv[1:] == ["--fork-each"]:
    _fork_each()
elif __name__ == "__main__":
    unittest.main()
