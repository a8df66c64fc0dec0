"""Grading tests for dml.py (`make grade METHOD=dml FILE=...`): only the public functions and their
outputs (dml_loss on hand-made logits, build_model's K networks, train_step's effect on the weights,
evaluate's names).
"""
import os
import sys
import unittest

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # helpers
from helpers import fake_run, graded, logs_seen, models, np_ce, np_kd, step_logs  # noqa: E402
import common  # noqa: E402
import dml  # noqa: E402  (the grader puts the student's file here)

# K = 3 networks, B = 3 images, C = 4 classes; labels.
Z = torch.tensor([[[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.2], [0.3, 0.3, 0.1, 1.0]],
                  [[0.5, 0.1, 2.0, 0.0], [1.0, 1.0, 0.0, -2.0], [2.0, -0.5, 0.0, 0.4]],
                  [[-1.0, 0.0, 1.0, 2.0], [0.2, 0.4, 0.6, 0.8], [1.5, 1.0, -1.0, 0.0]]])
Y = torch.tensor([1, 2, 3])


def by_hand(z, T):
    """Per network k: CE_k and KD_k = mean over l != k of T^2 KL(p_l || p_k) (numpy, loops)."""
    K = len(z)
    return ([np_ce(z[k], Y) for k in range(K)],
            [np.mean([np_kd(z[k], z[l], T) for l in range(K) if l != k]) for k in range(K)])


class TestLoss(unittest.TestCase):
    def test_terms_by_hand(self):
        """ce/peer<k> and kd/peer<k> (T = 1, K = 2 and 3) equal the equation computed by hand."""
        for K in (2, 3):
            logs = graded(dml.dml_loss(Z[:K], Y, dml.Args(temperature=1.0))[1], "dml_loss")
            ces, kds = by_hand(Z[:K].numpy(), 1.0)
            for k in range(K):
                ce, kd = logs[f"ce/peer{k + 1}"].item(), logs[f"kd/peer{k + 1}"].item()
                self.assertAlmostEqual(ce, ces[k], places=5, msg=f"ce/peer{k + 1}")
                self.assertAlmostEqual(kd, kds[k], places=5,
                                       msg=f"kd/peer{k + 1}, K = {K}")

    def test_kd_scaled_by_T_squared(self):
        """At T = 3 the KD term is T^2 = 9 times the KL of the softened distributions."""
        logs = graded(dml.dml_loss(Z[:2], Y, dml.Args(temperature=3.0))[1], "dml_loss")
        _, kds = by_hand(Z[:2].numpy(), 3.0)
        self.assertAlmostEqual(logs["kd/peer1"].item(), kds[0], places=5, msg="kd/peer1 at T = 3")

    def test_total_is_sum_over_networks(self):
        """L = sum_k (CE_k + KD_k): a sum over the networks, not a mean."""
        loss, _ = dml.dml_loss(Z, Y, dml.Args(temperature=1.0))
        ces, kds = by_hand(Z.numpy(), 1.0)
        self.assertAlmostEqual(loss.item(), sum(ces) + sum(kds), places=4, msg="L = sum_k L_k")

    def test_peer_targets_are_detached(self):
        """d L / d z_1 is the gradient of network 1's own L_1 = CE_1 + KD(sg z_2 -> z_1) only."""
        z = Z[:2].clone().requires_grad_(True)
        dml.dml_loss(z, Y, dml.Args(temperature=1.0))[0].backward()
        z1 = Z[0].clone().requires_grad_(True)
        (F.cross_entropy(z1, Y) + common.kd_loss(z1, Z[1], 1.0)).backward()
        torch.testing.assert_close(z.grad[0], z1.grad, atol=1e-6, rtol=0,
                                   msg="network 1 also received gradient as network 2's target")


def step_setup(update):
    args = dml.Args(arch="resnet8", num_peers=2, update=update, batch_size=8, device="cpu")
    run = fake_run(args, n=8)
    torch.manual_seed(0)
    model = dml.build_model(args, 10)
    x, y = (run.data.train_x.float() / 255 - run.data.mean) / run.data.std, run.data.train_y
    return args, run, model, x, y


def manual_step(net, own, peer, y, args):
    """One step of the recipe's SGD on one network's own loss CE + KD(sg peer -> own)."""
    opt = common.sgd(net.parameters(), args)
    (F.cross_entropy(own, y) + common.kd_loss(own, peer.detach(), args.temperature)).backward()
    opt.step()


class TestTrainStep(unittest.TestCase):
    def test_joint_step_equals_per_network_steps(self):
        """--update joint: one step of all == each network stepped on its own L_k (same peers)."""
        args, run, model, x, y = step_setup("joint")
        ref = dml.build_model(args, 10)
        ref.load_state_dict(model.state_dict())
        dml.train_step(model, dml.build_optimizers(model, args), x, y, 0, 0, run)
        z = [net(x) for net in ref]  # pre-update logits, train mode
        for k in range(2):
            manual_step(ref[k], z[k], z[1 - k], y, args)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"{name} after the step")

    def test_sequential_step_uses_updated_peers(self):
        """--update sequential (Algorithm 1): network 2 learns from network 1 AFTER its step."""
        args, run, model, x, y = step_setup("sequential")
        ref = dml.build_model(args, 10)
        ref.load_state_dict(model.state_dict())
        dml.train_step(model, dml.build_optimizers(model, args), x, y, 0, 0, run)
        z1, z2 = ref[0](x), ref[1](x)
        manual_step(ref[0], z1, z2, y, args)
        manual_step(ref[1], ref[1](x), ref[0](x), y, args)  # network 1 already updated
        for k in range(2):
            for p, q in zip(model[k].parameters(), ref[k].parameters()):
                torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=f"network {k + 1}, stepped")

    def test_returns_the_loss_logs(self):
        """train_step returns dml_loss's logs (a dict of 0-d tensors with 'loss', which fit
        averages over the epoch and prints)."""
        args, run, model, x, y = step_setup("joint")
        with logs_seen(dml, "dml_loss") as seen:
            logs = step_logs(dml.train_step(model, dml.build_optimizers(model, args), x, y, 0, 0, run))
        self.assertEqual(sorted(logs), sorted(seen), "train_step must return dml_loss's logs")


class TestEvaluate(unittest.TestCase):
    def test_every_peer_and_the_mean_logit_ensemble(self):
        """evaluate names peer1..K and 'ensemble' = the mean of the peers' logits."""
        model = dml.build_model(dml.Args(arch="resnet8", num_peers=3), 10).eval()
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            outs = dml.evaluate(model, x)
            logits = [net(x) for net in model]
        self.assertEqual(set(models(outs)), {"peer1", "peer2", "peer3", "ensemble"})
        for k in range(3):
            torch.testing.assert_close(outs[f"peer{k + 1}"], logits[k])
        torch.testing.assert_close(outs["ensemble"], torch.stack(logits).mean(0))


if __name__ == "__main__":
    unittest.main()
