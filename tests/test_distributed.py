"""Multi-process training (beyond.py, section 3): a real 2-process torchrun launch on the CPU (gloo)
against a one-process reference that takes the two halves of every global batch separately (per-half
BatchNorm statistics, as per-process BatchNorm gives) and averages their gradients before every
optimiser step; identical processes; resume under torchrun; one-line launch errors.

SyncBatchNorm (--sync-bn) needs CUDA GPUs: the GPU check in docs/distributed.md covers it."""
import importlib
import json
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import torch

from helpers import ROOT, tmpdir  # noqa: F401  (helpers puts the repository on sys.path, 1 thread)
import beyond  # noqa: E402
import common

TINY = dict(arch="resnet8", dataset="fake", subset=32, test_subset=20, batch_size=16, device="cpu",
            seed=0)
# name: (method, extra fields); 32 images, global batches of 16 = 2 processes x 8: 2 steps/epoch.
RUNS = {"baseline-stop": ("baseline", dict(epochs=2, stop_after=1)),  # resumed by a second launch
        "ffsd": ("ffsd", dict(epochs=1)),  # six optimisers, two Adams; eval-mode SD teachers
        "pcl": ("pcl", dict(epochs=1))}    # three views; EMA teacher with train-mode BN buffers
# Float32, one thread in every process: the 2-process weights come out bitwise equal to the
# reference here; the tolerance only allows for another summation order (another gloo or BLAS).
TOL = dict(rtol=1e-6, atol=1e-8)
_DATA = []


def tiny_run(name, args):
    """A one-process common.Run on the TINY data (loaded once for the module)."""
    if not _DATA:
        _DATA.append(common.load_data(args, "cpu"))
    return common.Run(args, name, torch.device("cpu"), _DATA[0], "", False, False)


