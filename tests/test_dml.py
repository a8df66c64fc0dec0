"""dml.py against the DML paper (Zhang et al., CVPR 2018) and the defaults in docs/dml.md: loss, gradient routing,
joint and sequential updates, defaults and a tiny run."""
import unittest
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from helpers import fake_run, np_ce, np_kd, tiny
import common
import dml


def dml_numpy(z, y, T):
    """Independent reference: per network k, CE_k + mean over l != k of T^2 * sum_c p_l (log p_l - log p_k) / B,
    p = softmax(z / T), i.e. np_kd(z[k], z[l], T) with network l's distribution as the target."""
    K = z.shape[0]
    ces = [np_ce(z[k], y) for k in range(K)]
    kds = [np.mean([np_kd(z[k], z[l], T) for l in range(K) if l != k]) for k in range(K)]
    return ces, kds


class TestDMLLoss(unittest.TestCase):
    z = torch.tensor([[[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.2], [0.3, 0.3, 0.1, 1.0]],
                      [[0.5, 0.1, 2.0, 0.0], [1.0, 1.0, 0.0, -2.0], [2.0, -0.5, 0.0, 0.4]],
                      [[-1.0, 0.0, 1.0, 2.0], [0.2, 0.4, 0.6, 0.8], [1.5, 1.0, -1.0, 0.0]]])  # (K=3, B=3, C=4)
    y = torch.tensor([1, 2, 3])

    def check(self, K, T):
        args = dml.Args(temperature=T)
        loss, logs = dml.dml_loss(self.z[:K], self.y, args)
        ces, kds = dml_numpy(self.z[:K].numpy(), self.y.numpy(), T)
        for k in range(K):
            self.assertAlmostEqual(logs[f"ce/peer{k + 1}"].item(), ces[k], places=5)
            self.assertAlmostEqual(logs[f"kd/peer{k + 1}"].item(), kds[k], places=5)
        self.assertAlmostEqual(loss.item(), sum(ces) + sum(kds), places=4)  # a sum over networks, not a mean

    def test_two_peers_T1(self):
        self.check(2, 1.0)

    def test_three_peers_T3_has_T_squared(self):
        self.check(3, 3.0)
        # the KD term at T = 3 is 9 x the KL of the T-softened distributions
        kl = F.kl_div(F.log_softmax(self.z[0] / 3, 1), F.softmax(self.z[1] / 3, 1), reduction="batchmean")
        _, logs = dml.dml_loss(self.z[:2], self.y, dml.Args(temperature=3.0))
        self.assertAlmostEqual(logs["kd/peer1"].item(), 9 * kl.item(), places=5)

    def test_batchmean_not_mean(self):
        _, logs = dml.dml_loss(self.z[:2], self.y, dml.Args())
        mean_red = F.kl_div(F.log_softmax(self.z[0], 1), F.softmax(self.z[1], 1), reduction="mean")
        self.assertAlmostEqual(logs["kd/peer1"].item(), 4 * mean_red.item(), places=5)  # C = 4 times 'mean'

    def test_identical_peers_and_swaps(self):
        same = torch.stack([self.z[0], self.z[0]])
        loss, logs = dml.dml_loss(same, self.y, dml.Args())
        self.assertAlmostEqual(logs["kd/peer1"].item(), 0.0, places=6)
        _, a = dml.dml_loss(self.z[:2], self.y, dml.Args())
        _, b = dml.dml_loss(self.z[[1, 0]], self.y, dml.Args())
        self.assertAlmostEqual(a["kd/peer1"].item(), b["kd/peer2"].item(), places=6)
        self.assertAlmostEqual(a["ce/peer2"].item(), b["ce/peer1"].item(), places=6)

    def test_peer_targets_are_detached(self):
        """d loss / d z_1 equals the gradient of network 1's own L_1 = CE_1 + KD(sg z_2 -> z_1): nothing from
        L_2 flows into z_1 through its role as network 2's target."""
        z = self.z[:2].clone().requires_grad_(True)
        loss, _ = dml.dml_loss(z, self.y, dml.Args(temperature=2.0))
        loss.backward()
        z1 = self.z[0].clone().requires_grad_(True)
        own = F.cross_entropy(z1, self.y) + 4 * F.kl_div(F.log_softmax(z1 / 2, 1), F.softmax(self.z[1] / 2, 1), reduction="batchmean")
        own.backward()
        self.assertTrue(torch.allclose(z.grad[0], z1.grad, atol=1e-6))


