"""--compile: torch.compile of the networks' forward gives eager's numbers up to float rounding,
keeps the state_dict (checkpoints, resume, the deployed export) as it is, and reaches every module a
method calls.

Tolerance: compiled (inductor) kernels fuse and reorder float operations, so a compiled step differs
from the eager one in the last bits, and training amplifies such differences step by step. Measured
on this test's setting (resnet8, batches of 32, lr 0.1, CPU): the first step's loss agrees to ~1e-7
relative, the fourth's to ~6e-6 on torch 2.14 and to 1.5e-4 on torch 2.3.1 and 2.4.1 (another
inductor, other fusions); the test allows 5e-4 relative for the losses of 4 steps and for the
weights after them (the loss moves by 11-19 % a step: a step lost or done twice is far outside
it). A real compilation takes ~30 s on two CPU cores, so there is one, in one test.
"""
import contextlib
import io
import json
import os
import unittest
from unittest import mock

import torch

from helpers import fake_run, tiny
import baseline
import common
import dml
import pcl

TOL = 5e-4  # relative; see the module docstring


class Compile(unittest.TestCase):
    def test_compiled_steps_match_eager_and_the_state_dict_is_unchanged(self):
        args = baseline.Args(arch="resnet8", dataset="fake", device="cpu", batch_size=32)
        run = fake_run(args, 64)
        x, y = (run.data.train_x.float() / 255 - run.data.mean) / run.data.std, run.data.train_y

        def four_steps(compiled):
            torch.manual_seed(0)
            net = baseline.build_model(args, 10)
            keys = list(net.state_dict())
            if compiled:
                common.compile_model(net)
            opts = baseline.build_optimizers(net, args)
            losses = [baseline.train_step(net, opts, x[s:s + 32], y[s:s + 32], 0, i, run)["loss"]
                      .item() for i, s in enumerate((0, 32, 0, 32))]
            return net, keys, losses, torch.cat([p.detach().flatten() for p in net.parameters()])

        eager, keys, eager_losses, eager_w = four_steps(False)
        net, keys_before, losses, w = four_steps(True)
        torch._dynamo.reset()
        self.assertIsNotNone(getattr(net, "_compiled_call_impl", None))  # it did run compiled
        for a, b in zip(eager_losses, losses):
            self.assertLess(abs(a - b) / abs(a), TOL, (eager_losses, losses))
        self.assertLess(float((w - eager_w).norm() / eager_w.norm()), TOL)
        self.assertNotEqual(eager_losses[0], eager_losses[-1])  # it trained: not an idle comparison
        self.assertEqual(list(net.state_dict()), keys_before)  # no '_orig_mod.' prefix
        self.assertEqual(list(net.state_dict()), list(eager.state_dict()))
        eager.load_state_dict(net.state_dict())  # a compiled run's weights load into an eager model

    def test_fit_compiles_every_module_a_method_calls_and_drops_the_last_batch(self):
        calls = []
        with mock.patch.object(torch.nn.Module, "compile", lambda m, **kw: calls.append((m, kw))):
            # 40 images in batches of 16: 2 full steps per epoch; the 8 left over are dropped
            args = tiny(dml.Args, self, compile=True, subset=40, test_subset=20, batch_size=16,
                        epochs=1)
            with contextlib.redirect_stdout(io.StringIO()):
                dml.main(args)
            self.assertEqual([type(m).__name__ for m, _ in calls], ["Net", "Net"])  # each peer
            self.assertEqual(calls[0][1], {"dynamic": False})
            with open(os.path.join(args.out, "metrics.jsonl")) as f:
                self.assertEqual(json.loads(f.readline())["images"], 32)
            calls.clear()
            model = pcl.build_model(pcl.Args(arch="resnet8"), 10)
            common.compile_model(model)
            # PCL itself has no forward: its student and temporal mean are compiled
            self.assertEqual([m for m, _ in calls], [model.student, model.mean])


if __name__ == "__main__":
    unittest.main()
