"""one.py: the loss against a hand computation, gate and teacher, gradient routing, ramp-up, parameter
counts, a tiny run that learns, determinism and the CLI. Expected behaviour: ONE paper and official code
(Lan1991Xu/ONE_NeurIPS2018); counts: docs/backbones.md."""
import math
import os
import unittest

import numpy as np
import torch

import helpers  # noqa: F401  (sys.path, one torch thread)
from helpers import (assert_parts_disjoint, batch, fake_run, np_ce, np_kd, np_softmax, run_script, three_steps,
                     tiny, tmpdir)

import common
import one


def model(m=3, arch="resnet8", classes=10, seed=0):
    torch.manual_seed(seed)
    return one.build_model(one.Args(arch=arch, num_branches=m), classes)


class TestLoss(unittest.TestCase):
    def setUp(self):
        # 3 branches x B = 2 x C = 4 fixed logits, a fixed teacher, labels.
        self.z = np.array([[[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.2, 0.7]],
                           [[0.4, 1.5, -0.3, 0.0], [-0.6, 2.2, 0.5, 0.1]],
                           [[-1.0, 0.8, 1.1, 0.3], [1.3, -0.4, 0.0, 0.9]]])
        self.z_e = np.array([[0.5, 0.6, 0.4, 0.9], [0.3, 0.7, -0.2, 0.6]])
        self.y = np.array([3, 1])

    def test_loss_equals_hand_computation(self):
        args, w = one.Args(), 0.3
        self.assertEqual(args.temperature, 3.0)
        loss, logs = one.one_loss(torch.tensor(self.z), torch.tensor(self.z_e), torch.tensor(self.y), w, args)
        ce = [np_ce(self.z[i], self.y) for i in range(3)]
        kd = [np_kd(self.z[i], self.z_e, 3.0) for i in range(3)]
        expected = sum(ce) + np_ce(self.z_e, self.y) + w * sum(kd)
        # The loss runs in float32 (.float() before CE/KL): agreement to ~1e-6, far below a T^2 (x9) or a
        # 'mean' vs 'batchmean' (x4) slip.
        self.assertAlmostEqual(loss.item(), expected, places=5)
        for i in range(3):
            self.assertAlmostEqual(logs[f"ce/branch{i + 1}"].item(), ce[i], places=6)
            self.assertAlmostEqual(logs[f"kd/branch{i + 1}"].item(), kd[i], places=6)
        self.assertAlmostEqual(logs["ce/one_e"].item(), np_ce(self.z_e, self.y), places=6)
        self.assertAlmostEqual(logs["w"].item(), w, places=6)

    def test_teacher_target_sends_no_gradient_through_kl(self):
        # z_e's gradient must be exactly that of CE(z_e) alone: (softmax(z_e) - onehot(y)) / B, whatever w is.
        z = torch.tensor(self.z, requires_grad=True)
        z_e = torch.tensor(self.z_e, requires_grad=True)
        loss, _ = one.one_loss(z, z_e, torch.tensor(self.y), 1.0, one.Args())
        loss.backward()
        expected = (np_softmax(self.z_e) - np.eye(4)[self.y]) / 2
        np.testing.assert_allclose(z_e.grad.numpy(), expected, rtol=0, atol=1e-6)  # float32
        # ... while the branches do receive the KD gradient on top of their CE gradient.
        ce_only = (np_softmax(self.z) - np.eye(4)[self.y][None]) / 2
        self.assertGreater(np.abs(z.grad.numpy() - ce_only).max(), 1e-3)

    def test_identical_branches_and_teacher_give_zero_kd(self):
        z = torch.tensor(self.z_e).expand(3, 2, 4)
        _, logs = one.one_loss(z, torch.tensor(self.z_e), torch.tensor(self.y), 1.0, one.Args())
        for i in range(3):
            self.assertAlmostEqual(logs[f"kd/branch{i + 1}"].item(), 0.0, places=12)

    def test_swapping_branches_swaps_their_terms(self):
        z, perm = torch.tensor(self.z), [2, 0, 1]
        _, logs = one.one_loss(z, torch.tensor(self.z_e), torch.tensor(self.y), 1.0, one.Args())
        _, swapped = one.one_loss(z[perm], torch.tensor(self.z_e), torch.tensor(self.y), 1.0, one.Args())
        for new, old in enumerate(perm):
            self.assertAlmostEqual(swapped[f"kd/branch{new + 1}"].item(), logs[f"kd/branch{old + 1}"].item(), places=12)
            self.assertAlmostEqual(swapped[f"ce/branch{new + 1}"].item(), logs[f"ce/branch{old + 1}"].item(), places=12)


