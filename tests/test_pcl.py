"""PCL (pcl.py): loss against an explicit computation of the objective in pcl.py's docstring, the temporal-mean
(EMA) teacher, gradient routing, per-peer views, parameter counts, a tiny run that learns, and determinism."""
import copy
import json
import math
import os
import unittest
from unittest import mock

import torch
import torch.nn.functional as F

import helpers
from helpers import np_ce, np_kd
import common
import pcl


def tiny_model(seed=0, m=3):
    torch.manual_seed(seed)
    args = pcl.Args(arch="resnet8", device="cpu", batch_size=16)
    return args, pcl.build_model(args, 10)


def views_of(run, seed=0, m=3):
    gen = torch.Generator().manual_seed(seed)
    return next(iter(common.train_batches(run, gen, views=m)))


def ready_to_step(**arg_changes):
    """tiny_model() (args changed by arg_changes first) in train mode, its optimisers, a 32-image fake run and the
    first batch of peer views: what a train_step test starts from. Returns (args, model, run, opts, x, y)."""
    args, model = tiny_model()
    for name, value in arg_changes.items():
        setattr(args, name, value)
    run = helpers.fake_run(args, 32)
    opts = pcl.build_optimizers(model, args)
    model.train()
    x, y = views_of(run)
    return args, model, run, opts, x, y


class TestLoss(unittest.TestCase):
    def setUp(self):
        g = torch.Generator().manual_seed(3)
        self.m, self.B, self.C = 3, 2, 4
        self.logits = torch.randn(self.m, self.B, self.C, generator=g) * 2
        self.ens = torch.randn(self.B, self.C, generator=g) * 2
        self.mean = torch.randn(self.m, self.B, self.C, generator=g) * 2
        self.y = torch.tensor([1, 3])
        self.args = pcl.Args()

    def test_loss_matches_explicit_equation(self):
        w, T = 0.287, 3.0
        loss, logs = pcl.pcl_loss(self.logits, self.ens, self.mean, self.y, w, self.args)
        z, ze, zm, y = self.logits.double().numpy(), self.ens.double().numpy(), self.mean.double().numpy(), self.y.numpy()
        ce_peers = sum(np_ce(z[j], y) for j in range(3))
        kd_ens = sum(np_kd(z[j], ze, T) for j in range(3))
        kd_mean = sum(sum(np_kd(z[j], zm[k], T) for k in range(3) if k != j) / 2 for j in range(3))
        expected = np_ce(ze, y) + ce_peers + w * (kd_ens + kd_mean)
        self.assertAlmostEqual(loss.item(), expected, places=4)
        self.assertAlmostEqual(logs["ce/ens"].item(), np_ce(ze, y), places=5)
        self.assertAlmostEqual(logs["ce/peers"].item(), ce_peers, places=4)
        self.assertAlmostEqual(logs["kd/ens"].item(), kd_ens, places=4)
        self.assertAlmostEqual(logs["kd/mean"].item(), kd_mean, places=4)
        self.assertTrue(all(not v.requires_grad for v in logs.values()))

    def test_identical_targets_give_zero_kd(self):
        same = self.logits[0].expand(3, -1, -1)
        _, logs = pcl.pcl_loss(same.clone(), self.logits[0].clone(), same.clone(), self.y, 1.0, self.args)
        self.assertAlmostEqual(logs["kd/ens"].item(), 0.0, places=6)
        self.assertAlmostEqual(logs["kd/mean"].item(), 0.0, places=6)

    def test_peer_never_distils_from_its_own_mean_teacher(self):
        # Changing mean-teacher peer 1 (k = 0) only must not change the gradient of peer 1's logits, and must
        # change the gradient of the other peers' logits.
        def grad(mean_logits):
            z = self.logits.clone().requires_grad_(True)
            loss, _ = pcl.pcl_loss(z, self.ens, mean_logits, self.y, 1.0, self.args)
            loss.backward()
            return z.grad
        other = self.mean.clone()
        other[0] = other[0] * -3 + 1
        g1, g2 = grad(self.mean), grad(other)
        self.assertTrue(torch.equal(g1[0], g2[0]))
        self.assertFalse(torch.allclose(g1[1], g2[1]))
        self.assertFalse(torch.allclose(g1[2], g2[2]))

    def test_ensemble_logits_get_gradient_only_from_their_ce(self):
        ens = self.ens.clone().requires_grad_(True)
        loss, _ = pcl.pcl_loss(self.logits, ens, self.mean, self.y, 1.0, self.args)
        loss.backward()
        ens_ce = self.ens.clone().requires_grad_(True)
        F.cross_entropy(ens_ce, self.y).backward()
        self.assertTrue(torch.allclose(ens.grad, ens_ce.grad, atol=1e-7))


