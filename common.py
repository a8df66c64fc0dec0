"""common.py: everything that is NOT an online-distillation algorithm. Method files import this module
and nothing else of ours; the algorithm (losses, train step, which models are scored) lives in each.

What a method file may use, by section (sections 1-5 are the reading path; 6 is plumbing):
  1. CLI bridge     `arg` (a flag with its --help, choices, bounds), `TrainArgs`, `parse_args`, `fail`.
  2. Backbones      `build_backbone(arch, C)` -> `Net` (stem, stages, pool, fc; `.features(x)` every
                    stage's map, `.head(maps)` the logits), `num_params`, `network_archs`, `peer_names`.
  3. Branching      `MultiBranch(arch, C, m)`: one shared trunk, m branches; `.single(j)`.
  4. Data           nothing directly: `fit(..., views=m)` asks for m augmented views per batch.
  5. Training loop  `setup(args, method)` -> `Run` (`.args`, `.num_classes`, `.steps_per_epoch`,
                    `.autocast()`, `.to_device()`, `.scalar()`), `sgd`, `adam`, `kd_loss`,
                    `sigmoid_rampup`, `rampup_weight`, `ema_update`, `fp32_region`, `eval_mode`,
                    `fit(run, model, optimizers, train_step, evaluate, deployed, ...)`.
  6. Plumbing       nothing directly: the start of a run, --compile, devices, seeds, metrics.jsonl,
                    checkpoints, --resume, deployed.pt, final.json.
Streamed folders, the ImageNet recipe and torchrun live in beyond.py; `setup` hands such a run over.
"""
import argparse
import dataclasses
import functools
import datetime
import json
import math
import operator
import os
import random
import shlex
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def fail(msg):
    """Stop with a one-line error (no traceback): `error: <msg>` on stderr, exit status 1. Under
    torchrun every process meets the same error: rank 0 says it, the others exit quietly after a
    pause that lets its line come out first (torchrun stops them as soon as one fails)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        time.sleep(3)
        raise SystemExit(1)
    raise SystemExit(f"error: {msg}")


# =====================================================================================================
# 1. CLI bridge and shared arguments
# =====================================================================================================
def arg(default, help, **kw):
    """A dataclass field with its --help text kept in the field's metadata, with optional checks
    that check_args applies: `choices` (a list, or a function returning one, for lists defined
    further down) and the bounds `at_least`, `at_most` (inclusive) and `above` (exclusive)."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def choices(field):
    """A field's allowed values (None: any)."""
    c = field.metadata.get("choices")
    return c() if callable(c) else c


@dataclass
class TrainArgs:
    """Arguments every method shares (same names in every script)."""
    arch: str = arg("resnet32", "backbone", choices=lambda: list(BACKBONES))  # looked up when parsing
    dataset: str = arg("cifar10", "data set; 'folder' reads --data-dir/{train,test}/<class>/*",
                       choices=lambda: DATASETS)
    data_dir: str = arg("./data", "where torchvision downloads CIFAR, or the image folder for "
                                  "--dataset folder")
    subset: int = arg(0, "use a class-balanced first N training images (0 = all)", at_least=0)
    test_subset: int = arg(0, "use a class-balanced first N test images (0 = all)", at_least=0)
    epochs: int = arg(300, "training epochs", at_least=1)
    batch_size: int = arg(128, "training mini-batch size (images)", at_least=1)
    lr: float = arg(0.1, "initial SGD learning rate", above=0)
    lr_decay_at: str = arg("0.5,0.75", "multiply the LR by --lr-gamma after these fractions of --epochs")
    lr_gamma: float = arg(0.1, "LR decay factor at each milestone")
    momentum: float = arg(0.9, "SGD momentum")
    nesterov: bool = arg(True, "Nesterov momentum")
    weight_decay: float = arg(5e-4, "SGD weight decay (L2, coupled)")
    pad_mode: str = arg("zero", "random-crop padding (4 pixels): zero (black) or reflect",
                        choices=["zero", "reflect"])
    augment: bool = arg(True, "random crop and flip of every training image (--no-augment: the "
                              "images as they are, as PyTorch's distillation tutorial trains)")
    seed: int = arg(0, "random seed (initialisation, batch order, augmentation)")
    device: str = arg("auto", "auto = cuda if available, else mps (Apple silicon), else cpu",
                      choices=["auto", "cpu", "cuda", "mps"])
    bf16: bool = arg(True, "bf16 autocast for forward and loss (CUDA only; ignored on CPU)")
    channels_last: bool = arg(True, "channels_last memory layout (CUDA only; ignored on CPU)")
    drop_last: bool = arg(False, "drop each epoch's last partial training batch, so every step has "
                                 "the same shape (default: kept, as the papers' DataLoader does; "
                                 "--compile implies it)")
    compile: bool = arg(False, "torch.compile the networks' forward (opt-in; implies --drop-last; "
                               "eager's numbers up to float rounding; the first steps compile)")
    eval_batch_size: int = arg(1000, "test-time batch size", at_least=1)
    out: str = arg("", "output directory (default runs/<method>-<arch>-<dataset>-seed<seed>)")
    resume: bool = arg(False, "continue from the checkpoint in --out")
    stop_after: int = arg(0, "stop after N epochs of this invocation, checkpoint kept, to continue "
                             "later with --resume (0 = run to --epochs)", at_least=0)
    log_every: int = arg(0, "also print a line every N steps (0 = one row per epoch)", at_least=0)
    # Beyond CIFAR (beyond.py, docs/beyond-cifar.md): image size, streamed folders, warm-up, recipe,
    # torchrun. The CIFAR path leaves them at their defaults.
    image_size: int = arg(0, "image side in pixels, a multiple of 32: 0 = the data's own (32 "
                             "for CIFAR and fake, the images' own in memory, 224 streamed)")
    loader: str = arg("auto", "--dataset folder: memory (decode once, hold on the device), stream "
                              "(decode every batch from disk), auto (stream when the decoded train "
                              "split would exceed --memory-budget-gb or --image-size differs from "
                              "the images' size)", choices=["auto", "memory", "stream"])
    memory_budget_gb: float = arg(16.0, "--loader auto: largest decoded train split held in memory",
                                  above=0)
    lr_warmup_epochs: int = arg(0, "linear LR warm-up: epoch e < N (0-based) uses (e + 1) / N of "
                                   "the scheduled LR (0 = off)", at_least=0)
    recipe: str = arg("none", "imagenet: FFSD's ImageNet recipe (90 epochs, batch 256, LR 0.8 "
                              "warmed up over 5 epochs, x0.1 at epochs 30 and 60, wd 1e-4, "
                              "Nesterov) for every flag left at its default",
                      choices=["none", "imagenet"])
    sync_bn: bool = arg(False, "under torchrun: BatchNorm statistics of the whole global batch "
                               "(CUDA only; default: per process, as nn.DataParallel in the "
                               "papers' code)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise SystemExit(f"{self.prog}: error: {message} (see --help)")


def parse_args(cls, argv=None):
    """Turn a dataclass of arguments into argparse flags (--kebab-case) and back into the dataclass."""
    parser = _Parser(description=cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if isinstance(f.default, bool):
            parser.add_argument(flag, default=f.default, help=meta["help"],
                                action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, default=f.default, help=meta["help"], type=type(f.default),
                                choices=choices(f))
    return check_args(cls(**vars(parser.parse_args(argv))))


BOUNDS = {"at_least": (operator.ge, "at least"), "at_most": (operator.le, "at most"),
          "above": (operator.gt, "above")}  # arg(..., at_least=2): the check and its words


def check_args(args):
    """Validate values argparse cannot (also for Args built directly in Python); one-line errors."""
    for f in dataclasses.fields(args):
        value, allowed, flag = getattr(args, f.name), choices(f), "--" + f.name.replace("_", "-")
        if allowed is not None and value not in allowed:
            fail(f"{flag} {value!r} is not one of: {', '.join(map(str, allowed))}")
        for key, (ok, words) in BOUNDS.items():
            if key in f.metadata and not ok(value, f.metadata[key]):
                fail(f"{flag} must be {words} {f.metadata[key]}, got {value}")
    try:
        fractions = [float(v) for v in args.lr_decay_at.split(",") if v.strip()]
    except ValueError:
        fractions = [-1.0]
    if any(not 0 < v <= 1 for v in fractions):
        fail(f"--lr-decay-at takes comma-separated fractions in (0, 1], got {args.lr_decay_at!r}")
    if args.image_size < 0 or args.image_size % 32:
        fail(f"--image-size must be 0 (the data's own size) or a multiple of 32 (every backbone "
             f"halves its maps up to 5 times), got {args.image_size}")
    if args.dataset != "folder" and args.image_size not in (0, 32):
        fail(f"--image-size {args.image_size}: {args.dataset} images are 32x32; other sizes need "
             f"--dataset folder")
    if args.dataset != "folder" and args.loader == "stream":
        fail(f"--loader stream reads an image folder (--dataset folder), not --dataset {args.dataset}")
    return args


def apply_preset(args):
    """--preset NAME of a method whose Args defines PRESETS = {NAME: {field: value}}: those fields
    take the preset's values (over any flag), in place like --recipe."""
    for name, value in getattr(args, "PRESETS", {}).get(getattr(args, "preset", None), {}).items():
        setattr(args, name, value)
    return args


# =====================================================================================================
# 2. Backbones: every network is stem -> stages[0..S-1] -> pool -> fc, built from plain modules, so a
#    method can read every stage output (FFSD) or cut the network into a shared trunk and per-branch parts
#    (ONE, OKDDip, PCL) by composition, without hooks.
# =====================================================================================================
class Net(nn.Module):
    """A backbone as parts. `widths[i]`: channels out of stages[i]; `split`: how many stages the shared
    trunk of a multi-branch network keeps (where the ONE / OKDDip official codes cut it; docs/backbones.md);
    `feature_dim`: width of pool's output (given explicitly when fc is not a single Linear, e.g. VGG's MLP
    head)."""

    def __init__(self, stem, stages, pool, fc, widths, split, feature_dim=None):
        super().__init__()
        self.stem, self.stages, self.pool, self.fc = stem, nn.ModuleList(stages), pool, fc
        self.widths, self.split, self.feature_dim = list(widths), split, feature_dim or fc.in_features

    def features(self, x):
        """Every stage's output map, shallow to deep: [F^1, ..., F^S]."""
        maps = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def head(self, maps):
        """Logits from the stage maps (the last one): pool, then fc."""
        return self.fc(self.pool(maps[-1]))

    def forward(self, x):
        return self.head(self.features(x))


def _conv_bn(cin, cout, k, stride=1, groups=1, bias=False):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias),
                         nn.BatchNorm2d(cout))


