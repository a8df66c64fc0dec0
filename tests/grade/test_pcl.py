"""Grading tests for pcl.py (`make grade METHOD=pcl FILE=...`): only the public functions and their
outputs (pcl_loss on hand-made logits, ema_decay, ema_update, the model's student and mean halves
and their outputs, train_step's effect, evaluate's names). Peer j alone: `peers.single(j)` (common).
"""
import copy
import math
import os
import sys
import unittest
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # helpers
from helpers import fake_run, graded, logs_seen, models, np_ce, np_kd, step_logs  # noqa: E402
import common  # noqa: E402
import pcl  # noqa: E402  (the grader puts the student's file here)

G = torch.Generator().manual_seed(3)
LOGITS = torch.randn(3, 2, 4, generator=G) * 2  # peers (m, B, C)
ENS = torch.randn(2, 4, generator=G) * 2  # ensemble head (B, C)
MEAN = torch.randn(3, 2, 4, generator=G) * 2  # temporal-mean peers (m, B, C)
Y = torch.tensor([1, 3])


def terms_by_hand(T=3.0, m=3):
    """The logged terms for the first m peers of LOGITS and MEAN, by numpy."""
    z, ze, zm, y = LOGITS[:m].double().numpy(), ENS.double().numpy(), MEAN[:m].double().numpy(), Y.numpy()
    return {"ce/ens": np_ce(ze, y), "ce/peers": sum(np_ce(z[j], y) for j in range(m)),
            "kd/ens": sum(np_kd(z[j], ze, T) for j in range(m)),
            "kd/mean": sum(np_kd(z[j], zm[k], T) / (m - 1) for j in range(m) for k in range(m) if k != j)}


def ready_to_step(**changes):
    """A resnet8 PCL model in train mode, its optimisers, a 16-image run (2 steps per epoch) and a
    batch of 3 views of 8 images."""
    torch.manual_seed(0)
    args = pcl.Args(arch="resnet8", device="cpu", batch_size=8, **changes)
    model = pcl.build_model(args, 10).train()
    run = fake_run(args, 16)
    x, y = next(iter(common.train_batches(run, torch.Generator().manual_seed(0), views=3)))
    return args, model, run, pcl.build_optimizers(model, args), x, y


class TestLoss(unittest.TestCase):
    def test_terms_by_hand(self):
        """ce/ens, ce/peers, kd/ens, kd/mean (x T^2; sums over the peers), by hand, with m = 3 and 2
        peers at --temperature 2 (not the default 3)."""
        for m in (3, 2):
            logs = pcl.pcl_loss(LOGITS[:m], ENS, MEAN[:m], Y, 0.287, pcl.Args(temperature=2.0))[1]
            for name, value in terms_by_hand(2.0, m).items():
                self.assertAlmostEqual(graded(logs, "pcl_loss")[name].item(), value, places=4,
                                       msg=f"{name}, m = {m} peers, T = 2 (args.temperature)")

    def test_total(self):
        """L = CE(z_e) + sum_j [CE(z_j) + w (L_pe,j + L_pm,j)]: sums over the peers, not means."""
        w, t = 0.287, terms_by_hand()
        loss, _ = pcl.pcl_loss(LOGITS, ENS, MEAN, Y, w, pcl.Args())
        expected = t["ce/ens"] + t["ce/peers"] + w * (t["kd/ens"] + t["kd/mean"])
        self.assertAlmostEqual(loss.item(), expected, places=4)

    def test_ensemble_is_a_detached_target(self):
        """d L / d z_e = d CE(z_e) / d z_e: the KD terms send nothing into the ensemble logits."""
        ens = ENS.clone().requires_grad_(True)
        pcl.pcl_loss(LOGITS, ens, MEAN, Y, 1.0, pcl.Args())[0].backward()
        ref = ENS.clone().requires_grad_(True)
        F.cross_entropy(ref, Y).backward()
        torch.testing.assert_close(ens.grad, ref.grad, atol=1e-6, rtol=0,
                                   msg="the ensemble logits got gradient from the KD terms")

    def test_no_peer_learns_from_its_own_mean_teacher(self):
        """Peer 1's gradient ignores temporal-mean peer 1; peers 2 and 3 do learn from it."""
        def grad(mean):
            z = LOGITS.clone().requires_grad_(True)
            pcl.pcl_loss(z, ENS, mean, Y, 1.0, pcl.Args())[0].backward()
            return z.grad
        other = MEAN.clone()
        other[0] = other[0] * -3 + 1
        g1, g2 = grad(MEAN), grad(other)
        torch.testing.assert_close(g1[0], g2[0], msg="peer 1 distils from its own mean teacher")
        self.assertFalse(torch.allclose(g1[1], g2[1]), "peer 2 ignores mean teacher 1")


