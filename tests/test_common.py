"""common.py: augmentation, data sources, backbones, branching, schedule, KD helper, CLI and file structure."""
import ast
import dataclasses
import hashlib
import os
import pickle
import re
import unittest
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from helpers import ROOT, fake_run, no_fake_cuda, run_script, tmpdir  # noqa: F401  (helpers sets sys.path and threads)
import common

METHOD_FILES = ["baseline.py", "dml.py", "one.py", "okddip.py", "pcl.py", "ffsd.py"]


def _data(x):
    """A Data with mean 0, std 1 so augment's output is the [0, 1] image itself."""
    zeros, ones = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    return common.Data(x, torch.zeros(len(x), dtype=torch.long), x, None, zeros, ones, ["a"])


class TestAugment(unittest.TestCase):
    def test_every_output_is_a_crop_of_the_padded_image_or_its_mirror(self):
        x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
        out = common.augment(x, _data(x), torch.Generator().manual_seed(0), "zero")
        self.assertEqual(out.shape, (16, 3, 32, 32))
        padded = F.pad(x.float() / 255, (4, 4, 4, 4))  # zero = black pixels, before normalisation
        flips = 0
        for b in range(16):
            matches = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (False, True)
                       if torch.equal(out[b], (lambda c: c.flip(-1) if f else c)(padded[b, :, oy:oy + 32, ox:ox + 32]))]
            self.assertTrue(matches, f"image {b} is not a crop (or mirrored crop) of its padded source")
            flips += all(f for _, _, f in matches)
        self.assertTrue(0 < flips < 16, "flip should happen for some images and not others")

    def test_zero_padding_is_black_before_normalisation(self):
        x = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)  # white images
        data = _data(x)
        data.mean, data.std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
        out = common.augment(x, data, torch.Generator().manual_seed(0), "zero")
        white, black = (1 - data.mean) / data.std, (0 - data.mean) / data.std
        is_white, is_black = torch.isclose(out, white.expand_as(out)), torch.isclose(out, black.expand_as(out))
        self.assertTrue(bool((is_white | is_black).all()))
        self.assertTrue(bool(is_black.any()), "some crops must show the zero padding")
        # padding occupies at most 4 rows/columns at one border of each image
        self.assertLessEqual(int(is_black[:, 0].all(dim=2).sum(dim=1).max()), 4)

    def test_reflect_padding_repeats_the_image(self):
        x = torch.randint(1, 256, (32, 3, 32, 32), dtype=torch.uint8)
        out = common.augment(x, _data(x), torch.Generator().manual_seed(1), "reflect")
        self.assertTrue(bool((out > 0).all()), "reflect padding never shows black pixels here")

    def test_views_are_independent_augmentations_of_the_same_images(self):
        args = common.TrainArgs(dataset="fake", device="cpu", batch_size=8)
        run = fake_run(args, n=16)
        (views, y), = list(common.train_batches(run, torch.Generator().manual_seed(0), views=3))[:1]
        self.assertEqual(len(views), 3)
        self.assertFalse(torch.equal(views[0], views[1]))
        self.assertEqual(views[0].shape, (8, 3, 32, 32))

    def test_no_augment_gives_the_images_themselves_in_the_shuffled_order(self):
        run = fake_run(common.TrainArgs(dataset="fake", device="cpu", batch_size=8, augment=False), n=16)
        gen = torch.Generator().manual_seed(3)
        batches = list(common.train_batches(run, gen, views=2))
        order = torch.randperm(16, generator=torch.Generator().manual_seed(3))
        d = run.data
        for k, (views, y) in enumerate(batches):
            idx = order[8 * k:8 * (k + 1)]
            expected = (d.train_x[idx].float() / 255 - d.mean) / d.std
            self.assertTrue(torch.equal(y, d.train_y[idx]))
            for v in views:  # every view is the same plain image: nothing random but the order
                torch.testing.assert_close(v, expected, rtol=0, atol=0)

    def test_same_generator_state_same_batches(self):
        run = fake_run(common.TrainArgs(dataset="fake", device="cpu", batch_size=8), n=16)
        a = list(common.train_batches(run, torch.Generator().manual_seed(5)))
        b = list(common.train_batches(run, torch.Generator().manual_seed(5)))
        self.assertTrue(all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b)))