def _conv_bn_relu(cin, cout, k, stride=1, bias=False):
    return nn.Sequential(_conv_bn(cin, cout, k, stride, bias=bias), nn.ReLU(inplace=True))


def _bn_relu_conv(cin, cout, k, stride=1, bias=False):
    """Pre-activation unit (WRN, DenseNet): BN-ReLU-conv."""
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias))


def _avg_pool():
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, C, H, W) -> (B, C)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. Shortcut = conv1x1+BN when the shape changes
    (option B)."""
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, planes, 3, stride), nn.ReLU(inplace=True),
                                  _conv_bn(planes, planes, 3))
        self.shortcut = _conv_bn(cin, planes, 1, stride) if stride != 1 or cin != planes else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN + shortcut, ReLU; output = planes * 4 channels.
    `width` = inner width (planes for ResNet, planes * base_width / 64 * groups for wide/grouped nets)."""
    expansion = 4

    def __init__(self, cin, planes, stride, width=None, groups=1):
        super().__init__()
        width, cout = width or planes, planes * self.expansion
        self.body = nn.Sequential(_conv_bn(cin, width, 1), nn.ReLU(inplace=True),
                                  _conv_bn(width, width, 3, stride, groups), nn.ReLU(inplace=True),
                                  _conv_bn(width, cout, 1))
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def init_weights(net):
    """Reference-code init: conv ~ N(0, sqrt(2 / (k*k*C_out))) (Kaiming normal, fan-out), BN gamma=1, beta=0,
    Linear left at PyTorch's default."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def cifar_resnet(block, blocks_per_stage, num_classes, planes=(16, 32, 64), stem=16, **block_kw):
    """CIFAR ResNet: conv3x3 3->stem + BN + ReLU; three stages (strides 1, 2, 2); avg-pool; Linear."""
    stages, cin = [], stem
    for i, p in enumerate(planes):
        layers = []
        for b in range(blocks_per_stage):
            layers.append(block(cin, p, 2 if (i > 0 and b == 0) else 1, **block_kw.get(f"s{i}", {})))
            cin = p * block.expansion
        stages.append(nn.Sequential(*layers))
    widths = [p * block.expansion for p in planes]
    return init_weights(Net(nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                          nn.ReLU(inplace=True)),
                            stages, _avg_pool(), nn.Linear(widths[-1], num_classes),
                            widths, split=len(stages) - 1))


def resnet8(num_classes):
    """Tiny basic-block ResNet (1 block/stage, 78k params): for tests and CPU demos only; in no paper
    table."""
    return cifar_resnet(BasicBlock, 1, num_classes)


def resnet20(num_classes):
    """ResNet-20: basic blocks, 3 per stage, projection (option B) shortcuts. 272,474 / 278,324 params."""
    return cifar_resnet(BasicBlock, 3, num_classes)


def resnet32(num_classes):
    """ResNet-32: basic blocks, 5 per stage, projection (option B) shortcuts. 466,906 / 472,756 params."""
    return cifar_resnet(BasicBlock, 5, num_classes)


def resnet56(num_classes):
    """ResNet-56: basic blocks, 9 per stage, projection (option B) shortcuts. 855,770 / 861,620 params."""
    return cifar_resnet(BasicBlock, 9, num_classes)


def resnet110(num_classes):
    """ResNet-110 as in the OKDDip/PCL tables: 12 BOTTLENECK blocks per stage (expansion 4, outputs
    64/128/256), 110 layers, 1,147,738 / 1,170,868 params. Not He et al.'s basic ResNet-110 (that is
    `resnet110_basic`), nor official ONE's 164-layer net."""
    return cifar_resnet(Bottleneck, 12, num_classes)


def resnet110_basic(num_classes):
    """He et al.'s ResNet-110: basic blocks, 18 per stage. 1,730,714 / 1,736,564 params; in no table here."""
    return cifar_resnet(BasicBlock, 18, num_classes)


def resnet164(num_classes):
    """Official ONE's "ResNet-110" (its bearpaw-style ResNet switches to bottlenecks at depth >= 44): 18
    BOTTLENECK blocks per stage, 164 layers, 1,704,154 / 1,727,284 params. Use it to compare with the
    ONE paper."""
    return cifar_resnet(Bottleneck, 18, num_classes)


def wrn20_8(num_classes):
    """WRN-20-8 of the OKDDip/PCL tables: NOT a Zagoruyko WRN (20 is not 6n+4) but a torchvision-style wide
    BOTTLENECK ResNet: stem 16; [2, 2, 2] Bottlenecks with width_per_group 512, i.e. inner widths 128/256/512,
    outputs 64/128/256. 6,848,090 / 6,871,220 params."""
    return cifar_resnet(Bottleneck, 2, num_classes, s0={"width": 128}, s1={"width": 256}, s2={"width": 512})


def resnext29_2x64d(num_classes):
    """ResNeXt-29 (2x64d), CIFAR version of Xie et al.: stem conv3x3 3->64; 3 stages of 3 Bottlenecks with
    cardinality 2 (grouped 3x3 convs, inner widths 128/256/512), outputs 256/512/1024. 9,130,314 / 9,222,564
    params. PCL gives no definition; this is the standard one."""
    grouped = {f"s{i}": {"width": w, "groups": 2} for i, w in enumerate((128, 256, 512))}
    return cifar_resnet(Bottleneck, 3, num_classes, planes=(64, 128, 256), stem=64, **grouped)


class PreActBlock(nn.Module):
    """Wide-ResNet block as in FFSD's file: BN-ReLU-conv3x3-BN-ReLU-conv3x3 (stride on the second conv) plus a
    shortcut (conv1x1, no BN, on the raw input when the shape changes); every conv has a bias; no ReLU after
    the sum (pre-activation)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(_bn_relu_conv(cin, cout, 3, bias=True),
                                  _bn_relu_conv(cout, cout, 3, stride, bias=True))
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=True) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


def wide_resnet(depth, k, num_classes):
    """Zagoruyko & Komodakis pre-activation WRN-depth-k with FFSD's conv bias=True: conv3x3 3->16; three
    stages of (depth-4)/6 PreActBlocks with 16k/32k/64k channels (strides 1, 2, 2); the final BN + ReLU closes
    stage 3, so that stage's output is FFSD's third tap (FFSD official code, models/wideresnet_cifar.py);
    avg-pool; Linear(64k -> C).
    NOTE(deviation): FFSD's final BN uses momentum=0.9 (running stats follow the latest batch); here 0.1."""
    n, stages, cin = (depth - 4) // 6, [], 16
    for i, w in enumerate((16 * k, 32 * k, 64 * k)):
        stages.append(nn.Sequential(*(PreActBlock(cin if b == 0 else w, w, 2 if i > 0 and b == 0 else 1)
                                      for b in range(n))))
        cin = w
    stages[-1].extend([nn.BatchNorm2d(cin), nn.ReLU(inplace=True)])
    return init_weights(Net(nn.Conv2d(3, 16, 3, 1, 1, bias=True), stages, _avg_pool(),
                            nn.Linear(cin, num_classes), [16 * k, 32 * k, 64 * k], split=2))


def wrn16_2(num_classes):
    """WRN-16-2 (FFSD tables): 2 blocks per stage, widths 32/64/128. 692,810 / 704,420 params
    (bias-free: 691,674 / 703,284)."""
    return wide_resnet(16, 2, num_classes)


def wrn40_2(num_classes):
    """WRN-40-2 (FFSD tables): 6 blocks per stage, widths 32/64/128. 2,246,474 / 2,258,084 params."""
    return wide_resnet(40, 2, num_classes)