class TestTemporalMean(unittest.TestCase):
    def test_phi_schedule(self):
        """phi(g) = min(1 - 1/(g+1), beta): 0, 0.5, 0.9 at g = 0, 1, 9; beta from g = 999 on (beta =
        0.999), from g = 9 on with beta = 0.9 (--ema-decay)."""
        self.assertEqual([pcl.ema_decay(g, 0.999) for g in (0, 1)], [0.0, 0.5])
        self.assertAlmostEqual(pcl.ema_decay(9, 0.999), 0.9, places=12)
        self.assertLess(pcl.ema_decay(998, 0.999), 0.999)
        self.assertEqual([pcl.ema_decay(g, 0.999) for g in (999, 5000)], [0.999, 0.999])
        self.assertAlmostEqual(pcl.ema_decay(5, 0.9), 5 / 6, places=12, msg="phi(5), beta = 0.9")
        self.assertEqual([pcl.ema_decay(g, 0.9) for g in (50, 5000)], [0.9, 0.9], "phi(g) <= beta = 0.9")

    def test_update_formula(self):
        """theta' <- phi theta' + (1 - phi) theta, every parameter; BN buffers, student kept."""
        _, model, *_ = ready_to_step()
        with torch.no_grad():  # a student unlike its mean, BN running statistics included
            for p in model.student.parameters():
                p.add_(torch.randn_like(p))
            for b in model.student.buffers():
                if b.is_floating_point():
                    b.add_(0.5)
        old = [p.clone() for p in model.mean.parameters()]
        student = [p.clone() for p in model.student.parameters()]
        buffers = [b.clone() for b in model.mean.buffers()]
        pcl.ema_update(model.mean, model.student, 0.7)
        for new, o, theta in zip(model.mean.parameters(), old, student):
            torch.testing.assert_close(new, 0.7 * o + 0.3 * theta, atol=1e-6, rtol=1e-6)
            self.assertFalse(new.requires_grad, "a temporal-mean parameter requires grad")
        for p, before in zip(model.student.parameters(), student):
            self.assertTrue(torch.equal(p, before), "the student changed")
        for b, before in zip(model.mean.buffers(), buffers):
            self.assertTrue(torch.equal(b, before), "BN running statistics must not be averaged")


class TestModel(unittest.TestCase):
    def test_parameter_count(self):
        """ResNet-32, CIFAR-100: trunk + 3 peers + Linear(3 x 64 -> 100) = 1,212,384 parameters
        (the temporal mean has none), and the student's forward gives (m, B, C) and (B, C)."""
        model = pcl.build_model(pcl.Args(arch="resnet32"), 100)
        self.assertEqual(common.num_params(model), 1_212_384)
        logits, ens = model.student(torch.randn(2, 3, 32, 32))
        self.assertEqual((tuple(logits.shape), tuple(ens.shape)), ((3, 2, 100), (2, 100)))

    def test_ensemble_ce_reaches_trunk_and_peers(self):
        """CE(z_e) trains all student parameters but the peers' classifiers (features kept)."""
        _, model, _, _, x, y = ready_to_step()
        logits, ens = model.student(x)
        self.assertEqual((tuple(logits.shape), tuple(ens.shape)), ((3, 8, 10), (8, 10)))
        params = list(model.student.parameters())
        grads = torch.autograd.grad(F.cross_entropy(ens, y), params, allow_unused=True)
        reached = sum(g is not None and bool(g.any()) for g in grads)
        self.assertEqual(reached, len(params) - 2 * 3, "CE(z_e) must reach trunk and peers")

    def test_ensemble_teacher_per_image(self):
        """z_e of image b = head([h_1(b), ..., h_m(b)]): the head on THAT image's peer features,
        concatenated in peer order (eval mode); no image's z_e depends on another image."""
        _, model, *_ = ready_to_step()
        student = model.student.eval()  # BN on running statistics: the images are independent
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            _, ens = student(x)
            _, feats, _ = student.peers(x)  # (m, B, D)
            for b in range(4):
                want = student.head(torch.cat([feats[j, b] for j in range(3)]))
                torch.testing.assert_close(ens[b], want, atol=1e-5, rtol=1e-5,
                                           msg=f"z_e of image {b + 1} is not head([h_1, h_2, h_3]) "
                                               f"of image {b + 1}: are images mixed across the batch?")


