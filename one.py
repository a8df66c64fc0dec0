"""ONE: On-the-Fly Native Ensemble.

X. Lan, X. Zhu, S. Gong. "Knowledge Distillation by On-the-Fly Native Ensemble". NeurIPS 2018.
arXiv:1806.04606.

One network with a shared low-level trunk and m branches (each its own copy of the last stage and
classifier). A small gate looks at the shared features and weights the branches per sample; the weighted
sum of the branch logits is a teacher built on the fly. The teacher learns from the labels like every
branch, and its softened prediction is distilled back into each branch. At test time one branch is kept:
the deployed model costs exactly as much as the plain backbone.

Objective (ONE paper Sec. 3; exact forms from the official code Lan1991Xu/ONE_NeurIPS2018: cifar_one.py,
loss/kl_loss.py, utils/ramps.py, and models/cifar/resnet.py, ONE_ResNet, for the gate), branch logits
z_i, gate g = softmax(ReLU(BN(W pool(trunk(x)) + b))) over the m branches, teacher z_e = sum_i g_i z_i
(logits, per sample, nothing detached in the forward):
    L = sum_i CE(z_i, y) + CE(z_e, y) + w(e) * sum_i T^2 * KL(softmax(sg(z_e)/T) || softmax(z_i/T))
T = 3; w(e) = exp(-5 (1 - min(e, 80)/80)^2) at the 0-based epoch e (the official code's ramp-up); sg = detach
(the teacher is a target in the KL; it and the gate learn from CE(z_e) only). KL summed over classes,
averaged over the batch. (No paper equation numbers are cited: these forms were checked against the official
code, not against the paper's equations.)

Differences from baseline.py:
    1. The model is a shared trunk (stem + stages 1-2) with m branches (stage 3 + pool + Linear each, their
       own weights; --num-branches, default 3) and a gate Linear(C_trunk -> m) -> BN1d -> ReLU -> softmax.
    2. The loss adds CE on the gated teacher and the ramped-up KD from the detached teacher into every branch
       (--temperature 3, --rampup-epochs 80).
    3. Evaluation reports every branch, the gated teacher (one_e), the mean-logit ensemble and the branches'
       mean accuracy; branch 1 (trunk + branch 1, the plain backbone's size) is deployed.

Deviations: none from the official code in the algorithm (no 1e-7 added to the teacher's probabilities,
which is negligible). The default recipe is the repository's (Nesterov, wd 5e-4); --preset one-official sets
the official scripts' optimiser (wd 1e-4, no Nesterov) but keeps this repository's per-dataset
normalisation and LR milestones (the official code decays at epoch 151 and uses CIFAR-10 statistics for
both data sets).

Run:
    python one.py --arch resnet32 --dataset cifar100                     # GPU
    python one.py --arch resnet8 --dataset fake --epochs 3 --subset 512 --test-subset 200 --device cpu
Published (error %, ResNet-32): 5.99 (CIFAR-10), 26.61 (CIFAR-100) in the ONE paper (unverified;
FFSD Table II quotes ONE ResNet-32 CIFAR-100 as 73.39 % accuracy); PCL Tables 1-2 ONE column: 5.80 +- 0.12
(CIFAR-10), 26.21 +- 0.41 (CIFAR-100).
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
    """ONE: shared trunk, m branches, a gated on-the-fly teacher distilled into every branch."""
    num_branches: int = arg(3, "m: number of branches (official code: 3)", at_least=1)
    temperature: float = arg(3.0, "T: temperature of the KD term (scaled by T^2; official: 3)", above=0)
    rampup_epochs: int = arg(80, "epochs of the KD weight's ramp-up w(e) (official: 80; 0 = none)",
                             at_least=0)
    preset: str = arg("none", "one-official: the official scripts' optimiser, weight decay 1e-4 and "
                              "no Nesterov", choices=["none", "one-official"])
    PRESETS = {"one-official": {"weight_decay": 1e-4, "nesterov": False}}  # common.setup applies it


# ===== 3. Model =====
class ONE(nn.Module):
    """Shared trunk + m branches (common.MultiBranch) + the gate."""

    def __init__(self, arch, num_classes, m):
        super().__init__()
        self.net = common.MultiBranch(arch, num_classes, m)
        # ===== BEGIN ALGO: gate =====
        # ALGO: gate = pool(shared trunk output) -> Linear(C_trunk -> m, bias) -> BN1d(m) -> ReLU, then
        # a softmax over the branches (in forward). The ReLU clips negative scores to 0.
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(self.net.trunk_channels, m), nn.BatchNorm1d(m), nn.ReLU())
        # ===== END ALGO =====

    def forward(self, x):
        """Returns branch logits z (m, B, C), gate g (B, m), teacher logits z_e (B, C)."""
        z, _, t = self.net(x)  # z: (m, B, C); t: trunk output (B, C_trunk, H, W)
        # ===== BEGIN ALGO: gated teacher =====
        # The gate in float32 even under autocast (a tiny Linear C_trunk -> m feeding a softmax).
        with common.fp32_region(t):
            g = F.softmax(self.gate(t.float()), dim=1)  # (B, m): over the branches, rows sum to 1
        # ALGO: z_e = sum_i g_i * z_i, per sample, on LOGITS; nothing detached, so CE(z_e) trains
        # gate, branches and trunk.
        z_e = (g.t().unsqueeze(-1) * z.float()).sum(0)  # (m, B, 1) * (m, B, C) -> (B, C)
        return z, g, z_e
        # ===== END ALGO =====


def build_model(args, num_classes):
    # ALGO: one trunk shared once, m branches with their own weights (each from a freshly built backbone).
    return ONE(args.arch, num_classes, args.num_branches)


def build_optimizers(model, args):
    # BOILERPLATE: the recipe's SGD over every trainable parameter.
    return {"sgd": common.sgd(model.parameters(), args)}


# ===== 4. Loss =====
def one_loss(logits, z_e, y, w, args):
    """logits: (m, B, C) branches; z_e: (B, C) gated teacher; w: the ramp-up weight w(e) (a number
    or common.rampup_weight's tensor). Returns (loss, logs)."""
    # ===== BEGIN ALGO: loss =====
    T, loss, logs = args.temperature, 0.0, {}
    # ALGO: CE(z_e, y) trains the teacher, hence the gate (mean over the batch).
    ce_e = F.cross_entropy(z_e.float(), y)
    for i in range(logits.shape[0]):
        # ALGO: CE(z_i, y) for every branch, mean over the batch.
        ce = F.cross_entropy(logits[i].float(), y)
        # ALGO: KD_T(sg(z_e) -> z_i) = T^2 * KL(softmax(z_e/T) || softmax(z_i/T)), batchmean. The teacher is
        # detached (the official code takes it from .data): KD moves the branches and trunk, never the gate.
        # NOTE(deviation): the official code adds 1e-7 to the teacher's probabilities; left out (negligible).
        kd = common.kd_loss(logits[i], z_e.detach(), T)
        loss = loss + ce + w * kd
        logs[f"ce/branch{i + 1}"], logs[f"kd/branch{i + 1}"] = ce.detach(), kd.detach()
    # ALGO: L = sum_i CE_i + CE_e + w(e) * sum_i KD_i (plain sums, all weights 1).
    loss = loss + ce_e
    return loss, {"loss": loss.detach(), **logs, "ce/one_e": ce_e.detach(), "w": torch.as_tensor(w)}
    # ===== END ALGO =====


# ===== 5. Train step =====
def train_step(model, optimizers, x, y, epoch, step, run):
    # ===== BEGIN ALGO: train step =====
    # ALGO: w(e) from the 0-based epoch, constant within an epoch.
    w = common.rampup_weight(run, epoch, run.args.rampup_epochs)
    with run.autocast():
        logits, _, z_e = model(x)  # (m, B, C), (B, m), (B, C)
        loss, logs = one_loss(logits, z_e, y, w, run.args)
    optimizers["sgd"].zero_grad(set_to_none=True)
    loss.backward()
    optimizers["sgd"].step()
    return logs
    # ===== END ALGO =====


# ===== 6. Evaluate =====
def evaluate(model, x):
    # ===== BEGIN ALGO: evaluate =====
    logits, gate, z_e = model(x)  # (m, B, C), (B, m), (B, C)
    # Branch 1 is deployed; also every branch, the gated teacher (ONE-E as the official code logs it) and the
    # plain mean of the branch logits (what OKDDip's code calls the ensemble); both cost m branches.
    # Internal: the gate's weight on each branch, per test image (a softmax: sums to 1).
    return {**{f"branch{i + 1}": logits[i] for i in range(len(logits))}, "one_e": z_e,
            "ensemble": logits.float().mean(0), "int/gate": gate}
    # ===== END ALGO =====


def deployed_net(model, args):
    """The deployed model as a plain backbone (written to deployed.pt)."""
    return model.net.single(0)  # trunk + branch 1


# ===== 7. Main =====
def main(args):
    run = common.setup(args, method="one")
    model = run.to_device(build_model(args, run.num_classes))
    optimizers = build_optimizers(model, args)
    return common.fit(run, model, optimizers, train_step, evaluate, deployed="branch1",
                      averages={"branch_avg": [f"branch{i + 1}" for i in range(args.num_branches)]},
                      show=["ce/one_e", "kd/branch1", "w"],
                      deployed_net=deployed_net)


if __name__ == "__main__":
    main(common.parse_args(Args))
