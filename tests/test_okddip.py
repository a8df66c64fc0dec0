"""okddip.py: attention and targets against explicit loops, the two-level loss against a hand computation,
gradient routing (W_q learns only through the undetached targets), leader handling, parameter counts, a tiny
run that learns, determinism and the CLI. Expected behaviour: OKDDip official code
(DefangChen/OKDDip-AAAI2020, train_GL.py, models/model_cifar/*_GL.py); counts: docs/backbones.md."""
import math
import unittest

import numpy as np
import torch

import helpers  # noqa: F401  (sys.path, one torch thread)
from helpers import assert_parts_disjoint, batch, fake_run, np_ce, np_kd, np_softmax, run_script, three_steps, tiny

import common
import okddip


def model(m=3, arch="resnet8", classes=10, seed=0, exclude_self=False):
    torch.manual_seed(seed)
    return okddip.build_model(okddip.Args(arch=arch, num_peers=m, exclude_self=exclude_self), classes)


# 3 peers + leader, B = 2, C = 3 fixed logits; a fixed per-sample attention (B, 3, 3), rows summing to 1.
Z = np.array([[[1.0, -0.5, 0.3], [0.2, 0.1, -1.2]],
              [[0.4, 1.5, -0.3], [-0.6, 2.2, 0.5]],
              [[-1.0, 0.8, 1.1], [1.3, -0.4, 0.0]],
              [[0.7, 0.2, -0.1], [0.0, 0.9, 0.4]]])  # last row = leader
A = np_softmax(np.array([[[0.5, -0.2, 1.0], [0.3, 0.3, -0.7], [1.2, 0.0, 0.4]],
                         [[-0.1, 0.9, 0.2], [0.6, -0.5, 0.1], [0.0, 0.8, -0.3]]]))
Y = np.array([2, 1])


class TestLoss(unittest.TestCase):
    def test_loss_equals_hand_computation(self):
        args, w = okddip.Args(), 0.7
        self.assertEqual(args.temperature, 3.0)
        loss, logs = okddip.okddip_loss(torch.tensor(Z), torch.tensor(A), torch.tensor(Y), w, args)
        # t_a[b] = sum_c A[b, a, c] z_c[b] by explicit loops; leader target = mean of the 3 peers' logits.
        t = np.zeros((3, 2, 3))
        for a in range(3):
            for b in range(2):
                for c in range(3):
                    t[a, b] += A[b, a, c] * Z[c, b]
        ce = [np_ce(Z[a], Y) for a in range(3)]
        kd = [np_kd(Z[a], t[a], 3.0) for a in range(3)]
        kd_leader = np_kd(Z[3], (Z[0] + Z[1] + Z[2]) / 3, 3.0)
        expected = sum(ce) + np_ce(Z[3], Y) + w * (sum(kd) + kd_leader)  # sums over peers, one w for both levels
        # float32 inside the loss: ~1e-6, far below a T^2 (x9) or 'mean' vs 'batchmean' (x3) slip.
        self.assertAlmostEqual(loss.item(), expected, places=5)
        for a in range(3):
            self.assertAlmostEqual(logs[f"ce/peer{a + 1}"].item(), ce[a], places=5)
            self.assertAlmostEqual(logs[f"kd/peer{a + 1}"].item(), kd[a], places=5)
        self.assertAlmostEqual(logs["ce/leader"].item(), np_ce(Z[3], Y), places=5)
        self.assertAlmostEqual(logs["kd/leader"].item(), kd_leader, places=5)

    def test_peer_targets_against_a_loop(self):
        g = torch.Generator().manual_seed(3)
        z = torch.randn(3, 5, 7, generator=g)
        att = torch.softmax(torch.randn(5, 3, 3, generator=g), -1)
        t = okddip.peer_targets(z, att)
        self.assertEqual(tuple(t.shape), (3, 5, 7))
        for a in range(3):
            for b in range(5):
                expect = sum(att[b, a, c] * z[c, b] for c in range(3))
                torch.testing.assert_close(t[a, b], expect)

    def test_leader_never_enters_a_peer_target(self):
        z2 = Z.copy()
        z2[3] += np.array([[3.0, -1.0, 0.5], [-2.0, 0.0, 1.0]])
        _, logs = okddip.okddip_loss(torch.tensor(Z), torch.tensor(A), torch.tensor(Y), 1.0, okddip.Args())
        _, moved = okddip.okddip_loss(torch.tensor(z2), torch.tensor(A), torch.tensor(Y), 1.0, okddip.Args())
        for a in range(3):
            self.assertEqual(logs[f"kd/peer{a + 1}"].item(), moved[f"kd/peer{a + 1}"].item())
        self.assertNotAlmostEqual(logs["kd/leader"].item(), moved["kd/leader"].item(), places=3)

    def test_nothing_detached_in_the_loss(self):
        # A gets gradient (the targets are not detached) and the leader's KD reaches the peers through the mean:
        # the peers' gradient depends on the leader's logits.
        def peer_grad(z):
            z, att = torch.tensor(z, requires_grad=True), torch.tensor(A, requires_grad=True)
            okddip.okddip_loss(z, att, torch.tensor(Y), 1.0, okddip.Args())[0].backward()
            return z.grad[:3].clone(), att.grad
        g0, att_grad = peer_grad(Z)
        self.assertGreater(att_grad.abs().sum().item(), 0)
        z2 = Z.copy()
        z2[3] *= -2.0
        g1, _ = peer_grad(z2)
        self.assertGreater((g0 - g1).abs().max().item(), 1e-4)