class TestMeanTeacher(unittest.TestCase):
    def test_phi_schedule(self):
        beta = pcl.Args().ema_decay
        self.assertEqual(beta, 0.999)
        self.assertEqual(pcl.ema_decay(0, beta), 0.0)
        self.assertEqual(pcl.ema_decay(1, beta), 0.5)
        self.assertAlmostEqual(pcl.ema_decay(9, beta), 0.9, places=12)
        self.assertAlmostEqual(pcl.ema_decay(998, beta), 1 - 1 / 999, places=12)
        self.assertLess(pcl.ema_decay(998, beta), 0.999)
        for g in (999, 1000, 5000, 10 ** 6):
            self.assertEqual(pcl.ema_decay(g, beta), 0.999)

    def test_ema_update_formula_touches_only_mean_parameters(self):
        _, model = tiny_model()
        with torch.no_grad():
            for p in model.student.parameters():
                p.add_(torch.randn_like(p))
                p.grad = torch.randn_like(p)
            for b in model.mean.buffers():
                if b.is_floating_point():
                    b.add_(0.5)
        old_mean = [p.clone() for p in model.mean.parameters()]
        student = [p.clone() for p in model.student.parameters()]
        grads = [p.grad.clone() for p in model.student.parameters()]
        mean_buffers = [b.clone() for b in model.mean.buffers()]
        phi = 0.7
        pcl.ema_update(model.mean, model.student, phi)
        for new, old, theta in zip(model.mean.parameters(), old_mean, student):
            self.assertTrue(torch.allclose(new, phi * old + (1 - phi) * theta, atol=1e-6, rtol=1e-6))
            self.assertFalse(new.requires_grad)
        for p, before, g in zip(model.student.parameters(), student, grads):
            self.assertTrue(torch.equal(p, before))
            self.assertTrue(torch.equal(p.grad, g))
        for b, before in zip(model.mean.buffers(), mean_buffers):  # BN running statistics are not averaged
            self.assertTrue(torch.equal(b, before))
        pcl.ema_update(model.mean, model.student, 0.0)  # phi = 0 (first update) is an exact copy
        for new, theta in zip(model.mean.parameters(), model.student.parameters()):
            self.assertTrue(torch.equal(new, theta))

    def test_train_step_updates_mean_after_the_optimiser_step(self):
        args, model, run, opts, x, y = ready_to_step()
        with torch.no_grad():  # a mean model that is not the student, as after some training
            for p in model.mean.parameters():
                p.add_(0.05 * torch.randn_like(p))
        before = copy.deepcopy(model)
        pcl.train_step(model, opts, x, y, epoch=0, step=5, run=run)
        phi = 5 / 6  # min(1 - 1/(5+1), 0.999)
        for new, old, theta in zip(model.mean.parameters(), before.mean.parameters(), model.student.parameters()):
            self.assertTrue(torch.allclose(new, phi * old + (1 - phi) * theta, atol=1e-6, rtol=1e-6))
        # The student did take an SGD step (so the EMA used the updated weights, not the old ones).
        self.assertFalse(torch.equal(model.student.head.weight, before.student.head.weight))
        # BN buffers of the mean model: exactly what its own train-mode forward on the views produces.
        with torch.no_grad():
            before.mean(x)
        for (name, b), b_ref, b_student in zip(model.mean.named_buffers(), before.mean.buffers(), model.student.buffers()):
            self.assertTrue(torch.equal(b, b_ref), name)
            if b.is_floating_point():
                self.assertFalse(torch.equal(b, b_student), name)

    def test_mean_teacher_gets_no_gradient_and_is_not_optimised(self):
        args, model, run, opts, x, y = ready_to_step()
        pcl.train_step(model, opts, x, y, epoch=100, step=0, run=run)
        in_opt = {id(p) for g in opts["sgd"].param_groups for p in g["params"]}
        self.assertEqual(in_opt, {id(p) for p in model.student.parameters()})
        for p in model.mean.parameters():
            self.assertFalse(p.requires_grad)
            self.assertIsNone(p.grad)
            self.assertNotIn(id(p), in_opt)
        self.assertEqual(common.num_params(model), common.num_params(model.student))

    def test_ema_per_epoch_updates_once_at_epoch_end(self):
        args, model, run, opts, x, y = ready_to_step(ema_per_epoch=True)  # batch 16 -> 2 steps per epoch
        old = [p.clone() for p in model.mean.parameters()]
        pcl.train_step(model, opts, x, y, epoch=3, step=6, run=run)  # first step of epoch 3: no update
        self.assertTrue(all(torch.equal(a, b) for a, b in zip(model.mean.parameters(), old)))
        pcl.train_step(model, opts, x, y, epoch=3, step=7, run=run)  # last step: phi = min(1 - 1/4, beta)
        for new, o, theta in zip(model.mean.parameters(), old, model.student.parameters()):
            self.assertTrue(torch.allclose(new, 0.75 * o + 0.25 * theta, atol=1e-6, rtol=1e-6))