class TestDMLModel(unittest.TestCase):
    def test_peers_are_independent(self):
        model = dml.build_model(dml.Args(arch="resnet32", num_peers=2), 100)
        self.assertEqual(common.num_params(model), 2 * 472_756)
        ids = [{id(m) for m in net.modules()} | {id(p) for p in net.parameters()} for net in model]
        self.assertFalse(ids[0] & ids[1])
        self.assertFalse(torch.equal(model[0].stem[0].weight, model[1].stem[0].weight))  # separately initialised

    def test_loss_of_network_1_reaches_no_other_network(self):
        args = dml.Args(arch="resnet8", num_peers=2)
        model = dml.build_model(args, 10)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
        z = torch.stack([net(x) for net in model])  # (K, B, C), as in train_step
        # L_1 alone: CE_1 + KD(sg z_2 -> z_1)
        l1 = F.cross_entropy(z[0], y) + common.kd_loss(z[0], z[1].detach(), 1.0)
        l1.backward()
        self.assertTrue(all(p.grad is None or not p.grad.any() for p in model[1].parameters()))
        self.assertTrue(all(p.grad is not None and p.grad.any() for p in model[0].parameters()))

    def test_joint_step_equals_per_network_steps(self):
        """One SGD over all parameters on L = sum_k L_k == each network stepped on its own L_k with the same
        pre-update peer logits."""
        args = tiny(dml.Args, self, arch="resnet8", num_peers=2)
        run = fake_run(args, n=8)
        torch.manual_seed(0)
        model = dml.build_model(args, 10)
        copy = dml.build_model(args, 10)
        copy.load_state_dict(model.state_dict())
        x, y = run.data.train_x[:8].float() / 255, run.data.train_y[:8]
        assert_joint_equals_per_network(self, model, copy, args, run, x, y)

    def test_sequential_update_recomputes_peers(self):
        args = tiny(dml.Args, self, arch="resnet8", num_peers=2, update="sequential")
        run = fake_run(args, n=8)
        model = dml.build_model(args, 10)
        seen = []
        real = dml.dml_loss

        def spy(logits, y, a):
            seen.append(logits.detach().clone())
            return real(logits, y, a)

        x, y = run.data.train_x[:8].float() / 255, run.data.train_y[:8]
        with mock.patch.object(dml, "dml_loss", spy):
            dml.train_step(model, dml.build_optimizers(model, args), x, y, 0, 0, run)
        self.assertEqual(len(seen), 2)
        # network 1 was stepped before network 2's update: the network-1 logits network 2 sees are new
        self.assertFalse(torch.allclose(seen[0][0], seen[1][0]))

    def test_defaults(self):
        a = dml.Args()
        self.assertEqual((a.num_peers, a.temperature, a.update, a.epochs, a.batch_size, a.lr, a.weight_decay, a.nesterov),
                         (2, 1.0, "joint", 300, 128, 0.1, 5e-4, True))
        self.assertEqual([common.lr_factor(e, a) for e in (149, 150, 225)], [1, 0.1, 0.1 ** 2])


class TestDMLRun(unittest.TestCase):
    def test_learns_and_reports_every_model(self):
        res = dml.main(tiny(dml.Args, self, epochs=2))
        self.assertEqual(set(res["models"]), {"peer1", "peer2", "ensemble", "peer_avg"})
        self.assertEqual(res["deployed"], "peer1")
        self.assertEqual(res["test_acc"], res["models"]["peer1"])
        self.assertGreater(res["test_acc"], 50.0)  # chance is 10%
        self.assertAlmostEqual(res["models"]["peer_avg"], (res["models"]["peer1"] + res["models"]["peer2"]) / 2)
        again = dml.main(tiny(dml.Args, self, epochs=2))
        self.assertEqual((res["models"], res["train_loss"]), (again["models"], again["train_loss"]))


