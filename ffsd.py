"""FFSD: Feature Fusion and Self-Distillation.

S. Li, M. Lin, Y. Wang, Y. Wu, Y. Tian, L. Shao, R. Ji. "Distilling a Powerful Student Model via Online
Knowledge Distillation". IEEE TNNLS 2022. arXiv:2103.14473. Official code: github.com/SJLeo/FFSD.

M "common students" learn from each other as in DML; each student k >= 1 is pushed to attend to other
regions than student k-1 (diversity on attention maps). A fusion module turns the students' last-stage maps
into a fused map with its own classifier. The "leader" (one more network, same backbone) learns from that
classifier, mimics the fused map and decodes its own map back to the students' maps. Self-distillation (SD)
modules map a last-stage map back to the shallower stages. Only the leader is deployed.

Objective (symbols lost in the paper text; forms from the official code). A(F) = channel-mean of F^2,
D(u, v) = mean over batch and positions of (u/||u|| - v/||v||)^2, KD_T(t -> s) = T^2 KL(p_t^T || p_s^T),
sg = stop-gradient, F^l = stage-l map, z = logits, y = labels, p^T = softmax(z/T), w(e) warms up every lambda:
    student k:  CE(z_k, y) + 1/(M-1) sum_{j!=k} KD_2(sg z_j -> z_k)                       (Eqs. 2-3)
                + [k >= 1] lambda_div * ( Div(A(F_k^L), sg A(F_{k-1}^L))                   (Eqs. 7-9)
                + sum_{l<L} D(A(F_k^l), A(G_k^l(shift(sg F_{k-1}^L)))) )                   (Eqs. 11-12)
    fusion:     CE(z_f, y) + KD_2(sg mean_k z_k -> z_f),  (F_f, z_f) = fusion(sg concat_k F_k^L)  (Eq. 4)
    leader:     CE(z_ld, y) + KD_2(sg z_f -> z_ld) + lambda_fusion * ( D(A(F_ld^L), A(sg F_f))
                + D(A(R(F_ld^L)), A(sg concat)) + sum_{l<L} D(A(F_ld^l), A(G_ld^l(sg F_f))) )  (Eqs. 5, 13-14)
    SD module:  lambda_sd * sum_{l<L} [ D(G^l, sg F^l) + D(A(G^l), sg A(F^l)) ],  G^l = G^l(sg F^L) of its
                own network, F flattened over C*H*W in the first term                              (Eq. 10)
G_k, G_ld: SD modules of student k >= 1 and of the leader; R: the leader's decoder; shift = shifted_map;
Div(a, sg a') = mean (a/||a|| - t)^2, t = diversity_target(a') (Eq. 8); concat: stacked on channels.

Differences from baseline.py:
    1. Three kinds of trained parts: M common students and a leader (full backbones, nothing shared), the
       fusion module, the leader's decoder R, and M SD modules (students 1..M-1 and the leader).
    2. The loss is the sum of the students', the fusion module's, the leader's and the SD modules' losses.
    3. Six optimisers for M = 2 (student SGDs, leader+R SGD, fusion SGD with wd 1e-5, SD Adams).
    4. FFSD's own recipe: weight decay 1e-4 and reflect padding (the other scripts use 5e-4 and zeros).
    5. Evaluation reports the students, their mean accuracy, logit-mean ensemble, fusion, leader (deployed).

Deviations from the official code (SJLeo/FFSD, CIFARTrainer.py):
    1. One summed backward, then every optimiser steps (the code: one backward per network, students ->
       fusion -> leader -> SD modules). Same gradients: all cross-network targets and the fusion input are
       detached, the parameter sets disjoint. SD teachers use the pre-update SD weights, as in the code.
    2. "ensemble" is the mean of the students' logits (arg-max scored), not the code's "any student correct"
       oracle; 300 epochs instead of the code's 299; no dummy forward of student 0 at construction.
Deviations from the paper text, where this file follows the official code:
    3. Fusion-module weight decay 1e-5 (--fusion-wd; the paper's "same implementation details": 1e-4).
    4. lambda_div, lambda_fusion and lambda_sd warm up over epochs 1-5 (--warmup-epochs; none in the paper).
    5. No SD module on the first common student (no diversity target); the paper gives each student one.
    6. Eq. 10's weight balancing its whole-map and attention terms is fixed at 1.
    7. Every distance the paper writes as an l_p norm (its symbols are lost) is D, the mean squared difference
       of per-sample L2-normalised maps: attention maps (whole maps in Eq. 10's first term).

Run:
    python ffsd.py --arch resnet32 --dataset cifar100                     # FFSD's own recipe, GPU
    python ffsd.py --arch resnet8 --dataset fake --epochs 2 --subset 512 --test-subset 200 --device cpu
Published (CIFAR-100 top-1 %, Table I, mean of 3 runs; most likely each run's best epoch, an
inference: the official code keeps each network's best test accuracy): ResNet-32 leader
74.85 +- 0.05 (students 74.30 / 74.34, fusion 76.04); ResNet-20 72.70; ResNet-56 75.80.
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
    """FFSD: common students (DML + diversity) -> fusion module -> leader, with self-distillation modules."""
    weight_decay: float = arg(1e-4, "SGD weight decay of students and leader, also the SD modules' "
                                    "Adam (FFSD Sec. IV-A: 1e-4)")
    pad_mode: str = arg("reflect", "random-crop padding (4 pixels): zero or reflect (FFSD code: reflect)",
                        choices=["zero", "reflect"])
    num_students: int = arg(2, "M: common students (paper: 2); the leader is one more", at_least=2)
    temperature: float = arg(2.0, "T (Eqs. 1-4): every KL's temperature (scaled by T^2; paper: 2)", above=0)
    lambda_div: float = arg(1e-5, "lambda_div (Eqs. 9, 11-12): weight of the diversity and student SD terms")
    lambda_fusion: float = arg(10.0, "lambda_fusion (Eqs. 5, 13-14): weight of the leader's 3 feature terms")
    lambda_sd: float = arg(1000.0, "lambda_sd (Eq. 10): weight of the SD modules' own training loss")
    warmup_epochs: int = arg(5, "lambda_* x exp(-5 (1 - e/W)^2) over epochs e = 1..W (0 = off)",
                             at_least=0)
    fusion_wd: float = arg(1e-5, "weight decay of the fusion module's SGD (official code: 1e-5)")
    sd_lr: float = arg(1e-3, "Adam learning rate of the SD modules (Sec. IV-A), decayed with the schedule")


# ===== 3. Model =====
def attention(fmap):
    """A(F) (Eq. 7): mean over channels of F^2. (B, C, H, W) -> (B, H*W), fp32, not normalised."""
    # ===== BEGIN ALGO: attention -- channel mean of F^2, flattened =====
    return fmap.float().pow(2).mean(1).flatten(1)
    # ===== END ALGO =====


def distance(u, v):
    """D(u, v): mean over batch and entries of (u/||u|| - v/||v||)^2, each sample flattened and L2-normalised
    (an attention MSE when given A(.) maps, the code's feature loss when given whole maps)."""
    # ===== BEGIN ALGO: distance -- mean squared difference of per-sample L2-normalised maps =====
    return (F.normalize(u.float().flatten(1), dim=1) - F.normalize(v.float().flatten(1), dim=1)).pow(2).mean()
    # ===== END ALGO =====


def diversity_target(a_prev):
    """Eq. 8 on a_prev = A(F_{k-1}^L) (B, HW), detached. y_hat = a_prev / n, n = ||a_prev||_2 per sample;
    tau = the K-th smallest entry of y_hat, K = floor(HW/3). Target t = y_hat where y_hat < tau (weakest
    third kept), n/2 where y_hat = tau, n - y_hat where y_hat > tau (attention moved off the strongest
    regions). Note the mixed scales (y_hat unit-norm, n raw): lambda_div = 1e-5 is tuned for this form.
    Returns t, y_hat, n."""
    # ===== BEGIN ALGO: diversity target -- Eq. 8, see the docstring =====
    n = a_prev.norm(dim=1, keepdim=True)  # (B, 1)
    y_hat = F.normalize(a_prev, dim=1)  # (B, HW)
    tau = y_hat.kthvalue(a_prev.shape[1] // 3, dim=1, keepdim=True).values  # (B, 1)
    # ALGO: Eq. 8 in one line: sign = -1 keeps y_hat, +1 gives n - y_hat, 0 (the threshold itself) gives n/2.
    t = (n / 2 - y_hat) * torch.sign(y_hat - tau) + n / 2
    return t, y_hat, n
    # ===== END ALGO =====


def shifted_map(fmap_prev):
    """The diversity target turned back into a feature map (Sec. III-C), the SD module's input for student k:
    F + (t - y_hat) * n / C, the same shift added to every channel at each position. (B, C, H, W)."""
    B, C, H, W = fmap_prev.shape
    t, y_hat, n = diversity_target(attention(fmap_prev))
    return fmap_prev.float() + ((t - y_hat) * n / C).view(B, 1, H, W)


class Fusion(nn.Module):
    """Fusion module (Sec. III-B, Fig. 3): concat of M maps (B, M*C, H, W) -> depthwise 3x3 + BN + ReLU ->
    1x1 (M*C -> C) + BN + ReLU = fused map F_f (B, C, H, W) -> global average pool -> Linear = z_f."""

    def __init__(self, C, M, num_classes):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(M * C, M * C, 3, 1, 1, groups=M * C, bias=False),  # depthwise 3x3
            nn.BatchNorm2d(M * C), nn.ReLU(inplace=True),
            nn.Conv2d(M * C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU(inplace=True))
        self.pool, self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(C, num_classes)
        common.init_weights(self)  # the official code's init, as the backbones

    def forward(self, concat):
        fused = self.encoder(concat)  # (B, C, H, W)
        return fused, self.fc(self.pool(fused))


def decoder(C, M):
    """The leader's decoder R (Eq. 5, "aligns the channel dimension"): F_ld^L (B, C, H, W) ->
    depthwise 3x3 + BN + ReLU -> 1x1 (C -> M*C) + BN + ReLU -> (B, M*C, H, W). Trained with the
    leader, unused at test time."""
    return common.init_weights(nn.Sequential(
        nn.Conv2d(C, C, 3, 1, 1, groups=C, bias=False), nn.BatchNorm2d(C), nn.ReLU(inplace=True),
        nn.Conv2d(C, M * C, 1, bias=False), nn.BatchNorm2d(M * C), nn.ReLU(inplace=True)))


class SelfDistillation(nn.Module):
    """SD module G (Sec. III-C, Fig. 4): L-1 blocks of ConvTranspose2d(3, stride 2) + BN + ReLU, each doubling
    the resolution and moving to the previous stage's width: 64x8x8 -> 32x16x16 -> 16x32x32 for ResNets.
    forward(F^L) -> [G^1, ..., G^{L-1}], shallow to deep like Net.features. (PyTorch's default init.)
    `sizes`: each stage's map side; where two stages share a size (DenseNet-BC's last two, 8x8) the block
    keeps the size (stride 1) instead of doubling it."""

    def __init__(self, widths, sizes):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, s_out // s_in, 1,
                                             output_padding=s_out // s_in - 1, bias=False),
                          nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
            for cin, cout, s_in, s_out in zip(widths[:0:-1], widths[-2::-1], sizes[:0:-1], sizes[-2::-1]))

    def forward(self, x):
        maps = [x]
        for block in self.blocks:
            maps.append(block(maps[-1]))
        return maps[:0:-1]  # [G^1 (shallowest), ..., G^{L-1}]: input dropped, shallow first


class FFSD(nn.Module):
    """Everything FFSD trains, as one module (one checkpoint): M common students, the leader and its decoder
    R, the fusion module, and the SD modules `sd_students[k-1]` of student k >= 1 and `sd_leader`."""

    def __init__(self, arch, num_classes, M):
        super().__init__()
        # ALGO: M + 1 separately built backbones of one architecture; nothing shared (FFSD official code,
        # CIFARTrainer.py).
        self.students = nn.ModuleList(common.build_backbone(arch, num_classes) for _ in range(M))
        self.leader = common.build_backbone(arch, num_classes)
        widths, C = self.leader.widths, self.leader.widths[-1]
        with torch.no_grad(), common.eval_mode(self.leader):  # BOILERPLATE: each stage's map side
            sizes = [f.shape[-1] for f in self.leader.features(torch.zeros(1, 3, 32, 32))]
        self.decoder = decoder(C, M)
        self.fusion = Fusion(C, M, num_classes)
        # ALGO: SD modules for students 1..M-1 and the leader only; student 0 has no diversity target.
        self.sd_students = nn.ModuleList(SelfDistillation(widths, sizes) for _ in range(M - 1))
        self.sd_leader = SelfDistillation(widths, sizes)

    @staticmethod
    @torch.no_grad()
    def _teach(sd, x):
        # ALGO: an SD module as a teacher: eval-mode BN (running statistics untouched) and no gradient,
        # so its outputs are detached targets and the student/leader losses never reach its weights.
        with common.eval_mode(sd):
            return sd(x)

    def forward(self, x):
        """Every tensor the losses need, for one batch x (B, 3, 32, 32) shared by all networks (the
        forward passes that open each iteration of the official CIFARTrainer.py)."""
        M = len(self.students)
        feats_ld = self.leader.features(x)  # [F_ld^1, ..., F_ld^L]
        feats = [net.features(x) for net in self.students]  # M lists of L maps
        z = torch.stack([net.head(f) for net, f in zip(self.students, feats)])  # (M, B, classes)
        # ALGO: Sec. III-B: concat of the students' DETACHED last maps, so the fusion loss never reaches them.
        concat = torch.cat([f[-1].detach() for f in feats], dim=1)  # (B, M*C, H, W)
        fused, z_f = self.fusion(concat)  # (B, C, H, W), (B, classes)
        return {
            "z": z, "feats": feats, "z_ld": self.leader.head(feats_ld), "feats_ld": feats_ld,
            "recon": self.decoder(feats_ld[-1]),  # R(F_ld^L): (B, M*C, H, W)
            "concat": concat, "fused": fused, "z_f": z_f,
            # ALGO: Eq. 11: G_k on student k-1's diversity-shifted map: targets for k's shallow stages.
            "sd_teach": [self._teach(self.sd_students[k - 1], shifted_map(feats[k - 1][-1].detach()))
                         for k in range(1, M)],
            # ALGO: Eq. 13: G_ld fed the fused map (targets for the leader's shallow stages).
            "sd_teach_ld": self._teach(self.sd_leader, fused.detach()),
            # ALGO: Eq. 10 fit: each SD module in train mode on its OWN network's detached last map.
            "sd_fit": [sd(feats[k][-1].detach()) for k, sd in zip(range(1, M), self.sd_students)]
                      + [self.sd_leader(feats_ld[-1].detach())],
        }


def build_model(args, num_classes):
    return FFSD(args.arch, num_classes, args.num_students)


def build_optimizers(model, args):
    # ALGO: one SGD per student; the leader's SGD also holds its decoder R; the fusion module's SGD
    # has its own weight decay (1e-5); each SD module has its own Adam (coupled L2 = --weight-decay).
    # fit() scales every group's LR by the step schedule: all decay at 50% / 75% of the epochs.
    opts = {f"student{k + 1}": common.sgd(net.parameters(), args) for k, net in enumerate(model.students)}
    opts["fusion"] = common.sgd(model.fusion.parameters(), args, weight_decay=args.fusion_wd)
    opts["leader"] = common.sgd([*model.leader.parameters(), *model.decoder.parameters()], args)
    for k, sd in enumerate(model.sd_students, start=1):
        opts[f"sd/student{k + 1}"] = common.adam(sd.parameters(), args.sd_lr, args.weight_decay)
    opts["sd/leader"] = common.adam(model.sd_leader.parameters(), args.sd_lr, args.weight_decay)
    return opts


# ===== 4. Loss =====
def student_loss(out, y, k, args, w):
    """Common student k (0-based). Returns (L_k, logs); logged terms carry their weights."""
    # ===== BEGIN ALGO: student loss =====
    z, T, M = out["z"], args.temperature, out["z"].shape[0]
    # ALGO: Eq. 2: CE(z_k, y), mean over the batch.
    ce = F.cross_entropy(z[k].float(), y)
    # ALGO: Eqs. 2-3: mutual KL from the detached peers, T^2 KL(p_j^T || p_k^T), batchmean, mean over M-1.
    kd = sum(common.kd_loss(z[k], z[j].detach(), T) for j in range(M) if j != k) / (M - 1)
    logs = {f"ce/student{k + 1}": ce.detach(), f"kd/student{k + 1}": kd.detach()}
    if k == 0:  # student 0 heads the one-way diversity chain 0 -> 1 -> ...: no diversity, no SD term
        return ce + kd, logs
    lam = args.lambda_div * w
    # ALGO: Eqs. 7-9: last stage only; a(F_k) = normalised A(F_k^L) against the shifted target of student k-1.
    t, _, _ = diversity_target(attention(out["feats"][k - 1][-1].detach()))
    div = lam * (F.normalize(attention(out["feats"][k][-1]), dim=1) - t).pow(2).mean()
    # ALGO: Eqs. 11-12: shallow stages mimic G_k(shifted map of student k-1) (detached, eval-mode SD module).
    sd = lam * sum(distance(attention(f), attention(g))
                   for f, g in zip(out["feats"][k][:-1], out["sd_teach"][k - 1]))
    logs.update({f"div/student{k + 1}": div.detach(), f"sd/student{k + 1}": sd.detach()})
    return ce + kd + div + sd, logs
    # ===== END ALGO =====


def fusion_loss(out, y, args):
    """Fusion module (Eq. 4): CE(z_f, y) + KD_T(sg z_bar -> z_f), z_bar = mean of the students' logits."""
    # ===== BEGIN ALGO: fusion loss =====
    ce = F.cross_entropy(out["z_f"].float(), y)
    kd = common.kd_loss(out["z_f"], out["z"].float().mean(0).detach(), args.temperature)  # students only
    return ce + kd, {"ce/fusion": ce.detach(), "kd/fusion": kd.detach()}
    # ===== END ALGO =====


def leader_loss(out, y, args, w):
    """Leader (Eq. 14). No KL with the common students: its soft target is the fusion classifier."""
    # ===== BEGIN ALGO: leader loss =====
    ce = F.cross_entropy(out["z_ld"].float(), y)
    # ALGO: KD_T(sg z_f -> z_ld), T^2 x batchmean KL.
    kd = common.kd_loss(out["z_ld"], out["z_f"].detach(), args.temperature)
    lam = args.lambda_fusion * w
    # ALGO: Eq. 5, first term: the leader's last map mimics the fused map F_f (detached) in attention.
    fmap = lam * distance(attention(out["feats_ld"][-1]), attention(out["fused"].detach()))
    # ALGO: Eq. 5, second term: the decoded map R(F_ld^L) matches the students' (detached) concatenation.
    recon = lam * distance(attention(out["recon"]), attention(out["concat"].detach()))
    # ALGO: Eq. 13: shallow stages mimic G_ld(F_f) (detached, eval-mode SD module).
    sd = lam * sum(distance(attention(f), attention(g))
                   for f, g in zip(out["feats_ld"][:-1], out["sd_teach_ld"]))
    logs = {"ce/leader": ce.detach(), "kd/leader": kd.detach(), "fmap/leader": fmap.detach(),
            "recon/leader": recon.detach(), "sd/leader": sd.detach()}
    return ce + kd + fmap + recon + sd, logs
    # ===== END ALGO =====


def sd_fit_loss(out, args, w):
    """Eq. 10 for every SD module: lambda_sd * sum_{l<L} [D(G^l, sg F^l) + D(A(G^l), A(sg F^l))] on its own
    network's maps (whole-map term first, then attention term). Reaches only the SD modules' weights."""
    # ===== BEGIN ALGO: SD module loss =====
    owners = [out["feats"][k] for k in range(1, len(out["feats"]))] + [out["feats_ld"]]
    names = [f"student{k + 1}" for k in range(1, len(out["feats"]))] + ["leader"]
    lam, loss, logs = args.lambda_sd * w, 0.0, {}
    for name, maps, gs in zip(names, owners, out["sd_fit"]):
        term = lam * sum(distance(g, f.detach()) + distance(attention(g), attention(f.detach()))
                         for f, g in zip(maps[:-1], gs))
        loss, logs[f"sdfit/{name}"] = loss + term, term.detach()
    return loss, logs
    # ===== END ALGO =====


def ffsd_loss(out, y, args, w):
    """Sum of every network's loss (out = FFSD.forward(x)); w = warm-up factor on the three lambdas.
    Summing is exact: each parameter set receives the gradient of its own loss only (all cross-network
    targets and the fusion input are detached). Returns (loss, logs)."""
    # ===== BEGIN ALGO: loss =====
    parts = [student_loss(out, y, k, args, w) for k in range(out["z"].shape[0])]
    parts += [fusion_loss(out, y, args), leader_loss(out, y, args, w), sd_fit_loss(out, args, w)]
    loss = sum(p[0] for p in parts)
    logs = {k: v for p in parts for k, v in p[1].items()}
    return loss, {"loss": loss.detach(), **logs}
    # ===== END ALGO =====


# ===== 5. Train step =====
def train_step(model, optimizers, x, y, epoch, step, run):
    # ===== BEGIN ALGO: train step =====
    # ALGO: the lambdas' warm-up, official `lambda_warmup`: exp(-5 (1 - e/W)^2) at the 1-based epoch
    # e = epoch + 1 <= W, then 1: x0.041, 0.165, 0.449, 0.819, 1.0 over epochs 1-5.
    w = common.rampup_weight(run, epoch + 1, run.args.warmup_epochs, name="warmup")
    with run.autocast():
        out = model(x)  # every network on the same batch; SD teachers use the pre-update SD weights
        loss, logs = ffsd_loss(out, y, run.args, w)
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    # NOTE(deviation): one summed backward, not one per network as in the official code; every
    # parameter gets the same gradient, as all cross-network targets and the fusion input are detached.
    loss.backward()
    for opt in optimizers.values():  # students, fusion, leader (+R), SD modules: disjoint parameter sets
        opt.step()
    return logs
    # ===== END ALGO =====


# ===== 6. Evaluate =====
def evaluate(model, x):
    # ===== BEGIN ALGO: evaluate =====
    feats = [net.features(x) for net in model.students]
    z = torch.stack([net.head(f) for net, f in zip(model.students, feats)])  # (M, B, classes)
    _, z_f = model.fusion(torch.cat([f[-1] for f in feats], dim=1))
    # The leader is deployed (one backbone). The rest are labelled secondary models: each student, the
    # ensemble and the fusion classifier (needs every student at test time).
    # NOTE(deviation): ensemble = the MEAN of the students' logits (arg-max scored), not the official code's
    # "any student correct" oracle (utils/util.py, ensemble_accuracy).
    # Internal: per test image, the distance D between consecutive students' normalised last-stage attention
    # maps (0: the same regions; what the diversity term pushes up), one per pair k-1, k (B, M - 1).
    a = torch.stack([F.normalize(attention(f[-1]), dim=1) for f in feats])  # (M, B, HW)
    apart = (a[1:] - a[:-1]).pow(2).mean(-1).T  # (B, M - 1)
    return {**{f"student{k + 1}": z[k] for k in range(len(model.students))}, "ensemble": z.float().mean(0),
            "fusion": z_f, "leader": model.leader(x), "int/attention_distance": apart}
    # ===== END ALGO =====


def deployed_net(model, args):
    """The deployed model as a plain backbone (written to deployed.pt)."""
    return model.leader


# ===== 7. Main =====
def main(args):
    run = common.setup(args, method="ffsd")
    model = run.to_device(build_model(args, run.num_classes))
    optimizers = build_optimizers(model, args)
    return common.fit(run, model, optimizers, train_step, evaluate, deployed="leader",
                      averages={"student_avg": [f"student{k + 1}" for k in range(args.num_students)]},
                      show=["kd/student2", "kd/leader", "fmap/leader"],
                      deployed_net=deployed_net)


if __name__ == "__main__":
    main(common.parse_args(Args))
