"""Grading tests for okddip.py (`make grade METHOD=okddip FILE=...`): only the public functions and
their outputs (peer_targets and okddip_loss on hand-made tensors, the model's attention against its
W_q / W_k, gradients, train_step's w, evaluate's names).
"""
import os
import sys
import unittest

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # helpers
from helpers import assert_ramp_and_step, batch, graded, models, np_ce, np_kd, np_softmax  # noqa: E402
import okddip  # noqa: E402  (the grader puts the student's file here)

# 3 peers + the leader (last), B = 2, C = 3; a fixed attention (B, 3, 3), rows summing to 1; labels.
Z = np.array([[[1.0, -0.5, 0.3], [0.2, 0.1, -1.2]],
              [[0.4, 1.5, -0.3], [-0.6, 2.2, 0.5]],
              [[-1.0, 0.8, 1.1], [1.3, -0.4, 0.0]],
              [[0.7, 0.2, -0.1], [0.0, 0.9, 0.4]]])
A = np_softmax(np.array([[[0.5, -0.2, 1.0], [0.3, 0.3, -0.7], [1.2, 0.0, 0.4]],
                         [[-0.1, 0.9, 0.2], [0.6, -0.5, 0.1], [0.0, 0.8, -0.3]]]))
Y = np.array([2, 1])


def targets_by_hand():
    """t_a[b] = sum_c A[b, a, c] z_c[b], by explicit loops."""
    t = np.zeros((3, 2, 3))
    for a in range(3):
        for b in range(2):
            for c in range(3):
                t[a, b] += A[b, a, c] * Z[c, b]
    return t


def model(m=3, exclude_self=False):
    torch.manual_seed(0)
    args = okddip.Args(arch="resnet8", num_peers=m, exclude_self=exclude_self)
    return okddip.build_model(args, 10)


class TestLoss(unittest.TestCase):
    def test_peer_targets(self):
        """t_a = sum_b A[a, b] z_b per sample, on logits."""
        t = okddip.peer_targets(torch.tensor(Z[:3]), torch.tensor(A))
        np.testing.assert_allclose(t.numpy(), targets_by_hand(), rtol=1e-6, atol=1e-6)

    def test_terms_by_hand(self):
        """ce/peer<a>, kd/peer<a> (at --temperature 2, not the default 3; x T^2; from t_a),
        ce/leader, kd/leader (from the mean)."""
        _, logs = okddip.okddip_loss(torch.tensor(Z), torch.tensor(A), torch.tensor(Y), 0.7,
                                     okddip.Args(temperature=2.0))
        logs, t = graded(logs, "okddip_loss"), targets_by_hand()
        for a in range(3):
            ce, kd = logs[f"ce/peer{a + 1}"].item(), logs[f"kd/peer{a + 1}"].item()
            self.assertAlmostEqual(ce, np_ce(Z[a], Y), places=5, msg=f"ce/peer{a + 1}")
            self.assertAlmostEqual(kd, np_kd(Z[a], t[a], 2.0), places=5,
                                   msg=f"kd/peer{a + 1} at T = 2 (args.temperature)")
        self.assertAlmostEqual(logs["ce/leader"].item(), np_ce(Z[3], Y), places=5, msg="ce/leader")
        self.assertAlmostEqual(logs["kd/leader"].item(), np_kd(Z[3], Z[:3].mean(0), 2.0), places=5,
                               msg="kd/leader: target = mean of the peers' logits")

    def test_total(self):
        """L = sum_a (CE_a + w KD_a) + CE_L + w KD_L: sums over the peers, one w for both levels."""
        w, t = 0.7, targets_by_hand()
        loss, _ = okddip.okddip_loss(torch.tensor(Z), torch.tensor(A), torch.tensor(Y), w,
                                     okddip.Args())
        expected = (sum(np_ce(Z[a], Y) + w * np_kd(Z[a], t[a], 3.0) for a in range(3))
                    + np_ce(Z[3], Y) + w * np_kd(Z[3], Z[:3].mean(0), 3.0))
        self.assertAlmostEqual(loss.item(), expected, places=5)

    def test_nothing_detached(self):
        """The attention learns through the targets; the leader's KD reaches the peers."""
        def peer_grad(z):
            z, att = torch.tensor(z, requires_grad=True), torch.tensor(A, requires_grad=True)
            okddip.okddip_loss(z, att, torch.tensor(Y), 1.0, okddip.Args())[0].backward()
            return z.grad[:3].clone(), att.grad
        g0, att_grad = peer_grad(Z)
        self.assertTrue(att_grad is not None and att_grad.abs().sum() > 0, "no gradient into A")
        z2 = Z.copy()
        z2[3] *= -2.0
        self.assertGreater((g0 - peer_grad(z2)[0]).abs().max().item(), 1e-4,
                           "the peers' gradient ignores the leader: is its target detached?")