class TestGradients(unittest.TestCase):
    def forward(self, seed=0):
        args, model = tiny_model(seed)
        run = helpers.fake_run(args, 32)
        model.train()
        x, y = views_of(run)
        logits, ens = model.student(x)
        with torch.no_grad():
            mean_logits, _ = model.mean(x)
        return args, model, logits, ens, mean_logits, y

    def test_kd_terms_alone_leave_the_ensemble_head_without_gradient(self):
        args, model, logits, ens, mean_logits, y = self.forward()
        loss, _ = pcl.pcl_loss(logits, ens, mean_logits, y, 1.0, args)
        ce = F.cross_entropy(ens, y) + sum(F.cross_entropy(logits[j], y) for j in range(3))
        (loss - ce).backward()  # = w (L_pe + L_pm): the KD terms alone
        for p in model.student.head.parameters():
            self.assertTrue(p.grad is None or torch.count_nonzero(p.grad) == 0)
        for j in range(3):  # ... but they do train every peer
            self.assertGreater(model.student.peers.branches[j].fc.weight.grad.abs().sum().item(), 0)
        for p in model.mean.parameters():
            self.assertIsNone(p.grad)

    def test_ensemble_ce_reaches_every_peer_and_the_trunk(self):
        _, model, logits, ens, _, y = self.forward()
        F.cross_entropy(ens, y).backward()
        self.assertGreater(model.student.head.weight.grad.abs().sum().item(), 0)
        for j in range(3):
            branch = model.student.peers.branches[j]
            self.assertGreater(branch.stages[0][0].body[0][0].weight.grad.abs().sum().item(), 0)
            self.assertIsNone(branch.fc.weight.grad)  # the peers' classifiers are not on this path
        self.assertGreater(model.student.peers.trunk[0][0].weight.grad.abs().sum().item(), 0)


