"""Grading tests for ffsd.py (`make grade METHOD=ffsd FILE=...`): only the public functions and
their outputs (attention, distance, diversity_target and every loss on hand-made tensors in the
FFSD.forward format; the model's named parts and their gradients, train_step, evaluate's names).
"""
import copy
import math
import os
import sys
import unittest

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # helpers
from helpers import fake_run, fixed_outputs, graded, models, np_ce, np_kd, npy, rand, step_logs  # noqa: E402
from helpers import np_att, np_dist, np_dist_att, np_div_target, np_leader_terms  # noqa: E402
import ffsd  # noqa: E402  (the grader puts the student's file here)

T = 4.0  # every loss test runs at non-default flags: a hard-coded T or lambda fails
ARGS = ffsd.Args(temperature=T, lambda_div=0.5, lambda_fusion=3.0, lambda_sd=7.0)
Y = torch.tensor([0, 3, 1])


class TestParts(unittest.TestCase):
    def test_attention_and_distance(self):
        """A(F) = channel mean of F^2 per position; D(u, v) = mean of (u/|u| - v/|v|)^2."""
        g = torch.Generator().manual_seed(1)
        u, v = rand(g, 2, 3, 2, 3), rand(g, 2, 3, 2, 3)
        np.testing.assert_allclose(npy(ffsd.attention(u)), np_att(npy(u)), rtol=1e-6)
        d = ffsd.distance(ffsd.attention(u), ffsd.attention(v)).item()
        self.assertAlmostEqual(d, np_dist_att(u, v), places=6)
        self.assertAlmostEqual(ffsd.distance(u, v).item(), np_dist(npy(u), npy(v)), places=6)

    def test_diversity_target(self):
        """Eq. 8: below the floor(HW/3)-th smallest kept, that one -> n/2, the rest n - y_hat."""
        a = torch.tensor([[5., 1., 3., 8., 2., 9., 4., 7., 6.],
                          [1., 4., 2., 9., 2., 5., 7., 3., 8.]])
        t, y_hat, n = ffsd.diversity_target(a)
        norm = np.linalg.norm(npy(a), axis=1, keepdims=True)
        np.testing.assert_allclose(npy(t), np_div_target(npy(a)), rtol=1e-5)
        np.testing.assert_allclose(npy(n).reshape(2, 1), norm, rtol=1e-6)
        np.testing.assert_allclose(npy(y_hat), npy(a) / norm, rtol=1e-6)


