"""Backbones (common.py section 2) and their multi-branch split (section 3): pinned parameter counts for 10 and
100 classes, stage shapes, pooled widths, trunk / branch sizes (split as in the ONE / OKDDip official codes;
docs/backbones.md), fresh modules per branch, and the definition details that change numbers (pre-activation WRN
taps, VGG head, DenseNet variants)."""
import dataclasses
import unittest

import torch
import torch.nn as nn

from helpers import ROOT  # noqa: F401  (helpers puts the repository on sys.path and pins torch to 1 thread)
import common


def resnet8_count(C):
    """resnet8 (tests only, in no table) counted by hand: conv weights + BN gamma/beta, option-B shortcuts."""
    conv = lambda cin, cout, k: cin * cout * k * k + 2 * cout  # conv (no bias) + its BN
    stem = conv(3, 16, 3)
    s1 = 2 * conv(16, 16, 3)
    s2 = conv(16, 32, 3) + conv(32, 32, 3) + conv(16, 32, 1)
    s3 = conv(32, 64, 3) + conv(64, 64, 3) + conv(32, 64, 1)
    return stem + s1 + s2 + s3 + 64 * C + C


# Trainable parameters (C10, C100) of the definitions in docs/backbones.md. Every published count is matched
# exactly.
PARAMS = {
    "resnet8": (resnet8_count(10), resnet8_count(100)),
    "resnet20": (272_474, 278_324),
    "resnet32": (466_906, 472_756),
    "resnet56": (855_770, 861_620),
    "resnet110": (1_147_738, 1_170_868),        # bottleneck-110 (OKDDip/PCL lineage)
    "resnet110_basic": (1_730_714, 1_736_564),  # He et al.
    "resnet164": (1_704_154, 1_727_284),        # official ONE's "resnet110"
    "wrn16_2": (692_810, 704_420),              # FFSD's conv bias=True (bias-free would be 691,674 / 703,284)
    "wrn40_2": (2_246_474, 2_258_084),
    "wrn20_8": (6_848_090, 6_871_220),          # OKDDip's wide bottleneck net
    "vgg16": (15_253_578, 15_299_748),
    "densenet40_12": (176_122, 188_092),        # BC
    "densenet40_12_plain": (1_059_298, 1_100_428),
    "resnext29_2x64d": (9_130_314, 9_222_564),
    "googlenet": (6_166_250, 6_258_500),
    "resnet18": (11_181_642, 11_227_812),       # torchvision's ImageNet nets: 11,689,512 / 21,797,672 at 1000
    "resnet34": (21_289_802, 21_335_972),
}

# (C, H, W) of each stage output for a 32x32 input: FFSD's taps (FFSD official code, models/*_cifar.py)
# for the backbones FFSD uses, otherwise the stage outputs of each definition (docs/backbones.md).
BASIC = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
BOTTLE = [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
STAGES = {
    "resnet8": BASIC, "resnet20": BASIC, "resnet32": BASIC, "resnet56": BASIC, "resnet110_basic": BASIC,
    "resnet110": BOTTLE, "resnet164": BOTTLE, "wrn20_8": BOTTLE,
    "wrn16_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)], "wrn40_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)],
    "vgg16": [(256, 8, 8), (512, 4, 4), (512, 2, 2)],  # conv stages 3, 4, 5, each opened by a max-pool
    "densenet40_12": [(48, 16, 16), (60, 8, 8), (132, 8, 8)],  # 24 -> 96 -> 48 -> 120 -> 60 -> 132
    "densenet40_12_plain": [(168, 32, 32), (312, 16, 16), (456, 8, 8)],
    "resnext29_2x64d": [(256, 32, 32), (512, 16, 16), (1024, 8, 8)],
    "googlenet": [(480, 32, 32), (832, 16, 16), (1024, 8, 8)],
    "resnet18": [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)],  # ImageNet stem: /4 before stage 1
    "resnet34": [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)],
}

# (shared trunk, one branch) parameters on CIFAR-100, split as in the ONE / OKDDip official codes
# (docs/backbones.md), for the backbones listed.
SPLITS = {
    "resnet32": (112_592, 360_164),
    "resnet110": (275_280, 895_588),
    "wrn20_8": (1_629_776, 5_241_444),
    "vgg16": (7_640_640, 7_659_108),
    "densenet40_12": (115_848, 72_244),
    "resnext29_2x64d": (2_158_912, 7_063_652),
}


