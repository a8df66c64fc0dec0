"""CUDA's rules, checked on a CPU: every method's train_step and evaluate under CUDA's bf16
autocast, without a GPU. A CUDA step must not synchronise the host, must keep everything a method
computes on top of its networks (attention, gates, targets, loss terms, KL/CE inputs, the EMA) in
float32, must not mix devices, and must not bake a per-epoch Python number into its kernels.

What is real and what is emulated:
- Real: CUDA's autocast op lists. Model, batch, optimiser state and data are fake CUDA tensors
  (FakeTensorMode: shapes, dtypes and devices are computed, no data), and torch.autocast('cuda',
  bfloat16) dispatches through the CUDA autocast kernels as on a GPU: e.g. an einsum of .float()
  inputs comes out bf16. (torch.autocast's constructor refuses 'cuda' without a driver, so
  torch.cuda.is_available / is_bf16_supported are patched while Run.autocast builds it; nothing
  else is patched.)
- Real: every aten op as it reaches the backend, after autocast's casts, is seen by Audit (a
  TorchDispatchMode) with its dtypes and devices; fake tensors raise on a device mix.
- Emulated: backward. The autograd engine needs a CUDA driver even for fake tensors, so
  loss.backward() is replaced by a walk of the autograd graph that gives every parameter it reaches
  a zero gradient; the optimiser step and PCL's EMA then run on exactly those parameters. Backward's
  own ops are audited for host syncs on real CPU tensors (test_backward_and_step_on_cpu_never_sync).
- Emulated: the fused SGD/Adam kernels have no fake implementation; Audit checks their arguments
  (one device, float32, the LR a device tensor) and skips them.
- Emulated: PCL's temporal-mean model is built as a fresh PeerNet, not a deepcopy (a deepcopy of
  fake tensors corrupts memory in this torch build).
- Not checked: numerics (no kernel computes anything), cuDNN/cuBLAS choices, memory, streams.

Rules (each violation names the op, its dtypes and the module it ran in):
 1. no host sync inside train_step: no .item(), bool(), float() of a device tensor
    (aten._local_scalar_dense, aten.is_nonzero), no copy between host and device (a tensor built
    from a Python number, .cpu()), no op whose output shape depends on data (nonzero,
    masked_select, ...), no tensor made on the host;
 2. outside the networks (declared per method in NETWORKS: backbones and branches with their
    classifiers, PCL's ensemble head, FFSD's fusion module, decoder and SD modules) no op computes
    in a 16-bit float; every softmax / log_softmax runs in float32; the loss and every logged term
    are float32 scalars on the device; foreach (EMA) ops are float32; evaluate's arg-max gets
    float32 logits;
 3. two steps at different epochs and steps issue the same ops with the same non-tensor arguments
    (no Python number baked into a kernel; Run.scalar's in-place fill_ of a 0-d tensor is the one
    exception: it is how such numbers reach the device).
"""
import contextlib
import unittest
import warnings
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                           DynamicOutputShapeException, FakeTensorMode)
from torch.nn.modules import module as nn_module
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helpers import fake_run, no_fake_cuda  # helpers also sets sys.path and threads
import common

aten = torch.ops.aten
LOW = (torch.bfloat16, torch.float16)
SYNCS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal}
DATA_SHAPED = {aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim,
               aten.unique_consecutive}
MOVES = {aten._to_copy, aten.copy_, aten.clone, aten.cat, aten.stack, aten._unsafe_view,
         aten.lift_fresh, aten.lift_fresh_copy, aten.empty_like, aten.zeros_like, aten.new_empty,
         aten.new_zeros, aten.empty_strided}  # ops that only move, copy, cast or allocate
FUSED = {aten._fused_sgd_, aten._fused_adam_, aten._fused_adamw_}
SOFTMAX = {aten._softmax, aten._log_softmax}
PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)

