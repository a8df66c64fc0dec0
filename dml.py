"""DML: Deep Mutual Learning.

Y. Zhang, T. Xiang, T. M. Hospedales, H. Lu. "Deep Mutual Learning". CVPR 2018. arXiv:1706.00384.

K networks with no shared weights train together on the same mini-batches. Each one minimises its own
cross-entropy plus a "mimicry" KL that pulls its predicted class distribution towards each peer's current
(detached) prediction. No network is a fixed teacher: peers teach each other through their non-target
class probabilities. Every network is deployable alone; peer 1 is the headline model.

Objective (paper Eq. 4 for K = 2, averaged over the K-1 peers for K > 2), for network k with logits z_k:
    L_k = CE(z_k, y) + 1/(K-1) * sum_{l != k} T^2 * KL(softmax(sg(z_l)/T) || softmax(z_k/T))
    L   = sum_k L_k          (sum, not mean: averaging would divide every network's LR by K)
sg = stop-gradient (the peer is a target, not a student); KL summed over classes, averaged over the batch.

Differences from baseline.py:
    1. K independently built and initialised networks instead of one (--num-peers, default 2), of
       one backbone or one each (--arch resnet32,wrn16_2: K = 2, as in the paper's mixed pairs).
    2. The loss adds, per network, the mean KL from its detached peers (--temperature T, default 1, x T^2).
    3. One joint optimiser step over all networks (default), or the paper's sequential update
       (--update sequential: network k is stepped after recomputing its peers with their current weights).
    4. Evaluation reports every peer (peers of different backbones are named with theirs:
       peer1_resnet32), the peer-accuracy mean and the logit-mean ensemble; peer 1 is deployed.

Deviations (details in docs/dml.md): joint update by default (what the CIFAR
re-implementations do; the paper's Algorithm 1 is --update sequential); zero padding (the paper uses
reflect padding: --pad-mode reflect); the repository's 300-epoch recipe instead of the paper's 200.

Run:
    python dml.py --arch resnet32 --dataset cifar10                      # GPU
    python dml.py --arch resnet8 --dataset fake --epochs 3 --subset 512 --test-subset 200 --device cpu
Published: CIFAR-100 ResNet-32 pair 71.19 / 70.75 % (DML paper Table 2, unverified recollection);
PCL Table 1-2 DML column (error %): 6.06 +- 0.07 (CIFAR-10), 26.32 +- 0.14 (CIFAR-100), T and K not stated.
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
    """DML: K peers, each trained with CE + KL from its detached peers."""
    arch: str = arg("resnet32", f"backbone of every peer, or one per peer: resnet32,wrn16_2 (K = "
                                f"the number of names); choices: {', '.join(common.BACKBONES)}")
    num_peers: int = arg(2, "K: number of peer networks (paper: 2)", at_least=2)
    temperature: float = arg(1.0, "T: temperature of the mimicry KL (scaled by T^2; paper: 1)", above=0)
    update: str = arg("joint", "joint: one step for all peers; sequential: paper Algorithm 1",
                      choices=["joint", "sequential"])


# ===== 3. Model =====
def build_model(args, num_classes):
    # ALGO: K separately built (so separately initialised) networks; nothing shared. Backbones may
    # be mixed: the peers meet only through their logits.
    archs = common.network_archs(args, "num_peers")  # a list of names sets K
    return nn.ModuleList(common.build_backbone(arch, num_classes) for arch in archs)


def build_optimizers(model, args):
    # BOILERPLATE: the recipe's SGD over every trainable parameter.
    return {"sgd": common.sgd(model.parameters(), args)}


# ===== 4. Loss =====
def dml_loss(logits, y, args):
    """logits: (K, B, C), one row per peer. Returns (L = sum_k L_k, logs)."""
    # ===== BEGIN ALGO: loss =====
    K, T = logits.shape[0], args.temperature
    loss, logs = 0.0, {}
    for k in range(K):
        # ALGO: CE(z_k, y), mean over the batch.
        ce = F.cross_entropy(logits[k].float(), y)
        # ALGO: Eq. 4 mimicry: 1/(K-1) sum_{l != k} T^2 KL(p_l || p_k); peers detached (targets only).
        kd = sum(common.kd_loss(logits[k], logits[l].detach(), T) for l in range(K) if l != k) / (K - 1)
        # ALGO: L = sum_k (CE_k + KD_k).
        loss = loss + ce + kd
        logs[f"ce/peer{k + 1}"], logs[f"kd/peer{k + 1}"] = ce.detach(), kd.detach()
    return loss, {"loss": loss.detach(), **logs}
    # ===== END ALGO =====


# ===== 5. Train step =====
def train_step(model, optimizers, x, y, epoch, step, run):
    # ===== BEGIN ALGO: train step =====
    if run.args.update != "joint":
        # ALGO: Algorithm 1 (--update sequential): for k = 1..K, recompute the peers with their
        # current weights (no grad; train mode, so their BN statistics are updated again), then step
        # network k only. The optimiser skips parameters whose .grad is None: every other network.
        for k in range(len(model)):
            with run.autocast():
                with torch.no_grad():
                    peers = [net(x) for net in model]
                # (K, B, C): network k live, its peers recomputed without gradient
                logits = torch.stack([model[k](x) if l == k else peers[l] for l in range(len(model))])
                loss, logs = dml_loss(logits, y, run.args)
            optimizers["sgd"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["sgd"].step()
        return logs
    # NOTE(deviation): joint update by default (the CIFAR re-implementations); the paper's
    # Algorithm 1 is the sequential branch above.
    with run.autocast():
        logits = torch.stack([net(x) for net in model])  # (K, B, C)
        loss, logs = dml_loss(logits, y, run.args)
    optimizers["sgd"].zero_grad(set_to_none=True)
    # Peers are detached, so network k receives exactly the gradient of its own L_k.
    loss.backward()
    optimizers["sgd"].step()
    return logs
    # ===== END ALGO =====


# ===== 6. Evaluate =====
def evaluate(model, x):
    # ===== BEGIN ALGO: evaluate =====
    logits = torch.stack([net(x) for net in model])  # (K, B, C)
    pred, K = logits.float().argmax(-1), len(logits)  # (K, B)
    # Internal: per test image, the fraction of peer pairs that predict the same class.
    agreement = torch.stack([pred[k] == pred[l] for k in range(K) for l in range(k + 1, K)]).float().mean(0)
    # Every peer, and the ensemble = the mean of the peers' logits (scored by arg-max; K x the cost).
    return {**dict(zip(common.peer_names(model), logits)), "ensemble": logits.float().mean(0),
            "int/agreement": agreement}
    # ===== END ALGO =====


def deployed_net(model, args):
    """The deployed model as a plain backbone (written to deployed.pt)."""
    return model[0]  # peer 1


# ===== 7. Main =====
def main(args):
    run = common.setup(args, method="dml")
    model = run.to_device(build_model(args, run.num_classes))
    optimizers = build_optimizers(model, args)
    names = common.peer_names(model)
    return common.fit(run, model, optimizers, train_step, evaluate, deployed=names[0],
                      averages={"peer_avg": names}, show=["ce/peer1", "kd/peer1"],
                      deployed_net=deployed_net)


if __name__ == "__main__":
    main(common.parse_args(Args))