class TestData(unittest.TestCase):
    def args(self, **kw):
        return common.TrainArgs(**{"dataset": "fake", "device": "cpu", **kw})

    def test_fake_is_deterministic_and_balanced(self):
        x1, y1 = common.make_fake(100, seed=1)
        x2, y2 = common.make_fake(100, seed=1)
        self.assertTrue(torch.equal(x1, x2) and torch.equal(y1, y2))
        self.assertEqual(x1.dtype, torch.uint8)
        self.assertEqual(torch.bincount(y1).tolist(), [10] * 10)

    def test_class_balanced_subset(self):
        y = torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 1, 0])
        idx = common.balanced_first(y, 5, 3)  # 2 + 2 + 1
        self.assertEqual(idx.tolist(), [0, 1, 2, 3, 4])
        d = common.load_data(self.args(subset=30, test_subset=20), "cpu")
        self.assertEqual(torch.bincount(d.train_y).tolist(), [3] * 10)
        self.assertEqual(torch.bincount(d.test_y).tolist(), [2] * 10)

    def _write_folder(self, root, classes=("cat", "dog"), n=3, size=32, split_classes=None):
        from torchvision.io import write_png
        for split in ("train", "test"):
            for c in (split_classes or {}).get(split, classes):
                os.makedirs(os.path.join(root, split, c), exist_ok=True)
                for i in range(n):
                    img = torch.full((3, size, size), 40 * i + (100 if c == classes[-1] else 0), dtype=torch.uint8)
                    write_png(img, os.path.join(root, split, c, f"{i}.png"))

    def test_folder_reads_images_and_labels(self):
        root = tmpdir(self)
        self._write_folder(root)
        d = common.load_data(self.args(dataset="folder", data_dir=root), "cpu")
        self.assertEqual(d.classes, ["cat", "dog"])
        self.assertEqual(tuple(d.train_x.shape), (6, 3, 32, 32))
        self.assertEqual(d.train_y.tolist(), [0, 0, 0, 1, 1, 1])
        self.assertEqual(int(d.train_x[4, 0, 0, 0]), 140)  # dog image 1: 40 + 100

    def test_folder_errors_are_one_line(self):
        root = tmpdir(self)
        with self.assertRaises(SystemExit) as e:
            common.load_data(self.args(dataset="folder", data_dir=root), "cpu")
        self.assertIn("train", str(e.exception))
        self._write_folder(root, size=28)
        with self.assertRaises(SystemExit) as e:
            common.load_data(self.args(dataset="folder", data_dir=root), "cpu")
        self.assertRegex(str(e.exception), r"is 28x28, expected 32x32")
        self.assertNotIn("\n", str(e.exception))

    def test_cifar10_loader_on_an_offline_fixture(self):
        """The torchvision CIFAR-10 path, on tiny files in CIFAR's pickle format. torchvision verifies md5
        checksums of the real archive's files; the test (not the loader) swaps in the fixture's checksums."""
        from torchvision.datasets import CIFAR10
        root = tmpdir(self)
        base = os.path.join(root, CIFAR10.base_folder)
        os.makedirs(base)
        rng = np.random.default_rng(0)

        def dump(name, obj):
            with open(os.path.join(base, name), "wb") as f:
                pickle.dump(obj, f)
            with open(os.path.join(base, name), "rb") as f:
                return [name, hashlib.md5(f.read()).hexdigest()]

        train_list = [dump(f"data_batch_{i}", {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                                               "labels": [i % 10, (i + 1) % 10, (i + 2) % 10, (i + 3) % 10]})
                      for i in range(1, 6)]
        test_list = [dump("test_batch", {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))})]
        meta = dump("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
        with mock.patch.object(CIFAR10, "train_list", train_list), mock.patch.object(CIFAR10, "test_list", test_list), \
                mock.patch.object(CIFAR10, "meta", {"filename": meta[0], "key": "label_names", "md5": meta[1]}):
            d = common.load_data(self.args(dataset="cifar10", data_dir=root), "cpu")
        self.assertEqual(tuple(d.train_x.shape), (20, 3, 32, 32))
        self.assertEqual(d.classes, [f"c{i}" for i in range(10)])
        with open(os.path.join(base, "data_batch_1"), "rb") as f:
            first = pickle.load(f)["data"][0].reshape(3, 32, 32)
        self.assertTrue(np.array_equal(d.train_x[0].numpy(), first))  # CHW layout kept
        self.assertEqual(d.test_y.tolist(), list(range(10)))
        self.assertTrue(torch.allclose(d.mean.flatten(), torch.tensor(common.MEAN_STD["cifar10"][0])))


class TestBackbones(unittest.TestCase):
    # (CIFAR-10, CIFAR-100) trainable parameters, projection (option B) shortcuts; docs/backbones.md.
    COUNTS = {"resnet20": (272_474, 278_324), "resnet32": (466_906, 472_756), "resnet56": (855_770, 861_620),
              "resnet110": (1_147_738, 1_170_868), "resnet110_basic": (1_730_714, 1_736_564)}

    def test_parameter_counts(self):
        for arch, counts in self.COUNTS.items():
            for C, n in zip((10, 100), counts):
                self.assertEqual(common.num_params(common.build_backbone(arch, C)), n, f"{arch} C={C}")

    def test_stage_maps_and_logits(self):
        net = common.build_backbone("resnet32", 100)
        x = torch.randn(2, 3, 32, 32)
        maps = net.features(x)
        self.assertEqual([tuple(m.shape[1:]) for m in maps], [(16, 32, 32), (32, 16, 16), (64, 8, 8)])
        self.assertEqual([m.shape[1] for m in maps], net.widths)
        self.assertEqual(tuple(net(x).shape), (2, 100))
        net.eval()  # head(features) is forward, split in two
        self.assertTrue(torch.equal(net.head(net.features(x)), net(x)))

    def test_eval_mode_keeps_bn_statistics_and_restores_the_mode(self):
        net = common.build_backbone("resnet8", 10)
        stats = net.stem[1].running_mean.clone()
        with torch.no_grad(), common.eval_mode(net):
            self.assertFalse(net.training)
            net(torch.randn(4, 3, 32, 32) + 5)
        self.assertTrue(net.training)
        self.assertTrue(torch.equal(net.stem[1].running_mean, stats))  # eval BN: no update
        net.eval()
        with self.assertRaises(ZeroDivisionError), common.eval_mode(net):
            1 / 0
        self.assertFalse(net.training)  # the mode it had, also after an error

    def test_network_archs_and_peer_names(self):
        @dataclasses.dataclass
        class Args(common.TrainArgs):
            num_nets: int = common.arg(2, "networks")
        self.assertEqual(common.network_archs(Args(arch="resnet8", num_nets=3), "num_nets"), ["resnet8"] * 3)
        args = Args(arch="resnet8,wrn16_2,resnet8")
        self.assertEqual(common.network_archs(args, "num_nets"), ["resnet8", "wrn16_2", "resnet8"])
        self.assertEqual(args.num_nets, 3)  # the list sets the count (in place: config.json records it)
        with self.assertRaises(SystemExit) as cm:
            common.network_archs(Args(arch="resnet8,wrn16_2", num_nets=3), "num_nets")
        self.assertIn("names 2 networks but --num-nets is 3", str(cm.exception))
        nets = [common.build_backbone(a, 10) for a in ("resnet8", "wrn16_2")]
        self.assertEqual(common.peer_names(nets, "student"), ["student1_resnet8", "student2_wrn16_2"])
        self.assertEqual(common.peer_names(nets[:1] * 2), ["peer1", "peer2"])

    def test_resnet110_is_the_bottleneck_variant(self):
        net = common.build_backbone("resnet110", 10)
        self.assertIsInstance(net.stages[0][0], common.Bottleneck)
        self.assertEqual(len(net.stages[0]), 12)
        self.assertEqual(net.widths, [64, 128, 256])

    def test_multibranch_shares_trunk_once_and_nothing_else(self):
        mb = common.MultiBranch("resnet32", 100, 3)
        self.assertEqual(common.num_params(mb.trunk), 112_592)  # stem + stages 1-2 (docs/backbones.md)
        self.assertEqual(common.num_params(mb.branches[0]), 360_164)
        self.assertEqual(common.num_params(mb), 112_592 + 3 * 360_164)
        self.assertEqual(common.num_params(mb.single(1)), 472_756)
        ids = [{id(m) for m in b.modules()} for b in mb.branches]
        self.assertFalse(ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
        self.assertFalse(torch.equal(mb.branches[0].fc.weight, mb.branches[1].fc.weight))  # independent init
        logits, feats, t = mb(torch.randn(2, 3, 32, 32))
        self.assertEqual((tuple(logits.shape), tuple(feats.shape), tuple(t.shape)), ((3, 2, 100), (3, 2, 64), (2, 32, 16, 16)))
        logits, feats, t = mb([torch.randn(2, 3, 32, 32) for _ in range(3)])  # one view per branch
        self.assertEqual(len(t), 3)


class TestSchedulesAndLoss(unittest.TestCase):
    def test_kd_loss_against_numpy(self):
        s, t = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]), torch.tensor([[0.3, 0.1, 2.0], [1.0, 1.0, 0.0]])
        for T in (1.0, 3.0):
            ps = np.exp(s.numpy() / T) / np.exp(s.numpy() / T).sum(1, keepdims=True)
            pt = np.exp(t.numpy() / T) / np.exp(t.numpy() / T).sum(1, keepdims=True)
            expected = T * T * (pt * (np.log(pt) - np.log(ps))).sum() / 2  # sum over classes, / B
            self.assertAlmostEqual(common.kd_loss(s, t, T).item(), expected, places=5)

    def test_rampup_values(self):
        w = lambda e: common.sigmoid_rampup(e, 80)  # noqa: E731
        self.assertAlmostEqual(w(0), 0.006738, places=5)
        self.assertAlmostEqual(w(40), 0.286505, places=5)
        self.assertAlmostEqual(w(79), 0.999219, places=5)
        self.assertEqual((w(80), w(200), common.sigmoid_rampup(3, 0)), (1.0, 1.0, 1.0))

    def test_loss_meter_needs_train_steps_logs(self):
        """A train_step that returns no logs (or not a dict of 0-d tensors with 'loss') is a one-line
        error naming what it got, not a failed torch.stack."""
        meter = common.LossMeter()
        meter.add({"loss": torch.tensor(2.0), "ce": torch.tensor(1.0)}, 4, 0)
        self.assertEqual(meter.means(), {"loss": 2.0, "ce": 1.0})
        for bad in ({}, None, {"ce": torch.tensor(1.0)}, {"loss": torch.ones(3)}, {"loss": 1.0}):
            with self.assertRaises(SystemExit) as cm:
                common.LossMeter().add(bad, 4, 0)
            self.assertEqual(str(cm.exception), "error: train_step must return a non-empty dict of 0-d tensors "
                                                f"with 'loss' (got {bad!r})")

    def test_lr_milestones(self):
        args = common.TrainArgs(epochs=300)
        self.assertEqual([common.lr_factor(e, args) for e in (0, 149, 150, 224, 225, 299)],
                         [1, 1, 0.1, 0.1, 0.1 ** 2, 0.1 ** 2])

    def test_sgd_recipe(self):
        opt = common.sgd([torch.nn.Parameter(torch.zeros(1))], common.TrainArgs())
        g = opt.param_groups[0]
        self.assertEqual((g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]), (0.1, 0.9, True, 5e-4))


