"""OKDDip: Online Knowledge Distillation with Diverse Peers.

D. Chen, J.-P. Mei, C. Wang, Y. Feng, C. Chen. "Online Knowledge Distillation with Diverse Peers".
AAAI 2020. arXiv:1912.00350.

A shared trunk with m auxiliary peers and one group leader (m + 1 branches, the leader is the LAST one).
Two levels of distillation. First level: every auxiliary peer gets its own target, a per-sample
attention-weighted mix of the peers' logits, with weights from the peers' pooled features; distinct
targets keep the peers from collapsing onto one shared ensemble. Second level: the plain mean of the
auxiliary peers is distilled into the leader, which is the model deployed.

Objective (as the official code DefangChen/OKDDip-AAAI2020 implements it: train_GL.py, utils.py KL_Loss,
models/model_cifar/*_GL.py; not checked against the paper's method section), peer logits z_a (a < m),
pooled peer features h_a (D values per sample), leader logits z_L, labels y:
    q_a = W_q h_a,  k_a = W_k h_a                       (bias-free Linear(D -> D/8), one pair for all peers)
    A[a, :] = softmax_c(q_a . k_c)                      (per sample, no 1/sqrt(d), c = a included)
    t_a = sum_c A[a, c] z_c                             (mix of LOGITS)
    L = sum_a CE(z_a, y) + CE(z_L, y)
        + w(e) * [ sum_a KD_T(t_a -> z_a) + KD_T(mean_a z_a -> z_L) ]
KD_T(t -> s) = T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch; T = 3;
w(e) = exp(-5 (1 - min(e, 80)/80)^2) at the 0-based epoch e, the same w on both levels; sums over peers.
NOTHING is detached: W_q, W_k act only through the targets t_a, whose KD term is their only loss gradient
(weight decay aside; detaching t_a would freeze the attention at its random initialisation).

Differences from baseline.py:
    1. A shared trunk (MultiBranch) with m + 1 branches (--num-peers m, plus the leader) and W_q, W_k.
    2. The loss adds w(e) x [first-level KD (t_a -> peer a) + second-level KD (peer mean -> leader)].
    3. Evaluation reports every peer, their mean-logit ensemble, the peers' mean accuracy and the leader.

Deviations: none from the official code in the algorithm (no 1e-7 added to the target probabilities, which
is negligible). --exclude-self (off by default) masks a peer out of its own target, as the abstract's
"from predictions of other auxiliary peers" could be read; the official code includes it.

Run:
    python okddip.py --arch resnet32 --dataset cifar100                     # GPU
    python okddip.py --arch resnet8 --dataset fake --epochs 3 --subset 512 --test-subset 200 --device cpu
Published (error %, ResNet-32, CIFAR-100, branch-based): 25.65 +- 0.15 (OKDDip Table 2, quoted by its author,
unverified); PCL Tables 1-2 OKDDip column: 5.83 +- 0.15 (CIFAR-10), 26.75 +- 0.38 (CIFAR-100).
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
    """OKDDip: m auxiliary peers with attention-mixed targets, their mean distilled into a leader."""
    num_peers: int = arg(3, "m: auxiliary peers; the leader is one more branch (official: 3 + 1)",
                         at_least=2)
    temperature: float = arg(3.0, "T: both KD levels' temperature (scaled by T^2; official: 3)", above=0)
    rampup_epochs: int = arg(80, "epochs of the KD weight's ramp-up w(e), both levels (official: 80; "
                                 "0 = none)", at_least=0)
    exclude_self: bool = arg(False, "mask each peer out of its own attention target (official: no)")


# ===== 3. Model =====
class OKDDip(nn.Module):
    """Shared trunk + m peers + leader (common.MultiBranch with m + 1 branches, leader last) + W_q, W_k."""

    def __init__(self, arch, num_classes, m, exclude_self=False):
        super().__init__()
        self.m, self.exclude_self = m, exclude_self
        self.net = common.MultiBranch(arch, num_classes, m + 1)
        D = self.net.feature_dim
        # ALGO: W_q, W_k = Linear(D -> D/8, no bias), ONE pair shared by all peers.
        self.query = nn.Linear(D, D // 8, bias=False)
        self.key = nn.Linear(D, D // 8, bias=False)

    def attention(self, h):
        """h: (m, B, D) pooled features of the auxiliary peers only. Returns A (B, m, m), rows sum
        to 1, computed in float32 (projections, energies, softmax) even under autocast."""
        # ===== BEGIN ALGO: attention =====
        with common.fp32_region(h):
            q, k = self.query(h.float()), self.key(h.float())  # (m, B, D/8) each
            # ALGO: energy[a, c] = q_a . k_c per sample b, no 1/sqrt(d) scaling.
            energy = torch.einsum("abd,cbd->bac", q, k)  # (B, m, m): [sample b, query a, key c]
        if self.exclude_self:  # NOTE(deviation): optional, not the official code's: no self-target.
            energy = energy.masked_fill(torch.eye(self.m, dtype=torch.bool, device=energy.device),
                                        float("-inf"))
        # ALGO: softmax over the keys c (row a sums to 1), the peer itself included by default.
        return F.softmax(energy, dim=-1)
        # ===== END ALGO =====

    def forward(self, x):
        """Returns logits (m + 1, B, C): peers 0..m-1 then the leader; attention A (B, m, m)."""
        z, h, _ = self.net(x)  # z: (m + 1, B, C), h: (m + 1, B, D)
        # ALGO: the leader (last branch) takes no part in the attention.
        return z, self.attention(h[:self.m])


def build_model(args, num_classes):
    # ALGO: one trunk shared once, m + 1 branches with their own weights (each a fresh backbone's).
    return OKDDip(args.arch, num_classes, args.num_peers, args.exclude_self)


def build_optimizers(model, args):
    # BOILERPLATE: the recipe's SGD over every trainable parameter.
    # (W_q and W_k included, weight decay too.)
    return {"sgd": common.sgd(model.parameters(), args)}


# ===== 4. Loss =====
def peer_targets(peer_logits, A):
    """t_a = sum_c A[a, c] z_c. peer_logits: (m, B, C), A: (B, m, m). Returns (m, B, C)."""
    # ===== BEGIN ALGO: peer targets =====
    # ALGO: targets mix LOGITS (softmax(./T) comes inside the KD), per sample.
    with common.fp32_region(A):  # float32 even under autocast (it would lower the einsum to bf16)
        return torch.einsum("bac,cbk->abk", A.float(), peer_logits.float())
    # ===== END ALGO =====


def okddip_loss(logits, A, y, w, args):
    """logits: (m + 1, B, C), peers then leader; A: (B, m, m); w: the ramp-up weight w(e) (a number
    or common.rampup_weight's tensor). Returns (loss, logs)."""
    # ===== BEGIN ALGO: loss =====
    T, m, loss, logs = args.temperature, A.shape[-1], 0.0, {}
    peers, leader = logits[:m], logits[m]  # (m, B, C), (B, C)
    # ALGO: NOTHING detached: the gradient of each peer's KD flows into t_a, hence into every peer's
    # logits and into W_q, W_k, whose only loss gradient this is.
    t = peer_targets(peers, A)  # (m, B, C)
    for a in range(m):
        # ALGO: CE(z_a, y), mean over the batch; first level: KD_T(t_a -> z_a), i.e.
        # T^2 KL(softmax(t_a/T) || softmax(z_a/T)).
        # NOTE(deviation): left out the official KL_Loss's +1e-7 on target probabilities (negligible).
        ce, kd = F.cross_entropy(peers[a].float(), y), common.kd_loss(peers[a], t[a], T)
        loss = loss + ce + w * kd
        logs[f"ce/peer{a + 1}"], logs[f"kd/peer{a + 1}"] = ce.detach(), kd.detach()
    # ALGO: second level: the leader learns from the labels and the peers' mean logits (not detached).
    ce_l, kd_l = F.cross_entropy(leader.float(), y), common.kd_loss(leader, peers.float().mean(0), T)
    # ALGO: L = sum_a (CE_a + w KD_a) + CE_L + w KD_L: sums over peers, one w for both levels.
    loss = loss + ce_l + w * kd_l
    return loss, {"loss": loss.detach(), **logs, "ce/leader": ce_l.detach(), "kd/leader": kd_l.detach(),
                  "w": torch.as_tensor(w)}
    # ===== END ALGO =====


# ===== 5. Train step =====
def train_step(model, optimizers, x, y, epoch, step, run):
    # ===== BEGIN ALGO: train step =====
    # ALGO: w(e) from the 0-based epoch, constant within an epoch.
    w = common.rampup_weight(run, epoch, run.args.rampup_epochs)
    with run.autocast():
        logits, A = model(x)  # (m + 1, B, C), (B, m, m)
        loss, logs = okddip_loss(logits, A, y, w, run.args)
    optimizers["sgd"].zero_grad(set_to_none=True)
    loss.backward()
    optimizers["sgd"].step()
    return logs
    # ===== END ALGO =====


# ===== 6. Evaluate =====
def evaluate(model, x):
    # ===== BEGIN ALGO: evaluate =====
    logits, A = model(x)  # (m + 1, B, C), (B, m, m)
    m = len(logits) - 1
    # The leader (last branch) is deployed; also every peer and the peer ensemble = the mean of the
    # auxiliary peers' logits, scored by its arg-max (the leader not included; costs m branches).
    # Internals: the attention matrix (row a: how peer a's target weighs the peers; rows sum to 1) and each
    # row's entropy in nats (log m: uniform weights, log(m - 1) with --exclude-self; 0: one peer only).
    A = A.float()
    entropy = -(A * A.clamp_min(1e-12).log()).sum(-1)  # (B, m)
    return {**{f"peer{a + 1}": logits[a] for a in range(m)}, "ensemble": logits[:m].float().mean(0),
            "leader": logits[m], "int/attention": A, "int/attention_entropy": entropy}
    # ===== END ALGO =====


def deployed_net(model, args):
    """The deployed model as a plain backbone (written to deployed.pt)."""
    return model.net.single(model.m)  # trunk + leader


# ===== 7. Main =====
def main(args):
    run = common.setup(args, method="okddip")
    model = run.to_device(build_model(args, run.num_classes))
    optimizers = build_optimizers(model, args)
    return common.fit(run, model, optimizers, train_step, evaluate, deployed="leader",
                      averages={"peer_avg": [f"peer{a + 1}" for a in range(args.num_peers)]},
                      show=["kd/peer1", "kd/leader", "w"],
                      deployed_net=deployed_net)


if __name__ == "__main__":
    main(common.parse_args(Args))
