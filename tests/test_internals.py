"""Method internals (evaluate's 'int/...' entries; docs/tutorial.md, section 9): each equals a direct numpy
computation on a tiny model, has the documented shape, and is what common averages over the test set and writes to
metrics.jsonl every epoch. ONE's gate rows and OKDDip's attention rows sum to 1."""
import json
import os
import unittest

import numpy as np
import torch
import torch.nn as nn

import helpers  # noqa: F401  (sys.path, one torch thread)
from helpers import fake_run, np_softmax, npy, tiny

import common
import dml
import ffsd
import okddip
import one
import pcl

B = 6  # test images


def images(seed=0):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def outputs(module, model, x):
    with torch.no_grad():
        return module.evaluate(model.eval(), x)


class Fixed(nn.Module):
    """A stand-in network that returns the given logits, whatever the input."""

    def __init__(self, z):
        super().__init__()
        self.z = z

    def forward(self, x):
        return self.z


def np_kl(p_log, q_log):
    """KL(p || q) per row from log-probabilities."""
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class TestInternals(unittest.TestCase):
    def test_dml_agreement_is_the_fraction_of_peer_pairs_that_agree(self):
        """DML: int/agreement per image = the fraction of peer pairs predicting the same class."""
        # Three peers, four images: all agree / two of three agree / none agree / peers 2 and 3 agree.
        preds = torch.tensor([[0, 1, 0, 3], [0, 1, 1, 2], [0, 2, 2, 2]])  # (K, B)
        nets = nn.ModuleList(Fixed(torch.nn.functional.one_hot(p, 10).float()) for p in preds)
        got = outputs(dml, nets, torch.zeros(4, 3, 32, 32))["int/agreement"]
        self.assertEqual(tuple(got.shape), (4,))
        np.testing.assert_allclose(npy(got), [1.0, 1 / 3, 0.0, 1 / 3], atol=1e-6)

    def test_one_gate_is_the_softmax_that_weights_the_teacher(self):
        """ONE: int/gate (B, m) sums to 1 per image, equals softmax(ReLU(BN(Linear(pool(trunk))))) and is the
        weight the gated teacher gives each branch (one_e = sum_i g_i z_i)."""
        torch.manual_seed(0)
        model = one.ONE("resnet8", 10, 3).eval()
        x = images()
        outs = outputs(one, model, x)
        g = npy(outs["int/gate"])
        self.assertEqual(g.shape, (B, 3))
        np.testing.assert_allclose(g.sum(1), np.ones(B), atol=1e-6)
        with torch.no_grad():
            z, _, t = model.net(x)
        lin, bn = model.gate[2], model.gate[3]
        s = npy(t).mean((2, 3)) @ npy(lin.weight).T + npy(lin.bias)
        s = (s - npy(bn.running_mean)) / np.sqrt(npy(bn.running_var) + bn.eps) * npy(bn.weight) + npy(bn.bias)
        np.testing.assert_allclose(g, np_softmax(np.maximum(s, 0)), atol=1e-5)
        np.testing.assert_allclose(npy(outs["one_e"]), np.einsum("bi,ibc->bc", g, npy(z)), atol=1e-4)

    def test_okddip_attention_and_entropy_equal_a_direct_computation(self):
        """OKDDip: int/attention (B, m, m) = softmax_c(q_a . k_c) from the peers' features (rows sum to 1, the
        leader left out); int/attention_entropy (B, m) = -sum_c A log A per row."""
        torch.manual_seed(0)
        model = okddip.OKDDip("resnet8", 10, 3).eval()
        with torch.no_grad():
            model.query.weight.mul_(20)  # far from uniform, so that a wrong axis shows
        x = images()
        outs = outputs(okddip, model, x)
        A, H = npy(outs["int/attention"]), npy(outs["int/attention_entropy"])
        self.assertEqual((A.shape, H.shape), ((B, 3, 3), (B, 3)))
        np.testing.assert_allclose(A.sum(-1), np.ones((B, 3)), atol=1e-5)
        with torch.no_grad():
            h = npy(model.net(x)[1][:3])  # (m, B, D): the auxiliary peers only
        q, k = h @ npy(model.query.weight).T, h @ npy(model.key.weight).T
        want = np_softmax(np.einsum("abd,cbd->bac", q, k))
        np.testing.assert_allclose(A, want, atol=1e-4)
        self.assertGreater(np.abs(A - 1 / 3).max(), 0.05)
        np.testing.assert_allclose(H, -(want * np.log(want)).sum(-1), atol=1e-4)

    def test_pcl_kl_from_each_temporal_mean_to_its_peer(self):
        """PCL: int/kl_mean_peer (B, m) = KL(softmax(temporal mean j) || softmax(peer j)) at T = 1."""
        args = pcl.Args(arch="resnet8", device="cpu")
        torch.manual_seed(0)
        model = pcl.build_model(args, 10)
        with torch.no_grad():
            for p in model.mean.parameters():  # a temporal mean that differs from the students
                p.add_(0.05 * torch.randn_like(p))
        x = images()
        outs = outputs(pcl, model, x)
        kl = npy(outs["int/kl_mean_peer"])
        self.assertEqual(kl.shape, (B, 3))
        with torch.no_grad():
            z, zm = npy(model.student(x)[0]), npy(model.mean(x)[0])  # (m, B, C) each
        want = np_kl(np_log_softmax(zm), np_log_softmax(z)).T
        np.testing.assert_allclose(kl, want, rtol=1e-4, atol=1e-6)
        self.assertGreater(np.abs(want - np_kl(np_log_softmax(z), np_log_softmax(zm)).T).max(), 1e-4)

    def test_ffsd_distance_between_consecutive_students_attention_maps(self):
        """FFSD: int/attention_distance (B, M - 1) = mean over positions of (a_k - a_(k-1))^2, a = the
        L2-normalised channel mean of the last-stage map squared, for each pair of consecutive students."""
        args = ffsd.Args(arch="resnet8", device="cpu", num_students=3)
        torch.manual_seed(0)
        model = ffsd.build_model(args, 10)
        x = images()
        got = npy(outputs(ffsd, model, x)["int/attention_distance"])
        self.assertEqual(got.shape, (B, 2))
        with torch.no_grad():
            maps = [npy(net.features(x)[-1]) for net in model.students]
        a = [(f ** 2).mean(1).reshape(B, -1) for f in maps]
        a = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in a]
        want = np.stack([((a[k] - a[k - 1]) ** 2).mean(1) for k in (1, 2)], 1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)

    def test_common_averages_internals_over_the_whole_test_set(self):
        """evaluate_all: an internal's logged value is its mean over every test image (batches of unequal
        size included), a float for a scalar per image, nested lists for a matrix; models get accuracy."""
        run = fake_run(okddip.Args(arch="resnet8", device="cpu", eval_batch_size=4), n=10)
        torch.manual_seed(0)
        model = okddip.OKDDip("resnet8", 10, 3)
        scores = common.evaluate_all(run, model, okddip.evaluate)
        x = (run.data.test_x.float() / 255 - run.data.mean) / run.data.std
        outs = outputs(okddip, model, x)
        np.testing.assert_allclose(np.array(scores["int/attention"]), npy(outs["int/attention"]).mean(0),
                                   atol=1e-5)
        np.testing.assert_allclose(scores["int/attention_entropy"], npy(outs["int/attention_entropy"]).mean(0),
                                   atol=1e-5)
        self.assertIsInstance(scores["int/attention"][0], list)
        acc = 100.0 * (outs["leader"].argmax(-1) == run.data.test_y).float().mean().item()
        self.assertAlmostEqual(scores["leader"], acc, places=4)

    def test_metrics_log_the_internals_every_epoch(self):
        """A PCL run writes the internals into metrics.jsonl at every epoch, with no 'acc/' prefix;
        int/acc_gap_peer<j> = acc/mt_peer<j> - acc/peer<j>."""
        args = tiny(pcl.Args, self, subset=64, test_subset=32, batch_size=32, epochs=2)
        pcl.main(args)
        with open(os.path.join(args.out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        self.assertEqual(len(rows), 2)
        for row in rows:
            self.assertEqual(len(row["int/kl_mean_peer"]), 3)
            self.assertFalse(any(k.startswith("acc/int/") for k in row))
            for j in (1, 2, 3):
                self.assertAlmostEqual(row[f"int/acc_gap_peer{j}"], row[f"acc/mt_peer{j}"] - row[f"acc/peer{j}"])


if __name__ == "__main__":
    unittest.main()