class TestRampUp(unittest.TestCase):
    def test_pinned_epochs(self):
        w = common.sigmoid_rampup
        self.assertAlmostEqual(w(0, 80), math.exp(-5.0), places=12)  # 0.0067
        self.assertAlmostEqual(w(0, 80), 0.0067, places=4)
        self.assertAlmostEqual(w(40, 80), 0.2865, places=4)
        self.assertAlmostEqual(w(79, 80), 0.9992, places=4)
        self.assertEqual(w(80, 80), 1.0)
        self.assertEqual(w(200, 80), 1.0)
        self.assertEqual(w(0, 0), 1.0)
        self.assertEqual(w(17, 0), 1.0)

    def test_train_step_uses_one_w_per_epoch(self):
        args = tiny(one.Args, self, num_branches=2)
        run = fake_run(args, 16)
        x, y = run.data.train_x.float() / 255, run.data.train_y
        net = model(m=2)
        opt = one.build_optimizers(net, args)
        a = one.train_step(net, opt, x, y, epoch=40, step=0, run=run)["w"].item()
        b = one.train_step(net, opt, x, y, epoch=40, step=7, run=run)["w"].item()
        self.assertEqual(a, b)
        self.assertAlmostEqual(a, math.exp(-5 * (1 - 40 / 80) ** 2), places=6)
        self.assertEqual(one.Args().rampup_epochs, 80)
        off = fake_run(tiny(one.Args, self, num_branches=2, rampup_epochs=0), 16)
        self.assertEqual(one.train_step(net, opt, x, y, epoch=0, step=0, run=off)["w"].item(), 1.0)


class TestModel(unittest.TestCase):
    def test_shapes_and_gate(self):
        net = model(m=3)
        x, _ = batch(8)
        logits, g, z_e = net(x)
        self.assertEqual(tuple(logits.shape), (3, 8, 10))
        self.assertEqual(tuple(g.shape), (8, 3))
        self.assertEqual(tuple(z_e.shape), (8, 10))
        torch.testing.assert_close(g.sum(1), torch.ones(8), rtol=0, atol=1e-6)
        self.assertTrue((g >= 0).all())
        # z_e = sum_i g_i z_i per sample, against an explicit loop.
        for b in range(8):
            expect = sum(g[b, i] * logits[i, b] for i in range(3))
            torch.testing.assert_close(z_e[b], expect, rtol=1e-5, atol=1e-5)
        # gate = pool -> Linear(C_trunk -> m, bias) -> BN1d(m) -> ReLU, on the trunk's 32 channels.
        kinds = [type(mod) for mod in net.gate]
        self.assertEqual(kinds, [torch.nn.AdaptiveAvgPool2d, torch.nn.Flatten, torch.nn.Linear, torch.nn.BatchNorm1d,
                                 torch.nn.ReLU])
        self.assertEqual((net.gate[2].in_features, net.gate[2].out_features), (32, 3))
        self.assertIsNotNone(net.gate[2].bias)
        self.assertEqual(one.Args().num_branches, 3)

    def test_gate_reads_the_trunk_output(self):
        # Changing a branch leaves the gate untouched; changing the trunk changes it.
        net = model(m=3).eval()
        x, _ = batch(4)
        with torch.no_grad():
            _, g0, _ = net(x)
            net.net.branches[1].fc.weight.add_(1.0)
            _, g1, _ = net(x)
            net.net.trunk[0][0].weight.mul_(-1.0)
            _, g2, _ = net(x)
        self.assertTrue(torch.equal(g0, g1))
        self.assertFalse(torch.allclose(g0, g2))

    def test_equal_gate_weights_give_the_mean_logit(self):
        net = model(m=3)
        with torch.no_grad():  # Linear -> 0, then BN(0) = 0 -> ReLU -> softmax: 1/3 each
            net.gate[2].weight.zero_()
            net.gate[2].bias.zero_()
        logits, g, z_e = net(batch(6)[0])
        torch.testing.assert_close(g, torch.full((6, 3), 1 / 3))
        torch.testing.assert_close(z_e, logits.mean(0), rtol=1e-6, atol=1e-6)

    def test_one_branch_teacher_is_that_branch_and_kd_is_zero(self):
        net = model(m=1)
        x, y = batch(6)
        logits, g, z_e = net(x)
        torch.testing.assert_close(g, torch.ones(6, 1))
        torch.testing.assert_close(z_e, logits[0])
        _, logs = one.one_loss(logits, z_e, y, 1.0, one.Args(num_branches=1))
        self.assertAlmostEqual(logs["kd/branch1"].item(), 0.0, places=6)

    def test_branches_own_their_modules_and_the_trunk_is_counted_once(self):
        net = model(m=3)
        groups = [net.net.trunk, net.gate, *net.net.branches]
        assert_parts_disjoint(self, net, groups)
        # Trunk = stem + stages 1-2 (shared exactly once); each branch = its own stage 3 + pool + Linear.
        self.assertEqual(len(net.net.trunk), 3)
        self.assertTrue(all(len(b.stages) == 1 for b in net.net.branches))
        self.assertEqual(tuple(net.net.trunk(batch(2)[0]).shape), (2, 32, 16, 16))

    def test_parameter_counts_resnet32(self):
        # split after stage 2 as the official ONE_ResNet (docs/backbones.md): trunk 112,592 + 3 branches + gate
        # (32*3 + 3 + BN 2*3 = 105).
        for classes, total, deployed in ((10, 1_175_639, 466_906), (100, 1_193_189, 472_756)):
            net = model(m=3, arch="resnet32", classes=classes)
            self.assertEqual(common.num_params(net), total)
            self.assertEqual(common.num_params(net.gate), 105)
            self.assertEqual(common.num_params(net.net.single(0)), deployed)

    def test_deployed_branch1_is_trunk_plus_first_branch(self):
        net = model(m=3).eval()
        x = batch(4)[0]
        with torch.no_grad():
            outs = one.evaluate(net, x)
            solo = net.net.single(0)(x)
            logits, _, z_e = net(x)
        self.assertEqual(set(outs), {"branch1", "branch2", "branch3", "one_e", "ensemble", "int/gate"})
        torch.testing.assert_close(outs["branch1"], solo)
        torch.testing.assert_close(outs["one_e"], z_e)
        torch.testing.assert_close(outs["ensemble"], logits.mean(0))


