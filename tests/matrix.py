"""Method x backbone matrix (driven by tests/test_matrix_a.py and test_matrix_b.py, one half of the backbones
each, so the two-process runner runs them side by side).

For every method file present and every backbone: build_model(args, 10), build_optimizers, one
train_step(model, optimizers, x, y, 0, 0, run) on a batch of 2 CPU images, then check
  - every logged term (and 'loss') is a finite scalar;
  - every trainable parameter (requires_grad) got a finite gradient, except the names a method lists in
    NO_GRAD below with the reason;
  - every trainable parameter is in exactly one optimiser, and every optimiser stepped;
  - evaluate(model, x) in eval mode gives finite (2, 10) logits for every model it names;
  - deployed_net(model, args) loads strictly into build_backbone(arch, 10), computing one of those.
The method list is fixed; a method file that is absent is reported as a skipped test with its name (never a
silent pass), so after the merge every method is covered without editing this file.
"""
import importlib
import os
import sys

import torch

from helpers import ROOT, fake_run, tmpdir
import common

METHODS = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]
# Methods whose train_step takes x as a list of independently augmented views: the Args field with its count.
VIEWS = {"pcl": "num_peers"}
# Trainable parameters that legitimately receive no gradient from one train_step: {method: (name prefix, ...)}.
# None so far; a method adding an entry must say why next to it.
NO_GRAD = {}
# The heavier half of the backbones (by MACs) goes to test_matrix_a, the rest (including any backbone added
# later) to test_matrix_b.
HALF_A = ["googlenet", "wrn20_8", "densenet40_12_plain", "wrn40_2", "resnet110_basic", "resnet8", "resnet56"]
# The ImageNet ResNet-18/34 need images of 64 px or more (at 32 px their last maps are 1x1): every method
# on them is tested at 64 px in test_beyond.py, not here.
IMAGENET = ["resnet18", "resnet34"]
HALF_B = [a for a in common.BACKBONES if a not in HALF_A + IMAGENET]


def load_method(name):
    """The method module, or None when <name>.py is not in this checkout."""
    if not os.path.isfile(os.path.join(ROOT, f"{name}.py")):
        return None
    return importlib.import_module(name)


class MatrixChecks:
    """Mixed into a unittest.TestCase with a class attribute ARCHS (the backbones to cover)."""
    ARCHS = []

    def check_method(self, name):
        mod = load_method(name)
        if mod is None:
            print(f"matrix: {name}.py absent, not covered", file=sys.stderr)
            self.skipTest(f"{name}.py is not in this checkout")
        for arch in self.ARCHS:
            with self.subTest(method=name, arch=arch):
                self.check_pair(mod, name, arch)
        print(f"matrix: {name} covered on {len(self.ARCHS)} backbones: {', '.join(self.ARCHS)}", file=sys.stderr)

    def check_pair(self, mod, name, arch):
        torch.manual_seed(0)
        # lr 1e-4: a full-size step (0.1) on a batch of 2 makes BatchNorm gradients of the deepest nets large
        # (|grad| ~ 800 in resnet164), and with running statistics from those 2 images eval-mode logits then
        # overflow (NaN). That says nothing about the code under test; a small step keeps them finite.
        args = mod.Args(arch=arch, dataset="fake", device="cpu", batch_size=2, lr=1e-4,
                        out=os.path.join(tmpdir(self), "run"))
        run = fake_run(args, n=2)
        data = run.data
        x = (data.train_x.float() / 255 - data.mean) / data.std  # (2, 3, 32, 32), one image of class 0 and 1
        y = data.train_y
        xs = [x + 0.1 * torch.randn_like(x) for _ in range(getattr(args, VIEWS[name]))] if name in VIEWS else x
        model = mod.build_model(args, 10)
        optimizers = mod.build_optimizers(model, args)
        model.train()
        logs = mod.train_step(model, optimizers, xs, y, 0, 0, run)

        self.assertIn("loss", logs)
        for k, v in logs.items():
            self.assertEqual(v.numel(), 1, k)
            self.assertTrue(torch.isfinite(v).all(), f"log {k!r} = {v}")
            self.assertFalse(v.requires_grad, f"log {k!r} is not detached")

        exempt = NO_GRAD.get(name, ())
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.assertTrue(trainable)
        for n, p in trainable:
            if n.startswith(exempt) and exempt:
                continue
            self.assertIsNotNone(p.grad, f"{n} got no gradient")
            self.assertTrue(torch.isfinite(p.grad).all(), f"{n} has a non-finite gradient")

        owner = {}
        for opt_name, opt in optimizers.items():
            for g in opt.param_groups:
                for p in g["params"]:
                    self.assertNotIn(id(p), owner, f"a parameter is in optimisers {owner.get(id(p))} and {opt_name}")
                    owner[id(p)] = opt_name
            self.assertTrue(opt.state, f"optimiser {opt_name!r} did not step")
        for n, p in trainable:
            self.assertIn(id(p), owner, f"trainable {n} is in no optimiser")

        model.eval()
        with torch.no_grad():
            outs = mod.evaluate(model, x)
        self.assertTrue(outs)
        for model_name, logits in outs.items():
            if common.is_internal(model_name):  # per-sample values: (2, ...)
                self.assertEqual(logits.shape[0], 2, model_name)
                self.assertTrue(torch.isfinite(logits).all(), model_name)
                continue
            self.assertEqual(tuple(logits.shape), (2, 10), model_name)
            self.assertTrue(torch.isfinite(logits).all(), model_name)

        # deployed.pt's network: the plain backbone (built on the meta device: no init cost) takes
        # its state_dict strictly, and alone computes exactly one of the models the method scores.
        with torch.device("meta"):
            plain = common.build_backbone(arch, 10)
        plain.load_state_dict(mod.deployed_net(model, args).state_dict(), strict=True, assign=True)
        with torch.no_grad():
            z = plain.eval()(x)
        self.assertTrue([k for k, v in outs.items() if torch.equal(z, v)], "deployed: no model")

    # One test per method (explicit, so a missing method shows up by name as a skip).
    def test_baseline(self):
        self.check_method("baseline")

    def test_dml(self):
        self.check_method("dml")

    def test_one(self):
        self.check_method("one")

    def test_okddip(self):
        self.check_method("okddip")

    def test_pcl(self):
        self.check_method("pcl")

    def test_ffsd(self):
        self.check_method("ffsd")
