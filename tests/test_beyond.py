"""Beyond CIFAR (beyond.py, and the in-memory folders of common.py): folders of any image size (64 px: crop padding
8, every backbone, FFSD's taps and SD modules, a run of every method), the Tiny-ImageNet converter,
folders streamed from disk (ImageNet's crop and test transforms, epoch / seed / resume semantics,
per-process shares), the ImageNet ResNet-18/34, the LR warm-up and the ImageNet recipe."""
import copy
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.io import write_jpeg, write_png

from helpers import ROOT, fake_run, tmpdir
import beyond  # noqa: E402
import common
from test_backbones import STAGES

METHODS = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]


def write_folder(root, size=(64, 64), n_train=8, n_test=4, classes=("cat", "dog"), fmt="png"):
    """root/{train,test}/<class>/<i>.<fmt>: random images, each class in its own brightness."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                img = (torch.rand(3, *size, generator=g) * 100 + 120 * c).to(torch.uint8)
                path = os.path.join(root, split, name, f"{i}.{fmt}")
                write_png(img, path) if fmt == "png" else write_jpeg(img, path, quality=90)
    return root


def old_augment(x, data, gen, pad_mode="zero"):
    """augment() before it followed the image size (32 x 32 only): the reference at 32 px."""
    B, dev = x.shape[0], x.device
    xp = F.pad(x.float() / 255, (4, 4, 4, 4), mode="constant" if pad_mode == "zero" else "reflect")
    oy, ox = (torch.randint(0, 9, (B,), generator=gen, device=dev) for _ in range(2))
    flip = torch.rand(B, generator=gen, device=dev) < 0.5
    i = torch.arange(32, device=dev)
    rows = oy[:, None] + i
    cols = ox[:, None] + torch.where(flip[:, None], 31 - i, i)
    out = xp[torch.arange(B, device=dev)[:, None, None, None],
             torch.arange(3, device=dev)[None, :, None, None], rows[:, None, :, None],
             cols[:, None, None, :]]
    return (out - data.mean) / data.std


def plain_data(x):
    """A Data with mean 0, std 1: augment's output is the [0, 1] image itself."""
    return common.Data(x, torch.zeros(len(x), dtype=torch.long), x, None, torch.zeros(1, 3, 1, 1),
                       torch.ones(1, 3, 1, 1), ["a"])


class TestAugmentAnySize(unittest.TestCase):
    def test_32px_is_bit_identical_to_the_previous_augment(self):
        x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
        data = plain_data(x)
        data.mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
        data.std = torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)
        for mode in ("zero", "reflect"):
            g_new, g_old = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
            new, old = common.augment(x, data, g_new, mode), old_augment(x, data, g_old, mode)
            self.assertTrue(torch.equal(new, old))
            self.assertTrue(torch.equal(g_new.get_state(), g_old.get_state()))  # same draws

    def test_64px_pads_by_8_and_non_square_by_side_over_8(self):
        for H, W in ((64, 64), (32, 64)):
            x = torch.randint(0, 256, (6, 3, H, W), dtype=torch.uint8)
            out = common.augment(x, plain_data(x), torch.Generator().manual_seed(0), "zero")
            self.assertEqual(out.shape, (6, 3, H, W))
            ph, pw = H // 8, W // 8
            padded = F.pad(x.float() / 255, (pw, pw, ph, ph))
            offsets = []
            for b in range(6):
                crop = lambda oy, ox, f: padded[b, :, oy:oy + H, ox:ox + W].flip(-1 if f else [])
                found = [(oy, ox) for oy in range(2 * ph + 1) for ox in range(2 * pw + 1)
                         for f in (0, 1) if torch.equal(out[b], crop(oy, ox, f))]
                self.assertTrue(found, f"{H}x{W} image {b} is not a crop of its padded source")
                offsets += [max(o) for o in found]
            self.assertGreater(max(offsets), 4)  # crops reach beyond the 32-px padding of 4


