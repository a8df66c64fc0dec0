"""tools/bench.py (make bench) on the CPU: its JSON's columns, the same weights and batches on every path
(what the bf16~fp32 column relies on), the --compile ratio's plumbing, and the reference pipeline's
augmentation."""
import io
import json
import os
import sys
import unittest
from contextlib import redirect_stdout
from unittest import mock

import torch

from helpers import ROOT, tmpdir

sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench  # noqa: E402

TINY = ["--device", "cpu", "--archs", "resnet8", "--images", "32", "--batch-size", "8", "--warmup", "1",
        "--steps", "2", "--loss-steps", "3", "--profile-steps", "1", "--workers", "0"]
COLUMNS = {"method", "arch", "batch_size", "ms_per_step", "images_per_s", "x_ref", "bf16_speedup", "losses",
           "bf16_fp32_loss_rel_diff", "peak_mib", "compile_speedup", "compile_s", "kernels_per_step",
           "syncs_per_step", "aten_ops_per_step"}


class TestBench(unittest.TestCase):
    def test_json_columns_and_the_compile_ratio(self):
        out = os.path.join(tmpdir(self), "bench.json")
        # compiling takes minutes on a CPU: the plumbing runs with compile_model as the identity
        with mock.patch.object(bench.common, "compile_model", side_effect=lambda m: m) as compiled, \
                redirect_stdout(io.StringIO()) as said:
            bench.main(TINY + ["--methods", "baseline", "--compile-methods", "baseline", "--out", out])
        self.assertEqual(compiled.call_count, 1)
        doc = json.load(open(out))
        self.assertTrue(doc["complete"])
        self.assertEqual(doc["env"]["timer"], "perf_counter")
        (row,) = doc["rows"]
        self.assertEqual(set(row), COLUMNS)
        self.assertEqual(set(row["ms_per_step"]), {"fp32", "ref", "compiled"})  # no bf16 on a CPU
        for key in ("bf16_fp32_loss_rel_diff", "bf16_speedup", "peak_mib", "kernels_per_step",
                    "syncs_per_step"):
            self.assertIsNone(row[key], key)  # CUDA-only: never a made-up number
        self.assertEqual(len(row["losses"]["fp32"]), 3)
        self.assertTrue(all(0 < v < 10 for v in row["losses"]["fp32"] + row["losses"]["ref"]))
        ms = row["ms_per_step"]
        self.assertAlmostEqual(row["x_ref"], ms["ref"] / ms["fp32"], places=2)
        self.assertAlmostEqual(row["compile_speedup"], ms["fp32"] / ms["compiled"], places=2)
        self.assertGreater(row["aten_ops_per_step"], 20)  # counted by the profiler after the timing
        self.assertIn("baseline  resnet8", said.getvalue())

    def test_every_path_starts_from_the_same_weights_and_batches(self):
        """bf16~fp32 compares two runs of one seed: on a CPU, where --bf16 does nothing, their losses are
        identical, step for step (another seed's differ)."""
        opt = bench.parse(TINY + ["--out", "unused"])
        with mock.patch("sys.stdout", io.StringIO()):
            opt.scratch = tmpdir(self)
            a = bench.time_path("dml", "resnet8", opt, "bf16")["losses"]
            b = bench.time_path("dml", "resnet8", opt, "fp32")["losses"]
        self.assertEqual(len(a), 3)
        self.assertEqual(a, b)
        self.assertEqual(bench.rel_diff(a, b), 0.0)
        self.assertAlmostEqual(bench.rel_diff([1.01, 1.03], [1.0, 1.0]), 0.02)

    def test_bad_names_stop_with_one_line(self):
        for argv, msg in ((["--methods", "baseline,nosuch"], "--methods nosuch: not one of baseline"),
                          (["--archs", "resnet9"], "--archs resnet9: not one of"),
                          (["--compile-methods", "pcl", "--methods", "baseline"],
                           "--compile-methods pcl: not one of baseline"),
                          (["--steps", "0"], "--steps must be at least 1, got 0")):
            with self.assertRaises(SystemExit) as e:
                bench.parse(["--device", "cpu", *argv])
            self.assertIn(msg, str(e.exception))
            self.assertNotIn("\n", str(e.exception))

    def test_reference_pipeline_is_crop_and_flip_of_padded_image(self):
        x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        ds = bench.PILSet(x, torch.arange(4), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), views=2)
        img, label = ds[1]
        self.assertEqual((tuple(img.shape), label), ((2, 3, 32, 32), 1))
        padded = torch.nn.functional.pad(x[1].float() / 255, (4, 4, 4, 4))
        for v in img:
            self.assertTrue(any(torch.allclose(v, c, atol=1e-6) for oy in range(9) for ox in range(9)
                                for c in (padded[:, oy:oy + 32, ox:ox + 32],
                                          padded[:, oy:oy + 32, ox:ox + 32].flip(-1))))


if __name__ == "__main__":
    unittest.main()