class TestViews(unittest.TestCase):
    def test_peers_get_different_augmentations_of_the_same_images(self):
        args, _ = tiny_model()
        run = helpers.fake_run(args, 32)
        gen = torch.Generator().manual_seed(0)
        perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))[:16]  # train_batches' first draw
        x, y = next(iter(common.train_batches(run, gen, views=3)))
        self.assertEqual(len(x), 3)
        self.assertTrue(torch.equal(y, run.data.train_y[perm]))
        src = F.pad(run.data.train_x[perm].float() / 255, (4, 4, 4, 4))  # (B, 3, 40, 40), zero padding
        for v in x:
            img = v * run.data.std + run.data.mean  # back to [0, 1]
            for b in range(len(y)):  # each view of image b is some crop + optional flip of image b itself
                best = min((img[b] - (c.flip(-1) if f else c)).abs().max().item()
                           for oy in range(9) for ox in range(9) for f in (0, 1)
                           for c in [src[b, :, oy:oy + 32, ox:ox + 32]])
                self.assertLess(best, 1e-5)
        for a in range(3):
            for b in range(a + 1, 3):
                self.assertFalse(torch.equal(x[a], x[b]))

    def test_peer_j_and_mean_peer_k_see_their_own_view(self):
        args, model, run, opts, x, y = ready_to_step()
        before = copy.deepcopy(model)
        seen = {}

        def spy(logits, ens, mean_logits, y, w, args):
            seen.update(logits=logits.detach().clone(), mean=mean_logits.clone())
            return loss_fn(logits, ens, mean_logits, y, w, args)
        loss_fn = pcl.pcl_loss
        with mock.patch.object(pcl, "pcl_loss", spy):
            pcl.train_step(model, opts, x, y, epoch=0, step=0, run=run)
        with torch.no_grad():
            for j in range(3):  # train mode, batch statistics: a network on one view gives the same logits
                self.assertTrue(torch.allclose(seen["logits"][j], before.student.peers.single(j)(x[j]), atol=1e-5))
                self.assertTrue(torch.allclose(seen["mean"][j], before.mean.peers.single(j)(x[j]), atol=1e-5))
                self.assertFalse(torch.allclose(seen["mean"][j], before.mean.peers.single(j)(x[(j + 1) % 3]), atol=1e-3))

    def test_main_asks_fit_for_one_view_per_peer(self):
        captured = {}
        with mock.patch.object(common, "fit", lambda *a, **kw: captured.update(kw)):
            pcl.main(helpers.tiny(pcl.Args, self, num_peers=4, subset=40, test_subset=20))
        self.assertEqual(captured["views"], 4)
        self.assertEqual(captured["deployed"], "mt_peer1")