class TestAttention(unittest.TestCase):
    def test_attention_against_explicit_computation(self):
        net = model()
        h = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
        att = net.attention(h)
        self.assertEqual(tuple(att.shape), (5, 3, 3))
        torch.testing.assert_close(att.sum(-1), torch.ones(5, 3))
        Wq, Wk = net.query.weight.detach(), net.key.weight.detach()  # (8, 64) each
        for b in range(5):
            for a in range(3):
                # energy[a, c] = (W_q h_a) . (W_k h_c): no 1/sqrt(d); c = a included.
                e = torch.stack([(Wq @ h[a, b]) @ (Wk @ h[c, b]) for c in range(3)])
                torch.testing.assert_close(att[b, a], torch.softmax(e, 0), rtol=1e-5, atol=1e-6)

    def test_exclude_self_masks_the_diagonal(self):
        net = model(exclude_self=True)
        att = net.attention(torch.randn(3, 4, 64))
        torch.testing.assert_close(att.sum(-1), torch.ones(4, 3))
        self.assertTrue(torch.all(att.diagonal(dim1=1, dim2=2) == 0))
        self.assertFalse(okddip.Args().exclude_self)

    def test_projections_one_bias_free_pair(self):
        net = model(arch="resnet32")
        for lin in (net.query, net.key):
            self.assertEqual((lin.in_features, lin.out_features), (64, 8))
            self.assertIsNone(lin.bias)
        names = [n for n, _ in net.named_modules() if isinstance(_, torch.nn.Linear) and n in ("query", "key")]
        self.assertEqual(sorted(names), ["key", "query"])  # one pair for the whole model

    def test_forward_shapes_and_leader_outside_attention(self):
        net = model()
        x, _ = batch(6)
        logits, att = net(x)
        self.assertEqual(tuple(logits.shape), (4, 6, 10))
        self.assertEqual(tuple(att.shape), (6, 3, 3))
        torch.testing.assert_close(att.sum(-1), torch.ones(6, 3))
        # The attention reads the peers' pooled features, the same ones that feed their classifiers.
        z, h, _ = net.net(x)
        torch.testing.assert_close(att, net.attention(h[:3]))
        torch.testing.assert_close(net.net.branches[0].fc(h[0]), z[0])
        # Perturbing the leader branch changes the leader's logits but not the attention.
        net.eval()
        with torch.no_grad():
            z0, a0 = net(x)
            for p in net.net.branches[3].parameters():
                p.add_(0.1 * torch.randn_like(p))
            z1, a1 = net(x)
        self.assertTrue(torch.equal(a0, a1))
        self.assertTrue(torch.equal(z0[:3], z1[:3]))
        self.assertFalse(torch.allclose(z0[3], z1[3]))


class TestGradients(unittest.TestCase):
    def test_wq_learns_through_the_undetached_targets(self):
        net = model()
        x, y = batch(8)
        logits, att = net(x)
        loss, _ = okddip.okddip_loss(logits, att, y, 1.0, okddip.Args())
        loss.backward()
        self.assertGreater(net.query.weight.grad.abs().sum().item(), 0)
        self.assertGreater(net.key.weight.grad.abs().sum().item(), 0)
        # With the KD terms switched off (w = 0), W_q gets nothing: the first-level KD is its only source.
        net.zero_grad(set_to_none=True)
        logits, att = net(x)
        okddip.okddip_loss(logits, att, y, 0.0, okddip.Args())[0].backward()
        self.assertEqual(torch.count_nonzero(net.query.weight.grad).item(), 0)

    def test_detached_targets_would_freeze_the_attention(self):
        net = model()
        x, y = batch(8)
        logits, att = net(x)
        t = okddip.peer_targets(logits[:3], att).detach()  # the deliberate mistake
        kd = sum(common.kd_loss(logits[a], t[a], 3.0) for a in range(3))
        kd.backward()
        self.assertIsNone(net.query.weight.grad)
        self.assertIsNone(net.key.weight.grad)
        self.assertGreater(net.net.branches[0].fc.weight.grad.abs().sum().item(), 0)


