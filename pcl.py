"""PCL: Peer Collaborative Learning for Online Knowledge Distillation.

G. Wu, S. Gong. "Peer Collaborative Learning for Online Knowledge Distillation". AAAI 2021. arXiv:2006.04147.
No official code; the loss below follows the structure of the public re-implementation
shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation (src/losses/, src/trainer.py).

One network with a shared low-level trunk and m branches ("peers"); each peer sees its own random
augmentation of the image. A peer ensemble teacher (one Linear on the concatenated pooled features of all
peers) learns from the labels and is distilled into every peer. A peer mean teacher (the temporal mean, i.e.
an EMA of the weights, of the whole network) distils each peer k's smoothed prediction into the OTHER peers.
After training, the temporal mean of peer 1 (mean trunk + mean peer 1) is deployed: it is a plain backbone.

Objective (the paper's terms, arranged as in the re-implementation; m peers, view x_j, labels y, logits
z_j, pooled features h_j, ensemble logits z_e = head([h_1, ..., h_m]); sg = stop-gradient, i.e. detach:
a target, not a student):
    L = CE(z_e, y) + sum_j [ CE(z_j, y) + w(e) KD_T(sg z_e -> z_j)                          # L_ce, L_pe
                             + w(e) 1/(m-1) sum_{k != j} KD_T(z'_k -> z_j) ]                  # L_pm
    KD_T(t -> s) = T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch.
    z'_k = temporal-mean peer k on its own view x_k (no gradient); w(e) = exp(-5 (1 - e/80)^2) at the
    0-based epoch e < 80, then 1; T = temperature.
Temporal mean (EMA of every student parameter theta; theta' = its mean): theta' <- phi(g) theta' +
(1 - phi(g)) theta after every optimiser step g = 0, 1, ...; phi(g) = min(1 - 1/(g + 1), beta), beta = 0.999
(beta: --ema-decay). The paper's presentation writes phi(g) = min(1 - 1/g, beta) and labels g the
epoch; counting steps is the re-implementation's (mean-teacher) reading, the only one under which
beta = 0.999 ever binds.

Differences from baseline.py:
    1. A student (MultiBranch: trunk + m peers; ensemble head Linear(m*D -> C)) and its temporal mean.
    2. m independently augmented views per batch (fit(..., views=m)); the trunk runs once per view.
    3. The loss adds CE(z_e) and the w(e)-weighted KD terms L_pe and L_pm (--temperature, --rampup-epochs).
    4. After each optimiser step the mean model takes an EMA step (--ema-decay beta).
    5. Evaluation reports the peers, the ensemble head, the temporal-mean peers (mt_peer1 deployed), PCL-E.

Deviations: the temporal-mean model runs in train mode while producing targets, so its BN statistics are
its own (not averaged, not copied), as in the mean-teacher code; phi counts optimiser steps, not epochs
(--ema-per-epoch gives the other reading of the paper's "g"); PCL-E averages logits (unstated in the paper);
every peer is initialised independently (the re-implementation starts all peers' Linear heads identical).

Run:
    python pcl.py --arch resnet32 --dataset cifar100        # the re-implementation's recipe, GPU
    python pcl.py --arch resnet8 --dataset fake --epochs 3 --subset 512 --test-subset 200 --device cpu
Published (error %, PCL Tables 1-2, temporal-mean peer 1, ResNet-32): 5.67 +- 0.12 (CIFAR-10),
25.86 +- 0.16 (CIFAR-100).
"""
# ===== 1. Imports =====
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import arg


# ===== 2. Args =====
@dataclass
class Args(common.TrainArgs):
    """PCL: peers with their own views, a feature-fusion ensemble teacher and a temporal-mean teacher."""
    num_peers: int = arg(3, "m: peers (trunk branches), each on its own view (paper: 3)", at_least=2)
    temperature: float = arg(3.0, "T: temperature of both KD terms (scaled by T^2; re-implementation: 3)",
                             above=0)
    rampup_epochs: int = arg(80, "alpha: epochs of the KD terms' ramp-up w(e) (0 = none)", at_least=0)
    ema_decay: float = arg(0.999, "beta: cap of the EMA decay phi(g) = min(1 - 1/(g+1), beta) "
                                  "(re-implementation: 0.999)", at_least=0, at_most=1)
    ema_per_epoch: bool = arg(False, "g counts epochs: one EMA update per epoch end (default: steps)")


