"""FFSD (ffsd.py): attention, diversity target, every loss term against explicit numpy computations,
gradient routing between the seven trained parts, module sizes, warm-up, optimisers, a tiny run that learns,
determinism."""
import math
import os
import re
import unittest
from unittest import mock

import numpy as np
import torch

from helpers import (ROOT, fake_run, fixed_outputs, models, np_att, np_ce, np_dist, np_div_target, np_kd,
                     np_leader_terms, npy, rand, tiny)

import common
import ffsd

ARGS = ffsd.Args(temperature=2.0, lambda_div=0.5, lambda_fusion=3.0, lambda_sd=7.0)
Y = torch.tensor([0, 3, 1])


class TestAttentionAndDiversity(unittest.TestCase):
    def test_attention_and_distance_match_numpy(self):
        g = torch.Generator().manual_seed(1)
        u, v = rand(g, 2, 3, 2, 3), rand(g, 2, 3, 2, 3)
        np.testing.assert_allclose(npy(ffsd.attention(u)), np_att(npy(u)), rtol=1e-6)
        self.assertEqual(tuple(ffsd.attention(u).shape), (2, 6))
        # D on attention maps (mean over B x HW) and on whole maps (mean over B x C*H*W)
        self.assertAlmostEqual(ffsd.distance(ffsd.attention(u), ffsd.attention(v)).item(),
                               np_dist(np_att(npy(u)), np_att(npy(v))), places=6)
        self.assertAlmostEqual(ffsd.distance(u, v).item(), np_dist(npy(u), npy(v)), places=6)
        # scale-free: D(c u, v) = D(u, v); D(u, u) = 0
        self.assertAlmostEqual(ffsd.distance(5 * u, v).item(), ffsd.distance(u, v).item(), places=6)
        self.assertEqual(ffsd.distance(u, u).item(), 0.0)

    def test_attention_of_concat_is_mean_of_attentions(self):
        g = torch.Generator().manual_seed(2)
        f0, f1 = rand(g, 2, 4, 3, 3), rand(g, 2, 4, 3, 3)
        torch.testing.assert_close(ffsd.attention(torch.cat([f0, f1], 1)),
                                   (ffsd.attention(f0) + ffsd.attention(f1)) / 2)

    def test_diversity_target_threshold_kept_shifted_and_tie(self):
        # HW = 9 -> K = 3. Row 0 distinct: 3rd smallest is 3 -> {1, 2} kept, 3 -> n/2, the rest -> n - y_hat.
        # Row 1 has a tie at the threshold: sorted 1, 2, 2, ... -> tau = 2: only 1 kept, BOTH 2s -> n/2.
        a = torch.tensor([[5., 1., 3., 8., 2., 9., 4., 7., 6.], [1., 4., 2., 9., 2., 5., 7., 3., 8.]])
        t, y_hat, n = ffsd.diversity_target(a)
        np.testing.assert_allclose(npy(t), np_div_target(npy(a)), rtol=1e-5)  # fp32 normalisation
        n0 = math.sqrt(sum(v * v for v in a[0].tolist()))
        self.assertAlmostEqual(n[0, 0].item(), n0, places=5)
        self.assertAlmostEqual(t[0, 1].item(), 1 / n0, places=6)  # kept (weakest)
        self.assertAlmostEqual(t[0, 4].item(), 2 / n0, places=6)  # kept
        self.assertAlmostEqual(t[0, 2].item(), n0 / 2, places=5)  # the threshold entry
        self.assertAlmostEqual(t[0, 5].item(), n0 - 9 / n0, places=5)  # strongest: shifted to n - y_hat
        n1 = n[1, 0].item()
        self.assertAlmostEqual(t[1, 0].item(), 1 / n1, places=6)
        self.assertAlmostEqual(t[1, 2].item(), n1 / 2, places=5)
        self.assertAlmostEqual(t[1, 4].item(), n1 / 2, places=5)
        self.assertAlmostEqual(t[1, 7].item(), n1 - 3 / n1, places=5)
        self.assertEqual([((t[b] - y_hat[b]).abs() < 1e-6).sum().item() for b in range(2)], [2, 1])  # kept entries

    def test_shifted_map_adds_the_same_shift_to_every_channel(self):
        g = torch.Generator().manual_seed(3)
        f = rand(g, 2, 4, 3, 3)
        out = ffsd.shifted_map(f)
        a = np_att(npy(f))
        n = np.linalg.norm(a, axis=1, keepdims=True)
        shift = ((np_div_target(a) - a / n) * n / 4).reshape(2, 1, 3, 3)
        np.testing.assert_allclose(npy(out), npy(f) + shift, rtol=1e-5, atol=1e-6)