class TestCaptureSafe(unittest.TestCase):
    """Per-epoch numbers reach the step as device tensors; the last partial batch can be dropped."""

    def test_scalar_is_one_device_tensor_rewritten_in_place(self):
        run = fake_run(common.TrainArgs(dataset="fake", device="cpu"), n=16)
        w = run.scalar("w", 0.25)
        self.assertEqual((w.dtype, w.dim(), w.device, w.item()),
                         (torch.float32, 0, run.device, 0.25))
        version = w._version
        self.assertIs(run.scalar("w", 0.25), w)
        self.assertEqual(w._version, version)  # same value: no kernel at all
        self.assertIs(run.scalar("w", 0.5), w)  # a new value: written into the same tensor
        self.assertEqual((w.item(), w._version), (0.5, version + 1))
        self.assertIsNot(run.scalar("phi", 0.5), w)

    @unittest.skipIf(no_fake_cuda(), str(no_fake_cuda()))
    def test_set_lr_floats_on_cpu_device_tensors_for_fused_cuda_optimisers(self):
        args = common.TrainArgs(dataset="fake", device="cpu", epochs=4, lr=0.1, lr_decay_at="0.5")
        run = fake_run(args, n=16)
        opts = {"sgd": common.sgd([torch.nn.Parameter(torch.zeros(2))], args)}
        g = opts["sgd"].param_groups[0]
        self.assertEqual((common.set_lr(run, opts, 1), g["lr"]), (0.1, 0.1))
        self.assertEqual((common.set_lr(run, opts, 2), g["lr"], g["base_lr"]),
                         (0.1 * 0.1, 0.1 * 0.1, 0.1))
        g["lr"] = torch.tensor(0.01)  # as a CUDA run's checkpoint holds it (loaded on the CPU)
        common.set_lr(run, opts, 3)
        self.assertEqual((type(g["lr"]), g["lr"]), (float, 0.1 * 0.1))
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode(), torch.device("cuda"):  # fake CUDA tensors: devices, dtypes, no data
            cuda = common.Run(args, "t", torch.device("cuda"), None, "", amp=True,
                              channels_last=False)
            opts = {"sgd": common.sgd([torch.nn.Parameter(torch.zeros(2))], args),
                    "adam": common.adam([torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0)}
            self.assertTrue(opts["sgd"].defaults["fused"] and opts["adam"].defaults["fused"])
            # as a checkpoint restores them (loaded on the CPU)
            opts["sgd"].param_groups[0].update(lr=torch.tensor(0.01), base_lr=0.1)
            self.assertEqual(common.set_lr(cuda, opts, 0), 0.1)
            lrs = [g["lr"] for o in opts.values() for g in o.param_groups]
            for lr in lrs:
                self.assertEqual((type(lr).__name__, lr.device.type, lr.dtype, lr.dim()),
                                 ("FakeTensor", "cuda", torch.float32, 0))
            self.assertEqual(common.set_lr(cuda, opts, 2), 0.1 * 0.1)
            now = [g["lr"] for o in opts.values() for g in o.param_groups]
            self.assertTrue(all(a is b for a, b in zip(now, lrs)))  # rewritten in place

    def test_drop_last_keeps_only_full_batches_and_steps_per_epoch_agrees(self):
        # 20 images, batches of 8: 8, 8, 4 by default; 8, 8 with --drop-last or --compile
        cases = (({}, [8, 8, 4]), ({"drop_last": True}, [8, 8]), ({"compile": True}, [8, 8]))
        for flags, sizes in cases:
            with self.subTest(**flags):
                args = common.TrainArgs(dataset="fake", device="cpu", batch_size=8, **flags)
                run = fake_run(args, n=20)
                gen = torch.Generator().manual_seed(0)
                got = [len(y) for _, y in common.train_batches(run, gen)]
                self.assertEqual((got, run.steps_per_epoch), (sizes, len(sizes)))
        args = common.TrainArgs(dataset="fake", device="cpu", subset=20, test_subset=20,
                                batch_size=32, drop_last=True, out=os.path.join(tmpdir(self), "r"))
        with self.assertRaises(SystemExit) as e:
            common.setup(args, "baseline")
        self.assertRegex(str(e.exception), r"^error: --batch-size 32 with --drop-last leaves no "
                                           r"training batch: the training set has 20 images")


class TestCLIAndStructure(unittest.TestCase):
    def test_help_lists_every_field_with_help(self):
        for f in dataclasses.fields(common.TrainArgs):
            self.assertTrue(f.metadata.get("help"), f.name)
        out = run_script("baseline.py", "--help").stdout
        for f in dataclasses.fields(common.TrainArgs):
            self.assertIn("--" + f.name.replace("_", "-"), out)
        self.assertIn("resnet110", out)

    def test_parse_args_types_and_bools(self):
        a = common.parse_args(common.TrainArgs, ["--epochs", "7", "--no-nesterov", "--lr", "0.05"])
        self.assertEqual((a.epochs, a.nesterov, a.lr), (7, False, 0.05))

    def test_bounds_declared_on_the_field(self):
        @dataclasses.dataclass
        class Args(common.TrainArgs):
            beta: float = common.arg(0.5, "a fraction", at_least=0, at_most=1)
            temp: float = common.arg(1.0, "a temperature", above=0)
        for kw, msg in ((dict(beta=-0.1), "--beta must be at least 0, got -0.1"),
                        (dict(beta=1.5), "--beta must be at most 1, got 1.5"),
                        (dict(temp=0.0), "--temp must be above 0, got 0.0")):
            with self.subTest(**kw), self.assertRaises(SystemExit) as cm:
                common.parse_args(Args, [f"--{k}={v}" for k, v in kw.items()])
            self.assertEqual(str(cm.exception), "error: " + msg)
        self.assertEqual(common.check_args(Args(beta=1.0, temp=1e-9)).beta, 1.0)  # bounds inclusive

    def test_method_files_share_the_skeleton(self):
        banners = ["1. Imports", "2. Args", "3. Model", "4. Loss", "5. Train step", "6. Evaluate", "7. Main"]
        present = [f for f in METHOD_FILES if os.path.exists(os.path.join(ROOT, f))]
        self.assertIn("baseline.py", present)
        for name in present:
            src = open(os.path.join(ROOT, name)).read()
            found = re.findall(r"^# ===== (\d\. [A-Za-z ]+?) =====$", src, flags=re.M)
            self.assertEqual(found, banners, name)
            self.assertNotIn(".cuda(", src, name)
            tree = ast.parse(src)
            imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            self.assertFalse(imported & {f[:-3] for f in METHOD_FILES}, f"{name} imports another method file")
            for fn in ("build_model", "build_optimizers", "train_step", "evaluate", "main"):
                self.assertIn(f"\ndef {fn}(", src, f"{name} lacks {fn}")


if __name__ == "__main__":
    unittest.main()