class TestFolderAnySize(unittest.TestCase):
    def args(self, root, **kw):
        return common.TrainArgs(dataset="folder", data_dir=root, device="cpu", **kw)

    def load_error(self, root, **kw):
        with self.assertRaises(SystemExit) as e:
            common.load_data(self.args(root, **kw), "cpu")
        self.assertNotIn("\n", str(e.exception))
        return str(e.exception)

    def test_64px_folder_in_memory_with_train_statistics(self):
        root = write_folder(tmpdir(self))
        d = common.load_data(self.args(root), "cpu")
        self.assertEqual(tuple(d.train_x.shape), (16, 3, 64, 64))
        self.assertEqual(tuple(d.test_x.shape), (8, 3, 64, 64))
        f = d.train_x.double() / 255
        close = lambda a, b: torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-6)
        close(d.mean, f.mean(dim=(0, 2, 3), keepdim=True))
        close(d.std, f.std(dim=(0, 2, 3), keepdim=True))
        self.assertEqual(common.folder_loader(self.args(root)), "memory")
        tight = self.args(root, memory_budget_gb=1e-6)  # 1,000 bytes < 16 x 3 x 64 x 64
        self.assertEqual(common.folder_loader(tight), "stream")
        self.assertEqual(common.folder_loader(self.args(root, image_size=32)), "stream")

    def test_one_size_per_split_and_sides_of_32(self):
        root = write_folder(tmpdir(self))
        odd = os.path.join(root, "train", "dog", "9.png")
        write_png(torch.zeros(3, 96, 96, dtype=torch.uint8), odd)
        first = os.path.join(root, "train", "cat", "0.png")
        msg = self.load_error(root)
        self.assertIn(f"image {odd!r} is 96x96, expected 64x64 like {first!r}", msg)
        root = write_folder(tmpdir(self))  # 64 px train split, 32 px test split
        shutil.rmtree(os.path.join(root, "test"))
        small = write_folder(os.path.join(root, "small"), size=(32, 32))
        os.rename(os.path.join(small, "test"), os.path.join(root, "test"))
        self.assertIn("is 32x32, expected 64x64 like the train split", self.load_error(root))
        self.assertIn("is 48x48, expected 32x32, 64x64 or another square",
                      self.load_error(write_folder(tmpdir(self), size=(48, 48))))
        self.assertIn("is 64x64, expected 32x32 (--image-size 32; other sizes: --loader stream)",
                      self.load_error(write_folder(tmpdir(self)), image_size=32, loader="memory"))

    def test_flag_errors(self):
        cases = ((dict(image_size=48), "--image-size must be 0 (the data's own size) or a"),
                 (dict(image_size=64, dataset="cifar10"), "--image-size 64: cifar10 images are"),
                 (dict(loader="stream", dataset="fake"), "--loader stream reads an image folder"),
                 (dict(lr_warmup_epochs=-1), "--lr-warmup-epochs must be at least 0, got -1"))
        for kw, needle in cases:
            with self.subTest(**kw), self.assertRaises(SystemExit) as e:
                common.check_args(common.TrainArgs(**kw))
            self.assertIn(needle, str(e.exception))

    def test_channel_stats_in_chunks(self):
        x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
        mean, std = common.channel_stats(x, chunk=3)
        f = x.double() / 255
        close = lambda a, b: torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-7)
        close(mean, f.mean(dim=(0, 2, 3), keepdim=True))
        close(std, f.std(dim=(0, 2, 3), keepdim=True))