class TestLosses(unittest.TestCase):
    def test_student_0(self):
        """Student 1 (k = 0): CE + T^2 KL from the other student only (at --temperature 4, not the
        default 2); no diversity, no SD term."""
        out = fixed_outputs()
        z = npy(out["z"])
        loss, logs = ffsd.student_loss(out, Y, 0, ARGS, 0.3)
        logs = graded(logs, "student_loss")
        self.assertEqual(set(logs), {"ce/student1", "kd/student1"}, "student 1's logs")
        self.assertAlmostEqual(logs["kd/student1"].item(), np_kd(z[0], z[1], T), places=5,
                               msg="kd/student1 at T = 4 (args.temperature)")
        expected = np_ce(z[0], Y.numpy()) + np_kd(z[0], z[1], T)
        self.assertAlmostEqual(loss.item(), expected, places=5)

    def test_student_1(self):
        """Student 2: CE + KD + lambda_div w (diversity from student 1's target + shallow SD)."""
        out, w = fixed_outputs(), 0.3
        z = npy(out["z"])
        loss, logs = ffsd.student_loss(out, Y, 1, ARGS, w)
        logs = graded(logs, "student_loss")
        f_prev, f_k = npy(out["feats"][0][-1]), npy(out["feats"][1][-1])
        a_k = np_att(f_k) / np.linalg.norm(np_att(f_k), axis=1, keepdims=True)
        div = 0.5 * w * ((a_k - np_div_target(np_att(f_prev))) ** 2).mean()
        shallow = zip(out["feats"][1][:-1], out["sd_teach"][0])
        sd = 0.5 * w * sum(np_dist_att(f, g) for f, g in shallow)
        self.assertAlmostEqual(logs["div/student2"].item(), div, delta=1e-6 * div, msg="div")
        self.assertAlmostEqual(logs["sd/student2"].item(), sd, places=7, msg="sd/student2")
        expected = np_ce(z[1], Y.numpy()) + np_kd(z[1], z[0], T) + div + sd
        self.assertAlmostEqual(loss.item(), expected, delta=1e-5 * expected)

    def test_mutual_kl_is_a_mean_over_the_other_students(self):
        """With M = 3 students, KD_k = mean over the two others."""
        out = fixed_outputs(M=3)
        z = npy(out["z"])
        logs = graded(ffsd.student_loss(out, Y, 2, ARGS, 1.0)[1], "student_loss")
        expected = (np_kd(z[2], z[0], T) + np_kd(z[2], z[1], T)) / 2
        self.assertAlmostEqual(logs["kd/student3"].item(), expected, places=5)

    def test_fusion(self):
        """Fusion: CE(z_f) + KD from the mean of the students' logits (at --temperature 4)."""
        out = fixed_outputs()
        loss, _ = ffsd.fusion_loss(out, Y, ARGS)
        z_f = npy(out["z_f"])
        expected = np_ce(z_f, Y.numpy()) + np_kd(z_f, npy(out["z"]).mean(0), T)
        self.assertAlmostEqual(loss.item(), expected, places=5)

    def test_leader(self):
        """Leader: CE + KD(z_f) (at --temperature 4) + lambda_fusion w (fused-map mimicry,
        reconstruction, SD)."""
        out, w = fixed_outputs(), 0.5
        loss, logs = ffsd.leader_loss(out, Y, ARGS, w)
        logs = graded(logs, "leader_loss")
        expect = np_leader_terms(out, Y.numpy(), 3.0 * w, T)
        for k, v in expect.items():
            self.assertAlmostEqual(logs[k].item(), v, places=5, msg=k)
        self.assertAlmostEqual(loss.item(), sum(expect.values()), places=4)

    def test_sd_modules(self):
        """Eq. 10: lambda_sd w sum_l [D(G^l, F^l) + D(A(G^l), A(F^l))], each on its OWN network."""
        out, w = fixed_outputs(), 0.2
        loss, _ = ffsd.sd_fit_loss(out, ARGS, w)
        expected = 0.0
        for maps, gs in zip([out["feats"][1], out["feats_ld"]], out["sd_fit"]):
            expected += 7.0 * w * sum(np_dist(npy(g), npy(f)) + np_dist_att(g, f)
                                      for f, g in zip(maps[:-1], gs))
        self.assertAlmostEqual(loss.item(), expected, places=5)

    def test_total_is_the_sum_of_the_parts(self):
        """ffsd_loss = the students' + the fusion's + the leader's + the SD modules' losses."""
        out, w = fixed_outputs(), 0.7
        loss, _ = ffsd.ffsd_loss(out, Y, ARGS, w)
        parts = [ffsd.student_loss(out, Y, 0, ARGS, w), ffsd.student_loss(out, Y, 1, ARGS, w),
                 ffsd.fusion_loss(out, Y, ARGS), ffsd.leader_loss(out, Y, ARGS, w),
                 ffsd.sd_fit_loss(out, ARGS, w)]
        self.assertAlmostEqual(loss.item(), sum(p[0].item() for p in parts), places=4)