class TestTrainStep(unittest.TestCase):
    def test_mean_updated_after_the_optimiser_step(self):
        """At step g = 5: mean <- phi mean + (1 - phi) student, phi = 5/6, the UPDATED student."""
        args, model, run, opts, x, y = ready_to_step()
        with torch.no_grad():
            for p in model.mean.parameters():
                p.add_(0.05 * torch.randn_like(p))
        before = copy.deepcopy(model)
        pcl.train_step(model, opts, x, y, epoch=0, step=5, run=run)
        for s, b in zip(model.student.parameters(), before.student.parameters()):
            if not torch.equal(s, b):
                break
        else:
            self.fail("the student took no optimiser step")
        triples = zip(model.mean.parameters(), before.mean.parameters(), model.student.parameters())
        for new, old, theta in triples:
            torch.testing.assert_close(new, 5 / 6 * old + 1 / 6 * theta, atol=1e-6, rtol=1e-6)

    def test_phi_capped_by_ema_decay(self):
        """At step g = 50 with --ema-decay 0.9: phi = min(50/51, 0.9) = 0.9, not 50/51."""
        args, model, run, opts, x, y = ready_to_step(ema_decay=0.9)
        old = [p.clone() for p in model.mean.parameters()]
        pcl.train_step(model, opts, x, y, epoch=0, step=50, run=run)
        for new, o, theta in zip(model.mean.parameters(), old, model.student.parameters()):
            torch.testing.assert_close(new, 0.9 * o + 0.1 * theta, atol=1e-6, rtol=1e-6,
                                       msg="phi(50) with --ema-decay 0.9 (run.args.ema_decay)")

    def test_returns_the_loss_logs(self):
        """train_step returns pcl_loss's logs (a dict of 0-d tensors with 'loss', which fit
        averages over the epoch and prints)."""
        args, model, run, opts, x, y = ready_to_step()
        with logs_seen(pcl, "pcl_loss") as seen:
            logs = step_logs(pcl.train_step(model, opts, x, y, epoch=0, step=0, run=run))
        self.assertEqual(sorted(logs), sorted(seen), "train_step must return pcl_loss's logs")

    def test_mean_teacher_gets_no_gradient(self):
        """Only the student's parameters are optimised; the temporal mean never gets a gradient."""
        args, model, run, opts, x, y = ready_to_step()
        pcl.train_step(model, opts, x, y, epoch=100, step=0, run=run)
        in_opt = {id(p) for o in opts.values() for g in o.param_groups for p in g["params"]}
        self.assertEqual(in_opt, {id(p) for p in model.student.parameters()})
        mean = list(model.mean.parameters())
        self.assertTrue(all(p.grad is None and not p.requires_grad for p in mean))

    def test_peer_j_and_mean_peer_k_see_their_own_view(self):
        """pcl_loss gets peer j and temporal-mean peer j, each on view x_j (the mean model's BN
        mode is another test's)."""
        args, model, run, opts, x, y = ready_to_step()
        before, seen, real = copy.deepcopy(model), {}, pcl.pcl_loss
        in_eval = copy.deepcopy(model.mean).eval()

        def spy(logits, ens, mean_logits, *rest):
            seen.update(logits=logits.detach().clone(), mean=mean_logits.detach().clone())
            return real(logits, ens, mean_logits, *rest)
        with mock.patch.object(pcl, "pcl_loss", spy):
            pcl.train_step(model, opts, x, y, epoch=0, step=0, run=run)
        with torch.no_grad():
            for j in range(3):
                peer, mean_peer = before.student.peers.single(j), before.mean.peers.single(j)
                torch.testing.assert_close(seen["logits"][j], peer(x[j]), atol=1e-5, rtol=0,
                                           msg=f"peer {j + 1} on view {j + 1}")
                either = [mean_peer(x[j]), in_eval.peers.single(j)(x[j])]  # train or eval mode
                self.assertTrue(any(torch.allclose(seen["mean"][j], t, atol=1e-5, rtol=0) for t in either),
                                f"temporal-mean peer {j + 1} on view {j + 1}")

    def test_mean_teacher_in_train_mode(self):
        """The temporal mean produces its targets in train mode (batch statistics), as fit leaves
        it, not in eval mode."""
        args, model, run, opts, x, y = ready_to_step()
        before, seen, real = copy.deepcopy(model), {}, pcl.pcl_loss

        def spy(logits, ens, mean_logits, *rest):
            seen.update(mean=mean_logits.detach().clone())
            return real(logits, ens, mean_logits, *rest)
        with mock.patch.object(pcl, "pcl_loss", spy):
            pcl.train_step(model, opts, x, y, epoch=0, step=0, run=run)
        with torch.no_grad():
            train_mode = before.mean(x)[0]  # (m, B, C), batch statistics
        torch.testing.assert_close(seen["mean"], train_mode, atol=1e-5, rtol=0,
                                   msg="the temporal mean must produce its targets in train mode "
                                       "(batch statistics), not eval mode")

    def test_rampup_weight_from_the_epoch(self):
        """train_step hands pcl_loss w(e) = exp(-5 (1 - e/L)^2) of the 0-based EPOCH e, the same at
        every step of that epoch (not a function of the global step), at --rampup-epochs L = 40 (not
        the default 80)."""
        args, model, run, opts, x, y = ready_to_step(rampup_epochs=40)
        seen, real = [], pcl.pcl_loss

        def spy(logits, ens, mean_logits, y, w, *rest):
            seen.append(float(w))
            return real(logits, ens, mean_logits, y, w, *rest)
        with mock.patch.object(pcl, "pcl_loss", spy):
            for epoch, step in ((0, 0), (20, 80), (20, 97), (40, 160)):
                pcl.train_step(model, opts, x, y, epoch=epoch, step=step, run=run)
        want = [math.exp(-5), math.exp(-5 / 4), math.exp(-5 / 4), 1.0]
        self.assertEqual(len(seen), 4, "train_step must call pcl_loss once")
        for got, w, at in zip(seen, want, ("w(0)", "w(20) at step 80", "w(20) at step 97", "w(40)")):
            self.assertAlmostEqual(got, w, places=6, msg=at)

    def test_ema_per_epoch(self):
        """--ema-per-epoch: no update inside the epoch; at its last step phi = phi(epoch), here
        phi(3) = min(0.75, 0.7) with --ema-decay 0.7."""
        args, model, run, opts, x, y = ready_to_step(ema_per_epoch=True, ema_decay=0.7)  # 2 steps/epoch
        old = [p.clone() for p in model.mean.parameters()]
        pcl.train_step(model, opts, x, y, epoch=3, step=6, run=run)
        self.assertTrue(all(torch.equal(a, b) for a, b in zip(model.mean.parameters(), old)))
        pcl.train_step(model, opts, x, y, epoch=3, step=7, run=run)
        for new, o, theta in zip(model.mean.parameters(), old, model.student.parameters()):
            torch.testing.assert_close(new, 0.7 * o + 0.3 * theta, atol=1e-6, rtol=1e-6)


class TestEvaluate(unittest.TestCase):
    def test_names_and_values(self):
        """peer1..m, pe_teacher, mt_peer1..m (mean trunk + mean peer j), pcl_e (their mean)."""
        _, model, *_ = ready_to_step()
        with torch.no_grad():
            for p in model.mean.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.eval()
        x = torch.randn(8, 3, 32, 32)
        with torch.no_grad():
            outs = pcl.evaluate(model, x)
            names = ["peer1", "peer2", "peer3", "pe_teacher", "mt_peer1", "mt_peer2", "mt_peer3"]
            self.assertEqual(set(models(outs)), {*names, "pcl_e"})
            for j in range(3):
                torch.testing.assert_close(outs[f"mt_peer{j + 1}"], model.mean.peers.single(j)(x))
                torch.testing.assert_close(outs[f"peer{j + 1}"], model.student.peers.single(j)(x))
            torch.testing.assert_close(outs["pe_teacher"], model.student(x)[1])
            mean_logits = torch.stack([outs[f"mt_peer{j}"] for j in (1, 2, 3)])
            torch.testing.assert_close(outs["pcl_e"], mean_logits.mean(0))


if __name__ == "__main__":
    unittest.main()