class TestAttention(unittest.TestCase):
    def test_attention_formula(self):
        """A[b, a, c] = softmax_c((W_q h_a) . (W_k h_c)) per sample: no 1/sqrt(d), c = a kept."""
        net = model()
        h = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
        att = net.attention(h)
        self.assertEqual(tuple(att.shape), (5, 3, 3))
        Wq, Wk = net.query.weight.detach(), net.key.weight.detach()
        for b in range(5):
            for a in range(3):
                e = torch.stack([(Wq @ h[a, b]) @ (Wk @ h[c, b]) for c in range(3)])
                torch.testing.assert_close(att[b, a], torch.softmax(e, 0), rtol=1e-5, atol=1e-6)

    def test_exclude_self(self):
        """--exclude-self: rows still sum to 1 and a peer has weight 0 in its own target."""
        att = model(exclude_self=True).attention(torch.randn(3, 4, 64))
        torch.testing.assert_close(att.sum(-1), torch.ones(4, 3))
        self.assertTrue(bool(torch.all(att.diagonal(dim1=1, dim2=2) == 0)))

    def test_projections_learn_through_the_targets(self):
        """W_q, W_k get gradient from the KD terms (w = 1) and none without them (w = 0)."""
        net = model()
        x, y = batch(8)
        logits, att = net(x)
        self.assertEqual((tuple(logits.shape), tuple(att.shape)), ((4, 8, 10), (8, 3, 3)))
        okddip.okddip_loss(logits, att, y, 1.0, okddip.Args())[0].backward()
        self.assertTrue(net.query.weight.grad is not None and net.query.weight.grad.abs().sum() > 0,
                        "W_q got no gradient: are the targets detached?")
        net.zero_grad(set_to_none=True)
        logits, att = net(x)
        okddip.okddip_loss(logits, att, y, 0.0, okddip.Args())[0].backward()
        g = net.query.weight.grad
        self.assertTrue(g is None or not g.any(), "W_q learns without the KD terms")


class TestTrainStep(unittest.TestCase):
    def test_one_w_per_epoch_and_a_step(self):
        """w(e) from the epoch at --rampup-epochs 20 (not the default 80), the same at every step, both
        levels; the step changes the weights; train_step returns okddip_loss's logs."""
        args = okddip.Args(arch="resnet8", batch_size=16, device="cpu", rampup_epochs=20)
        assert_ramp_and_step(self, okddip, args, model())


class TestEvaluate(unittest.TestCase):
    def test_names_and_values(self):
        """peer1..m, ensemble (mean of the peers' logits, not the leader's) and leader (last)."""
        net = model().eval()
        x = batch(4)[0]
        with torch.no_grad():
            outs = okddip.evaluate(net, x)
            logits, _ = net(x)
        self.assertEqual(set(models(outs)), {"peer1", "peer2", "peer3", "ensemble", "leader"})
        for a in range(3):
            torch.testing.assert_close(outs[f"peer{a + 1}"], logits[a])
        torch.testing.assert_close(outs["ensemble"], logits[:3].mean(0))
        torch.testing.assert_close(outs["leader"], logits[3])


if __name__ == "__main__":
    unittest.main()