class TestLossTerms(unittest.TestCase):
    def test_student_losses(self):
        out, w, T = fixed_outputs(), 0.3, 2.0
        z = npy(out["z"])
        loss0, logs0 = ffsd.student_loss(out, Y, 0, ARGS, w)
        self.assertEqual(set(logs0), {"ce/student1", "kd/student1"})  # student 0: no diversity, no SD term
        self.assertAlmostEqual(logs0["ce/student1"].item(), np_ce(z[0], Y.numpy()), places=5)
        self.assertAlmostEqual(logs0["kd/student1"].item(), np_kd(z[0], z[1], T), places=5)
        loss1, logs1 = ffsd.student_loss(out, Y, 1, ARGS, w)
        f_prev, f_k = npy(out["feats"][0][-1]), npy(out["feats"][1][-1])
        a_k = np_att(f_k) / np.linalg.norm(np_att(f_k), axis=1, keepdims=True)
        div = 0.5 * w * ((a_k - np_div_target(np_att(f_prev))) ** 2).mean()
        sd = 0.5 * w * sum(np_dist(np_att(npy(f)), np_att(npy(g)))
                           for f, g in zip(out["feats"][1][:-1], out["sd_teach"][0]))
        self.assertAlmostEqual(logs1["kd/student2"].item(), np_kd(z[1], z[0], T), places=5)
        self.assertAlmostEqual(logs1["div/student2"].item(), div, delta=1e-6 * div)
        self.assertAlmostEqual(logs1["sd/student2"].item(), sd, places=7)
        expected = np_ce(z[1], Y.numpy()) + np_kd(z[1], z[0], T) + div + sd
        self.assertAlmostEqual(loss1.item(), expected, delta=1e-5 * expected)
        # the warm-up factor scales the lambda terms only, never CE or KD
        _, half = ffsd.student_loss(out, Y, 1, ARGS, w / 2)
        self.assertEqual(half["ce/student2"].item(), logs1["ce/student2"].item())
        self.assertEqual(half["kd/student2"].item(), logs1["kd/student2"].item())
        self.assertAlmostEqual(half["div/student2"].item(), div / 2, delta=1e-6 * div)

    def test_mutual_kl_averages_over_peers(self):
        out = fixed_outputs(M=3)
        z = npy(out["z"])
        _, logs = ffsd.student_loss(out, Y, 2, ARGS, 1.0)
        self.assertAlmostEqual(logs["kd/student3"].item(), (np_kd(z[2], z[0], 2.0) + np_kd(z[2], z[1], 2.0)) / 2,
                               places=5)

    def test_fusion_loss(self):
        out = fixed_outputs()
        loss, logs = ffsd.fusion_loss(out, Y, ARGS)
        z_bar = npy(out["z"]).mean(0)  # mean of the students' LOGITS
        self.assertAlmostEqual(logs["ce/fusion"].item(), np_ce(npy(out["z_f"]), Y.numpy()), places=5)
        self.assertAlmostEqual(logs["kd/fusion"].item(), np_kd(npy(out["z_f"]), z_bar, 2.0), places=5)
        self.assertAlmostEqual(loss.item(), logs["ce/fusion"].item() + logs["kd/fusion"].item(), places=5)

    def test_leader_loss(self):
        out, w = fixed_outputs(), 0.5
        loss, logs = ffsd.leader_loss(out, Y, ARGS, w)
        expect = np_leader_terms(out, Y.numpy(), 3.0 * w, 2.0)
        for k, v in expect.items():
            self.assertAlmostEqual(logs[k].item(), v, places=5, msg=k)
        self.assertAlmostEqual(loss.item(), sum(expect.values()), places=4)

    def test_sd_fit_loss(self):
        out, w = fixed_outputs(), 0.2
        loss, logs = ffsd.sd_fit_loss(out, ARGS, w)
        owners = {"sdfit/student2": out["feats"][1], "sdfit/leader": out["feats_ld"]}  # each module's OWN network
        for (name, maps), gs in zip(owners.items(), out["sd_fit"]):
            v = 7.0 * w * sum(np_dist(npy(g), npy(f)) + np_dist(np_att(npy(g)), np_att(npy(f)))
                              for f, g in zip(maps[:-1], gs))
            self.assertAlmostEqual(logs[name].item(), v, places=5, msg=name)
        self.assertAlmostEqual(loss.item(), sum(v.item() for v in logs.values()), places=5)

    def test_ffsd_loss_is_the_sum_of_the_parts(self):
        out, w = fixed_outputs(), 0.7
        loss, logs = ffsd.ffsd_loss(out, Y, ARGS, w)
        parts = [ffsd.student_loss(out, Y, 0, ARGS, w), ffsd.student_loss(out, Y, 1, ARGS, w),
                 ffsd.fusion_loss(out, Y, ARGS), ffsd.leader_loss(out, Y, ARGS, w), ffsd.sd_fit_loss(out, ARGS, w)]
        self.assertAlmostEqual(loss.item(), sum(p[0].item() for p in parts), places=4)
        self.assertEqual(logs["loss"].item(), loss.item())
        self.assertEqual(len(logs), 1 + sum(len(p[1]) for p in parts))

    def test_warmup_values(self):
        """train_step hands ffsd_loss the warm-up factor of the 1-based epoch (fit's epoch 0 is
        "epoch 1"): 0.041, 0.165, 0.449, 0.819, then 1; 1 from the start with --warmup-epochs 0."""
        def seen(args, epochs):
            got, run = [], fake_run(args, n=8)
            def fake_loss(out, y, args, w):
                got.append(w.item())
                return torch.zeros((), requires_grad=True), {}
            with mock.patch.object(ffsd, "ffsd_loss", fake_loss):
                for e in epochs:
                    ffsd.train_step(lambda x: None, {}, None, None, e, 0, run)
            return got
        for g, want in zip(seen(ffsd.Args(), range(7)), [0.041, 0.165, 0.449, 0.819, 1.0, 1.0, 1.0]):
            self.assertAlmostEqual(g, want, delta=5e-4)
        self.assertEqual(seen(ffsd.Args(warmup_epochs=0), [0]), [1.0])