class TestNetworksAt64(unittest.TestCase):
    def test_every_backbone_at_64px_doubles_every_map(self):
        x = torch.randn(1, 3, 64, 64)
        for arch, shapes in STAGES.items():
            with self.subTest(arch=arch):
                net = common.build_backbone(arch, 10).eval()
                with torch.no_grad():
                    maps, logits = net.features(x), net(x)
                doubled = [(c, 2 * h, 2 * w) for c, h, w in shapes]
                self.assertEqual([tuple(m.shape[1:]) for m in maps], doubled)
                self.assertEqual(tuple(logits.shape), (1, 10))

    def test_vgg_adaptive_final_pool_is_the_old_max_pool_at_32px(self):
        torch.manual_seed(0)
        net = common.build_backbone("vgg16", 10).eval()
        old = copy.deepcopy(net)
        old.pool = nn.Sequential(nn.MaxPool2d(2), nn.Flatten())  # the definition before larger images
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            self.assertTrue(torch.equal(net(x), old(x)))

    def test_ffsd_taps_and_sd_modules_follow_64px(self):
        ffsd = importlib.import_module("ffsd")
        args = ffsd.Args(arch="resnet8", device="cpu")
        x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
        first_side = {"resnet8": 64, "vgg16": 16, "densenet40_12": 32, "resnet18": 16}  # stage 1
        shapes = lambda maps: [tuple(m.shape) for m in maps]
        for arch, side in first_side.items():
            with self.subTest(arch=arch):
                torch.manual_seed(0)
                out = ffsd.FFSD(arch, 10, 2)(x)
                self.assertEqual(out["feats"][1][0].shape[-1], side)
                # every SD module rebuilds its network's shallow stage maps at their 64-px sizes
                student2 = shapes(out["feats"][1][:-1])
                self.assertEqual(shapes(out["sd_teach"][0]), student2)
                self.assertEqual(shapes(out["sd_fit"][0]), student2)
                self.assertEqual(shapes(out["sd_teach_ld"]), shapes(out["feats_ld"][:-1]))
                self.assertEqual(shapes(out["sd_fit"][1]), shapes(out["feats_ld"][:-1]))
                loss, _ = ffsd.ffsd_loss(out, y, args, 1.0)
                self.assertTrue(torch.isfinite(loss))


class TestImageNetResNets(unittest.TestCase):
    def test_parameter_counts_and_torchvision_forward(self):
        import torchvision
        for arch, n in (("resnet18", 11_689_512), ("resnet34", 21_797_672)):
            with self.subTest(arch=arch):
                torch.manual_seed(0)
                net = common.build_backbone(arch, 1000).eval()
                torch.manual_seed(0)
                tv = getattr(torchvision.models, arch)(weights=None).eval()
                self.assertEqual(common.num_params(net), n)
                self.assertEqual(common.num_params(tv), n)
                self.assertEqual((net.widths, net.split), ([64, 128, 256, 512], 3))
                x = torch.randn(1, 3, 64, 64)
                with torch.no_grad():
                    self.assertTrue(torch.equal(net(x), tv(x)))  # same definition, same init

    def test_every_method_steps_on_resnet18(self):
        # At 64 px: FFSD's diversity target needs a last map of 3 positions or more (1x1 at 32 px).
        torch.manual_seed(0)
        for name in METHODS:
            with self.subTest(method=name):
                method = importlib.import_module(name)
                args = method.Args(arch="resnet18", dataset="fake", device="cpu", batch_size=4)
                run = fake_run(args, n=4)
                x = (run.data.train_x.float() / 255 - run.data.mean) / run.data.std
                x = F.interpolate(x, size=64)
                model = method.build_model(args, 10)
                opts = method.build_optimizers(model, args)
                before = [p.detach().clone() for p in model.parameters()]
                views = [x] * getattr(args, "num_peers", 1) if name == "pcl" else x
                logs = method.train_step(model, opts, views, run.data.train_y, 0, 0, run)
                self.assertTrue(torch.isfinite(logs["loss"]))
                moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())
                         if p.requires_grad]
                self.assertGreater(sum(moved) / len(moved), 0.9)


class TestEveryMethodAt64(unittest.TestCase):
    def test_one_epoch_of_every_method_on_a_64px_folder(self):
        root = write_folder(tmpdir(self), n_train=8, n_test=4)
        for name in METHODS:
            with self.subTest(method=name):
                method = importlib.import_module(name)
                out = os.path.join(tmpdir(self), "run")
                args = method.Args(arch="resnet8", dataset="folder", data_dir=root, epochs=1,
                                   batch_size=8, device="cpu", out=out)
                seen = []

                def recording(model, optimizers, x, *a, _step=method.train_step):
                    seen.extend(tuple(v.shape) for v in (x if isinstance(x, list) else [x]))
                    return _step(model, optimizers, x, *a)
                with mock.patch.object(method, "train_step", recording):
                    final = method.main(args)
                views = args.num_peers if name == "pcl" else 1
                self.assertEqual(seen, [(8, 3, 64, 64)] * 2 * views)  # 16 images: 2 batches
                self.assertTrue(math.isfinite(final["train_loss"]))
                self.assertTrue(all(0 <= a <= 100 for a in final["models"].values()))
                with open(os.path.join(args.out, "metrics.jsonl")) as f:
                    self.assertEqual(json.loads(f.readline())["images"], 16)