# ===== 3. Model =====
class PeerNet(nn.Module):
    """The student: shared trunk + m peers (common.MultiBranch) + the peer ensemble head."""

    def __init__(self, arch, num_classes, m):
        super().__init__()
        self.peers = common.MultiBranch(arch, num_classes, m)
        # ALGO: peer ensemble teacher: Linear(m*D -> C, bias) on concat(h_1..h_m) (m*D = 192 for ResNet-32).
        self.head = nn.Linear(m * self.peers.feature_dim, num_classes)

    def forward(self, x):
        """x: one batch for all peers, or a list of m views. Returns peer logits (m, B, C), z_e (B, C)."""
        logits, feats, _ = self.peers(x)  # (m, B, C), (m, B, D)
        # ===== BEGIN ALGO: ensemble teacher -- z_e = head([h_1, ..., h_m]), features not detached =====
        h = feats.transpose(0, 1).flatten(1)  # (B, m*D) = [h_1, ..., h_m], not detached
        return logits, self.head(h)
        # ===== END ALGO =====


class PCL(nn.Module):
    """Everything PCL trains or keeps, as one module (one checkpoint): the student, its temporal mean."""

    def __init__(self, arch, num_classes, m):
        super().__init__()
        self.student = PeerNet(arch, num_classes, m)
        # ALGO: peer mean teacher = temporal mean of the whole student (trunk, peers, head): no
        # gradient, not in the optimiser. It starts equal to the student (the first update copies anyway).
        self.mean = copy.deepcopy(self.student).requires_grad_(False)


def build_model(args, num_classes):
    return PCL(args.arch, num_classes, args.num_peers)


def build_optimizers(model, args):
    # BOILERPLATE: the recipe's SGD over every trainable parameter.
    # (The student's; the mean model has none.)
    return {"sgd": common.sgd(model.student.parameters(), args)}


# ===== 4. Loss =====
def pcl_loss(logits, ens_logits, mean_logits, y, w, args):
    """logits: (m, B, C) peer j on view x_j; ens_logits: (B, C) z_e; mean_logits: (m, B, C)
    temporal-mean peer k on view x_k; w: the ramp-up weight w(e) (a number or a 0-d tensor).
    Returns (L, logs); logged KD terms are unweighted sums over peers."""
    # ===== BEGIN ALGO: loss =====
    m, T = logits.shape[0], args.temperature
    # ALGO: CE(z_e, y): the ensemble head's only loss; its gradient also reaches every peer and the trunk.
    ce_ens = F.cross_entropy(ens_logits.float(), y)
    # ALGO: the ensemble is a target for the peers, not a student of them: sg(z_e).
    target_ens = ens_logits.detach()
    ce_peers, kd_ens, kd_mean = 0.0, 0.0, 0.0
    for j in range(m):
        # ALGO: CE(z_j, y), mean over the batch.
        ce_peers = ce_peers + F.cross_entropy(logits[j].float(), y)
        # ALGO: L_pe: KD_T(sg z_e -> z_j) = T^2 batchmean KL(p_e || p_j).
        kd_ens = kd_ens + common.kd_loss(logits[j], target_ens, T)
        # ALGO: L_pm: 1/(m-1) sum_{k != j} KD_T(z'_k -> z_j); a peer never distils from its own mean teacher.
        kd_mean = kd_mean + sum(common.kd_loss(logits[j], mean_logits[k].detach(), T)
                                for k in range(m) if k != j) / (m - 1)
    # ALGO: L = CE(z_e) + sum_j [CE(z_j) + w(e) (L_pe,j + L_pm,j)]: sums over peers, not means.
    loss = ce_ens + ce_peers + w * (kd_ens + kd_mean)
    return loss, {"loss": loss.detach(), "ce/ens": ce_ens.detach(), "ce/peers": ce_peers.detach(),
                  "kd/ens": kd_ens.detach(), "kd/mean": kd_mean.detach()}
    # ===== END ALGO =====


