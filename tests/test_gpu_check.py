"""tools/gpu_check.py (make gpu-check) on the CPU: its dry run end to end (every stage through the
user-facing tools, into an output folder that already holds a file of the user's, the summary's keys), the
GPU probe's failure and time-out paths, its one-line errors; and tools/unpack_cifar10_jpeg.py, which it
runs for --npz."""
import io
import json
import os
import sys
import tempfile
import unittest
from contextlib import redirect_stdout
from unittest import mock

import numpy as np
import torch

from helpers import ROOT, run_script, tmpdir
import common

sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402
import reproduce  # noqa: E402
import unpack_cifar10_jpeg as unpack  # noqa: E402


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


class TestDryRun(unittest.TestCase):
    """One `--dry-run` (tiny sizes on the CPU) into a folder holding a log of the user's."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.out = os.path.join(cls.tmp.name, "out")
        os.makedirs(cls.out)
        with open(os.path.join(cls.out, "session.log"), "w") as f:
            f.write("the user's own log\n")
        cls.proc = run_script("tools/gpu_check.py", "--dry-run", "--out", cls.out, timeout=300)
        path = os.path.join(cls.out, "summary.json")
        cls.summary = json.loads(read(path)) if os.path.isfile(path) else {}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_every_stage_runs_and_the_summary_has_its_keys(self):
        self.assertEqual(self.proc.returncode, 0, self.proc.stdout[-3000:] + self.proc.stderr[-3000:])
        s = self.summary
        self.assertEqual((s["check"], s["mode"]), ("gpu-check", "dry-run"))
        self.assertLessEqual({"python", "started", "finished", "command", "probe", "preflight"}, set(s))
        self.assertIn("torch", s["probe"])
        self.assertLessEqual({"compile_ok", "compiler", "python_h", "missing"}, set(s["preflight"]))
        self.assertEqual({k: v["status"] for k, v in s["stages"].items()},
                         {"bench": "ok", "stream": "ok", "grid": "ok", "beyond": "skipped"})
        (row,) = s["stages"]["bench"]["rows"]
        self.assertEqual((row["method"], row["arch"]), ("baseline", "resnet8"))
        self.assertEqual(json.loads(read(os.path.join(self.out, "bench.json")))["rows"], [row])
        self.assertGreater(s["stages"]["stream"]["images_per_s"], 0)
        self.assertEqual(s["stages"]["grid"]["recorded"], ["baseline-resnet8-fake-seed0"])
        for name in ("bench", "stream", "grid"):  # each tool's output is kept beside the summary
            self.assertTrue(read(os.path.join(self.out, s["stages"][name]["log"])), name)
        md = read(os.path.join(self.out, "summary.md"))
        self.assertIn("| baseline | resnet8 |", md)
        self.assertIn("| grid | ok |", md)

    def test_a_file_of_the_users_in_the_folder_is_kept(self):
        self.assertEqual(read(os.path.join(self.out, "session.log")), "the user's own log\n")


class TestProbe(unittest.TestCase):
    def probe(self, code, timeout=20):
        with redirect_stdout(io.StringIO()) as said:
            info = gpu_check.probe([sys.executable, "-c", code], timeout=timeout)
        return info, said.getvalue()

    def test_a_hanging_probe_is_stopped_and_its_error_output_printed(self):
        info, said = self.probe("import sys, time; print('cuInit stuck', file=sys.stderr, flush=True); "
                                "time.sleep(60)", timeout=3)
        self.assertIn("timed out after 3 s", info["error"])
        self.assertIn("cuInit stuck", info["error"])
        self.assertIn("cuInit stuck", said)

    def test_a_failing_probe_and_a_probe_without_cuda_print_why(self):
        info, said = self.probe("raise SystemExit('CUDA driver version is insufficient')")
        self.assertIn("exit status 1", info["error"])
        self.assertIn("driver version is insufficient", said)
        # an old driver: torch answers "no CUDA" and says why on stderr only
        info, said = self.probe("import json, sys; print('UserWarning: the NVIDIA driver is too old', "
                                "file=sys.stderr); print(json.dumps({'cuda': False}))")
        self.assertEqual(info["cuda"], False)
        self.assertIn("driver is too old", said)

    def test_no_gpu_without_dry_run_and_bad_paths_stop_with_one_line(self):
        d = tmpdir(self)
        no_gpu = {"cuda": False, "error": "the GPU probe failed (exit status 1): no driver"}
        with mock.patch.object(gpu_check, "probe", return_value=no_gpu), \
                mock.patch.object(gpu_check, "nvidia_smi", return_value=None), \
                redirect_stdout(io.StringIO()), self.assertRaises(SystemExit) as e:
            gpu_check.main(["--out", os.path.join(d, "o")])
        self.assertIn("no CUDA GPU (the GPU probe failed", str(e.exception))
        self.assertIn("--dry-run", str(e.exception))
        cases = [(["--npz", os.path.join(d, "none.npz")], "none.npz': no such file"),
                 (["--data-dir", os.path.join(d, "nodir")], "nodir': no such folder"),
                 (["--grid-budget", "-1"], "--grid-budget must be at least 0, got -1")]
        for argv, msg in cases:
            with self.assertRaises(SystemExit) as e:
                gpu_check.main(argv + ["--out", os.path.join(d, "o")])
            self.assertIn(msg, str(e.exception))
            self.assertNotIn("\n", str(e.exception))


def jpeg(seed):
    from torchvision.io import encode_jpeg
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
    return encode_jpeg(img, quality=90).numpy().tobytes()


class TestUnpack(unittest.TestCase):
    def archive(self, path, per_class=(2, 1), **override):
        arrays, self.blobs = {"classes": np.array(reproduce.CIFAR10_CLASSES)}, {}
        for split, n in zip(("train", "test"), per_class):
            labels = np.array([c for _ in range(n) for c in range(10)], dtype=np.int64)  # mixed
            blobs = [jpeg(1000 * (split == "test") + i) for i in range(len(labels))]
            arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
            arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
            arrays[f"{split}_labels"] = labels
            self.blobs[split] = blobs
        arrays.update(override)
        np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
        return path

    def test_folder_layout_bytes_and_loader(self):
        d = tmpdir(self)
        npz, out = self.archive(os.path.join(d, "c.npz")), os.path.join(d, "cifar10-jpeg")
        with redirect_stdout(io.StringIO()):
            self.assertEqual(unpack.main([npz, out]), {"train": 20, "test": 10})
        self.assertEqual(sorted(os.listdir(out)), ["test", "train"])
        reproduce.check_data_folder(out)  # the layout the short grid asks for
        self.assertEqual(sorted(os.listdir(os.path.join(out, "train", "cat"))),
                         ["0000.jpg", "0001.jpg"])
        # image i of the archive, the k-th of its class, is <class>/<k>.jpg, byte for byte
        self.assertEqual(read(os.path.join(out, "train", "airplane", "0001.jpg"), "rb"),
                         self.blobs["train"][10])
        self.assertEqual(read(os.path.join(out, "test", "truck", "0000.jpg"), "rb"),
                         self.blobs["test"][9])
        x, y, classes = common._folder(out, "train")
        self.assertEqual((tuple(x.shape), classes), ((20, 3, 32, 32), reproduce.CIFAR10_CLASSES))
        self.assertEqual(y.tolist(), [c for c in range(10) for _ in range(2)])
        self.assertFalse(os.path.exists(out + ".partial"))
        with redirect_stdout(io.StringIO()) as said:  # complete already: left alone
            self.assertEqual(unpack.main([npz, out]), {"train": 0, "test": 0})
        self.assertIn("already holds", said.getvalue())

    def test_bad_archives_stop_with_one_line(self):
        d = tmpdir(self)
        cases = {"lacks test_labels": dict(test_labels=None),
                 "test_offsets must rise": dict(test_offsets=np.array([0, 5, 3], dtype=np.int64)),
                 "not a JPEG": dict(train_jpeg=np.zeros(20 * 8, dtype=np.uint8),
                                    train_offsets=np.arange(0, 161, 8, dtype=np.int64))}
        for i, (msg, override) in enumerate(cases.items()):
            npz = self.archive(os.path.join(d, f"bad{i}.npz"), **override)
            with self.assertRaises(SystemExit) as e, redirect_stdout(io.StringIO()):
                unpack.main([npz, os.path.join(d, f"out{i}")])
            text = str(e.exception)
            self.assertTrue(text.startswith("error: ") and msg in text, text)
            self.assertNotIn("\n", text)
            self.assertFalse([n for n in os.listdir(d) if "out" in n])  # no tree, no .partial left
        with self.assertRaises(SystemExit) as e:
            unpack.main([os.path.join(d, "missing.npz"), os.path.join(d, "o")])
        self.assertIn("no archive at", str(e.exception))


if __name__ == "__main__":
    unittest.main()
