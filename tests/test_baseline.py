"""baseline.py: the loss, learning on the synthetic set, determinism, the CLI and what --out holds."""
import json
import os
import unittest

import torch
import torch.nn.functional as F

from helpers import run_script, tiny, tmpdir
import baseline
import common


class TestBaseline(unittest.TestCase):
    def test_loss_is_cross_entropy(self):
        z, y = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 1])
        loss, logs = baseline.baseline_loss(z, y, None)
        expected = -(torch.log_softmax(z, 1)[0, 0] + torch.log_softmax(z, 1)[1, 1]) / 2
        self.assertAlmostEqual(loss.item(), expected.item(), places=6)
        self.assertEqual(set(logs), {"loss", "ce"})

    def test_learns_fake_well_above_chance_and_is_deterministic(self):
        a = baseline.main(tiny(baseline.Args, self, epochs=3))
        self.assertGreater(a["test_acc"], 60.0)  # 10 classes: chance is 10%
        b = baseline.main(tiny(baseline.Args, self, epochs=3))
        self.assertEqual(a["test_acc"], b["test_acc"])
        self.assertEqual(a["models"], b["models"])
        c = baseline.main(tiny(baseline.Args, self, epochs=3, seed=1))
        self.assertNotEqual(a["train_loss"], c["train_loss"])  # another seed: other init, order, crops
        self.assertEqual(a["train_loss"], b["train_loss"])

    def test_cli_run_writes_outputs(self):
        out = os.path.join(tmpdir(self), "run")
        p = run_script("baseline.py", "--arch", "resnet8", "--dataset", "fake", "--epochs", "2", "--subset", "256",
                       "--test-subset", "100", "--device", "cpu", "--out", out)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout.splitlines()[-1], r"^final \| net \d+\.\d\d \(last\) \d+\.\d\d \(best, epoch \d\)")
        final = json.load(open(os.path.join(out, "final.json")))
        for key in ("method", "arch", "dataset", "epochs", "device", "test_acc", "best_test_acc", "best_epoch",
                    "models", "train_time_s", "images_per_s"):
            self.assertIn(key, final)
        self.assertEqual((final["method"], final["arch"], final["epochs"], final["device"]), ("baseline", "resnet8", 2, "cpu"))
        rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
        self.assertEqual([r["epoch"] for r in rows], [1, 2])
        self.assertEqual(rows[-1]["acc/net"], final["test_acc"])
        self.assertEqual(max(r["acc/net"] for r in rows), final["best_test_acc"])
        self.assertEqual(json.load(open(os.path.join(out, "config.json")))["subset"], 256)
        ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
        self.assertEqual(ck["epoch"], 2)
        self.assertFalse(any(f.endswith(".tmp") for f in os.listdir(out)))

    def test_lr_schedule_applied_per_epoch(self):
        args = tiny(baseline.Args, self, epochs=4, subset=128)
        baseline.main(args)
        rows = [json.loads(l) for l in open(os.path.join(args.out, "metrics.jsonl"))]
        self.assertEqual([round(r["lr"], 6) for r in rows], [0.1, 0.1, 0.01, 0.001])


if __name__ == "__main__":
    unittest.main()