# ===== 5. Train step =====
def ema_decay(g, beta):
    """phi(g), g = the 0-based update count (header: Temporal mean): 0 (a copy), 0.5, ..., <= beta."""
    # ===== BEGIN ALGO: phi(g) -- the decay of update g, see the header; never above beta =====
    return min(1.0 - 1.0 / (g + 1), beta)
    # ===== END ALGO =====


@torch.no_grad()
def ema_update(mean, student, phi):
    """theta' <- phi theta' + (1 - phi) theta for every parameter; BN running statistics are left
    alone. phi: a number or a 0-d tensor."""
    # ===== BEGIN ALGO: temporal mean -- theta' <- phi theta' + (1 - phi) theta, parameters only =====
    # ALGO: common.ema_update(mean_tensors, tensors, phi) updates each pair in place; pick the tensors.
    common.ema_update(mean.parameters(), student.parameters(), phi)
    # ===== END ALGO =====


def train_step(model, optimizers, x, y, epoch, step, run):
    # ===== BEGIN ALGO: train step =====
    # ALGO: both KD terms' ramp-up weight, per 0-based epoch: w(0) = 0.0067, w(40) = 0.287, w(80) = 1.
    w = common.rampup_weight(run, epoch, run.args.rampup_epochs)
    with run.autocast():
        logits, ens_logits = model.student(x)  # (m, B, C), (B, C); x = [x_1..x_m], peer j on x_j
        with torch.no_grad():
            # ALGO: z'_k = temporal-mean peer k on ITS OWN view x_k. The mean model is in train mode
            # (fit calls model.train()): batch statistics, and its BN buffers track its own activations.
            mean_logits, _ = model.mean(x)  # (m, B, C)
        loss, logs = pcl_loss(logits, ens_logits, mean_logits, y, w, run.args)
    optimizers["sgd"].zero_grad(set_to_none=True)
    loss.backward()
    optimizers["sgd"].step()
    # ALGO: temporal mean after every optimiser step, g = the 0-based global step (so --resume stays exact).
    if not run.args.ema_per_epoch:
        ema_update(model.mean, model.student, run.scalar("phi", ema_decay(step, run.args.ema_decay)))
    elif (step + 1) % run.steps_per_epoch == 0:
        # NOTE(deviation): the presentation's "g = epoch" reading: one update at each epoch end, g = epoch.
        ema_update(model.mean, model.student, run.scalar("phi", ema_decay(epoch, run.args.ema_decay)))
    return logs
    # ===== END ALGO =====


# ===== 6. Evaluate =====
def evaluate(model, x):
    # ===== BEGIN ALGO: evaluate =====
    logits, ens_logits = model.student(x)  # (m, B, C), (B, C): every peer sees the same test image
    mean_logits, _ = model.mean(x)  # (m, B, C), eval mode: the mean model's own BN running statistics
    m = logits.shape[0]
    # Students, the ensemble head, the temporal-mean peers (mt_peer1 is deployed) and PCL-E = the mean of the
    # temporal-mean peers' logits (costs m x at inference).
    # Internal: per test image, KL(temporal mean j || peer j) at T = 1 for each peer j (B, m).
    kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(mean_logits.float(), -1), reduction="none",
                  log_target=True).sum(-1).T
    return {**{f"peer{j + 1}": logits[j] for j in range(m)}, "pe_teacher": ens_logits,
            **{f"mt_peer{j + 1}": mean_logits[j] for j in range(m)}, "pcl_e": mean_logits.float().mean(0),
            "int/kl_mean_peer": kl}
    # ===== END ALGO =====


def deployed_net(model, args):
    """The deployed model as a plain backbone (written to deployed.pt)."""
    return model.mean.peers.single(0)  # mean trunk + mean peer 1


# ===== 7. Main =====
def main(args):
    run = common.setup(args, method="pcl")
    model = run.to_device(build_model(args, run.num_classes))
    optimizers = build_optimizers(model, args)
    m = args.num_peers
    return common.fit(run, model, optimizers, train_step, evaluate, deployed="mt_peer1",
                      views=m, show=["ce/ens", "kd/ens", "kd/mean"], deployed_net=deployed_net,
                      # and per peer j: its temporal mean's accuracy minus its own
                      gaps={f"acc_gap_peer{j}": (f"mt_peer{j}", f"peer{j}") for j in range(1, m + 1)})


if __name__ == "__main__":
    main(common.parse_args(Args))
