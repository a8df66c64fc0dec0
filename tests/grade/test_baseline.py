"""Grading tests for baseline.py (`make grade METHOD=baseline FILE=...`), the warm-up exercise: the
loss on hand-made logits, one train_step, evaluate's names.
"""
import os
import sys
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # helpers
from helpers import fake_run, models, np_ce, step_logs  # noqa: E402
import baseline  # noqa: E402  (the grader puts the student's file here)

Z, Y = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 1])


class TestBaseline(unittest.TestCase):
    def test_loss_is_cross_entropy(self):
        """L = CE(z, y), mean over the batch; logged as 'loss' and 'ce'."""
        loss, logs = baseline.baseline_loss(Z, Y, baseline.Args())
        self.assertAlmostEqual(loss.item(), np_ce(Z, Y), places=6)
        self.assertEqual(set(logs), {"loss", "ce"})

    def test_train_step_takes_one_sgd_step(self):
        """train_step returns baseline_loss's logs (a dict of 0-d tensors: the loss of the batch
        before the step) and changes the weights."""
        args = baseline.Args(arch="resnet8", batch_size=16, device="cpu")
        run = fake_run(args, 16)
        x, y = (run.data.train_x.float() / 255 - run.data.mean) / run.data.std, run.data.train_y
        torch.manual_seed(0)
        net = baseline.build_model(args, 10)
        before = [p.detach().clone() for p in net.parameters()]
        expected = baseline.baseline_loss(net(x), y, args)[0].item()  # train mode: batch statistics
        logs = step_logs(baseline.train_step(net, baseline.build_optimizers(net, args), x, y, 0, 0, run))
        self.assertAlmostEqual(logs["loss"].item(), expected, places=5)
        self.assertTrue(all(not torch.equal(p, q) for p, q in zip(net.parameters(), before)))

    def test_evaluate_names_the_network(self):
        """evaluate returns {'net': logits}."""
        net = baseline.build_model(baseline.Args(arch="resnet8"), 10).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            outs = baseline.evaluate(net, x)
            self.assertEqual(set(models(outs)), {"net"})
            torch.testing.assert_close(outs["net"], net(x))


if __name__ == "__main__":
    unittest.main()
