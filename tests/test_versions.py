"""Features that need a newer torch or torchvision than requirements.txt's floor stop with one line
naming the version they need (the installed version is patched to an old one), and the folder reader
works on the floor (it hands torchvision the file's bytes: a path is read by torchvision >= 0.20 only).
`make test-oldest` runs the whole suite on the floor itself."""
import os
import sys
import unittest
from unittest import mock

import torch
import torchvision

from helpers import tiny, tmpdir
import baseline
import beyond
import common

PYTHON = sys.version_info[:2]


class Require(unittest.TestCase):
    def test_stops_with_one_line_naming_the_version_needed(self):
        with mock.patch.object(torch, "__version__", "2.3.1+cu121"), \
                self.assertRaises(SystemExit) as stop:
            common.require("a feature", torch="2.4")
        self.assertEqual(str(stop.exception), "error: a feature needs torch >= 2.4 (this is 2.3.1+cu121)")

    def test_passes_on_that_version_and_later(self):
        for have in ("2.4", "2.4.0+cpu", "2.4.1", "2.10.0", "3.0.0a0"):
            with mock.patch.object(torch, "__version__", have):
                common.require("a feature", torch="2.4")  # no SystemExit
        with mock.patch.object(torchvision, "__version__", "0.9.0"), self.assertRaises(SystemExit):
            common.require("a feature", torchvision="0.19")  # 0.9 < 0.19: numbers, not strings


class Features(unittest.TestCase):
    def test_compile_on_a_python_newer_than_the_torch(self):
        """A whole run with --compile stops before compiling when this Python needs a newer torch."""
        args = tiny(baseline.Args, self, compile=True, epochs=1)
        with mock.patch.dict(common.COMPILE_NEEDS, {PYTHON: "2.4"}), \
                mock.patch.object(torch, "__version__", "2.3.1"), self.assertRaises(SystemExit) as stop:
            baseline.main(args)
        self.assertEqual(str(stop.exception), f"error: --compile on Python {PYTHON[0]}.{PYTHON[1]} "
                                              f"needs torch >= 2.4 (this is 2.3.1)")

    def test_streaming_jpegs_to_a_gpu_on_an_old_torchvision(self):
        args = tiny(baseline.Args, self, dataset="folder", data_dir=tmpdir(self))
        with mock.patch.object(torchvision, "__version__", "0.18.1"), \
                self.assertRaises(SystemExit) as stop:
            beyond.load_stream(args, torch.device("cuda"))  # stops before any file or CUDA call
        self.assertEqual(str(stop.exception), "error: decoding a list of JPEGs on the GPU (a streamed "
                                              "folder on CUDA) needs torchvision >= 0.19 (this is 0.18.1)")

    def test_the_folder_reader_decodes_bytes_not_paths(self):
        """torchvision < 0.20 decodes tensors only: the in-memory folder reader must not pass a path."""
        root, img = tmpdir(self), torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
        os.makedirs(os.path.join(root, "train", "cat"))
        torchvision.io.write_png(img, os.path.join(root, "train", "cat", "0.png"))
        decode = torchvision.io.decode_image

        def tensors_only(data, *a, **kw):
            if not torch.is_tensor(data):
                raise RuntimeError(f"expected a Tensor, got {type(data).__name__}")
            return decode(data, *a, **kw)
        with mock.patch.object(torchvision.io, "decode_image", tensors_only):
            x, y, classes = common._folder(root, "train")
        self.assertEqual((y.tolist(), classes), ([0], ["cat"]))
        self.assertTrue(torch.equal(x, img[None]))  # PNG: lossless


if __name__ == "__main__":
    unittest.main()