class TestModel(unittest.TestCase):
    def test_resnet32_cifar100_shapes_and_parameter_counts(self):
        torch.manual_seed(0)
        model = ffsd.build_model(ffsd.Args(arch="resnet32"), 100)
        n = common.num_params
        self.assertEqual(n(model.fusion), 16228)
        self.assertEqual(n(model.decoder), 9152)
        self.assertEqual(len(model.sd_students), 1)  # student 0 has none
        self.assertEqual([n(sd) for sd in [*model.sd_students, model.sd_leader]], [23136, 23136])
        self.assertEqual([n(net) for net in [*model.students, model.leader]], [472756] * 3)
        self.assertEqual(n(model), 1489920)
        # no parameter object shared between parts
        ids = [id(p) for p in model.parameters()]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(sum(p.numel() for p in model.parameters()), 1489920)
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        shapes = lambda ts: [tuple(t.shape[1:]) for t in ts]  # noqa: E731
        taps = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
        self.assertEqual(shapes(out["feats"][0]), taps)
        self.assertEqual(shapes(out["feats_ld"]), taps)
        self.assertEqual(tuple(out["concat"].shape), (2, 128, 8, 8))
        self.assertEqual(tuple(out["fused"].shape), (2, 64, 8, 8))
        self.assertEqual(tuple(out["recon"].shape), (2, 128, 8, 8))
        self.assertEqual(tuple(out["z"].shape), (2, 2, 100))
        self.assertEqual(tuple(out["z_f"].shape), (2, 100))
        for maps in [*out["sd_teach"], out["sd_teach_ld"], *out["sd_fit"]]:
            self.assertEqual(shapes(maps), taps[:2])

    def test_gradient_routing(self):
        """Each part's loss reaches exactly its own parameters, and the summed loss gives every parameter
        the gradient of its own loss (why one backward equals the official per-network backward passes)."""
        torch.manual_seed(0)
        model = ffsd.build_model(ffsd.Args(arch="resnet8"), 10)
        groups = {"student1": model.students[0], "student2": model.students[1], "leader": model.leader,
                  "decoder": model.decoder, "fusion": model.fusion, "sd_student2": model.sd_students[0],
                  "sd_leader": model.sd_leader}
        params = {k: list(m.parameters()) for k, m in groups.items()}
        out = model(torch.randn(8, 3, 32, 32))
        y = torch.arange(8) % 10
        args, w = ffsd.Args(), 1.0
        # large lambdas so that every term's gradient is far from zero
        args.lambda_div, args.lambda_fusion, args.lambda_sd = 1.0, 1.0, 1.0
        parts = {"student_loss 0": (ffsd.student_loss(out, y, 0, args, w)[0], {"student1"}),
                 "student_loss 1": (ffsd.student_loss(out, y, 1, args, w)[0], {"student2"}),
                 "fusion_loss": (ffsd.fusion_loss(out, y, args)[0], {"fusion"}),
                 "leader_loss": (ffsd.leader_loss(out, y, args, w)[0], {"leader", "decoder"}),
                 "sd_fit_loss": (ffsd.sd_fit_loss(out, args, w)[0], {"sd_student2", "sd_leader"})}
        total = ffsd.ffsd_loss(out, y, args, w)[0]
        all_params = [p for ps in params.values() for p in ps]
        g_total = dict(zip(map(id, all_params), torch.autograd.grad(total, all_params, retain_graph=True)))
        for name, (loss, owners) in parts.items():
            grads = torch.autograd.grad(loss, all_params, retain_graph=True, allow_unused=True)
            by_id = dict(zip(map(id, all_params), grads))
            for group, ps in params.items():
                gs = [by_id[id(p)] for p in ps]
                if group in owners:
                    self.assertTrue(any(g is not None and g.abs().sum() > 0 for g in gs), f"{name} -> {group}")
                    for p, g in zip(ps, gs):
                        torch.testing.assert_close(g if g is not None else torch.zeros_like(p), g_total[id(p)])
                else:
                    # None, or exact zeros (the students' logits are stacked, so a detached slice still
                    # sends a zero tensor back through torch.stack)
                    self.assertTrue(all(g is None or not g.any() for g in gs), f"{name} must not reach {group}")
        # targets produced by the SD modules (teachers) and the fusion input carry no graph at all
        for maps in [*out["sd_teach"], out["sd_teach_ld"]]:
            self.assertTrue(all(not m.requires_grad for m in maps))
        self.assertFalse(out["concat"].requires_grad)

    def test_optimisers(self):
        args = ffsd.Args(arch="resnet8")
        model = ffsd.build_model(args, 10)
        opts = ffsd.build_optimizers(model, args)
        self.assertEqual(list(opts), ["student1", "student2", "fusion", "leader", "sd/student2", "sd/leader"])
        for name in ("student1", "student2", "leader"):
            g = opts[name].defaults
            self.assertIsInstance(opts[name], torch.optim.SGD)
            self.assertEqual((g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]), (0.1, 0.9, True, 1e-4))
        self.assertIsInstance(opts["fusion"], torch.optim.SGD)
        self.assertEqual(opts["fusion"].defaults["weight_decay"], 1e-5)
        for name in ("sd/student2", "sd/leader"):
            self.assertIsInstance(opts[name], torch.optim.Adam)
            self.assertEqual((opts[name].defaults["lr"], opts[name].defaults["weight_decay"]), (1e-3, 1e-4))
        owned = lambda o: {id(p) for g in o.param_groups for p in g["params"]}  # noqa: E731
        self.assertEqual(owned(opts["leader"]), {id(p) for p in [*model.leader.parameters(), *model.decoder.parameters()]})
        # every parameter in exactly one optimiser
        counts = [len(owned(o)) for o in opts.values()]
        self.assertEqual(sum(counts), len(list(model.parameters())))
        self.assertEqual(set().union(*map(owned, opts.values())), {id(p) for p in model.parameters()})
        # FFSD's recipe defaults, also through the command line
        parsed = common.parse_args(ffsd.Args, [])
        self.assertEqual((parsed.weight_decay, parsed.pad_mode, parsed.fusion_wd, parsed.temperature),
                         (1e-4, "reflect", 1e-5, 2.0))
        self.assertEqual((parsed.lambda_div, parsed.lambda_fusion, parsed.lambda_sd), (1e-5, 10.0, 1000.0))

    def test_train_step_updates_everything_and_teachers_run_in_eval_mode(self):
        args = ffsd.Args(arch="resnet8", batch_size=16)
        run = fake_run(args, 16)
        torch.manual_seed(0)
        model = ffsd.build_model(args, 10)
        opts = ffsd.build_optimizers(model, args)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x = (run.data.train_x.float() / 255 - run.data.mean) / run.data.std
        logs = ffsd.train_step(model, opts, x, run.data.train_y, 0, 0, run)
        self.assertTrue(all(torch.isfinite(v) for v in logs.values()))
        for name, p in model.named_parameters():
            self.assertFalse(torch.equal(p, before[name]), f"{name} was not updated")
        # one train-mode batch per SD module: the teacher passes (eval mode) left the BN statistics alone
        for sd in (model.sd_students[0], model.sd_leader):
            self.assertEqual([m.num_batches_tracked.item() for m in sd.modules() if isinstance(m, torch.nn.BatchNorm2d)],
                             [1, 1])
            self.assertTrue(sd.training)

    def test_evaluate_names_and_ensemble_is_mean_of_logits(self):
        torch.manual_seed(0)
        model = ffsd.build_model(ffsd.Args(arch="resnet8"), 10).eval()
        x = torch.randn(5, 3, 32, 32)
        with torch.no_grad():
            outs = ffsd.evaluate(model, x)
            self.assertEqual(models(outs), ["student1", "student2", "ensemble", "fusion", "leader"])
            torch.testing.assert_close(outs["ensemble"], (model.students[0](x) + model.students[1](x)) / 2)
            torch.testing.assert_close(outs["leader"], model.leader(x))
            feats = [net.features(x)[-1] for net in model.students]
            torch.testing.assert_close(outs["fusion"], model.fusion(torch.cat(feats, 1))[1])