def vgg16(num_classes, dropout=0.5):
    """VGG-16 with BN as in OKDDip's multi-branch `vgg_GL.py`: conv stages 64x2, 128x2, 256x3, 512x3, 512x3
    (conv3x3 with bias, BN, ReLU), each followed by a 2x2 max-pool (-> 512x1x1); head Linear(512, 512)-ReLU-
    Dropout-Linear(512, 512)-ReLU-Dropout-Linear(512, C). 15,253,578 / 15,299,748 params.
    Parts: stem = conv stages 1-2; stages = conv stages 3, 4, 5, each OPENED by the previous max-pool (the
    last max-pool is in `pool`), so every backbone exposes three stages whose maps halve (256x8x8, 512x4x4,
    512x2x2) and none is 1x1. The shared trunk (stem + stages 1-2) is conv stages 1-4, as in OKDDip's
    official vgg_GL.py (same parameters, same function); it hands over 512x4x4, i.e. before its
    parameter-free max-pool, which opens each branch.
    Dropout 0.5 = OKDDip's multi-branch VGG (its single-network vgg.py and the PCL re-implementation use 0.0).
    Init: Kaiming fan-out convs, BN 1/0, Linear N(0, 0.01), all biases 0 (OKDDip)."""
    def convs(cin, cout, n):  # n x (conv3x3 + BN + ReLU)
        return [_conv_bn_relu(cin if i == 0 else cout, cout, 3, bias=True) for i in range(n)]
    stem = nn.Sequential(*convs(3, 64, 2), nn.MaxPool2d(2), *convs(64, 128, 2))  # (B, 128, 16, 16)
    stages = [nn.Sequential(nn.MaxPool2d(2), *convs(cin, cout, 3))
              for cin, cout in ((128, 256), (256, 512), (512, 512))]
    head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(512, num_classes))
    # The last max-pool is adaptive: 2x2 -> 1x1 at 32 px (as MaxPool2d(2)), any size -> 1x1 above.
    pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
    net = init_weights(Net(stem, stages, pool, head, [256, 512, 512], split=2, feature_dim=512))
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.zeros_(m.bias)
    return net


class DenseLayer(nn.Module):
    """x -> cat(x, g(x)) with k new channels; g = BN-ReLU-conv3x3 (plain), or BN-ReLU-conv1x1 to
    4k-BN-ReLU-conv3x3 (BC)."""

    def __init__(self, cin, k, bottleneck):
        super().__init__()
        self.g = (nn.Sequential(_bn_relu_conv(cin, 4 * k, 1), _bn_relu_conv(4 * k, k, 3)) if bottleneck
                  else _bn_relu_conv(cin, k, 3))

    def forward(self, x):
        return torch.cat([x, self.g(x)], 1)


