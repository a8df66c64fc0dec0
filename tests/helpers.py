"""Shared test helpers: tiny CPU arguments, temporary output folders, running a script as a user would, a batch of
random images, and independent numpy / explicit-loop references for softmax, cross-entropy and the KD term."""
import contextlib
import math
import os
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # deterministic float sums, and two test processes share the two cores


def tmpdir(testcase):
    """A fresh temporary folder removed when the test ends."""
    d = tempfile.TemporaryDirectory()
    testcase.addCleanup(d.cleanup)
    return d.name


def tiny(Args, testcase, **kw):
    """Args for a tiny CPU run on the synthetic set (the real code path, small sizes)."""
    base = dict(arch="resnet8", dataset="fake", subset=512, test_subset=200, epochs=2, batch_size=64,
                device="cpu", out=os.path.join(tmpdir(testcase), "run"))
    base.update(kw)
    return Args(**base)


def run_script(*argv, timeout=300):
    """Run `python <argv...>` in the repository root; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def fake_run(args, n=64):
    """A common.Run on n synthetic CPU images, without an output folder: for calling a method's
    build_model / build_optimizers / train_step / evaluate directly."""
    import common
    x, y = common.make_fake(n, seed=1)
    f = x.float() / 255
    data = common.Data(x, y, x, y, f.mean(dim=(0, 2, 3), keepdim=True), f.std(dim=(0, 2, 3), keepdim=True),
                       [f"class{i}" for i in range(10)])
    return common.Run(args, "test", torch.device("cpu"), data, out="", amp=False, channels_last=False)


def normalised(run):
    """The run's training images as the network sees them (no augmentation) and their labels."""
    return (run.data.train_x.float() / 255 - run.data.mean) / run.data.std, run.data.train_y


class GradedLogs(dict):
    """A function's logs as the grader reads them: a missing key fails naming the key (the file's
    header lists the graded keys), not with a KeyError."""

    def __init__(self, logs, who):
        super().__init__(logs)
        self.who = who

    def __missing__(self, key):
        raise AssertionError(f"{self.who} must log {key!r} (a graded log key: see the file's "
                             f"GRADED block); it logged {sorted(self)}")


def models(outs):
    """The names of the models evaluate scores, in order: its internals ('int/...') left out."""
    return [k for k in outs if not k.startswith("int/")]


def graded(logs, who):
    return GradedLogs(logs, who)


@contextlib.contextmanager
def logs_seen(module, loss_name):
    """Within the block, every call of module.<loss_name> (a loss returning (loss, logs)) also records
    its logs into the dict the block receives."""
    seen, real = {}, getattr(module, loss_name)

    def spy(*a, **kw):
        loss, logs = real(*a, **kw)
        seen.update(logs)
        return loss, logs
    with mock.patch.object(module, loss_name, spy):
        yield seen


def step_logs(logs, who="train_step"):
    """train_step's return value as the grader reads it: the loss function's logs, a non-empty dict of
    0-d tensors with 'loss' (fit averages and prints them); anything else fails saying so."""
    ok = isinstance(logs, dict) and "loss" in logs and all(
        torch.is_tensor(v) and v.dim() == 0 for v in logs.values())
    if not ok:
        raise AssertionError(f"{who} must return the loss function's logs, a non-empty dict of 0-d "
                             f"tensors with 'loss' (got {logs!r:.80})")
    return graded(logs, who)


def assert_ramp_and_step(test, method, args, net, n=16):
    """A method with a ramp-up weight: train_step returns its loss's logs, and logs w(e) = exp(-5 (1 -
    e/L)^2) at e = L/2 (L = args.rampup_epochs, so an even non-default length catches a hard-coded 80)
    at any step of that epoch (the same value at two steps: w depends on the epoch only) and moves the
    weights. Returns (run, optimisers, x, y) for further checks."""
    run, e = fake_run(args, n), args.rampup_epochs // 2
    x, y = normalised(run)
    opt = method.build_optimizers(net, args)
    before = [p.detach().clone() for p in net.parameters()]
    a = step_logs(method.train_step(net, opt, x, y, epoch=e, step=0, run=run))["w"].item()
    moved = any(not torch.equal(p, q) for p, q in zip(net.parameters(), before))
    test.assertTrue(moved, "no optimiser step")
    b = step_logs(method.train_step(net, opt, x, y, epoch=e, step=7, run=run))["w"].item()
    test.assertAlmostEqual(a, math.exp(-5 / 4), places=6,
                           msg=f"w({e}) with --rampup-epochs {args.rampup_epochs}")
    test.assertEqual(a, b, "w depends on the epoch only")
    return run, opt, x, y


def three_steps(method, args, build_net):
    """Three method.train_step calls (batches 0:16, 16:32, 0:16 at epoch 0) on a 32-image fake run, with the net
    build_net() makes once the run exists and method.build_optimizers' optimisers. Returns the three losses and
    every parameter flattened into one tensor afterwards: what a same-seed-same-numbers test compares."""
    run = fake_run(args, 32)
    x, y = normalised(run)
    net = build_net()
    opt = method.build_optimizers(net, args)
    logs = [method.train_step(net, opt, x[i:i + 16], y[i:i + 16], 0, i, run)["loss"].item() for i in (0, 16, 0)]
    return logs, torch.cat([p.detach().flatten() for p in net.parameters()])