class TestModel(unittest.TestCase):
    def test_gradient_routing(self):
        """Each loss reaches its own network's parameters only (targets, fusion input detached)."""
        torch.manual_seed(0)
        model = ffsd.build_model(ffsd.Args(arch="resnet8"), 10)
        groups = {"student1": model.students[0], "student2": model.students[1],
                  "leader": model.leader, "decoder": model.decoder, "fusion": model.fusion,
                  "sd_student2": model.sd_students[0], "sd_leader": model.sd_leader}
        params = [(k, p) for k, m in groups.items() for p in m.parameters()]
        out, y = model(torch.randn(8, 3, 32, 32)), torch.arange(8) % 10
        args = ffsd.Args(lambda_div=1.0, lambda_fusion=1.0, lambda_sd=1.0)
        parts = {"student_loss 0": (ffsd.student_loss(out, y, 0, args, 1.0)[0], {"student1"}),
                 "student_loss 1": (ffsd.student_loss(out, y, 1, args, 1.0)[0], {"student2"}),
                 "fusion_loss": (ffsd.fusion_loss(out, y, args)[0], {"fusion"}),
                 "leader_loss": (ffsd.leader_loss(out, y, args, 1.0)[0], {"leader", "decoder"}),
                 "sd_fit_loss": (ffsd.sd_fit_loss(out, args, 1.0)[0], {"sd_student2", "sd_leader"})}
        for name, (loss, owners) in parts.items():
            grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True,
                                        allow_unused=True)
            for group in groups:
                got = [g for (k, _), g in zip(params, grads) if k == group]
                if group in owners:
                    reached = any(g is not None and g.abs().sum() > 0 for g in got)
                    self.assertTrue(reached, f"{name} -> {group}")
                else:
                    untouched = all(g is None or not g.any() for g in got)
                    self.assertTrue(untouched, f"{name} must not reach {group}")

    def test_train_step_updates_every_part(self):
        """One train_step at epoch 0 returns ffsd_loss's logs, with the warm-up factor of epoch 1 at
        --warmup-epochs 2 (not the default 5): exp(-5 (1 - 1/2)^2) = 0.287 on every lambda, and changes
        every parameter."""
        args = ffsd.Args(arch="resnet8", batch_size=16, warmup_epochs=2)
        run = fake_run(args, 16)
        torch.manual_seed(0)
        model = ffsd.build_model(args, 10)
        opts = ffsd.build_optimizers(model, args)
        before = {k: v.clone() for k, v in model.named_parameters()}
        x = (run.data.train_x.float() / 255 - run.data.mean) / run.data.std
        _, want = ffsd.ffsd_loss(copy.deepcopy(model)(x), run.data.train_y, args, math.exp(-5 * 0.5 ** 2))
        logs = step_logs(ffsd.train_step(model, opts, x, run.data.train_y, 0, 0, run))
        self.assertTrue(all(math.isfinite(v.item()) for v in logs.values()))
        for name in ("div/student2", "fmap/leader", "sdfit/leader", "loss"):
            self.assertAlmostEqual(logs[name].item(), want[name].item(), delta=1e-5 * abs(want[name].item()),
                                   msg=f"{name}: train_step must weight the lambdas by the warm-up "
                                   f"w(epoch + 1) of length --warmup-epochs")
        for name, p in model.named_parameters():
            self.assertFalse(torch.equal(p, before[name]), f"{name} was not updated")

    def test_evaluate(self):
        """student1..M, ensemble (mean of the students' logits), fusion and leader."""
        torch.manual_seed(0)
        model = ffsd.build_model(ffsd.Args(arch="resnet8"), 10).eval()
        x = torch.randn(5, 3, 32, 32)
        with torch.no_grad():
            outs = ffsd.evaluate(model, x)
            self.assertEqual(set(models(outs)), {"student1", "student2", "ensemble", "fusion", "leader"})
            mean = (model.students[0](x) + model.students[1](x)) / 2
            torch.testing.assert_close(outs["ensemble"], mean)
            torch.testing.assert_close(outs["leader"], model.leader(x))
            feats = [net.features(x)[-1] for net in model.students]
            torch.testing.assert_close(outs["fusion"], model.fusion(torch.cat(feats, 1))[1])


if __name__ == "__main__":
    unittest.main()
