"""tools/bench.py: both paths train the same method code and the table/JSON hold a ratio per row."""
import json
import os
import sys
import unittest

import torch

from helpers import ROOT, tmpdir

sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench  # noqa: E402


class TestBench(unittest.TestCase):
    def test_tiny_bench_writes_a_ratio_per_row(self):
        out = os.path.join(tmpdir(self), "bench.json")
        rows = bench.main(["--methods", "baseline,dml,nosuchmethod", "--archs", "resnet8", "--batch-size", "8",
                           "--steps", "2", "--warmup", "1", "--workers", "0", "--images", "64", "--out", out])
        self.assertEqual([(r["method"], r["arch"]) for r in rows], [("baseline", "resnet8"), ("dml", "resnet8")])
        saved = json.load(open(out))
        self.assertEqual(len(saved["rows"]), 2)
        for r in saved["rows"]:
            self.assertGreater(r["ref"]["images_per_s"], 0)
            self.assertAlmostEqual(r["ratio"], r["okd"]["images_per_s"] / r["ref"]["images_per_s"])
            self.assertTrue(0 < r["ref"]["final_loss"] < 10 and 0 < r["okd"]["final_loss"] < 10)

    def test_accuracy_mode_trains_both_paths_to_well_above_chance(self):
        """The same-accuracy check: both pipelines train the same schedule and score the deployed model."""
        out = os.path.join(tmpdir(self), "acc.json")
        rows = bench.main(["--accuracy", "--methods", "baseline", "--archs", "resnet8", "--dataset", "fake",
                           "--subset", "256", "--test-subset", "200", "--epochs", "3", "--seeds", "0",
                           "--batch-size", "32", "--workers", "0", "--out", out])
        self.assertEqual((rows[0]["method"], rows[0]["model"]), ("baseline", "net"))
        for path in ("ref", "okd"):
            self.assertGreater(rows[0][path][0], 40.0)  # 10 classes: chance is 10%
        self.assertEqual(json.load(open(out))["accuracy"][0]["okd"], rows[0]["okd"])

    def test_reference_pipeline_is_crop_and_flip_of_padded_image(self):
        x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        ds = bench.PILSet(x, torch.arange(4), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), views=2)
        img, label = ds[1]
        self.assertEqual((tuple(img.shape), label), ((2, 3, 32, 32), 1))
        padded = torch.nn.functional.pad(x[1].float() / 255, (4, 4, 4, 4))
        for v in img:
            self.assertTrue(any(torch.allclose(v, c, atol=1e-6) for oy in range(9) for ox in range(9)
                                for c in (padded[:, oy:oy + 32, ox:ox + 32], padded[:, oy:oy + 32, ox:ox + 32].flip(-1))))


if __name__ == "__main__":
    unittest.main()