class TestTraining(unittest.TestCase):
    def test_tiny_run_leader_learns(self):
        final = ffsd.main(tiny(ffsd.Args, self, subset=256, batch_size=32, epochs=3))
        m = final["models"]
        self.assertEqual(set(m), {"student1", "student2", "ensemble", "fusion", "leader", "student_avg"})
        self.assertEqual(final["deployed"], "leader")
        self.assertEqual(final["test_acc"], m["leader"])
        self.assertGreater(m["leader"], 50.0)  # chance is 10%
        self.assertAlmostEqual(m["student_avg"], (m["student1"] + m["student2"]) / 2)
        self.assertTrue(all(math.isfinite(v) for v in m.values()))

    def _two_steps(self, seed):
        args = ffsd.Args(arch="resnet8", batch_size=16)
        run = fake_run(args, 16)
        torch.manual_seed(seed)
        model = ffsd.build_model(args, 10)
        opts = ffsd.build_optimizers(model, args)
        x = (run.data.train_x.float() / 255 - run.data.mean) / run.data.std
        logs = [ffsd.train_step(model, opts, x, run.data.train_y, 0, s, run) for s in range(2)]
        return [{k: v.item() for k, v in lg.items()} for lg in logs], model.state_dict()

    def test_same_seed_same_numbers(self):
        a_logs, a_state = self._two_steps(0)
        b_logs, b_state = self._two_steps(0)
        c_logs, _ = self._two_steps(1)
        self.assertEqual(a_logs, b_logs)
        self.assertTrue(all(torch.equal(a_state[k], b_state[k]) for k in a_state))
        self.assertNotEqual(a_logs[1]["loss"], c_logs[1]["loss"])


class TestStructure(unittest.TestCase):
    def test_banners_in_order_and_no_method_imports(self):
        with open(os.path.join(ROOT, "ffsd.py")) as f:
            src = f.read()
        banners = re.findall(r"^# ===== (\d)\. ([\w ]+) =====$", src, flags=re.M)
        self.assertEqual(banners, [("1", "Imports"), ("2", "Args"), ("3", "Model"), ("4", "Loss"),
                                   ("5", "Train step"), ("6", "Evaluate"), ("7", "Main")])
        imports = re.findall(r"^(?:from|import) (\w+)", src, flags=re.M)
        self.assertFalse({"baseline", "dml", "one", "okddip", "pcl"} & set(imports))
        self.assertNotIn(".cuda(", src)


if __name__ == "__main__":
    unittest.main()