def flags(fields):
    out = []
    for k, v in fields.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def torchrun(dump, runs, nproc=2):
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join("tests", "dist_worker.py"), dump,
           json.dumps(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def loss_of(name, model, x, y, epoch, args):
    """The method's loss on one half batch, as its train_step computes it (without the steps)."""
    method = importlib.import_module(name)
    if name == "baseline":
        return method.baseline_loss(model(x), y, args)[0]
    if name == "ffsd":
        return method.ffsd_loss(model(x), y, args, common.sigmoid_rampup(epoch + 1, args.warmup_epochs))[0]
    logits, ens = model.student(x)  # pcl: x = the list of views
    with torch.no_grad():
        mean_logits, _ = model.mean(x)
    w = common.sigmoid_rampup(epoch, args.rampup_epochs)
    return method.pcl_loss(logits, ens, mean_logits, y, w, args)[0]


def reference(name, fields, epochs):
    """One process, state_dict after `epochs` epochs: each global batch (the batches and
    augmentations one process draws) as its two halves, one after the other, with per-half
    BatchNorm statistics; the gradients of the halves averaged; then every optimiser steps once.
    Running statistics: the first half's (rank 0's); the second half starts from the same ones as
    the first (as process 1 does)."""
    method = importlib.import_module(name)
    args = common.check_args(method.Args(**{**TINY, **fields, "out": ""}))
    run = tiny_run(name, args)
    common.seed_everything(args.seed)
    model = method.build_model(args, run.num_classes)
    opts = method.build_optimizers(model, args)
    params = list(model.parameters())
    base = {id(g): g["lr"] for o in opts.values() for g in o.param_groups}
    gen, step = torch.Generator().manual_seed(args.seed), 0
    views = args.num_peers if name == "pcl" else 1
    for epoch in range(epochs):
        for o in opts.values():
            for g in o.param_groups:
                g["lr"] = base[id(g)] * common.lr_factor(epoch, args)
        model.train()
        for x, y in common.train_batches(run, gen, views):
            h = len(y) // 2
            halves = [([v[:h] for v in x] if views > 1 else x[:h], y[:h]),
                      ([v[h:] for v in x] if views > 1 else x[h:], y[h:])]
            before = [b.clone() for b in model.buffers()]
            grads = []
            for k, (xh, yh) in enumerate(halves):
                if k == 1:  # process 1 starts from the same running statistics as process 0
                    after_first = [b.clone() for b in model.buffers()]
                    for b, v in zip(model.buffers(), before):
                        b.copy_(v)
                for o in opts.values():
                    o.zero_grad(set_to_none=True)
                loss_of(name, model, xh, yh, epoch, args).backward()
                grads.append([p.grad for p in params])
            with torch.no_grad():
                for b, v in zip(model.buffers(), after_first):
                    b.copy_(v)
            for p, g0, g1 in zip(params, *grads):
                p.grad = None if g0 is None else (g0 + g1) / 2
            for o in opts.values():
                o.step()
            if name == "pcl":
                method.ema_update(model.mean, model.student, method.ema_decay(step, args.ema_decay))
            step += 1
    return model.state_dict()


class TestTorchrun(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._dir = tempfile.TemporaryDirectory()
        d = cls._dir.name
        cls.out = {name: os.path.join(d, name) for name in RUNS}
        runs = [[name, method, flags({**TINY, **f, "out": cls.out[name]})]
                for name, (method, f) in RUNS.items()]
        cls.first = torchrun(d, runs)
        again = {**TINY, **RUNS["baseline-stop"][1], "out": cls.out["baseline-stop"]}
        resume = [["baseline-resume", "baseline", flags(again) + ["--resume"]]]
        cls.second = torchrun(d, resume) if cls.first.returncode == 0 else cls.first
        cls.dumps = {}
        for name in list(RUNS) + ["baseline-resume"]:
            paths = [os.path.join(d, f"{name}-rank{r}.pt") for r in (0, 1)]
            if all(os.path.exists(p) for p in paths):
                cls.dumps[name] = [torch.load(p) for p in paths]

    @classmethod
    def tearDownClass(cls):
        cls._dir.cleanup()

    def test_launches_succeed_and_only_rank0_prints(self):
        for res in (self.first, self.second):
            self.assertEqual(res.returncode, 0, res.stderr[-3000:])
        out = self.first.stdout
        said = "torchrun: 2 processes (gloo), 8 images of every global batch of 16 each"
        self.assertEqual(out.count(said), 3)  # one line per run, from rank 0 only
        self.assertEqual(out.count("stopped after epoch 1 of 2"), 1)
        self.assertIn("continue with: torchrun --nproc-per-node=2 ", out)
        self.assertEqual(self.second.stdout.count("final | net "), 1)
        with open(os.path.join(self.out["baseline-stop"], "final.json")) as f:
            final = json.load(f)
        self.assertEqual((final["processes"], final["sync_bn"]), (2, False))
        self.assertTrue(final["command"].startswith("torchrun --nproc-per-node=2 dist_worker.py "))
        self.assertEqual(self.second.stdout.count("resumed from"), 1)
        # rank 0 alone wrote: one checkpoint, one metrics row per epoch
        with open(os.path.join(self.out["baseline-stop"], "metrics.jsonl")) as f:
            self.assertEqual([json.loads(line)["epoch"] for line in f], [1, 2])

    def test_processes_hold_identical_weights_and_buffers(self):
        runs = set(RUNS) | {"baseline-resume"}
        self.assertEqual(set(self.dumps), runs, self.first.stderr[-2000:])
        for name, (r0, r1) in self.dumps.items():
            for k in r0:
                with self.subTest(run=name, tensor=k):
                    self.assertTrue(torch.equal(r0[k], r1[k]))

    def test_two_processes_equal_two_half_batches_with_averaged_gradients(self):
        for name, (method, fields) in RUNS.items():
            with self.subTest(run=name):
                ref = reference(method, fields, epochs=1)
                got = self.dumps[name][0]
                self.assertEqual(set(got), set(ref))
                for k in ref:  # every parameter and buffer (BN running statistics: rank 0's)
                    torch.testing.assert_close(got[k], ref[k], **TOL, msg=f"{name}: {k}")
        # The comparison can fail: one process on the whole batch of 16 (BN statistics over 16
        # images) is another run, farther from the 2-process one than the tolerance.
        whole = importlib.import_module("baseline")
        args = common.check_args(whole.Args(**{**TINY, "epochs": 1, "out": ""}))
        run = tiny_run("baseline", args)
        common.seed_everything(0)
        net = whole.build_model(args, 10)
        opts = whole.build_optimizers(net, args)
        gen = torch.Generator().manual_seed(0)
        for g in opts["sgd"].param_groups:
            g["lr"] *= common.lr_factor(0, args)
        for i, (x, y) in enumerate(common.train_batches(run, gen)):
            whole.train_step(net, opts, x, y, 0, i, run)
        got = self.dumps["baseline-stop"][0]
        self.assertFalse(all(torch.allclose(got[k], v, **TOL) for k, v in net.state_dict().items()))

    def test_resume_under_torchrun_continues_the_run(self):
        ref = reference("baseline", RUNS["baseline-stop"][1], epochs=2)
        got = self.dumps["baseline-resume"][0]
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **TOL, msg=k)


class TestLaunchErrors(unittest.TestCase):
    """The checks dist_setup makes before joining the process group, here (WORLD_SIZE faked)."""

    def setup_error(self, env, drop=(), **fields):
        env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", **env}
        baseline = importlib.import_module("baseline")
        args = baseline.Args(**{**TINY, "out": os.path.join(tmpdir(self), "run"), **fields})
        with mock.patch.dict(os.environ, env), self.assertRaises(SystemExit) as e:
            for k in drop:
                os.environ.pop(k, None)
            common.setup(args, "baseline")
        self.assertFalse(beyond.world() > 1)  # nothing joined
        return str(e.exception)

    def test_batch_not_divisible_by_processes(self):
        msg = self.setup_error({}, batch_size=15)
        self.assertEqual(msg, "error: --batch-size 15 is not divisible by the 2 processes torchrun "
                              "started (each takes batch-size / processes images of every global "
                              "batch)")

    def test_sync_bn_needs_gpus(self):
        self.assertIn("--sync-bn needs CUDA GPUs", self.setup_error({}, sync_bn=True))

    def test_missing_backend(self):
        with mock.patch.object(beyond.dist, "is_gloo_available", return_value=False):
            self.assertEqual(self.setup_error({}), "error: torchrun on CPU needs the gloo backend, "
                                                   "which this PyTorch build lacks")
        with mock.patch.object(beyond.dist, "is_available", return_value=False):
            self.assertIn("has no torch.distributed", self.setup_error({}))

    def test_no_rendezvous_is_one_line(self):
        msg = self.setup_error({}, drop=("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
        self.assertTrue(msg.startswith("error: torchrun: cannot join the process group ("), msg)
        self.assertNotIn("\n", msg)

    def test_other_ranks_exit_without_a_message(self):
        with mock.patch.object(common.time, "sleep") as sleep:
            msg = self.setup_error({"RANK": "1", "LOCAL_RANK": "1"}, batch_size=15)
        self.assertEqual(msg, "1")  # SystemExit(1): status 1, nothing printed; rank 0 says it
        sleep.assert_called_once()


if __name__ == "__main__":
    unittest.main()