class TestTinyImageNetConverter(unittest.TestCase):
    def make_tiny(self, root):
        """A miniature of Tiny-ImageNet's layout: 3 classes, 2 train and 2 val 64x64 JPEGs each."""
        g, notes = torch.Generator().manual_seed(0), []
        wnids = ["n01443537", "n01629819", "n01641577"]
        os.makedirs(os.path.join(root, "val", "images"))
        os.makedirs(os.path.join(root, "test", "images"))
        for c, wnid in enumerate(wnids):
            os.makedirs(os.path.join(root, "train", wnid, "images"))
            with open(os.path.join(root, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
                f.write("")
            for i in range(2):
                img = (torch.rand(3, 64, 64, generator=g) * 60 + 90 * c).to(torch.uint8)
                write_jpeg(img, os.path.join(root, "train", wnid, "images", f"{wnid}_{i}.JPEG"))
        for k, c in enumerate([2, 0, 1, 2, 1, 0]):  # val images in no class order, as in the file
            grey = torch.full((3, 64, 64), 90 * c, dtype=torch.uint8)
            write_jpeg(grey, os.path.join(root, "val", "images", f"val_{k}.JPEG"))
            notes.append(f"val_{k}.JPEG\t{wnids[c]}\t0\t0\t63\t63\n")
        black = torch.zeros(3, 64, 64, dtype=torch.uint8)
        write_jpeg(black, os.path.join(root, "test", "images", "test_0.JPEG"))
        with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
            f.writelines(notes)
        return wnids

    def convert(self, *argv):
        tool = os.path.join("tools", "tinyimagenet_to_folder.py")
        return subprocess.run([sys.executable, tool, *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    def test_converts_the_layout_and_loads_at_64px(self):
        src = os.path.join(tmpdir(self), "tiny-imagenet-200")
        dst = os.path.join(tmpdir(self), "tiny")
        wnids = self.make_tiny(src)
        res = self.convert(src, dst)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn("3 classes, 6 train / 6 test images", res.stdout)
        self.assertEqual(sorted(os.listdir(os.path.join(dst, "test", wnids[2]))),
                         ["val_0.JPEG", "val_3.JPEG"])
        d = common.load_data(common.TrainArgs(dataset="folder", data_dir=dst, device="cpu"), "cpu")
        self.assertEqual(d.classes, wnids)
        self.assertEqual(tuple(d.train_x.shape), (6, 3, 64, 64))
        self.assertEqual(d.test_y.tolist(), [0, 0, 1, 1, 2, 2])
        self.assertLess(abs(d.test_x[4].float().mean().item() - 180), 3)  # val_0: class 2, grey 180
        res = self.convert(src, dst)  # refuses to overwrite
        self.assertEqual((res.returncode, res.stderr.strip()),
                         (1, f"error: {dst!r} already exists; choose a new folder"))

    def test_bad_annotations_one_line(self):
        src = os.path.join(tmpdir(self), "tiny-imagenet-200")
        self.make_tiny(src)
        with open(os.path.join(src, "val", "val_annotations.txt"), "a") as f:
            f.write("val_9.JPEG\tn01443537\t0\t0\t63\t63\n")
        res = self.convert(src, os.path.join(tmpdir(self), "out"))
        self.assertEqual(res.returncode, 1)
        self.assertRegex(res.stderr.strip(),
                         r"^error: .*val_annotations.txt' line 7: .*val_9.JPEG' not found$")


def rrc_reference(H, W, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params (an explicit loop), its draws replaced by u."""
    area, log_ratio = H * W, (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[t])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[10 + t])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= W and 0 < h <= H:
            return [int(u[20] * (H - h + 1)), int(u[21] * (W - w + 1)), h, w]
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return [(H - h) // 2, (W - w) // 2, h, w]


class TestStream(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._dir = tempfile.TemporaryDirectory()
        # "full-size" photos: 2 classes x 4 train, 2 test, 120x160 JPEGs (64 px crops: cheap)
        cls.root = write_folder(os.path.join(cls._dir.name, "jpg"), size=(120, 160), n_train=4,
                                n_test=2, fmt="jpg")

    @classmethod
    def tearDownClass(cls):
        cls._dir.cleanup()

    def args(self, **kw):
        base = dict(dataset="folder", data_dir=self.root, image_size=64, batch_size=4, device="cpu",
                    arch="resnet8", epochs=2)
        return common.TrainArgs(**{**base, **kw})

    def run_of(self, args):
        data = beyond.load_data(args, torch.device("cpu"))
        return beyond.BeyondRun(args, "baseline", torch.device("cpu"), data, "", False, False)

    def test_random_resized_crop_boxes_are_torchvisions(self):
        g = torch.Generator().manual_seed(0)
        hw = torch.cat([torch.randint(20, 400, (300, 2), generator=g),
                        torch.tensor([[10, 1000], [1000, 10], [50, 60], [375, 500]])])
        u = torch.rand(len(hw), 22, generator=g, dtype=torch.float64)
        u[300:302, :10] = 0.99  # extreme aspect, large areas: no try fits, the central fallback
        boxes = beyond.rrc_boxes(hw, u).tolist()
        for (H, W), uu, box in zip(hw.tolist(), u.tolist(), boxes):
            self.assertEqual(box, rrc_reference(H, W, uu), (H, W))
        self.assertEqual(boxes[300], [0, 493, 10, 13])  # 10 x 1000: full height, aspect 4/3

    def test_crop_and_test_transforms_are_torchvisions(self):
        import torchvision.transforms.v2.functional as TF
        img = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)
        out = beyond.crop_resize(img, (10, 20, 90, 70), 64)
        ref = TF.resized_crop(img.float(), 10, 20, 90, 70, [64, 64], antialias=True)
        torch.testing.assert_close(out[0], ref, rtol=0, atol=1e-4)
        # 73 = round(256 * 64 / 224)
        ref = TF.center_crop(TF.resize(img.float(), [73], antialias=True), [64, 64])
        torch.testing.assert_close(beyond.center_crop(img, 64)[0], ref, rtol=0, atol=1e-4)

    def test_streamed_batches_statistics_and_seed_semantics(self):
        run = self.run_of(self.args())
        data = run.data
        self.assertIsInstance(data, beyond.StreamData)
        self.assertEqual((len(data.train_files), data.test_y.tolist()), (8, [0, 0, 1, 1]))
        test_view = lambda p: beyond.center_crop(beyond._load(p, False), 64)
        crops = torch.cat([test_view(p) for p in data.train_files])
        crops = crops.double() / 255  # the normalisation: these 8 images at the test transform
        close = lambda a, b: torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5)
        close(data.mean, crops.mean(dim=(0, 2, 3), keepdim=True))
        close(data.std, crops.std(dim=(0, 2, 3), keepdim=True))
        gen = lambda seed: torch.Generator().manual_seed(seed)
        epoch = lambda seed, views=1: list(run.batches(gen(seed), views))
        a, b, c = epoch(0), epoch(0), epoch(1)
        self.assertEqual([tuple(x.shape) for x, _ in a], [(4, 3, 64, 64)] * 2)
        perm = torch.randperm(8, generator=gen(0))
        self.assertEqual(torch.cat([y for _, y in a]).tolist(), data.train_y[perm].tolist())
        self.assertTrue(all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b)))  # same seed
        self.assertFalse(torch.equal(a[0][0], c[0][0]))
        (views, y), _ = epoch(0, views=3)
        self.assertEqual(len(views), 3)  # PCL: independent crops of the same images
        self.assertFalse(torch.equal(views[0], views[1]))
        self.assertEqual(y.tolist(), a[0][1].tolist())

    def test_each_process_takes_its_share_of_the_one_process_batch(self):
        stream = self.run_of(self.args())
        memory = fake_run(common.TrainArgs(dataset="fake", device="cpu", batch_size=8), n=16)
        memory = beyond.BeyondRun(memory.args, "baseline", memory.device, memory.data, "", False, False)
        for run in (stream, memory):
            with self.subTest(data=type(run.data).__name__):
                one_process = common.train_batches if run is memory else beyond.shared_batches
                whole = list(one_process(run, torch.Generator().manual_seed(5), 2))
                shares = []
                for r in (0, 1):
                    with mock.patch.object(beyond, "world", return_value=2), \
                            mock.patch.object(beyond, "rank", return_value=r):
                        gen = torch.Generator().manual_seed(5)
                        shares.append(list(beyond.shared_batches(run, gen, 2)))
                self.assertEqual(len(shares[0]), len(whole))
                for (xw, yw), (x0, y0), (x1, y1) in zip(whole, *shares):
                    self.assertTrue(torch.equal(torch.cat([y0, y1]), yw))
                    for v in range(2):
                        torch.testing.assert_close(torch.cat([x0[v], x1[v]]), xw[v], rtol=0, atol=0)

    def test_streamed_run_resumes_exactly(self):
        baseline = importlib.import_module("baseline")
        d = tmpdir(self)
        kw = dict(dataset="folder", data_dir=self.root, image_size=64, batch_size=4, device="cpu",
                  arch="resnet8", epochs=2, loader="stream")
        straight = baseline.main(baseline.Args(**kw, out=os.path.join(d, "a")))
        baseline.main(baseline.Args(**kw, out=os.path.join(d, "b"), stop_after=1))
        resumed = baseline.main(baseline.Args(**kw, out=os.path.join(d, "b"), resume=True))
        self.assertEqual(straight["test_acc"], resumed["test_acc"])
        a, b = (torch.load(os.path.join(d, r, "checkpoint.pt"), weights_only=False)["model"]
                for r in "ab")
        self.assertTrue(all(torch.equal(a[k], b[k]) for k in a))
        # evaluate_stream = the test transform and arg-max over the whole test split
        run = self.run_of(baseline.Args(**kw))
        net = baseline.build_model(run.args, 2)
        net.load_state_dict(a)
        net.eval()
        with torch.no_grad():
            test_view = lambda p: beyond.center_crop(beyond._load(p, False), 64)
            x = torch.cat([test_view(p) for p in run.data.test_files])
            logits = net((x / 255 - run.data.mean) / run.data.std)
        hits = (logits.argmax(-1) == run.data.test_y).sum().item()
        got = run.score(net, baseline.evaluate)
        self.assertEqual(got, {"net": 100.0 * hits / 4})


class TestRecipeAndWarmup(unittest.TestCase):
    def test_warmup_then_steps(self):
        args = common.TrainArgs(epochs=90, lr_warmup_epochs=5, lr_decay_at="0.3333,0.6667")
        got = [common.lr_factor(e, args) for e in (0, 1, 2, 3, 4, 5, 29, 30, 59, 60, 89)]
        want = [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
        for g, w in zip(got, want):
            self.assertAlmostEqual(g, w, places=12)
        plain = common.TrainArgs()
        for e in range(300):  # off by default: exactly the step schedule
            self.assertEqual(common.lr_factor(e, plain), 0.1 ** ((e >= 150) + (e >= 225)))

    def test_imagenet_recipe_fills_the_flags_left_at_default(self):
        baseline, ffsd = importlib.import_module("baseline"), importlib.import_module("ffsd")
        argv = ["--recipe", "imagenet", "--epochs", "3"]
        args = beyond.apply_recipe(common.parse_args(baseline.Args, argv))
        self.assertEqual((args.epochs, args.batch_size, args.lr, args.weight_decay, args.momentum,
                          args.nesterov, args.lr_warmup_epochs), (3, 256, 0.8, 1e-4, 0.9, True, 5))
        args = beyond.apply_recipe(ffsd.Args(recipe="imagenet"))
        self.assertEqual((args.epochs, args.weight_decay, args.sd_lr, args.fusion_wd),
                         (90, 1e-4, 1e-3, 1e-5))
        for e, factor in ((4, 1.0), (29, 1.0), (30, 0.1), (59, 0.1), (60, 0.01)):  # /10 at 30, 60
            self.assertAlmostEqual(common.lr_factor(e, args), factor, places=12)
        # setup applies it in place, so the method's own Args (its optimisers) see it
        args = baseline.Args(recipe="imagenet", dataset="fake", subset=20, test_subset=10, epochs=1,
                             device="cpu", batch_size=10, out=os.path.join(tmpdir(self), "run"))
        common.setup(args, "baseline")
        self.assertEqual((args.lr, args.lr_warmup_epochs, args.batch_size), (0.8, 5, 10))


if __name__ == "__main__":
    unittest.main()
