"""Baseline: one network trained alone with cross-entropy.

The reference point of every table (the "Baseline" column of PCL Tables 1-2 and FFSD Table I) and the
diff base of this repository: every method file has this file's sections, names, boilerplate and
imports (torch, nn, arg: unused here), so `diff baseline.py <method>.py` shows the method and little else.

Objective:  L = CE(z, y),  z = f(x) the logits of the single network.

Differences from baseline.py:
    none (this is the base).

Run:
    python baseline.py --arch resnet32 --dataset cifar10                      # shared recipe, GPU
    python baseline.py --arch resnet8 --dataset fake --epochs 3 --subset 512 --test-subset 200 --device cpu
Published (error %, PCL Tables 1-2, ResNet-32): 6.74 +- 0.15 (CIFAR-10), 28.72 +- 0.19 (CIFAR-100).
"""
# ===== 1. Imports =====
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import arg


# ===== 2. Args =====
@dataclass
class Args(common.TrainArgs):
    """Baseline: one network, cross-entropy (the diff base for every method)."""


# ===== 3. Model =====
def build_model(args, num_classes):
    # BOILERPLATE: one backbone.
    return common.build_backbone(args.arch, num_classes)


def build_optimizers(model, args):
    # BOILERPLATE: the recipe's SGD over every trainable parameter.
    return {"sgd": common.sgd(model.parameters(), args)}


# ===== 4. Loss =====
def baseline_loss(logits, y, args):
    """logits: (B, C). Returns (loss, logs)."""
    # ===== BEGIN ALGO: loss =====
    # ALGO: L = CE(z, y), mean over the batch.
    ce = F.cross_entropy(logits.float(), y)
    return ce, {"loss": ce.detach(), "ce": ce.detach()}
    # ===== END ALGO =====


# ===== 5. Train step =====
def train_step(model, optimizers, x, y, epoch, step, run):
    # ===== BEGIN ALGO: train step =====
    with run.autocast():
        logits = model(x)  # (B, C)
        loss, logs = baseline_loss(logits, y, run.args)
    optimizers["sgd"].zero_grad(set_to_none=True)
    loss.backward()
    optimizers["sgd"].step()
    return logs
    # ===== END ALGO =====


# ===== 6. Evaluate =====
def evaluate(model, x):
    # ===== BEGIN ALGO: evaluate =====
    # The one network is the deployed model.
    return {"net": model(x)}
    # ===== END ALGO =====


def deployed_net(model, args):
    """The deployed model as a plain backbone (written to deployed.pt)."""
    return model  # the one network


# ===== 7. Main =====
def main(args):
    run = common.setup(args, method="baseline")
    model = run.to_device(build_model(args, run.num_classes))
    optimizers = build_optimizers(model, args)
    return common.fit(run, model, optimizers, train_step, evaluate, deployed="net",
                      deployed_net=deployed_net)


if __name__ == "__main__":
    main(common.parse_args(Args))