def assert_parts_disjoint(testcase, net, groups):
    """No module object and no parameter is shared between two of the parts in groups, and common.num_params(net)
    is the sum over the parts (each counted once)."""
    import common
    ids = [{id(mod) for mod in grp.modules()} for grp in groups]
    pids = [{id(p) for p in grp.parameters()} for grp in groups]
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            testcase.assertFalse(ids[i] & ids[j], f"module object shared between parts {i} and {j}")
            testcase.assertFalse(pids[i] & pids[j], f"parameter shared between parts {i} and {j}")
    testcase.assertEqual(common.num_params(net), sum(common.num_params(grp) for grp in groups))


def batch(n=8, seed=0):
    """n random (3, 32, 32) images from a seeded generator, with labels arange(n) % 10."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10


# ----- independent references (plain numpy and explicit loops; they do not use the code under test nor torch's
# losses). Inputs: numpy arrays or CPU tensors without grad, computed in float64. -----


def np_softmax(z):
    """softmax over the last axis: exp(z - max) / sum exp(z - max)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_ce(z, y):
    """Cross-entropy of logits z (B, C) with labels y (B,): (1/B) sum_b -log softmax(z_b)[y_b], by explicit loops."""
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y)
    return sum(-math.log(np_softmax(z[b])[y[b]]) for b in range(z.shape[0])) / z.shape[0]


def np_kd(student, teacher, T):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) = T^2 * (1/B) sum_b sum_c p_t log(p_t / p_s),
    p = softmax(z / T): summed over classes, / B, x T^2, by explicit loops. The teacher's distribution is the target."""
    student, teacher = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    total = 0.0
    for b in range(student.shape[0]):
        p_t, p_s = np_softmax(teacher[b] / T), np_softmax(student[b] / T)
        total += sum(p_t[c] * math.log(p_t[c] / p_s[c]) for c in range(student.shape[1]))
    return T * T * total / student.shape[0]


# ----- FFSD (official code, CIFARTrainer.py): numpy attention, distance and diversity target,
# and a hand-made FFSD.forward output dict. -----


def np_att(f):
    """A(F): mean over channels of F^2, flattened per sample."""
    return (f ** 2).mean(1).reshape(f.shape[0], -1)


def np_dist(u, v):
    u, v = u.reshape(u.shape[0], -1), v.reshape(v.shape[0], -1)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return ((u - v) ** 2).mean()


def np_div_target(a):
    """Eq. 8 by an explicit loop: kept below the K-th smallest, n/2 at it, n - y_hat above."""
    t = np.zeros_like(a)
    for b in range(a.shape[0]):
        n = math.sqrt(sum(v * v for v in a[b]))
        y_hat = [v / n for v in a[b]]
        tau = sorted(y_hat)[len(y_hat) // 3 - 1]
        for i, v in enumerate(y_hat):
            t[b, i] = v if v < tau else (n / 2 if v == tau else n - v)
    return t


def rand(g, *shape):
    return torch.randn(*shape, generator=g)


def fixed_outputs(M=2, B=3, C=4, seed=0):
    """A hand-made FFSD.forward-like dict: 3 stages (shallow maps 2x4x4 and 4x2x2 (last stage 3x3x3)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, 2, 4, 4), (B, 4, 2, 2), (B, 3, 3, 3)]
    feats = [[rand(g, *s) for s in shapes] for _ in range(M)]
    return {"z": rand(g, M, B, C), "feats": feats, "z_ld": rand(g, B, C), "feats_ld": [rand(g, *s) for s in shapes],
            "recon": rand(g, B, 3 * M, 3, 3), "concat": torch.cat([f[-1] for f in feats], 1),
            "fused": rand(g, B, 3, 3, 3), "z_f": rand(g, B, C),
            "sd_teach": [[rand(g, *s) for s in shapes[:-1]] for _ in range(M - 1)],
            "sd_teach_ld": [rand(g, *s) for s in shapes[:-1]],
            "sd_fit": [[rand(g, *s) for s in shapes[:-1]] for _ in range(M)]}


def npy(t):
    return t.detach().double().numpy()


def np_dist_att(f, g):
    """D(A(f), A(g)) in numpy, for torch maps."""
    return np_dist(np_att(npy(f)), np_att(npy(g)))


def np_leader_terms(out, y, lam, T):
    """Eqs. 5, 13-14 by hand on a fixed_outputs() dict: the leader's logged terms (lam = lambda_fusion
    x warm-up on the three feature terms)."""
    return {"ce/leader": np_ce(npy(out["z_ld"]), y),
            "kd/leader": np_kd(npy(out["z_ld"]), npy(out["z_f"]), T),
            "fmap/leader": lam * np_dist_att(out["feats_ld"][-1], out["fused"]),
            "recon/leader": lam * np_dist_att(out["recon"], out["concat"]),
            "sd/leader": lam * sum(np_dist_att(f, g) for f, g in zip(out["feats_ld"][:-1], out["sd_teach_ld"]))}


def no_fake_cuda():
    """Why this torch cannot make fake CUDA tensors on a machine without a GPU (older releases reach
    the CUDA driver for a fake tensor's random init), or None where it can: the fake-CUDA audits of
    test_cuda_rules and test_common skip with that reason (on the floor of requirements-oldest.txt)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    try:
        with FakeTensorMode(), torch.device("cuda"):
            torch.empty(2).uniform_()  # what building a network does
    except RuntimeError as e:
        return f"fake CUDA tensors fail on torch {torch.__version__}: {str(e).splitlines()[0]}"
    return None