def densenet(depth, k, num_classes, bc):
    """DenseNet for CIFAR: conv3x3 3->2k; three dense blocks of n layers (n = (depth-4)/6 bottleneck layers
    for BC, (depth-4)/3 plain ones otherwise); transitions BN-ReLU-conv1x1 (x0.5 channels for BC, x1 plain) +
    avg-pool 2; final BN + ReLU (closing stage 3); avg-pool; Linear. Stage boundaries follow each reference:
    BC (OKDDip) closes stages 1-2 with their transition, so the trunk ends at 60x8x8 (OKDDip official code,
    densenet_GL.py); plain (FFSD) opens stages 2-3 with it, so stage outputs are the dense-block outputs FFSD
    taps (FFSD official code, models/densenet_cifar.py)."""
    n, c = (depth - 4) // (6 if bc else 3), 2 * k
    # parts: block, transition, block, transition, block
    stem, parts, outs = nn.Conv2d(3, c, 3, 1, 1, bias=False), [], []
    for i in range(3):
        parts.append([DenseLayer(c + j * k, k, bc) for j in range(n)])
        c += n * k
        outs.append(c)
        if i < 2:
            parts.append([_bn_relu_conv(c, c // 2 if bc else c, 1), nn.AvgPool2d(2)])
            c = c // 2 if bc else c
            outs.append(c)
    parts[-1] += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
    groups = [[0, 1], [2, 3], [4]] if bc else [[0], [1, 2], [3, 4]]  # which parts make each stage
    stages = [nn.Sequential(*(m for p in g for m in parts[p])) for g in groups]
    return init_weights(Net(stem, stages, _avg_pool(), nn.Linear(c, num_classes),
                            [outs[g[-1]] for g in groups], split=2))


def densenet40_12(num_classes):
    """DenseNet-BC-40-12 of the OKDDip/PCL tables: 3 blocks of 6 bottleneck layers, compression 0.5;
    channels 24 -> 96 -> 48 -> 120 -> 60 -> 132. 176,122 / 188,092 params. (OKDDip's own densenet_GL.py reuses
    one dense block across branches and skips the final BN-ReLU; this is the corrected net, as in MCL-OKD.)"""
    return densenet(40, 12, num_classes, bc=True)


def densenet40_12_plain(num_classes):
    """Original DenseNet-40 (k = 12) of the FFSD tables: 3 blocks of 12 plain layers, no compression; stage
    outputs 168, 312, 456 channels. 1,059,298 / 1,100,428 params."""
    return densenet(40, 12, num_classes, bc=False)


class Inception(nn.Module):
    """Four paths, concatenated on channels: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 (the "5x5" path) | 3x3
    max-pool -> 1x1. Every conv has a bias and is followed by BN + ReLU."""

    def __init__(self, cin, n1, r3, n3, r5, n5, npool):
        super().__init__()
        self.paths = nn.ModuleList([
            _conv_bn_relu(cin, n1, 1, bias=True),
            nn.Sequential(_conv_bn_relu(cin, r3, 1, bias=True), _conv_bn_relu(r3, n3, 3, bias=True)),
            nn.Sequential(_conv_bn_relu(cin, r5, 1, bias=True), _conv_bn_relu(r5, n5, 3, bias=True),
                          _conv_bn_relu(n5, n5, 3, bias=True)),
            nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn_relu(cin, npool, 1, bias=True))])
        self.out_channels = n1 + n3 + n5 + npool

    def forward(self, x):
        return torch.cat([p(x) for p in self.paths], 1)


def googlenet(num_classes):
    """CIFAR GoogLeNet of the FFSD tables (kuangliu/pytorch-cifar layout): conv3x3 3->192 + BN + ReLU; stage 1
    = Inception a3, b3 (480x32x32); stage 2 = max-pool 3/2 + a4..e4 (832x16x16); stage 3 = max-pool + a5, b5
    (1024x8x8): the stage outputs are FFSD's taps. Avg-pool; Linear(1024 -> C). 6,166,250 / 6,258,500 params.
    The multi-branch split after stage 2 is by analogy with the ResNets (no reference uses one)."""
    # per Inception: n1, r3, n3, r5, n5, npool
    cfg = [[(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64)],
           [(192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
            (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128)],
           [(256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)]]
    stages, cin = [], 192
    for i, stage in enumerate(cfg):
        layers = [nn.MaxPool2d(3, 2, 1)] if i > 0 else []
        for spec in stage:
            layers.append(Inception(cin, *spec))
            cin = layers[-1].out_channels
        stages.append(nn.Sequential(*layers))
    return init_weights(Net(_conv_bn_relu(3, 192, 3, bias=True), stages, _avg_pool(),
                            nn.Linear(cin, num_classes), [s[-1].out_channels for s in stages], split=2))


def imagenet_resnet(depth, num_classes):
    """torchvision's ResNet-18/34 (weights=None, torchvision's own init) as a Net: stem = conv7x7/2 +
    BN + ReLU + max-pool/2; stages = layer1..4 (64, 128, 256, 512 channels; 56, 28, 14, 7 px at 224
    px); pool = global average; fc. split = 3: branches share the stem and layer1-3."""
    import torchvision
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
    stem = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool)
    return Net(stem, [tv.layer1, tv.layer2, tv.layer3, tv.layer4],
               nn.Sequential(tv.avgpool, nn.Flatten()), tv.fc, [64, 128, 256, 512], split=3)


def resnet18(num_classes):
    """ImageNet ResNet-18 (torchvision's). 11,689,512 params at 1000 classes."""
    return imagenet_resnet(18, num_classes)


def resnet34(num_classes):
    """ImageNet ResNet-34 (torchvision's). 21,797,672 params at 1000 classes."""
    return imagenet_resnet(34, num_classes)


BACKBONES = {f.__name__: f for f in (resnet8, resnet20, resnet32, resnet56, resnet110, resnet110_basic,
                                      resnet164, wrn16_2, wrn40_2, wrn20_8, vgg16, densenet40_12,
                                      densenet40_12_plain, resnext29_2x64d, googlenet, resnet18, resnet34)}


def build_backbone(arch, num_classes):
    if arch not in BACKBONES:
        fail(f"unknown --arch {arch!r}; choices: {', '.join(BACKBONES)}")
    net = BACKBONES[arch](num_classes)
    net.arch = arch  # a plain attribute (not in the state_dict): which backbone deployed.pt holds
    return net


def network_archs(args, count):
    """The backbone of each of a method's separate networks: --arch a (every network; their number
    is args.<count>) or --arch a,b,... (one each; the list sets args.<count>, in place, so that
    config.json records it; a --<count> given with another value is an error)."""
    archs, flag = args.arch.split(","), "--" + count.replace("_", "-")
    if len(archs) == 1:
        return archs * getattr(args, count)
    default = {f.name: f.default for f in dataclasses.fields(args)}[count]
    if getattr(args, count) not in (default, len(archs)):
        fail(f"--arch {args.arch!r} names {len(archs)} networks but {flag} is "
             f"{getattr(args, count)}; leave {flag} out or make them agree")
    setattr(args, count, len(archs))
    return archs


def peer_names(nets, prefix="peer"):
    """peer1, peer2, ...; networks of different backbones carry theirs: peer1_resnet32, ..."""
    archs = [getattr(net, "arch", None) for net in nets]
    return [f"{prefix}{k + 1}" + (f"_{a}" if len(set(archs)) > 1 else "") for k, a in enumerate(archs)]


def num_params(module):
    """Trainable parameters (BN running buffers excluded), the count the tests pin and
    docs/backbones.md reports."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# =====================================================================================================
# 3. Branching (ONE, OKDDip, PCL): one shared low-level trunk, m branches with their own weights.
# =====================================================================================================
class Branch(nn.Module):
    """The per-branch part of a backbone: its stages after the split, pooling and classifier."""

    def __init__(self, net):
        super().__init__()
        self.stages, self.pool, self.fc = net.stages[net.split:], net.pool, net.fc

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        h = self.pool(x)  # (B, D) pooled feature
        return self.fc(h), h


class MultiBranch(nn.Module):
    """Trunk (stem + stages[:split]) shared once; m branches (stages[split:] + pool + fc) each taken from its
    own freshly built and initialised backbone, so no module object is ever reused across branches."""

    def __init__(self, arch, num_classes, m):
        super().__init__()
        nets = [build_backbone(arch, num_classes) for _ in range(m)]
        self.trunk = nn.Sequential(nets[0].stem, *nets[0].stages[:nets[0].split])
        self.branches = nn.ModuleList(Branch(net) for net in nets)
        self.trunk_channels, self.feature_dim = nets[0].widths[nets[0].split - 1], nets[0].feature_dim
        self.arch, self.widths, self.split = arch, nets[0].widths, nets[0].split

    def forward(self, x):
        """x: one batch (B, 3, H, W) shared by every branch, or a list of m views (one per branch; the trunk
        then runs once per view). Returns logits (m, B, C), pooled features (m, B, D), trunk output(s)."""
        if isinstance(x, (list, tuple)):
            trunk_out = [self.trunk(view) for view in x]
            outs = [branch(t) for branch, t in zip(self.branches, trunk_out)]
        else:
            trunk_out = self.trunk(x)
            outs = [branch(trunk_out) for branch in self.branches]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs]), trunk_out

    def single(self, j):
        """Trunk + branch j as one plain backbone (the deployed model of ONE, OKDDip, PCL),
        sharing this network's modules (no copy): stem = trunk[0], stages = trunk[1:] + branch
        j's stages, then branch j's pool and fc. Its state_dict has exactly the keys of
        build_backbone(arch, C) (stem.*, stages.i.*, fc.*); its forward is the same computation
        as trunk + branch j here."""
        b = self.branches[j]
        net = Net(self.trunk[0], [*self.trunk[1:], *b.stages], b.pool, b.fc, self.widths,
                  self.split, self.feature_dim)
        net.arch = self.arch
        return net


# =====================================================================================================
# 4. Data: the whole split as one uint8 tensor (N, 3, S, S), S = 32 for CIFAR, on the training device;
#    augmentation (random crop with S/8-pixel padding + horizontal flip) runs batched on that device.
# =====================================================================================================
DATASETS = ["cifar10", "cifar100", "folder", "fake"]
# Per-dataset normalisation used by the OKDDip/PCL lineage; folder and fake compute theirs from the
# train split.
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


@dataclass
class Data:
    train_x: torch.Tensor  # (N, 3, S, S) uint8 (S = 32 for CIFAR), on the training device
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # (1, 3, 1, 1) float, in [0, 1] units
    std: torch.Tensor
    classes: list


def _cifar(args, train):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(args.data_dir, train=train, download=True)
    except Exception as e:  # no network, disk full, corrupt archive: say so in one line
        fail(f"could not load {args.dataset} into {args.data_dir!r} "
             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             f"without internet use --dataset folder")
    return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets),
            list(ds.classes))


def list_folder(root, split, classes=None):
    """root/split/<class>/* as (paths, labels, classes), nothing decoded (the checks of _folder)."""
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        fail(f"--data-dir {root!r} has no {split}/ folder; --dataset folder needs {d!r} with one "
             f"sub-folder per class (train/<class>/*, test/<class>/*)")
    found = sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))
    if not found:
        fail(f"{d!r} has no class sub-folders; expected {split}/<class>/<image>")
    if classes is not None and found != classes:
        fail(f"class folders of {d!r} {found} differ from train's {classes}")
    paths, labels = [], []
    for label, c in enumerate(found):
        names = sorted(os.listdir(os.path.join(d, c)))
        paths += [os.path.join(d, c, name) for name in names]
        labels += [label] * len(names)
    if not paths:
        fail(f"{d!r} contains no images")
    return paths, torch.tensor(labels), found


def read_image(path):
    """One image file as (3, H, W) uint8 RGB; a one-line error for a file that is not an image."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except Exception as e:
        fail(f"cannot decode image {path!r} ({type(e).__name__}: not an image file torchvision "
             f"can read)")


def _folder(root, split, classes=None, size=0):
    """root/split/<class>/* decoded into uint8 (N, 3, S, S): every image of the split one square
    size S, a multiple of 32 (`size` when given: --image-size for train, train's size for test)."""
    paths, labels, found = list_folder(root, split, classes)  # the layout checks, nothing decoded yet
    xs = [read_image(path) for path in paths]
    h0, w0 = xs[0].shape[1:]
    for path, (h, w) in zip(paths, (img.shape[1:] for img in xs)):
        if size and (h, w) != (size, size):
            why = ("like the train split" if split == "test"
                   else f"(--image-size {size}; other sizes: --loader stream)")
            fail(f"image {path!r} is {w}x{h}, expected {size}x{size} {why}")
        if (h, w) != (h0, w0):
            fail(f"image {path!r} is {w}x{h}, expected {w0}x{h0} like {paths[0]!r} (a folder held in "
                 f"memory has one image size per split; mixed sizes: --loader stream)")
    if h0 != w0 or h0 % 32:
        fail(f"image {paths[0]!r} is {w0}x{h0}, expected 32x32, 64x64 or another square whose side is "
             f"a multiple of 32 (a folder held in memory; other sizes: --loader stream --image-size S)")
    return torch.stack(xs), labels, found


def folder_loader(args):
    """'memory' or 'stream' for --dataset folder. --loader auto streams when the decoded train split
    would exceed --memory-budget-gb (the first train image's size x the number of files), or when
    --image-size asks for another size than that image's."""
    if args.loader != "auto":
        return args.loader
    paths, _, _ = list_folder(args.data_dir, "train")
    h, w = read_image(paths[0]).shape[1:]
    if args.image_size and (h, w) != (args.image_size, args.image_size):
        return "stream"
    too_big = (args.subset or len(paths)) * 3 * h * w > args.memory_budget_gb * 1e9
    return "stream" if too_big else "memory"


def make_fake(n, seed, num_classes=10):
    """Deterministic synthetic 32x32 RGB set: each class has its own colour plus a smooth random pattern
    (a 4x4 grid upsampled), the same for every split; an image is its class template at a random
    brightness plus pixel noise drawn from `seed`. A small CNN learns it in a few CPU epochs, and the
    class survives crop and flip. Independent of --seed: the same data every run, so it is built once
    per process (about a second of CPU) and each call gets its own copy."""
    x, y = _fake_set(n, seed, num_classes)
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=4)
def _fake_set(n, seed, num_classes):
    g = torch.Generator().manual_seed(1234)
    colour, grid = (torch.rand(num_classes, 3, 1, 1, generator=g),
                    torch.rand(num_classes, 3, 4, 4, generator=g))
    # class templates (C, 3, 32, 32): 60 % flat colour, 40 % the upsampled grid
    templates = 0.6 * colour + 0.4 * F.interpolate(grid, size=32, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = (templates[y] * (0.8 + 0.2 * torch.rand(n, 1, 1, 1, generator=g))
         + 0.1 * torch.randn(n, 3, 32, 32, generator=g))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def balanced_first(y, n, num_classes):
    """Indices (in data order) of a class-balanced first n: the first n // C images of every class, and one
    more of each of the first n % C classes."""
    idx = [torch.nonzero(y == c).flatten()[:n // num_classes + (c < n % num_classes)]
           for c in range(num_classes)]
    return torch.sort(torch.cat(idx)).values


def check_subset_sizes(args, n_train, n_test):
    """--subset and --test-subset fit their splits (n_train None: no train split loaded)."""
    for flag, n, size in (("--subset", args.subset, n_train), ("--test-subset", args.test_subset, n_test)):
        if size is not None and n > size:
            fail(f"{flag} {n} is larger than the split ({size} images)")


def channel_stats(x, chunk=1024):
    """Per-channel mean and (unbiased) std of uint8 images (N, 3, H, W) in [0, 1] units. Up to 32 px
    in one float copy; larger images in float64 chunks (Tiny-ImageNet's float copy: 4.9 GB)."""
    if x.shape[-1] <= 32:
        f = x.float() / 255
        return f.mean(dim=(0, 2, 3), keepdim=True), f.std(dim=(0, 2, 3), keepdim=True)
    s, s2 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        f = x[i:i + chunk].to(torch.float64) / 255
        s, s2 = s + f.sum(dim=(0, 2, 3)), s2 + f.pow(2).sum(dim=(0, 2, 3))
    n = x.numel() // 3
    mean = s / n
    std = ((s2 - n * mean ** 2) / (n - 1)).clamp_min(0).sqrt()
    return mean.float().view(1, 3, 1, 1), std.float().view(1, 3, 1, 1)


def load_data(args, device, test_only=False):
    """Both splits as a Data on `device` (--subset / --test-subset applied). test_only: the test
    split alone (evaluation; train_x is then empty and mean/std are the test split's, for the
    caller to replace with the training normalisation where the data set has no fixed one)."""
    if args.dataset in ("cifar10", "cifar100"):
        test_x, test_y, classes = _cifar(args, train=False)
        train_x, train_y, _ = (test_x[:0], test_y[:0], None) if test_only else _cifar(args, train=True)
    elif args.dataset == "folder" and test_only:
        test_x, test_y, classes = _folder(args.data_dir, "test", size=args.image_size)
        train_x, train_y = test_x[:0], test_y[:0]
    elif args.dataset == "folder":
        train_x, train_y, classes = _folder(args.data_dir, "train", size=args.image_size)
        test_x, test_y, _ = _folder(args.data_dir, "test", classes, size=train_x.shape[-1])
    elif args.dataset == "fake":
        test_x, test_y = make_fake(2000, seed=2)
        train_x, train_y = (test_x[:0], test_y[:0]) if test_only else make_fake(10000, seed=1)
        classes = [f"class{i}" for i in range(10)]
    else:
        fail(f"unknown --dataset {args.dataset!r}; choices: {', '.join(DATASETS)}")
    check_subset_sizes(args, None if test_only else len(train_y), len(test_y))
    if args.subset and not test_only:
        keep = balanced_first(train_y, args.subset, len(classes))
        train_x, train_y = train_x[keep], train_y[keep]
    if args.test_subset:
        keep = balanced_first(test_y, args.test_subset, len(classes))
        test_x, test_y = test_x[keep], test_y[keep]
    if args.dataset in MEAN_STD:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEAN_STD[args.dataset])
    else:
        mean, std = channel_stats(test_x if test_only else train_x)
    return Data(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device),
                mean.to(device), std.to(device), classes)


def augment(x, data, gen, pad_mode="zero"):
    """Random crop H x W from the image padded by H/8, W/8 (4 pixels at 32 x 32, 8 at 64 x 64;
    zero = black pixels, before normalisation; or reflect) and a horizontal flip with probability
    1/2, for a whole uint8 batch at once; returns normalised float. One gather does both: output
    pixel (i, j) reads padded pixel (oy + i, ox + j), or (oy + i, ox + W - 1 - j) when flipped."""
    (B, _, H, W), dev = x.shape, x.device
    ph, pw = H // 8, W // 8  # crop padding
    mode = "constant" if pad_mode == "zero" else "reflect"
    xp = F.pad(x.float() / 255, (pw, pw, ph, ph), mode=mode)  # (B, 3, H + 2ph, W + 2pw)
    oy, ox = (torch.randint(0, 2 * p + 1, (B,), generator=gen, device=dev) for p in (ph, pw))
    flip = torch.rand(B, generator=gen, device=dev) < 0.5
    i, j = torch.arange(H, device=dev), torch.arange(W, device=dev)
    rows = oy[:, None] + i  # (B, H)
    cols = ox[:, None] + torch.where(flip[:, None], W - 1 - j, j)  # (B, W)
    out = xp[torch.arange(B, device=dev)[:, None, None, None],
             torch.arange(3, device=dev)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]  # (B, 3, H, W)
    return (out - data.mean) / data.std


def normalise(x, data):
    """uint8 images -> float, normalised with the training set's per-channel mean and std."""
    return (x.float() / 255 - data.mean) / data.std


def train_view(x, data, gen, args):
    """One training view of the uint8 batch x: augment(...), or with --no-augment the images as they are."""
    return augment(x, data, gen, args.pad_mode) if args.augment else normalise(x, data)


def train_batches(run, gen, views=1):
    """One epoch of (x, y): shuffled, augmented on the device. x is a tensor, or a list of `views`
    independently augmented copies of the same images (one per peer). A last batch of 1 image is dropped
    (BatchNorm cannot train on it); with --drop-last (or --compile) every partial last batch is."""
    data, bs = run.data, run.args.batch_size
    perm = torch.randperm(len(data.train_y), generator=gen, device=data.train_y.device)
    for s in range(0, len(perm) - bs + 1 if run.drop_last else len(perm) - 1, bs):
        idx = perm[s:s + bs]
        xb = [run.layout(train_view(data.train_x[idx], data, gen, run.args)) for _ in range(views)]
        yield (xb[0] if views == 1 else xb), data.train_y[idx]


# =====================================================================================================
# 5. Training loop: KD helper, ramp-up, EMA, schedule, optimisers, the Run, setup, evaluation, fit.
# =====================================================================================================
def kd_loss(student_logits, teacher_logits, T):
    """KD_T(t -> s) = T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch
    (`reduction='batchmean'`, never 'mean', which would divide by C too). The T^2 keeps the gradient scale of
    the soft term independent of T (Hinton et al.). The caller decides what is detached. (..., C) logits."""
    s = F.log_softmax(student_logits.float() / T, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / T, dim=-1).flatten(0, -2)
    return T * T * F.kl_div(s, t, reduction="batchmean", log_target=True)


def sigmoid_rampup(epoch, length):
    """w(e) = exp(-5 (1 - min(e, L)/L)^2) at the 0-based epoch e: Laine & Aila's sigmoid ramp-up, as
    in the ONE and OKDDip official code (the PCL re-implementation's divides by the wrong constant).
    w(0) = 0.0067, w(L/2) = 0.287, w(>=L) = 1. L = 0 disables the ramp (w = 1)."""
    if length <= 0:
        return 1.0
    return math.exp(-5.0 * (1.0 - min(epoch, length) / length) ** 2)


def rampup_weight(run, epoch, length, name="w"):
    """w(e) = sigmoid_rampup(e, length) in the form a train step multiplies by: Run.scalar's 0-d
    float32 tensor on the run's device, so a CUDA step bakes in no Python number and copies nothing
    from the host. The same values as the plain number (a loss accepts either)."""
    return run.scalar(name, sigmoid_rampup(epoch, length))


@torch.no_grad()
def ema_update(mean_tensors, tensors, decay):
    """The temporal mean (Tarvainen & Valpola 2017): mean <- decay * mean + (1 - decay) * theta, in
    place, for each pair of `mean_tensors` and `tensors` (the caller chooses which: parameters, not
    BN buffers, in PCL). decay: a number, or a 0-d tensor on the tensors' device (Run.scalar).
    torch's multi-tensor ops: a couple of kernels for all the tensors on a GPU, not a few per tensor."""
    mean_tensors, tensors = list(mean_tensors), list(tensors)
    if len(mean_tensors) != len(tensors):
        raise ValueError(f"ema_update: {len(mean_tensors)} mean tensors for {len(tensors)} tensors")
    torch._foreach_mul_(mean_tensors, decay)
    torch._foreach_add_(mean_tensors, torch._foreach_mul(tensors, 1 - decay))


def lr_factor(epoch, args):
    """Step schedule: x lr_gamma at each milestone (fractions of --epochs; 0.5,0.75 of 300 = epochs 150,
    225 counted from 0, i.e. the decayed LR is first used in the 151st epoch). With --lr-warmup-epochs W
    (the ImageNet recipe; Goyal et al.) the 0-based epoch e < W also takes (e + 1) / W of it.
    NOTE(deviation): the warm-up moves once per epoch (fit sets the LR per epoch); Goyal et al.'s moves
    every iteration."""
    milestones = [round(float(v) * args.epochs) for v in args.lr_decay_at.split(",") if v.strip()]
    warm = args.lr_warmup_epochs
    warmup = (epoch + 1) / warm if epoch < warm else 1.0
    return args.lr_gamma ** sum(epoch >= m for m in milestones) * warmup


def sgd(params, args, weight_decay=None):
    """The recipe's SGD (Nesterov momentum 0.9, wd 5e-4 by default); one fused kernel per step on CUDA."""
    params = list(params)
    wd = args.weight_decay if weight_decay is None else weight_decay
    fused = bool(params) and all(p.is_cuda for p in params)  # BOILERPLATE: speed only, same update rule
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                           weight_decay=wd, fused=fused or None)


def adam(params, lr, weight_decay):
    """Adam (coupled L2 weight decay); fused on CUDA, like sgd: one kernel per step, and it reads a
    device-tensor learning rate (set_lr), which the non-fused CUDA paths cannot without a sync."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)  # BOILERPLATE: speed only, same rule
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def set_lr(run, optimizers, epoch):
    """Every group's LR = its base_lr (the LR it was built with) x lr_factor(epoch); returns the first
    group's LR as a number (for the log). On CUDA a fused (or capturable) optimiser's LR is a 0-d
    device tensor rewritten in place (no host sync; a compiled step reads the current value); on the
    CPU a Python float, exactly a plain float schedule. A resumed run converts either form here."""
    first = None
    for opt in optimizers.values():
        for g in opt.param_groups:
            if "base_lr" not in g:  # the first call: read the built LR once
                g["base_lr"] = float(g["lr"])
            lr = g["base_lr"] * lr_factor(epoch, run.args)
            first = lr if first is None else first
            dev = g["params"][0].device if g["params"] else run.device
            if dev.type == "cuda" and (g.get("fused") or g.get("capturable")):
                old = g["lr"]
                if torch.is_tensor(old) and old.device == dev and old.dtype == torch.float32:
                    old.fill_(lr)
                else:
                    g["lr"] = torch.full((), lr, dtype=torch.float32, device=dev)
            else:
                g["lr"] = lr
    return first


@contextmanager
def eval_mode(module):
    """The block runs `module` in evaluation mode (BN uses and keeps its running statistics); its
    mode is restored after."""
    mode = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(mode)


def fp32_region(x):
    """`with fp32_region(x):` autocast off for x's device type: matmul, einsum, bmm and Linear
    inside run in float32 on float32 inputs. CUDA autocast lowers those ops to bf16 whatever their
    inputs' dtype, so a .float() before them is not enough. Nothing changes where no autocast is
    active (CPU runs)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


@dataclass
class Run:
    """One training run: what a method's step uses (args, device, autocast, layout, scalar) and the
    parts of the loop that depend on where the data come from and how many processes train:
    `batches`, `score`, `prepare`, `launcher`, `summary`. setup builds this Run (CIFAR, fake, a folder
    held in memory; one process); beyond.py's overrides those parts for streamed folders and torchrun."""
    args: object
    method: str
    device: torch.device
    data: Data
    out: str
    amp: bool  # bf16 autocast active
    channels_last: bool
    scalars: dict = dataclasses.field(default_factory=dict, repr=False)  # name -> (tensor, value)
    main_process = True  # the process that prints and writes files (under torchrun: rank 0 only)

    @property
    def num_classes(self):
        return len(self.data.classes)

    @property
    def drop_last(self):
        """Every training batch full (--drop-last, implied by --compile): static shapes."""
        return self.args.drop_last or self.args.compile

    @property
    def steps_per_epoch(self):
        """Batches per epoch as train_batches yields them (a last batch of 1 image is dropped; with
        drop_last every partial one is)."""
        n, bs = len(self.data.train_y), self.args.batch_size
        return n // bs if self.drop_last else len(range(0, n - 1, bs))

    def scalar(self, name, value):
        """A number a step uses (a ramp-up weight, an EMA factor) as a 0-d float32 tensor on the
        run's device, cached under `name` and rewritten in place (fill_: no copy, no host sync) when
        the value changes: the step never builds a tensor from a Python number (a blocking copy on
        CUDA). A logged value aliases it: fit stacks each step's logs before any change."""
        t, old = self.scalars.get(name, (None, None))
        if t is None:
            t = torch.full((), value, dtype=torch.float32, device=self.device)
        elif value != old:
            t.fill_(value)
        self.scalars[name] = (t, value)
        return t

    def layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self):
        """bf16 autocast on CUDA (softmax, log_softmax, cross-entropy and KL still run in fp32);
        nothing on CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()

    def to_device(self, module):
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def batches(self, gen, views=1):
        """One epoch of training batches: train_batches."""
        return train_batches(self, gen, views)

    def score(self, model, evaluate):
        """Top-1 accuracy (%) of every model `evaluate` names: evaluate_all."""
        return evaluate_all(self, model, evaluate)

    def prepare(self, model, optimizers):
        """Before the first step: --compile."""
        return compile_model(model) if self.args.compile else model

    def launcher(self):
        """What starts a script of this run on the command line (resume_command)."""
        return [os.path.basename(sys.executable) or "python"]

    def summary(self):
        """final.json's fields on where and how the run ran."""
        return {"device": _device_name(self.device), "torch": torch.__version__,
                "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}


def setup(args, method):
    """Validate the arguments, pick the device, seed, load the data: a Run. --out is created only
    when training starts (fit): bad data, an error or Ctrl-C before that leaves no folder.
    The one branch off the CIFAR path: a torchrun launch, --recipe or a folder streamed from disk
    is set up by beyond.py (docs/beyond-cifar.md)."""
    check_args(args)
    apply_preset(args)  # a method's --preset (ONE's one-official) sets its flags (in place)
    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.recipe != "none"
            or args.dataset == "folder" and folder_loader(args) == "stream"):
        import beyond
        return beyond.setup(args, method)
    return start_run(args, method, pick_device(args.device))


def is_internal(name):
    """evaluate's entries named 'int/...' are a method's internals (ONE's gate, OKDDip's attention, ...):
    per-sample values (B, ...) averaged over the test set, not logits to score."""
    return name.startswith("int/")


def tally(outs, y):
    """One test batch's sums: correct predictions per model (logits (B, C)); per internal, its values
    summed over the batch (float32)."""
    return {name: v.float().sum(0) if is_internal(name) else (v.float().argmax(-1) == y).sum()
            for name, v in outs.items()}


def test_means(sums, n):
    """Top-1 accuracy (%) per model; per internal, its mean over the n test images (a float, or a list
    for a vector, nested lists for a matrix: JSON as metrics.jsonl writes it)."""
    return {name: (s / n).tolist() if is_internal(name) else 100.0 * s.item() / n for name, s in sums.items()}


@torch.no_grad()
def evaluate_all(run, model, evaluate):
    """Top-1 accuracy (%) of every model the method names: evaluate(model, x) -> {name: logits (B, C)},
    in eval mode, and the test-set mean of every internal it returns ('int/...': per-sample values).
    The forward runs under the training autocast (bf16 on CUDA, as trained); the logits are cast to
    float32 before the arg-max (the ensembles average float32 logits)."""
    model.eval()
    data, sums, ebs = run.data, {}, run.args.eval_batch_size
    for s in range(0, len(data.test_y), ebs):
        x = run.layout(normalise(data.test_x[s:s + ebs], data))
        y = data.test_y[s:s + ebs]
        with run.autocast():
            outs = evaluate(model, x)
        sums = {name: sums.get(name, 0) + v for name, v in tally(outs, y).items()}
    model.train()
    return test_means(sums, len(data.test_y))


def fit(run, model, optimizers, train_step, evaluate, deployed, views=1, averages=None, show=(),
        deployed_net=None, gaps=None):
    """The epoch loop every method shares; the method supplies the parts it owns.

    model:      nn.Module holding every weight of the method (checkpointed; eval mode while scoring).
    optimizers: {name: Optimizer} every optimiser (checkpointed); the LR schedule scales each group's
                initial LR by lr_factor(epoch).
    train_step(model, optimizers, x, y, epoch, step, run) -> {term: detached scalar tensor}, with 'loss'.
    evaluate(model, x) -> {model name: logits}; `deployed` names the model the method deploys (test_acc).
                Entries named 'int/...' are the method's internals (per-sample values, averaged over the
                test set and logged as they are: no 'acc/' prefix).
    averages:   {name: [model names]} extra columns: the mean of those models' accuracies (e.g. 'peer_avg').
    gaps:       {name: (model a, model b)} internals 'int/<name>' = accuracy of a - accuracy of b (points).
    show:       the loss terms the console row shows besides 'loss' (metrics.jsonl keeps every term).
    deployed_net(model, args) -> the deployed model as a plain backbone; a finished run writes it to
                deployed.pt. Returns final.json's content (or, after --stop-after, where to resume).
    """
    args = run.args
    gen = torch.Generator(device=run.device).manual_seed(args.seed)  # batch order and augmentation
    start, history, best = _begin(run, model, optimizers, gen)  # --out, --resume, --compile
    steps_per_epoch = run.steps_per_epoch
    with _interruptible(run, start) as progress:  # Ctrl-C: keep the last checkpoint, print how to resume
        for epoch in range(start, args.epochs):
            if args.stop_after and epoch - start == args.stop_after:
                return _stop(run, epoch)
            lr = set_lr(run, optimizers, epoch)  # one LR for the whole epoch (lr_factor)
            # Train mode for every sub-network of `model`, every epoch (evaluation left eval mode):
            # BN normalises with batch statistics and updates its running ones, PCL's temporal mean
            # included (its BN statistics come from its own forward passes, not from the EMA).
            model.train()
            meter, t0 = LossMeter(), time.perf_counter()
            # x: a batch, or a list of `views` independently augmented copies of it (PCL: one per peer).
            for i, (x, y) in enumerate(run.batches(gen, views)):
                step = epoch * steps_per_epoch + i  # 0-based, counts batches over the whole run
                logs = train_step(model, optimizers, x, y, epoch, step, run)
                meter.add(logs, len(y), step)
                if args.log_every and (i + 1) % args.log_every == 0:
                    print(f"  step {i + 1}/{steps_per_epoch} loss {logs['loss'].item():.4f}",
                          flush=True)
            _stop_if_not_finite(run, meter, epoch, progress["saved"])
            _sync(run.device)
            sec = time.perf_counter() - t0
            accs = run.score(model, evaluate)  # eval mode while scoring, train mode after
            for name, members in (averages or {}).items():
                accs[name] = sum(accs[m] for m in members) / len(members)
            for name, (a, b) in (gaps or {}).items():
                accs[f"int/{name}"] = accs[a] - accs[b]
            history.append({"epoch": epoch + 1, "lr": lr, **meter.means(),
                            **{(k if is_internal(k) else f"acc/{k}"): v for k, v in accs.items()},
                            "sec": sec, "images": meter.seen, "images_per_s": meter.seen / sec})
            if accs[deployed] > best["acc"]:
                best = {"acc": accs[deployed], "epoch": epoch + 1}
            _print_row(run, history[-1], best, deployed, show, averages, header=epoch == start)
            _save_epoch(run, model, optimizers, gen, history, best, deployed)
            progress["saved"] = epoch + 1
        return _finish(run, model, history, best, deployed, deployed_net)


# =====================================================================================================
# 6. Plumbing: the start every run shares, --compile, devices and seeds; what fit writes and reads back
#    (the epoch's loss sums, the console row, metrics.jsonl, checkpoints and --resume, Ctrl-C, the
#    non-finite check, deployed.pt, final.json).
# =====================================================================================================
def start_run(args, method, device, load=None, cls=Run):
    """The start every run shares: the --arch list, --out and --resume, the seeds, the data
    (load(args, device), by default load_data) and the Run (class cls)."""
    for name in args.arch.split(","):  # a list (one backbone per network) where a method allows it
        if name not in BACKBONES:
            fail(f"unknown --arch {name!r}; choices: {', '.join(BACKBONES)}")
    out = args.out or os.path.join("runs", f"{method}-{args.arch}-{args.dataset}-seed{args.seed}")
    ckpt = os.path.join(out, "checkpoint.pt")
    if args.resume and not os.path.isfile(ckpt):
        fail(f"--resume: no checkpoint at {ckpt!r}")
    if not args.resume and os.path.isfile(ckpt):
        fail(f"{out!r} already holds a run; continue it with --resume or choose another --out")
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        data = (load or load_data)(args, device)
    except KeyboardInterrupt:  # Ctrl-C here: one line, status 130, nothing written
        print(f"interrupted while loading the data; nothing was written to {out!r}",
              file=sys.stderr, flush=True)
        raise SystemExit(130)
    cuda = device.type == "cuda"  # bf16 and channels_last: CUDA only (not measured on MPS or CPU)
    run = cls(args, method, device, data, out, amp=cuda and args.bf16,
              channels_last=cuda and args.channels_last)
    if run.drop_last and run.steps_per_epoch == 0:
        why = "--drop-last" if args.drop_last else "--compile (implies --drop-last)"
        fail(f"--batch-size {args.batch_size} with {why} leaves no training batch: the training "
             f"set has {len(data.train_y)} images; lower --batch-size")
    return run


def require(feature, **needed):
    """Stop with one line where a feature needs a newer package than requirements.txt's floor, e.g.
    require("--compile on Python 3.12", torch="2.4") -> `error: --compile on Python 3.12 needs
    torch >= 2.4 (this is 2.3.1)`. Versions compare by their leading numbers (2.4.1+cu121 -> 2.4.1)."""
    def numbers(version):
        return tuple(int(p) for p in version.split("+")[0].split(".") if p.isdigit())
    for package, version in needed.items():
        have = __import__(package)  # torch or torchvision, already imported
        if numbers(have.__version__) < numbers(version):
            fail(f"{feature} needs {package} >= {version} (this is {have.__version__})")


COMPILE_NEEDS = {(3, 12): "2.4", (3, 13): "2.6"}  # Python -> the first torch whose compile runs on it


def compile_model(model):
    """--compile: torch.compile, in place (nn.Module.compile: state_dict keys unchanged), the forward
    of the model, or of each child when the model has none (PCL's student and mean, DML's networks).
    Static shapes (--compile implies --drop-last); modules called other ways (FFSD's net.features)
    stay eager."""
    python = sys.version_info[:2]
    if python in COMPILE_NEEDS:  # Dynamo learns each Python release in a later torch
        require(f"--compile on Python {python[0]}.{python[1]}", torch=COMPILE_NEEDS[python])
    if type(model).forward is nn.Module.forward:  # no forward of its own (ModuleList, PCL)
        for child in model.children():
            compile_model(child)
    else:
        model.compile(dynamic=False)
    return model


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mps_available():
    mps = getattr(torch.backends, "mps", None)  # Apple's GPU backend (absent from some builds)
    return bool(mps is not None and mps.is_available())


def pick_device(name):
    """--device: auto = CUDA if present, else Apple's MPS, else the CPU; cuda, mps: must exist."""
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; choices: auto, cpu, cuda, mps")
    if name == "mps" and not _mps_available():
        fail("--device mps but Apple's MPS backend is not available (it needs a Mac with Apple "
             "silicon and a PyTorch build with MPS); choices: auto, cpu, cuda, mps")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    return torch.device(name)


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class LossMeter:
    """An epoch's sums of every logged term (weighted by batch size), kept on the device as one
    vector: a few kernels per step whatever the number of terms, no host sync before the epoch's end.
    Also the first global step at which each term went non-finite."""

    def __init__(self):
        self.names, self.seen = None, 0

    def add(self, logs, n, step):
        if not (isinstance(logs, dict) and "loss" in logs
                and all(torch.is_tensor(v) and v.dim() == 0 for v in logs.values())):
            fail(f"train_step must return a non-empty dict of 0-d tensors with 'loss' (got {logs!r:.80})")
        vals = torch.stack([v.detach().float() for v in logs.values()])  # (terms,)
        if self.names is None:
            self.names, self.sums, self.bad = list(logs), torch.zeros_like(vals), torch.full_like(vals, -1.0)
        self.sums += vals * n
        self.bad = torch.where((self.bad < 0) & ~torch.isfinite(vals), float(step), self.bad)
        self.seen += n

    def means(self):
        return {k: v / self.seen for k, v in zip(self.names, self.sums.tolist())}

    def first_bad_steps(self):
        return {k: int(at) for k, at in zip(self.names, self.bad.tolist()) if at >= 0}


def _begin(run, model, optimizers, gen):
    """Before the first epoch: create --out (config.json), or load the checkpoint to continue from;
    prepare the model (run.prepare); print the run's header. Returns (first epoch, history, best)."""
    args = run.args
    try:
        os.makedirs(run.out, exist_ok=True)
        if not args.resume and run.main_process:  # a resumed run keeps its first config.json
            _write_json(os.path.join(run.out, "config.json"), {"method": run.method, **dataclasses.asdict(args)})
    except OSError as e:
        fail(f"cannot write to --out {run.out!r} ({e.strerror})")
    start, history, best = 0, [], {"acc": -1.0, "epoch": 0}
    if args.resume:
        start, history, best = _load_checkpoint(run, model, optimizers, gen)
    run.prepare(model, optimizers)
    data = run.data
    print(f"{run.method}.py | {args.arch} | {args.dataset} ({len(data.train_y)} train / {len(data.test_y)} test, "
          f"{run.num_classes} classes) | {run.device.type}{' bf16' if run.amp else ''} | seed {args.seed} | "
          f"{args.epochs} epochs | out {run.out}", flush=True)
    print("config " + json.dumps(dataclasses.asdict(args)), flush=True)
    return start, history, best


@contextmanager
def _interruptible(run, start):
    """Ctrl-C inside the block: the checkpoint on disk is the last completed epoch, consistent as is;
    say so and how to resume, exit with status 130. progress["saved"]: the epoch that checkpoint holds."""
    progress = {"saved": start}
    try:
        yield progress
    except KeyboardInterrupt:
        saved = progress["saved"]
        if saved:
            print(f"interrupted in epoch {saved + 1}; the checkpoint of epoch {saved} is kept in "
                  f"{run.out!r}; resume with: {resume_command(run)}", file=sys.stderr, flush=True)
        else:
            print("interrupted in epoch 1, before the first checkpoint; nothing to resume",
                  file=sys.stderr, flush=True)
        raise SystemExit(130)  # the shell's status for 'ended by SIGINT'


def _stop(run, epoch):
    """--stop-after: stop before `epoch`, the checkpoint kept; say how to continue."""
    again = resume_command(run)
    print(f"stopped after epoch {epoch} of {run.args.epochs} (--stop-after {run.args.stop_after}); "
          f"continue with: {again}", flush=True)
    return {"stopped_after_epoch": epoch, "out": run.out, "resume_command": again}


def _stop_if_not_finite(run, meter, epoch, saved):
    """Stop with one line naming every term that first went non-finite at the earliest bad step."""
    bad = meter.first_bad_steps()
    if not bad:
        return
    first, spe = min(bad.values()), run.steps_per_epoch
    terms = ", ".join(repr(k) for k, at in bad.items() if at == first)
    kept = f"the checkpoint of epoch {saved} is kept in {run.out!r}" if saved else "no checkpoint was written"
    fail(f"non-finite loss ({terms}) at epoch {epoch + 1}, step {first - epoch * spe + 1} of {spe}; "
         f"stopped, {kept} (lower --lr?)")


def _print_row(run, row, best, deployed, show, averages, header):
    """The console row: the loss and the terms the method shows, the deployed model's accuracy and its
    best so far, the averages, time (metrics.jsonl keeps everything)."""
    cols = {"epoch": f"{row['epoch']}", "lr": f"{row['lr']:.4f}", "loss": f"{row['loss']:.4f}",
            **{k: f"{row[k]:.4f}" for k in show}, deployed: f"{row['acc/' + deployed]:.2f}",
            "best": f"{best['acc']:.2f}", **{k: f"{row['acc/' + k]:.2f}" for k in averages or {}},
            "sec": f"{row['sec']:.1f}", "img/s": f"{row['images_per_s']:.0f}"}
    if header:
        print(f"({deployed}: the deployed model's top-1 %, best: its best so far; every term and "
              f"model: {os.path.join(run.out, 'metrics.jsonl')})", flush=True)
        print(" | ".join(f"{c:>{max(6, len(c))}}" for c in cols), flush=True)
    print(" | ".join(f"{v:>{max(6, len(c))}}" for c, v in cols.items()), flush=True)


def _save_epoch(run, model, optimizers, gen, history, best, deployed):
    """After every epoch: metrics.jsonl and the checkpoint everything continues from."""
    if not run.main_process:
        return
    _write_text(os.path.join(run.out, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    save_checkpoint(os.path.join(run.out, "checkpoint.pt"), {
        "epoch": history[-1]["epoch"], "meta": _meta(run), "history": history, "best": best,
        "deployed": deployed, "data": data_info(run.data), "model": model.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
        "device": run.device.type, "device_rng": _device_rng(run.device),  # this device's RNG only
        "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
        "args": dataclasses.asdict(run.args)})


def _finish(run, model, history, best, deployed, deployed_net):
    """A finished run: deployed.pt (before final.json: a run with final.json has its deployed.pt),
    final.json (last- and best-epoch accuracy, time, command, versions) and the closing line."""
    args, last = run.args, history[-1]
    models = {k[4:]: v for k, v in last.items() if k.startswith("acc/")}
    arch = {}
    if deployed_net is not None:
        net = deployed_net(model, args)
        arch = {"deployed_arch": net.arch}
        payload = deployed_payload(net, deployed, run.method, args.dataset, data_info(run.data),
                                   test_acc=models[deployed], epoch=last["epoch"],
                                   test_subset=args.test_subset, bf16=run.amp)
        if run.main_process:
            save_checkpoint(os.path.join(run.out, "deployed.pt"), payload, what="deployed network")
    train_time = sum(h["sec"] for h in history)
    final = {**_meta(run), "epochs": args.epochs, "seed": args.seed, "deployed": deployed, **arch,
             "test_acc": models[deployed], "best_test_acc": best["acc"], "best_epoch": best["epoch"],
             "models": models, "train_loss": last["loss"], "train_time_s": train_time,
             "images_per_s": sum(h["images"] for h in history) / max(train_time, 1e-9),
             "date": datetime.date.today().isoformat(), **run.summary()}
    if run.main_process:
        _write_json(os.path.join(run.out, "final.json"), final)
    parts = [f"{deployed} {final['test_acc']:.2f} (last) {best['acc']:.2f} (best, epoch {best['epoch']})"]
    parts += [f"{k} {v:.2f}" for k, v in models.items() if k != deployed] + [f"{train_time / 60:.1f} min"]
    print("final | " + " | ".join(parts), flush=True)
    return final


def resume_command(run):
    """The command line that continues this run: the script, every flag that differs from its default,
    the output folder and --resume (floats print in full precision, so the values are exactly these)."""
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == f"{run.method}.py" else f"{run.method}.py"
    parts = run.launcher() + [script]
    for f in dataclasses.fields(run.args):
        value, flag = getattr(run.args, f.name), "--" + f.name.replace("_", "-")
        if f.name in ("out", "resume") or value == f.default:
            continue
        parts += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts + ["--out", run.out, "--resume"])


def _load_checkpoint(run, model, optimizers, gen):
    """--resume: weights, optimiser states, history and every RNG from --out's checkpoint; one-line
    errors for a corrupt file, another run's, or one whose weights no longer fit."""
    path = os.path.join(run.out, "checkpoint.pt")
    try:  # on the CPU: RNG states must be CPU tensors; load_state_dict copies onto the model's device
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"--resume: cannot read checkpoint {path!r} ({type(e).__name__}); it is corrupt or not "
             "a checkpoint")
    old = ck.get("meta") if isinstance(ck, dict) else None
    if old == _meta(run) and "device" not in ck:
        fail(f"--resume: checkpoint {path!r} was written by an older version of this repository "
             "(before the run device was recorded); start the run again")
    if old != _meta(run):
        theirs = ", ".join(f"{k} {v}" for k, v in old.items()) if isinstance(old, dict) else "unknown"
        ours = ", ".join(f"{k} {v}" for k, v in _meta(run).items())
        fail(f"--resume: checkpoint {path!r} is from another run ({theirs}), not this one ({ours}); "
             "choose another --out")
    try:
        model.load_state_dict(ck["model"])
        for k, o in optimizers.items():
            o.load_state_dict(ck["optimizers"][k])
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. another --num-peers: name the flags that changed
        old, new = ck.get("args", {}), dataclasses.asdict(run.args)
        changed = [f"--{k.replace('_', '-')} {old[k]} -> {new[k]}" for k in new
                   if k in old and old[k] != new[k]
                   and k not in ("resume", "stop_after", "out", "log_every")]
        fail(f"--resume: the weights in {path!r} do not fit this model ({type(e).__name__}); "
             f"changed since that run: {', '.join(changed) or 'nothing recorded'}")
    torch.set_rng_state(ck["torch_rng"])  # the CPU RNG: restorable on any device
    random.setstate(ck["python_rng"])
    np.random.set_state(ck["numpy_rng"])
    if ck["device"] == run.device.type:
        gen.set_state(ck["gen"])
        if run.device.type == "cuda":
            torch.cuda.set_rng_state(ck["device_rng"], run.device)
        elif run.device.type == "mps":
            torch.mps.set_rng_state(ck["device_rng"])
    else:  # a CUDA generator's state cannot be set on a CPU one (nor the reverse): continue, say so
        gen.manual_seed(run.args.seed + 1_000_003 * ck["epoch"])
        print(f"warning: --resume: {path!r} was written on {ck['device']}, this run is on "
              f"{run.device.type}: weights, optimiser state and schedule continue, but the "
              f"data-order and augmentation RNG restarts (seeded from --seed and the epoch), so "
              f"the run is not bit-for-bit an uninterrupted one", file=sys.stderr, flush=True)
    print(f"resumed from {path} after epoch {ck['epoch']}", flush=True)
    return ck["epoch"], ck["history"], ck["best"]


def _meta(run):
    return {"method": run.method, "arch": run.args.arch, "dataset": run.args.dataset,
            "num_classes": run.num_classes}


def _device_rng(device):
    """The RNG state of the run's own device (CUDA: this GPU only; MPS), None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.mps.get_rng_state() if device.type == "mps" else None


def _sync(device):
    """Wait for the device's queued work (so epoch times are real)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def _write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _write_json(path, obj):
    _write_text(path, json.dumps(obj, indent=1) + "\n")


def save_checkpoint(path, obj, what="checkpoint"):
    """Write to a temporary file, then rename: a crash, a full disk or Ctrl-C during the save leaves the
    previous checkpoint as it was (and no half-written temporary file)."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # atomic on POSIX: `path` is always a complete checkpoint
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception):  # disk full, permissions...: one line; Ctrl-C goes on to fit's handler
            why = f"{type(e).__name__}: {(str(e) or '?').splitlines()[0]}"
            fail(f"cannot write {what} {path!r} ({why}); the previous one is kept")
        raise


# BOILERPLATE: deployed.pt = the network a method deploys, as a plain backbone, and what it needs.
DEPLOYED_FORMAT = "okd-deployed-1"


def data_info(data):
    """What a network trained on `data` needs beside its weights: the input normalisation (in [0, 1]
    pixel units, per RGB channel) and the class names (label i = classes[i])."""
    return {"mean": data.mean.flatten().tolist(), "std": data.std.flatten().tolist(),
            "classes": list(data.classes)}


def deployed_payload(net, name, method, dataset, info, **extra):
    """deployed.pt's content: `state_dict` (CPU, contiguous) of the plain backbone `net` (from
    build_backbone or MultiBranch.single, so build_backbone(arch, num_classes) loads it with
    strict=True), its `arch`, `num_classes`, normalisation `mean`/`std`, `classes`, the `method`,
    which of its models it is (`model`, e.g. 'mt_peer1'), the training `dataset` and `extra`
    (test_acc, epoch, ...). Only tensors, strings, numbers: torch.load(weights_only=True) reads
    it."""
    sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    return {"format": DEPLOYED_FORMAT, "arch": net.arch, "num_classes": len(info["classes"]),
            **info, "method": method, "model": name, "dataset": dataset, **extra, "state_dict": sd}


def load_deployed(path):
    """Read a deployed.pt: (plain backbone, CPU, eval mode; the file's dict). One-line errors."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {path!r} ({type(e).__name__}); it is not a deployed.pt (or is corrupt)")
    if not isinstance(d, dict) or d.get("format") != DEPLOYED_FORMAT:
        fail(f"{path!r} is not a deployed.pt (no {DEPLOYED_FORMAT!r} format tag)")
    if d["arch"] not in BACKBONES:
        fail(f"{path!r} holds an unknown arch {d['arch']!r}; choices: {', '.join(BACKBONES)}")
    net = build_backbone(d["arch"], d["num_classes"])
    try:
        net.load_state_dict(d["state_dict"])  # strict: every key, every shape
    except RuntimeError as e:
        fail(f"the weights in {path!r} do not fit a {d['arch']} for {d['num_classes']} classes "
             f"({str(e).splitlines()[0]})")
    return net.eval(), d