class TestBackbones(unittest.TestCase):
    def test_every_backbone_is_pinned(self):
        # A backbone added to BACKBONES without a pinned count or stage shapes fails here.
        self.assertEqual(set(common.BACKBONES), set(PARAMS))
        self.assertEqual(set(common.BACKBONES), set(STAGES))
        arch = next(f for f in dataclasses.fields(common.TrainArgs) if f.name == "arch")
        self.assertEqual(common.choices(arch), list(common.BACKBONES))  # what --arch accepts

    def test_parameter_counts_10_and_100_classes(self):
        for arch, counts in PARAMS.items():
            for C, n in zip((10, 100), counts):
                with self.subTest(arch=arch, C=C):
                    self.assertEqual(common.num_params(common.build_backbone(arch, C)), n)

    def test_stage_shapes_widths_and_logits(self):
        x = torch.randn(2, 3, 32, 32)
        for arch, shapes in STAGES.items():
            with self.subTest(arch=arch):
                torch.manual_seed(0)
                net = common.build_backbone(arch, 100).eval()
                with torch.no_grad():
                    maps, logits = net.features(x), net(x)
                self.assertEqual([tuple(m.shape) for m in maps], [(2, *s) for s in shapes])
                self.assertEqual(net.widths, [s[0] for s in shapes])
                self.assertEqual(net.feature_dim, shapes[-1][0])
                self.assertEqual(tuple(logits.shape), (2, 100))
                self.assertTrue(torch.isfinite(logits).all())
                # forward = pool + fc on the last stage map: a method reading features() sees what the
                # classifier sees.
                torch.testing.assert_close(logits, net.fc(net.pool(maps[-1])))

    def test_multibranch_split_every_backbone(self):
        x = torch.randn(2, 3, 32, 32)
        for arch, (_, full) in PARAMS.items():
            with self.subTest(arch=arch):
                mb = common.MultiBranch(arch, 100, 3).eval()
                trunk, branch = common.num_params(mb.trunk), common.num_params(mb.branches[0])
                if arch in SPLITS:
                    self.assertEqual((trunk, branch), SPLITS[arch])
                # trunk + one branch is exactly one backbone (the deployed model), for every backbone
                self.assertEqual(trunk + branch, full)
                self.assertEqual(common.num_params(mb), trunk + 3 * branch)
                self.assertEqual(common.num_params(mb.single(2)), full)
                shapes = STAGES[arch]
                self.assertEqual(mb.trunk_channels, shapes[-2][0])  # every backbone splits before its last stage
                self.assertEqual(mb.feature_dim, shapes[-1][0])
                with torch.no_grad():
                    logits, feats, t = mb(x)
                    single = mb.single(1)(x)
                self.assertEqual(tuple(logits.shape), (3, 2, 100))
                self.assertEqual(tuple(feats.shape), (3, 2, shapes[-1][0]))
                self.assertEqual(tuple(t.shape), (2, *shapes[-2]))
                torch.testing.assert_close(single, logits[1])
                # branches are built from separate backbones: their initial weights differ
                self.assertFalse(torch.equal(logits[0], logits[1]))

    def test_branches_own_distinct_modules_and_parameters(self):
        for arch in common.BACKBONES:
            with self.subTest(arch=arch):
                mb = common.MultiBranch(arch, 10, 3)
                parts = [mb.trunk, *mb.branches]
                mods = [{id(m) for m in p.modules()} for p in parts]
                params = [{id(q) for q in p.parameters()} for p in parts]
                for i in range(len(parts)):
                    for j in range(i + 1, len(parts)):
                        self.assertFalse(mods[i] & mods[j], f"module object shared by parts {i} and {j}")
                        self.assertFalse(params[i] & params[j])
                # every parameter of the model is in the trunk or in exactly one branch
                self.assertEqual(sum(len(p) for p in params), len(list(mb.parameters())))

    def test_three_resnet110s_are_different_nets(self):
        blocks = lambda arch: sum(isinstance(m, common.Bottleneck) for m in common.build_backbone(arch, 10).modules())
        self.assertEqual(blocks("resnet110"), 36)   # 12 bottlenecks/stage: 110 layers
        self.assertEqual(blocks("resnet164"), 54)   # 18 bottlenecks/stage: 164 layers
        self.assertEqual(blocks("resnet110_basic"), 0)
        basic = sum(isinstance(m, common.BasicBlock) for m in common.build_backbone("resnet110_basic", 10).modules())
        self.assertEqual(basic, 54)

    def test_wrn_is_preactivation_with_conv_bias_and_ffsd_taps(self):
        torch.manual_seed(0)
        net = common.build_backbone("wrn16_2", 10).train()
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        self.assertTrue(all(c.bias is not None for c in convs))  # FFSD's bias=True definition
        self.assertEqual(len(convs), 1 + 3 * 2 * 2 + 3)  # stem, 2 convs x 2 blocks x 3 stages, 3 shortcuts
        maps = net.features(torch.randn(4, 3, 32, 32))
        # stages 1-2 end with a residual sum (no ReLU: pre-activation); stage 3 ends with the final BN + ReLU,
        # which is FFSD's third tap.
        self.assertLess(maps[0].min().item(), 0)
        self.assertLess(maps[1].min().item(), 0)
        self.assertGreaterEqual(maps[2].min().item(), 0)
        self.assertIsInstance(net.stages[2][-1], nn.ReLU)
        self.assertIsInstance(net.stages[2][-2], nn.BatchNorm2d)

    def test_wrn20_8_is_the_wide_bottleneck_net(self):
        net = common.build_backbone("wrn20_8", 10)
        blocks = [m for m in net.modules() if isinstance(m, common.Bottleneck)]
        self.assertEqual(len(blocks), 6)  # [2, 2, 2]
        inner = [b.body[2][0].out_channels for b in blocks]  # the 3x3 conv of each bottleneck
        self.assertEqual(inner, [128, 128, 256, 256, 512, 512])

    def test_resnext_uses_two_groups(self):
        net = common.build_backbone("resnext29_2x64d", 10)
        grouped = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 2]
        self.assertEqual([c.out_channels for c in grouped], [128] * 3 + [256] * 3 + [512] * 3)

    def test_vgg_head_dropout_and_init(self):
        torch.manual_seed(0)
        net = common.build_backbone("vgg16", 100)
        linears = [m for m in net.fc if isinstance(m, nn.Linear)]
        self.assertEqual([(l.in_features, l.out_features) for l in linears], [(512, 512), (512, 512), (512, 100)])
        self.assertEqual([m.p for m in net.fc if isinstance(m, nn.Dropout)], [0.5, 0.5])  # OKDDip multi-branch VGG
        self.assertEqual(sum(isinstance(m, nn.Conv2d) for m in net.modules()), 13)
        w = torch.cat([l.weight.flatten() for l in linears])
        self.assertAlmostEqual(w.std().item(), 0.01, delta=0.001)  # Linear ~ N(0, 0.01)
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                self.assertEqual(m.bias.abs().max().item(), 0.0)
        # dropout makes train-mode outputs stochastic, eval-mode deterministic
        x = torch.randn(2, 3, 32, 32)
        net.eval()
        with torch.no_grad():
            torch.testing.assert_close(net(x), net(x))

    def test_densenet_variants(self):
        bc, plain = common.build_backbone("densenet40_12", 10), common.build_backbone("densenet40_12_plain", 10)
        layers = lambda net: [m for m in net.modules() if isinstance(m, common.DenseLayer)]
        self.assertEqual(len(layers(bc)), 18)      # 3 x 6 bottleneck layers (BC)
        self.assertEqual(len(layers(plain)), 36)   # 3 x 12 plain layers
        # BC layers: 1x1 to 4k = 48 then 3x3 to k = 12; plain layers: a single 3x3 to 12
        self.assertEqual([c.out_channels for c in layers(bc)[0].modules() if isinstance(c, nn.Conv2d)], [48, 12])
        self.assertEqual([c.out_channels for c in layers(plain)[0].modules() if isinstance(c, nn.Conv2d)], [12])
        # both end with BN + ReLU before pooling (the OKDDip original skips it in its branches; not copied)
        for net in (bc, plain):
            self.assertIsInstance(net.stages[2][-1], nn.ReLU)
            self.assertIsInstance(net.stages[2][-2], nn.BatchNorm2d)

    def test_googlenet_inception_paths(self):
        net = common.build_backbone("googlenet", 10)
        incs = [m for m in net.modules() if isinstance(m, common.Inception)]
        self.assertEqual(len(incs), 9)  # a3 b3 | a4 b4 c4 d4 e4 | a5 b5
        self.assertEqual([i.out_channels for i in incs], [256, 480, 512, 512, 512, 528, 832, 832, 1024])
        self.assertTrue(all(c.bias is not None for c in net.modules() if isinstance(c, nn.Conv2d)))


if __name__ == "__main__":
    unittest.main()