class TestGradients(unittest.TestCase):
    def test_gate_learns_from_ce_of_the_teacher_only(self):
        net = model(m=3)
        x, y = batch(8)
        logits, _, z_e = net(x)
        full, _ = one.one_loss(logits, z_e, y, 1.0, one.Args())
        no_kd, _ = one.one_loss(logits, z_e, y, 0.0, one.Args())
        # Backward of the KD terms alone: w * sum_i KD_i = L(w = 1) - L(w = 0) on the same graph.
        (full - no_kd).backward(retain_graph=True)
        self.assertEqual(torch.count_nonzero(net.gate[2].weight.grad).item(), 0)
        for b in net.net.branches:
            self.assertGreater(b.fc.weight.grad.abs().sum().item(), 0)
            self.assertGreater(b.stages[0][0].body[0][0].weight.grad.abs().sum().item(), 0)
        self.assertGreater(net.net.trunk[0][0].weight.grad.abs().sum().item(), 0)  # KD reaches the trunk
        net.zero_grad(set_to_none=True)
        full.backward()
        self.assertGreater(net.gate[2].weight.grad.abs().sum().item(), 0)


class TestRun(unittest.TestCase):
    def test_tiny_run_learns_and_reports_every_model(self):
        args = tiny(one.Args, self, epochs=3, batch_size=32)
        final = one.main(args)
        self.assertEqual(final["deployed"], "branch1")
        # last epoch is the headline, best epoch beside it
        self.assertGreaterEqual(final["best_test_acc"], final["test_acc"])
        self.assertIn(final["best_epoch"], (1, 2, 3))
        self.assertEqual(set(final["models"]), {"branch1", "branch2", "branch3", "one_e", "ensemble", "branch_avg"})
        self.assertGreater(final["test_acc"], 50.0)  # 10 classes: chance is 10%
        for name, acc in final["models"].items():
            self.assertGreater(acc, 30.0, name)
        avg = sum(final["models"][f"branch{i}"] for i in (1, 2, 3)) / 3
        self.assertAlmostEqual(final["models"]["branch_avg"], avg, places=9)

    def _steps(self, seed):
        return three_steps(one, tiny(one.Args, self, seed=seed), lambda: model(m=3, seed=seed))

    def test_same_seed_same_numbers(self):
        (l0, p0), (l1, p1), (l2, p2) = self._steps(0), self._steps(0), self._steps(1)
        self.assertEqual(l0, l1)
        self.assertTrue(torch.equal(p0, p1))
        self.assertNotEqual(l0, l2)

    def test_recipe_defaults_and_official_preset(self):
        a = one.Args()
        self.assertEqual((a.epochs, a.batch_size, a.lr, a.nesterov, a.weight_decay), (300, 128, 0.1, True, 5e-4))
        self.assertEqual([common.lr_factor(e, a) for e in (149, 150, 224, 225)], [1.0, 0.1, 0.1, 0.1 ** 2])
        self.assertEqual(common.apply_preset(one.Args()), a)  # no preset: nothing changes
        off = common.apply_preset(one.Args(preset="one-official"))
        self.assertEqual((off.weight_decay, off.nesterov, off.temperature, off.rampup_epochs), (1e-4, False, 3.0, 80))
        args = one.Args(preset="one-official", dataset="fake", subset=64, test_subset=20, device="cpu",
                        out=os.path.join(tmpdir(self), "run"))
        common.setup(args, "one")  # what the script calls: the preset lands in the args it trains with
        self.assertEqual((args.weight_decay, args.nesterov), (1e-4, False))
        group = one.build_optimizers(model(m=2), off)["sgd"].param_groups[0]
        self.assertEqual((group["weight_decay"], group["nesterov"]), (1e-4, False))

    def test_cli_help_and_bad_values(self):
        out = run_script("one.py", "--help")
        self.assertEqual(out.returncode, 0, out.stderr)
        for flag in ("--num-branches", "--temperature", "--rampup-epochs", "--preset", "--arch", "--epochs"):
            self.assertIn(flag, out.stdout)
        with self.assertRaises(SystemExit) as cm:
            common.check_args(one.Args(num_branches=0))
        self.assertEqual(str(cm.exception), "error: --num-branches must be at least 1, got 0")
        with self.assertRaises(SystemExit) as cm:
            common.parse_args(one.Args, ["--preset", "bogus"])
        self.assertIn("one-official", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
