"""Grading tests for one.py (`make grade METHOD=one FILE=...`): only the public functions and their
outputs (one_loss on hand-made logits, the model's (z, g, z_e), parameter counts and gradients,
train_step's w, evaluate's names).
"""
import math
import os
import sys
import unittest

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # helpers
from helpers import assert_ramp_and_step, batch, graded, models, np_ce, np_kd, np_softmax, step_logs  # noqa: E402
import common  # noqa: E402
import one  # noqa: E402  (the grader puts the student's file here)

# m = 3 branches, B = 2 images, C = 4 classes; a fixed teacher; labels.
Z = np.array([[[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.2, 0.7]],
              [[0.4, 1.5, -0.3, 0.0], [-0.6, 2.2, 0.5, 0.1]],
              [[-1.0, 0.8, 1.1, 0.3], [1.3, -0.4, 0.0, 0.9]]])
Z_E = np.array([[0.5, 0.6, 0.4, 0.9], [0.3, 0.7, -0.2, 0.6]])
Y = np.array([3, 1])


def model(m=3, arch="resnet8", classes=10):
    torch.manual_seed(0)
    return one.build_model(one.Args(arch=arch, num_branches=m), classes)


class TestLoss(unittest.TestCase):
    def test_terms_by_hand(self):
        """ce/branch<i>, kd/branch<i> (at --temperature 2, not the default 3; x T^2), ce/one_e and
        w, against a hand computation."""
        args = one.Args(temperature=2.0)
        _, logs = one.one_loss(torch.tensor(Z), torch.tensor(Z_E), torch.tensor(Y), 0.3, args)
        logs = graded(logs, "one_loss")
        for i in range(3):
            ce, kd = logs[f"ce/branch{i + 1}"].item(), logs[f"kd/branch{i + 1}"].item()
            self.assertAlmostEqual(ce, np_ce(Z[i], Y), places=5, msg=f"ce/branch{i + 1}")
            self.assertAlmostEqual(kd, np_kd(Z[i], Z_E, 2.0), places=5,
                                   msg=f"kd/branch{i + 1} at T = 2 (args.temperature)")
        self.assertAlmostEqual(logs["ce/one_e"].item(), np_ce(Z_E, Y), places=5, msg="ce/one_e")
        self.assertAlmostEqual(logs["w"].item(), 0.3, places=6, msg="w")

    def test_total(self):
        """L = sum_i CE_i + CE(z_e) + w * sum_i KD_i."""
        w = 0.3
        loss, _ = one.one_loss(torch.tensor(Z), torch.tensor(Z_E), torch.tensor(Y), w, one.Args())
        expected = sum(np_ce(Z[i], Y) + w * np_kd(Z[i], Z_E, 3.0) for i in range(3)) + np_ce(Z_E, Y)
        self.assertAlmostEqual(loss.item(), expected, places=5)

    def test_teacher_learns_from_its_ce_only(self):
        """d L / d z_e = d CE(z_e) / d z_e: the teacher is detached inside the KD terms."""
        z_e = torch.tensor(Z_E, requires_grad=True)
        one.one_loss(torch.tensor(Z), z_e, torch.tensor(Y), 1.0, one.Args())[0].backward()
        expected = (np_softmax(Z_E) - np.eye(4)[Y]) / 2
        np.testing.assert_allclose(z_e.grad.numpy(), expected, rtol=0, atol=1e-6,
                                   err_msg="the KD terms sent gradient into the teacher z_e")


class TestModel(unittest.TestCase):
    def test_gate_and_teacher(self):
        """g (B, m): a softmax over the branches (rows sum to 1); z_e = sum_i g_i z_i per sample."""
        logits, g, z_e = model()(batch(8)[0])
        shapes = tuple(tuple(t.shape) for t in (logits, g, z_e))
        self.assertEqual(shapes, ((3, 8, 10), (8, 3), (8, 10)))
        torch.testing.assert_close(g.sum(1), torch.ones(8), rtol=0, atol=1e-6, msg="rows sum to 1?")
        self.assertTrue(bool((g >= 0).all()), "gate weights must be non-negative")
        expect = torch.stack([sum(g[b, i] * logits[i, b] for i in range(3)) for b in range(8)])
        torch.testing.assert_close(z_e, expect, rtol=1e-5, atol=1e-5, msg="z_e = sum_i g_i z_i")

    def test_parameter_count(self):
        """ResNet-32, 3 branches: trunk + branches + gate Linear(32 -> 3) + BN1d(3) = 1,175,639."""
        self.assertEqual(common.num_params(model(arch="resnet32")), 1_175_639)

    def test_gate_learns_from_the_teacher_ce_only(self):
        """The parameters only the teacher reaches (the gate's) learn from CE(z_e), not from KD."""
        net = model()
        x, y = batch(8)
        logits, _, z_e = net(x)
        params = [p for p in net.parameters() if p.requires_grad]

        def grads(loss):
            return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        branch_ce = grads(sum(F.cross_entropy(logits[i], y) for i in range(3)))
        teacher_ce = grads(F.cross_entropy(z_e, y))
        gate = [i for i, (a, b) in enumerate(zip(branch_ce, teacher_ce))
                if (a is None or not a.any()) and b is not None and b.any()]
        self.assertTrue(gate, "CE(z_e) trains no parameter beyond the branches: is g detached?")
        full, _ = one.one_loss(logits, z_e, y, 1.0, one.Args())
        no_kd, _ = one.one_loss(logits, z_e, y, 0.0, one.Args())
        kd = grads(full - no_kd)
        for i in gate:
            self.assertTrue(kd[i] is None or not kd[i].any(), "the KD terms reach the gate")


class TestTrainStep(unittest.TestCase):
    def test_one_w_per_epoch_and_a_step(self):
        """w(e) = exp(-5 (1 - e/L)^2) from the epoch, at --rampup-epochs L = 20 (not the default
        80), the same at every step; a step is taken; train_step returns one_loss's logs."""
        args = one.Args(arch="resnet8", num_branches=2, batch_size=16, device="cpu", rampup_epochs=20)
        net = model(m=2)
        run, opt, x, y = assert_ramp_and_step(self, one, args, net)
        logs = step_logs(one.train_step(net, opt, x, y, epoch=0, step=0, run=run))
        self.assertAlmostEqual(logs["w"].item(), math.exp(-5), places=6, msg="w(0)")


class TestEvaluate(unittest.TestCase):
    def test_names_and_values(self):
        """branch1..m, one_e (the gated teacher) and ensemble (mean of the branch logits)."""
        net = model().eval()
        x = batch(4)[0]
        with torch.no_grad():
            outs = one.evaluate(net, x)
            logits, _, z_e = net(x)
        self.assertEqual(set(models(outs)), {"branch1", "branch2", "branch3", "one_e", "ensemble"})
        for i in range(3):
            torch.testing.assert_close(outs[f"branch{i + 1}"], logits[i])
        torch.testing.assert_close(outs["one_e"], z_e)
        torch.testing.assert_close(outs["ensemble"], logits.mean(0))


if __name__ == "__main__":
    unittest.main()