class TestModel(unittest.TestCase):
    def test_branches_own_their_modules_and_the_trunk_is_counted_once(self):
        net = model()
        self.assertEqual(len(net.net.branches), 4)  # 3 auxiliary peers + the leader
        groups = [net.net.trunk, net.query, net.key, *net.net.branches]
        assert_parts_disjoint(self, net, groups)

    def test_parameter_counts_resnet32(self):
        # 4 branches as in the official code: 1,554,272 on CIFAR-100 = trunk 112,592 + 4 x branch 360,164
        # + W_q, W_k 2 x 64 x 8.
        # CIFAR-10 from the same definition: a branch's Linear(64 -> 10) has 90 x 65 = 5,850 fewer parameters,
        # so 112,592 + 4 x 354,314 + 1,024 = 1,530,872. The leader alone is the plain ResNet-32.
        for classes, total, leader in ((10, 1_530_872, 466_906), (100, 1_554_272, 472_756)):
            net = model(arch="resnet32", classes=classes)
            self.assertEqual(common.num_params(net), total)
            self.assertEqual(common.num_params(net.net.single(3)), leader)
            self.assertEqual(common.num_params(net.query) + common.num_params(net.key), 1024)

    def test_deployed_leader_is_the_last_branch(self):
        net = model().eval()
        x = batch(4)[0]
        with torch.no_grad():
            outs = okddip.evaluate(net, x)
            logits, _ = net(x)
            solo = net.net.single(3)(x)
        self.assertEqual(set(outs), {"peer1", "peer2", "peer3", "ensemble", "leader", "int/attention",
                                     "int/attention_entropy"})
        torch.testing.assert_close(outs["leader"], solo)
        torch.testing.assert_close(outs["ensemble"], logits[:3].mean(0))  # leader not in the ensemble


class TestRun(unittest.TestCase):
    def test_one_w_per_epoch_for_both_levels(self):
        args = tiny(okddip.Args, self)
        run = fake_run(args, 16)
        x, y = run.data.train_x.float() / 255, run.data.train_y
        net = model()
        opt = okddip.build_optimizers(net, args)
        a = okddip.train_step(net, opt, x, y, epoch=40, step=0, run=run)["w"].item()
        b = okddip.train_step(net, opt, x, y, epoch=40, step=9, run=run)["w"].item()
        self.assertEqual(a, b)
        self.assertAlmostEqual(a, math.exp(-5 * (1 - 40 / 80) ** 2), places=6)  # 0.287
        self.assertAlmostEqual(common.sigmoid_rampup(0, 80), 0.0067, places=4)
        self.assertEqual(common.sigmoid_rampup(80, 80), 1.0)
        self.assertEqual(okddip.Args().rampup_epochs, 80)

    def test_tiny_run_learns_and_reports_every_model(self):
        args = tiny(okddip.Args, self, epochs=3, batch_size=32)
        final = okddip.main(args)
        self.assertEqual(final["deployed"], "leader")
        # last epoch is the headline, best epoch beside it
        self.assertGreaterEqual(final["best_test_acc"], final["test_acc"])
        self.assertIn(final["best_epoch"], (1, 2, 3))
        self.assertEqual(set(final["models"]), {"peer1", "peer2", "peer3", "ensemble", "leader", "peer_avg"})
        self.assertGreater(final["test_acc"], 50.0)  # 10 classes: chance is 10%
        for name, acc in final["models"].items():
            self.assertGreater(acc, 30.0, name)

    def _steps(self, seed):
        return three_steps(okddip, tiny(okddip.Args, self, seed=seed), lambda: model(seed=seed))

    def test_same_seed_same_numbers(self):
        (l0, p0), (l1, p1), (l2, _) = self._steps(0), self._steps(0), self._steps(1)
        self.assertEqual(l0, l1)
        self.assertTrue(torch.equal(p0, p1))
        self.assertNotEqual(l0, l2)

    def test_recipe_defaults(self):
        a = okddip.Args()
        self.assertEqual((a.num_peers, a.epochs, a.batch_size, a.lr, a.nesterov, a.weight_decay, a.temperature),
                         (3, 300, 128, 0.1, True, 5e-4, 3.0))
        self.assertEqual([common.lr_factor(e, a) for e in (149, 150, 224, 225)], [1.0, 0.1, 0.1, 0.1 ** 2])
        net = model()
        group = okddip.build_optimizers(net, a)["sgd"].param_groups[0]
        self.assertEqual(group["weight_decay"], 5e-4)
        self.assertTrue(any(p is net.query.weight for p in group["params"]))  # W_q decayed like the rest

    def test_cli_help_and_bad_values(self):
        out = run_script("okddip.py", "--help")
        self.assertEqual(out.returncode, 0, out.stderr)
        for flag in ("--num-peers", "--temperature", "--rampup-epochs", "--exclude-self", "--arch", "--epochs"):
            self.assertIn(flag, out.stdout)
        with self.assertRaises(SystemExit) as cm:
            common.check_args(okddip.Args(num_peers=1))
        self.assertEqual(str(cm.exception), "error: --num-peers must be at least 2, got 1")


if __name__ == "__main__":
    unittest.main()