class TestDMLMixedPeers(unittest.TestCase):
    """--arch resnet8,wrn16_2: one backbone per peer (the DML paper's mixed pairs). The routing
    tests above hold with peers of different architectures."""
    ARCH = "resnet8,wrn16_2"

    def test_one_backbone_per_peer_named_by_it(self):
        model = dml.build_model(dml.Args(arch=self.ARCH), 10)
        self.assertEqual([net.arch for net in model], ["resnet8", "wrn16_2"])
        self.assertEqual([common.num_params(net) for net in model],
                         [common.num_params(common.resnet8(10)), 692_810])
        self.assertEqual(common.peer_names(model), ["peer1_resnet8", "peer2_wrn16_2"])
        self.assertEqual(common.peer_names(dml.build_model(dml.Args(arch="resnet8", num_peers=3), 10)),
                         ["peer1", "peer2", "peer3"])  # one backbone: the names of before

    def test_the_list_sets_K_and_a_conflicting_num_peers_is_an_error(self):
        three = "resnet8,resnet20,wrn16_2"
        for args, K in ((dml.Args(arch=three), 3), (dml.Args(arch=three, num_peers=3), 3),
                        (dml.Args(arch="resnet8", num_peers=4), 4)):
            self.assertEqual(len(dml.build_model(args, 10)), K)
            self.assertEqual(args.num_peers, K)  # what config.json records
        with self.assertRaises(SystemExit) as cm:
            dml.build_model(dml.Args(arch="resnet8,resnet20", num_peers=3), 10)
        self.assertEqual(str(cm.exception.code),
                         "error: --arch 'resnet8,resnet20' names 2 networks but --num-peers is 3; "
                         "leave --num-peers out or make them agree")

    def test_loss_of_network_1_reaches_no_other_network(self):
        model = dml.build_model(dml.Args(arch=self.ARCH), 10)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
        z = torch.stack([net(x) for net in model])  # (K, B, C), as in train_step
        l1 = F.cross_entropy(z[0], y) + common.kd_loss(z[0], z[1].detach(), 1.0)  # L_1 alone
        l1.backward()
        self.assertTrue(all(p.grad is None or not p.grad.any() for p in model[1].parameters()))
        self.assertTrue(all(p.grad is not None and p.grad.any() for p in model[0].parameters()))

    def test_joint_step_equals_per_network_steps(self):
        """The KD targets are detached: one SGD step on L = sum_k L_k moves each network exactly as
        a step on its own L_k (pre-update peer logits) would, whatever the peers' backbones."""
        args = tiny(dml.Args, self, arch=self.ARCH)
        run = fake_run(args, n=8)
        model = dml.build_model(args, 10)
        copy = dml.build_model(args, 10)
        copy.load_state_dict(model.state_dict())
        x, y = run.data.train_x[:8].float() / 255, run.data.train_y[:8]
        assert_joint_equals_per_network(self, model, copy, args, run, x, y)


def assert_joint_equals_per_network(test, model, copy, args, run, x, y):
    """One train_step of `model` == each network of its copy stepped on its own L_k, with the
    pre-update logits of both networks (the KD targets are detached)."""
    dml.train_step(model, dml.build_optimizers(model, args), x, y, 0, 0, run)
    z = [net(x) for net in copy]  # pre-update logits of both networks
    for k in range(2):
        opt = common.sgd(copy[k].parameters(), args)
        lk = F.cross_entropy(z[k], y) + common.kd_loss(z[k], z[1 - k].detach(), 1.0)
        opt.zero_grad()
        lk.backward()
        opt.step()
    for p, q in zip(model.parameters(), copy.parameters()):
        test.assertTrue(torch.allclose(p, q, atol=1e-6))


if __name__ == "__main__":
    unittest.main()