# The modules whose layers may run in bf16 under autocast (networks: convolutions, BN, classifiers).
# Everything else a method computes must stay float32.
NETWORKS = {
    "baseline": lambda m: [m],
    "dml": lambda m: [m],
    "one": lambda m: [m.net],  # not the gate: it feeds a softmax over the branches
    "okddip": lambda m: [m.net],  # not W_q, W_k: they feed the softmax over the peers
    # the ensemble head is a classifier like every peer's fc (its logits are cast before the loss)
    "pcl": lambda m: [m.student.peers, m.student.head, m.mean.peers, m.mean.head],
    "ffsd": lambda m: list(m.children()),  # students, leader, decoder, fusion, SD modules
}


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class Audit(TorchDispatchMode):
    """Records every aten op (after autocast) and the rules it breaks. stack: the modules now
    running (innermost last); networks: ids of every module inside a declared network. step=True:
    a training step's rules (no syncs); False: evaluation (syncs allowed). on_device=False: real
    CPU tensors (only the sync rules mean something there)."""

    def __init__(self, stack, networks, step=True, on_device=True):
        super().__init__()
        self.stack, self.networks, self.step, self.on_device = stack, networks, step, on_device
        self.problems, self.trace, self.in_optimizer, self.bf16_in_networks = [], [], False, 0

    def flag(self, what):
        where = type(self.stack[-1]).__name__ if self.stack else "method code"
        self.problems.append(f"{what} (in {where})")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pkt, ins = func.overloadpacket, _tensors((args, kwargs))
        sig = tuple((t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else
                    t if isinstance(t, PLAIN) else type(t).__name__
                    for t in tree_flatten((args, kwargs))[0])
        if not (pkt is aten.fill_ and ins and ins[0].dim() == 0):  # Run.scalar's update: ignored
            self.trace.append((str(func), sig))
        if pkt in SYNCS:
            # Reading a host tensor is no sync; on real CPU tensors the CPU optimisers' own .item()
            # calls are not GPU syncs either (CUDA runs the fused kernels, audited on fake CUDA).
            on_host = self.on_device and all(t.device.type == "cpu" for t in ins)
            if self.step and not on_host and (self.on_device or not self.in_optimizer):
                self.flag(f"host sync: {func}")
            return 1 if self.on_device else func(*args, **kwargs)  # a fake has no value: a stand-in
        if pkt in DATA_SHAPED and self.step:
            self.flag(f"host sync: {func} (data-dependent output shape)")
        if pkt in FUSED:
            self.check_fused(func, args, kwargs)
            if self.on_device:
                return None  # no fake kernel: arguments checked, update skipped
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            self.flag(f"host sync: {func} (data-dependent output shape)")
            raise
        outs = _tensors(out)
        inside = bool(self.stack) and id(self.stack[-1]) in self.networks
        dtypes = [str(t.dtype).replace("torch.", "") for t in ins + outs]
        if self.on_device and self.step:
            if pkt in (aten._to_copy, aten.copy_) and len({t.device.type for t in ins + outs}) > 1:
                self.flag(f"host sync: {func} copies between host and device")
            elif any(t.device.type == "cpu" for t in outs):
                self.flag(f"host tensor: {func} makes a tensor on the host")
        if not func.is_view and pkt not in MOVES and any(t.dtype in LOW for t in outs):
            if inside:
                self.bf16_in_networks += 1  # autocast is on: the networks' layers run in bf16
            else:
                self.flag(f"{func} computes in {dtypes} outside the networks")
        if pkt in SOFTMAX and any(t.dtype != torch.float32 for t in ins + outs):
            self.flag(f"{func} not in float32: {dtypes}")
        if str(pkt).split(".")[-1].startswith("_foreach_") and not inside and \
                any(t.is_floating_point() and t.dtype != torch.float32 for t in ins + outs):
            self.flag(f"EMA/foreach {func} not in float32: {dtypes}")
        if pkt is aten.argmax and ins[0].dtype != torch.float32:
            self.flag(f"scored logits are {ins[0].dtype} at {func}")
        return out

    def check_fused(self, func, args, kwargs):
        ts, lr = _tensors(args), kwargs.get("lr")
        if len({t.device for t in ts}) > 1 or any(t.dtype != torch.float32 for t in args[0]):
            self.flag(f"{func}: parameters and state not all float32 on one device")
        if self.on_device and not (isinstance(lr, torch.Tensor) and lr.device == ts[0].device):
            self.flag(f"{func}: the LR is {lr!r}, not a tensor on {ts[0].device} (baked into the "
                      f"step)")


@contextlib.contextmanager
def module_stack():
    """The modules whose forward is running, innermost last (global forward hooks)."""
    stack = []

    def enter(mod, inputs):
        stack.append(mod)

    def leave(mod, inputs, output):  # returns None: the output stays as it is
        stack.pop()
    pre = nn_module.register_module_forward_pre_hook(enter)
    post = nn_module.register_module_forward_hook(leave, always_call=True)
    try:
        yield stack
    finally:
        pre.remove()
        post.remove()


@contextlib.contextmanager
def optimizer_steps(audit):
    """Sets audit.in_optimizer while any optimiser steps (global step hooks)."""
    def enter(opt, args, kwargs):
        audit.in_optimizer = True

    def leave(opt, args, kwargs):
        audit.in_optimizer = False
    handles = [register_optimizer_step_pre_hook(enter), register_optimizer_step_post_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fake_backward(loss, *a, **kw):
    """Stands in for loss.backward() on fake CUDA tensors: the loss must be a float32 scalar; every
    parameter the autograd graph reaches gets a zero gradient (then the optimisers step those)."""
    assert loss.dtype == torch.float32 and loss.dim() == 0, f"loss {loss.dtype} {tuple(loss.shape)}"
    seen, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable") and fn.variable.grad is None:
            fn.variable.grad = torch.zeros_like(fn.variable)
        todo.extend(f for f, _ in fn.next_functions)


def cuda_autocast(run):
    """Run.autocast as on a GPU: torch.autocast('cuda') built with CUDA's availability patched."""
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "is_bf16_supported", return_value=True):
        return common.Run.autocast(run)


def method_args(name, **kw):
    method = __import__(name)
    return method, method.Args(arch="resnet8", dataset="fake", device="cpu", batch_size=8,
                               eval_batch_size=16, **kw)


def audit_on_fake_cuda(name, epochs=((0, 0), (0, 1), (200, 60000)), **kw):
    """Build method `name` on fake CUDA and run train_step at each (epoch, step), then
    evaluate_all. Returns (audits of the steps, audit of evaluate_all, logs of the last step)."""
    method, args = method_args(name, **kw)
    with warnings.catch_warnings(), FakeTensorMode(), torch.device("cuda"):
        warnings.simplefilter("ignore")  # 'CUDA is not available' from autocast(enabled=False)
        with contextlib.ExitStack() as patches:
            if name == "pcl":  # deepcopy of fake tensors breaks memory here: a fresh mean model
                patches.enter_context(mock.patch("copy.deepcopy", lambda student: method.PeerNet(
                    args.arch, 10, args.num_peers)))
            model = method.build_model(args, 10)
        opts = method.build_optimizers(model, args)
        x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
        y = torch.arange(32) % 10
        mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
        data = common.Data(x, y, x, y, mean, std, [f"c{i}" for i in range(10)])
        run = common.Run(args, name, torch.device("cuda"), data, out="", amp=True,
                         channels_last=True)
        run.autocast = lambda: cuda_autocast(run)
        views = args.num_peers if name == "pcl" else 1
        batch = [run.layout((x[:8].float() / 255 - mean) / std) for _ in range(views)]
        networks = {id(m) for net in NETWORKS[name](model) for m in net.modules()}
        steps = []
        with module_stack() as stack, mock.patch.object(torch.Tensor, "backward", fake_backward):
            for epoch, step in epochs:
                common.set_lr(run, opts, epoch)
                audit = Audit(stack, networks)
                with audit:
                    xb = batch[0] if views == 1 else batch
                    logs = method.train_step(model, opts, xb, y[:8], epoch, step, run)
                steps.append(audit)
            evaluation = Audit(stack, networks, step=False)
            with evaluation:
                common.evaluate_all(run, model, method.evaluate)
    return steps, evaluation, logs


def first_difference(a, b):
    for i, (p, q) in enumerate(zip(a, b)):
        if p != q:
            return f"op {i}: {p[0]} {p[1]} vs {q[1]}"
    return None if len(a) == len(b) else f"{len(a)} vs {len(b)} ops"


NO_FAKE_CUDA = no_fake_cuda()


@unittest.skipIf(NO_FAKE_CUDA, str(NO_FAKE_CUDA))
class CudaRules(unittest.TestCase):
    maxDiff = None  # every violation in the report

    def check_method(self, name, **kw):
        steps, evaluation, logs = audit_on_fake_cuda(name, **kw)
        problems = [f"train_step: {p}" for p in sorted({p for a in steps for p in a.problems})]
        problems += [f"evaluate: {p}" for p in sorted(set(evaluation.problems))]
        problems += [f"log {k!r} is {v.dtype} {tuple(v.shape)} on {v.device.type}"
                     for k, v in logs.items()
                     if (v.dtype, v.dim(), v.device.type) != (torch.float32, 0, "cuda")]
        # rule 3: the step at epoch 200 (after an LR milestone, ramp-ups done) runs the same
        # kernels, with the same arguments, as the one at epoch 0
        diff = first_difference(steps[1].trace, steps[2].trace)
        if diff:
            problems.append(f"a Python number differs between the steps of epochs 0 and 200 "
                            f"(baked into the step): {diff}")
        self.assertEqual(problems, [], f"{name}{' ' + str(kw) if kw else ''} breaks CUDA's rules")
        # the audit saw a bf16 forward, the fused optimiser step(s) and the scoring
        self.assertGreater(steps[1].bf16_in_networks, 0)
        self.assertTrue(any("_fused_sgd_" in op for op, _ in steps[1].trace))
        self.assertTrue(any("argmax" in op for op, _ in evaluation.trace))

    def test_baseline(self):
        self.check_method("baseline")

    def test_dml(self):
        self.check_method("dml")
        self.check_method("dml", update="sequential")

    def test_one(self):
        self.check_method("one")

    def test_okddip(self):
        self.check_method("okddip")
        self.check_method("okddip", exclude_self=True)

    def test_pcl(self):
        self.check_method("pcl")

    def test_ffsd(self):
        self.check_method("ffsd")

    def test_the_audit_sees_what_it_must_refuse(self):
        """The rules fire: a bf16 einsum of .float() inputs, a tensor from a Python number, an
        .item() and a Python LR, each in a step on fake CUDA."""
        with warnings.catch_warnings(), FakeTensorMode(), torch.device("cuda"), \
                module_stack() as stack:
            warnings.simplefilter("ignore")
            lin = torch.nn.Linear(4, 4)
            opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, fused=True)
            run = common.Run(None, "x", torch.device("cuda"), None, out="", amp=True,
                             channels_last=False)
            audit = Audit(stack, {id(lin)})
            with audit, cuda_autocast(run):
                h = lin(torch.randn(2, 4))  # inside a network: bf16 allowed
                e = torch.einsum("ab,cb->ac", h.float(), h.float())  # autocast lowers it anyway
                F.softmax(e, -1).sum().item()
                e.new_tensor(0.5)
                for p in lin.parameters():
                    p.grad = torch.zeros_like(p)
                opt.step()
        text = "\n".join(audit.problems)
        self.assertRegex(text, r"aten\.bmm.*computes in .*bfloat16.* outside the networks")
        self.assertIn("host sync: aten._local_scalar_dense", text)
        self.assertIn("copies between host and device", text)
        self.assertIn("the LR is 0.1", text)
        self.assertNotIn("addmm", text)  # the Linear inside the declared network may run in bf16


class HostSyncsOnCpu(unittest.TestCase):
    def test_backward_and_step_on_cpu_never_sync(self):
        """Real CPU tensors, real backward and optimiser steps (what the fake run emulates): no op
        that would synchronise a GPU (.item(), bool(), data-dependent shapes) in any train_step."""
        for name in NETWORKS:
            with self.subTest(method=name):
                method, args = method_args(name)
                torch.manual_seed(0)
                run = fake_run(args, 16)
                model = method.build_model(args, 10)
                opts = method.build_optimizers(model, args)
                common.set_lr(run, opts, 0)
                x = (run.data.train_x[:8].float() / 255 - run.data.mean) / run.data.std
                views = [x, x.flip(-1), x.flip(-2)][:args.num_peers] if name == "pcl" else x
                with module_stack() as stack:
                    audit = Audit(stack, set(), on_device=False)
                    with optimizer_steps(audit), audit:
                        method.train_step(model, opts, views, run.data.train_y[:8], 0, 0, run)
                syncs = [p for p in audit.problems if p.startswith("host sync")]
                self.assertEqual(syncs, [])
                # backward ran under the audit
                self.assertTrue(any("convolution_backward" in op for op, _ in audit.trace))


if __name__ == "__main__":
    unittest.main()