class TestModel(unittest.TestCase):
    def test_parameter_counts_resnet32_cifar100(self):
        model = pcl.build_model(pcl.Args(arch="resnet32"), 100)
        self.assertEqual(common.num_params(model), 1_212_384)  # trunk + 3 peers + Linear(192 -> 100)
        self.assertEqual(model.student.head.in_features, 192)
        deployed = model.mean.peers.single(0)
        self.assertEqual(sum(p.numel() for p in deployed.parameters()), 472_756)
        self.assertEqual(sum(p.numel() for p in model.mean.parameters()), 1_212_384)
        self.assertEqual(sum(p.numel() for p in model.mean.parameters() if p.requires_grad), 0)

    def test_deployed_model_is_mean_trunk_plus_mean_peer1_in_eval_mode(self):
        _, model = tiny_model()
        with torch.no_grad():
            for p in model.mean.parameters():
                p.add_(0.01 * torch.randn_like(p))  # make the mean model differ from the student
        model.eval()
        x = torch.randn(8, 3, 32, 32)
        with torch.no_grad():
            outs = pcl.evaluate(model, x)
            self.assertTrue(torch.allclose(outs["mt_peer1"], model.mean.peers.single(0)(x), atol=1e-5))
            self.assertFalse(torch.allclose(outs["mt_peer1"], outs["peer1"], atol=1e-4))
            mean_logits = torch.stack([outs[f"mt_peer{j}"] for j in (1, 2, 3)])
            self.assertTrue(torch.allclose(outs["pcl_e"], mean_logits.mean(0)))
        self.assertEqual(set(outs), {"peer1", "peer2", "peer3", "pe_teacher", "mt_peer1", "mt_peer2", "mt_peer3",
                                     "pcl_e", "int/kl_mean_peer"})

    def test_peers_share_no_module_and_start_different(self):
        _, model = tiny_model()
        branches = model.student.peers.branches
        ids = [{id(p) for p in b.parameters()} for b in branches]
        self.assertTrue(all(not (ids[a] & ids[b]) for a in range(3) for b in range(a + 1, 3)))
        mean_ids = {id(p) for p in model.mean.parameters()}
        self.assertFalse(mean_ids & {id(p) for p in model.student.parameters()})
        for a in range(3):
            for b in range(a + 1, 3):
                self.assertFalse(torch.equal(branches[a].fc.weight, branches[b].fc.weight))
                self.assertFalse(torch.equal(branches[a].stages[0][0].body[0][0].weight,
                                             branches[b].stages[0][0].body[0][0].weight))

    def test_defaults_and_rampup(self):
        a = pcl.Args()
        self.assertEqual((a.num_peers, a.temperature, a.ema_decay, a.rampup_epochs), (3, 3.0, 0.999, 80))
        self.assertEqual((a.epochs, a.batch_size, a.lr, a.weight_decay, a.momentum), (300, 128, 0.1, 5e-4, 0.9))
        self.assertTrue(a.nesterov)
        self.assertFalse(a.ema_per_epoch)
        self.assertEqual([common.lr_factor(e, a) for e in (149, 150, 224, 225)], [1.0, 0.1, 0.1, 0.1 ** 2])
        self.assertAlmostEqual(common.sigmoid_rampup(0, a.rampup_epochs), 0.0067, places=4)
        self.assertAlmostEqual(common.sigmoid_rampup(40, a.rampup_epochs), 0.2865, places=4)
        self.assertEqual(common.sigmoid_rampup(80, a.rampup_epochs), 1.0)
        self.assertEqual(common.sigmoid_rampup(200, a.rampup_epochs), 1.0)

    def test_bad_arguments_fail_in_one_line(self):
        for kw, msg in (({"num_peers": 1}, "--num-peers must be at least 2, got 1"),
                        ({"ema_decay": 1.5}, "--ema-decay must be at most 1, got 1.5"),
                        ({"ema_decay": -0.1}, "--ema-decay must be at least 0, got -0.1"),
                        ({"temperature": 0.0}, "--temperature must be above 0, got 0.0"),
                        ({"rampup_epochs": -1}, "--rampup-epochs must be at least 0, got -1")):
            with self.subTest(**kw), self.assertRaises(SystemExit) as cm:
                common.check_args(pcl.Args(arch="resnet8", **kw))  # parse_args and setup call it
            self.assertEqual(str(cm.exception), "error: " + msg)


class TestRuns(unittest.TestCase):
    def test_tiny_run_learns_well_above_chance(self):
        # 48 steps of 16 images; a shorter cap (beta = 0.8) so the temporal mean forgets the random start
        # within this tiny run, and no LR decay (same code path as the paper recipe otherwise).
        # Seeds 0-3 reach 87-99% for mt_peer1; the margin below leaves room for other float libraries.
        args = helpers.tiny(pcl.Args, self, subset=256, test_subset=100, batch_size=16, epochs=3, lr=0.05,
                            lr_decay_at="1", ema_decay=0.8)
        final = pcl.main(args)
        self.assertEqual(final["deployed"], "mt_peer1")
        self.assertEqual(final["test_acc"], final["models"]["mt_peer1"])
        self.assertTrue(all(math.isfinite(v) for v in final["models"].values()))
        self.assertGreater(final["models"]["mt_peer1"], 60.0)  # chance is 10%
        self.assertGreater(final["models"]["pe_teacher"], 50.0)

    def test_same_seed_same_numbers(self):
        def go(seed):
            args = helpers.tiny(pcl.Args, self, subset=64, test_subset=50, batch_size=32, epochs=1, seed=seed)
            final = pcl.main(args)
            with open(os.path.join(args.out, "metrics.jsonl")) as f:
                row = json.loads(f.readline())
            return final["models"], {k: v for k, v in row.items() if k not in ("sec", "images_per_s")}
        a, b, c = go(0), go(0), go(1)
        self.assertEqual(a, b)
        self.assertNotEqual(a[1]["loss"], c[1]["loss"])  # another seed: other init and batches


if __name__ == "__main__":
    unittest.main()
