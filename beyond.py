"""beyond.py: what the CIFAR path never runs. Image folders streamed from disk (ImageNet-sized),
the ImageNet recipe (--recipe imagenet) and multi-process runs under torchrun.

`common.setup` hands a run to this module's `setup` in one place only: for a torchrun launch
(WORLD_SIZE > 1), a --recipe, or a folder that is streamed (--loader stream, or auto on a folder too
big for memory or resized). The run it returns is a `BeyondRun`: a `common.Run` whose batches,
scoring and preparation `common.fit` calls as usual, so neither fit nor a method file knows which
kind of run it drives. Method files never import this module. Details: docs/beyond-cifar.md and
docs/distributed.md.

  1. The ImageNet recipe      RECIPES, apply_recipe
  2. Streamed folders         StreamData, load_stream, the decode pool, rrc_boxes, center_crop
  3. torchrun                 world, rank, dist_setup, dist_prepare, gradient averaging
  4. The run                  BeyondRun (what fit calls), setup
"""
import atexit
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import fail

# =================================================================================================
# 1. The ImageNet recipe
# =================================================================================================
RECIPES = {
    # FFSD Sec. IV-A, ImageNet: SGD, Nesterov momentum 0.9, weight decay 1e-4, 90 epochs, batch 256,
    # the LR warmed up linearly to 0.8 over 5 epochs and divided by 10 after epochs 30 and 60.
    # (Streamed folders train on 224 px crops by default, --image-size 0.)
    "imagenet": dict(epochs=90, batch_size=256, lr=0.8, lr_decay_at="0.3333,0.6667", lr_gamma=0.1,
                     momentum=0.9, nesterov=True, weight_decay=1e-4, lr_warmup_epochs=5),
}


def apply_recipe(args):
    """--recipe NAME: every field the recipe names that is still at its default takes the recipe's
    value (a flag given with another value wins). In place, so that the Args object the method
    builds its optimisers from sees the values too."""
    if args.recipe == "none":
        return args
    defaults = {f.name: f.default for f in common.dataclasses.fields(args)}
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) == defaults[name]:
            setattr(args, name, value)
    return args


# =================================================================================================
# 2. Folders streamed from disk (--loader stream; ImageNet)
# =================================================================================================
@dataclass
class StreamData:
    """An image folder read from disk batch by batch: paths and labels; images decoded when used."""
    train_files: list
    train_y: torch.Tensor  # (N,) int64, on the training device
    test_files: list
    test_y: torch.Tensor
    mean: torch.Tensor  # (1, 3, 1, 1) float in [0, 1] units, from a sample of the train split
    std: torch.Tensor
    classes: list
    size: int  # S: train and test crops are S x S


def load_stream(args, device):
    """--dataset folder, streamed: list both splits (class-balanced subsets as in load_data) and
    estimate the normalisation on a train sample; the batches and the scoring decode."""
    if device.type == "cuda":  # _collect decodes each batch's JPEGs in one call on the GPU
        common.require("decoding a list of JPEGs on the GPU (a streamed folder on CUDA)", torchvision="0.19")
    S = args.image_size or 224
    train_files, train_y, classes = common.list_folder(args.data_dir, "train")
    test_files, test_y, _ = common.list_folder(args.data_dir, "test", classes)
    common.check_subset_sizes(args, len(train_y), len(test_y))
    if args.subset:
        keep = common.balanced_first(train_y, args.subset, len(classes))
        train_files, train_y = [train_files[i] for i in keep.tolist()], train_y[keep]
    if args.test_subset:
        keep = common.balanced_first(test_y, args.test_subset, len(classes))
        test_files, test_y = [test_files[i] for i in keep.tolist()], test_y[keep]
    if len(test_files) < world():
        fail(f"the test split has {len(test_files)} images, fewer than the {world()} processes "
             f"sharing it")
    mean, std = _stream_stats(train_files, S)
    where = "on the GPU (nvJPEG)" if device.type == "cuda" else "on the CPU"
    print(f"data: streaming {len(train_files)} train / {len(test_files)} test images of "
          f"{args.data_dir!r} from disk, {S} px crops, JPEGs decoded {where}", flush=True)
    return StreamData(train_files, train_y.to(device), test_files, test_y.to(device),
                      mean.to(device), std.to(device), classes, S)


_POOL = None


def _pool():
    """Threads that read the files (and decode those the GPU does not); torchvision's decoders
    release the GIL. Shared by the processes of one machine: cores / LOCAL_WORLD_SIZE, 2 to 16."""
    global _POOL
    if _POOL is None:
        cores = (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        _POOL = ThreadPoolExecutor(max(2, min(16, cores)))
    return _POOL


def _load(path, keep_jpeg):
    """One file: its bytes (uint8 (n,)) when keep_jpeg and it is a JPEG (decoded later, batched, on
    the GPU), else the decoded (3, H, W) uint8 RGB image."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    try:
        data = read_file(path)
        if keep_jpeg and data[:3].tolist() == [0xFF, 0xD8, 0xFF]:
            return data
        return decode_image(data, mode=ImageReadMode.RGB)
    except Exception:  # said by whichever process reads the file, hence not fail()
        raise SystemExit(f"error: cannot decode image {path!r} (not an image file torchvision "
                         f"can read)")


def _submit(paths, device):
    """Start reading `paths` in the background (the next batch is read while this one trains)."""
    return [_pool().submit(_load, p, device.type == "cuda") for p in paths]


def _collect(futures, device):
    """The images of _submit: a list of (3, H_i, W_i) uint8 tensors on `device`. On a GPU the JPEGs
    are decoded there in one call, torchvision.io.decode_jpeg(list, device='cuda'); other formats,
    and JPEGs nvJPEG refuses (CMYK), on the CPU."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    items = [f.result() for f in futures]
    raw = [i for i, t in enumerate(items) if t.dim() == 1]  # JPEG bytes (GPU runs only)
    if raw:
        # torchvision's GPU decoder writes into memory the caching allocator may still have
        # promised to kernels queued on the current stream: let them finish first.
        torch.cuda.current_stream(device).synchronize()
        try:
            decoded = decode_jpeg([items[i] for i in raw], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [decode_image(items[i], mode=ImageReadMode.RGB) for i in raw]
        for i, img in zip(raw, decoded):
            items[i] = img
    return [t.to(device, non_blocking=True) for t in items]


def rrc_boxes(hw, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params for a batch, from uniform numbers u (B, 22) drawn
    beforehand (so that every process and every resume draws the same numbers): up to 10 tries, area
    fraction u[:, :10] of `scale`, log aspect u[:, 10:20] of log `ratio`; the first crop that fits
    is placed at u[:, 20:22] of the free room; if none fits, the central crop with the aspect
    clamped to `ratio`. hw: (B, 2) image sizes (H, W). Returns (B, 4) int64 (top, left, h, w)."""
    hw, u = hw.double(), u.double()
    H, W = hw[:, :1], hw[:, 1:]  # (B, 1)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, :10])  # (B, 10)
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 10:20])
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))  # (B, 10)
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
    w, h, ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    H, W = H[:, 0], W[:, 0]
    in_ratio = W / H  # fallback: the whole image, cut to the nearest allowed aspect ratio
    w = torch.where(ok, w, torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    h = torch.where(ok, h, torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H))
    top = torch.where(ok, torch.floor(u[:, 20] * (H - h + 1)), torch.floor((H - h) / 2))
    left = torch.where(ok, torch.floor(u[:, 21] * (W - w + 1)), torch.floor((W - w) / 2))
    return torch.stack([top, left, h, w], 1).long()


def crop_resize(img, box, S):
    """(3, H, W) uint8 -> the box (top, left, height, width) resized to (1, 3, S, S) float in
    [0, 255] (bilinear with antialiasing, as torchvision's resized_crop on tensors)."""
    top, left, h, w = box
    x = img[None, :, top:top + h, left:left + w].float()
    return F.interpolate(x, size=(S, S), mode="bilinear", antialias=True, align_corners=False)


def center_crop(img, S):
    """The test transform: the shorter side resized to round(256 S / 224) (256 at 224 px), then the
    central S x S (torchvision's Resize + CenterCrop on tensors). (3, H, W) uint8 -> (1, 3, S, S)
    float."""
    R, (H, W) = round(256 * S / 224), img.shape[1:]
    size = (R, int(R * W / H)) if H <= W else (int(R * H / W), R)
    x = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True,
                      align_corners=False)
    top, left = int(round((size[0] - S) / 2.0)), int(round((size[1] - S) / 2.0))
    return x[..., top:top + S, left:left + S]


def _stream_stats(files, S, k=1024):
    """Normalisation of a streamed folder: per-channel mean and std of up to k train images spread
    evenly over the split, at the test transform, decoded on the CPU (the same in every process)."""
    pick = torch.linspace(0, len(files) - 1, min(k, len(files))).round().long().unique().tolist()
    cpu = torch.device("cpu")
    s, s2 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for img in _collect(_submit([files[i] for i in pick], cpu), cpu):
        f = center_crop(img, S).double() / 255
        s, s2 = s + f.sum(dim=(0, 2, 3)), s2 + f.pow(2).sum(dim=(0, 2, 3))
    n = len(pick) * S * S
    mean = s / n
    std = ((s2 - n * mean ** 2) / max(n - 1, 1)).clamp_min(1e-12).sqrt()
    return mean.float().view(1, 3, 1, 1), std.float().view(1, 3, 1, 1)


def _share(s, n, bs):
    """This process's contiguous slice [lo, hi) of the global batch that starts at s (of n)."""
    b, nproc, r = min(bs, n - s), world(), rank()
    return s + r * b // nproc, s + (r + 1) * b // nproc


def shared_batches(run, gen, views):
    """train_batches for a streamed folder or under torchrun. Every process draws the same global
    permutation and the same augmentation numbers for the whole global batch, in the order one
    process draws them, and keeps its contiguous share: the union over the processes is the
    one-process batch. Under torchrun only full global batches (bs / world images per process)."""
    data, bs, N = run.data, run.args.batch_size, len(run.data.train_y)
    perm = torch.randperm(N, generator=gen, device=data.train_y.device)
    starts = range(0, N - 1, bs) if world() == 1 else range(0, N - bs + 1, bs)
    if isinstance(data, StreamData):
        yield from _stream_batches(run, gen, views, perm, starts)
        return
    for s in starts:
        idx, (lo, hi) = perm[s:s + bs], _share(s, N, bs)
        # Augment the whole global batch (one process's draws), keep this share.
        xb = [run.layout(common.train_view(data.train_x[idx], data, gen, run.args)[lo - s:hi - s])
              for _ in range(views)]
        yield (xb[0] if views == 1 else xb), data.train_y[perm[lo:hi]]


def _stream_batches(run, gen, views, perm, starts):
    """shared_batches for a streamed folder: decode this process's share of each batch (the next
    batch is read while this one trains), then crop, resize and flip it for each view."""
    data, bs, N = run.data, run.args.batch_size, len(run.data.train_y)
    order = perm.tolist()

    def read(s):  # start reading this process's share of the batch that begins at s
        lo, hi = _share(s, N, bs)
        return _submit([data.train_files[i] for i in order[lo:hi]], run.device)
    pending = read(starts[0]) if len(starts) else []
    for k, s in enumerate(starts):
        (lo, hi), b = _share(s, N, bs), min(bs, N - s)
        imgs = _collect(pending, run.device)
        if k + 1 < len(starts):
            pending = read(starts[k + 1])
        hw = torch.tensor([tuple(img.shape[1:]) for img in imgs])  # (b / W, 2)
        xb = []
        for _ in range(views):
            # Per image of the GLOBAL batch: 22 numbers for the crop (rrc_boxes), 1 for the flip.
            u = torch.rand(b, 23, generator=gen, device=gen.device)[lo - s:hi - s]
            boxes = rrc_boxes(hw, u[:, :22].cpu()).tolist()
            x = torch.cat([crop_resize(im, box, data.size) for im, box in zip(imgs, boxes)])
            x = torch.where((u[:, 22] < 0.5).to(x.device)[:, None, None, None], x.flip(-1), x)
            xb.append(run.layout((x / 255 - data.mean) / data.std))  # (b / W, 3, S, S)
        yield (xb[0] if views == 1 else xb), data.train_y[perm[lo:hi]]


@torch.no_grad()
def evaluate_stream(run, model, evaluate):
    """evaluate_all for a streamed folder: each process scores its contiguous shard of the test
    split (test transform: center_crop); the sums (correct counts, internals) are summed over the processes."""
    data, ebs, n = run.data, run.args.eval_batch_size, len(run.data.test_y)
    lo, hi = rank() * n // world(), (rank() + 1) * n // world()
    starts = range(lo, hi, ebs)
    read = lambda s: _submit(data.test_files[s:min(s + ebs, hi)], run.device)
    model.eval()
    sums, pending = {}, read(starts[0])
    for k, s in enumerate(starts):
        imgs = _collect(pending, run.device)
        if k + 1 < len(starts):
            pending = read(starts[k + 1])
        x = torch.cat([center_crop(img, data.size) for img in imgs])  # (b, 3, S, S)
        x, y = run.layout((x / 255 - data.mean) / data.std), data.test_y[s:s + len(imgs)]
        with run.autocast():
            outs = evaluate(model, x)
        sums = {name: sums.get(name, 0) + v for name, v in common.tally(outs, y).items()}
    if world() > 1:
        for v in sums.values():
            dist.all_reduce(v)
    model.train()
    return common.test_means(sums, n)


# =================================================================================================
# 3. Multi-GPU: torchrun --nproc-per-node N <method>.py ... (docs/distributed.md)
# =================================================================================================
# The gradients are averaged by torch.distributed.all_reduce in a step pre-hook of every optimiser,
# not by a DistributedDataParallel wrapper: the methods call their sub-networks directly (PCL
# model.student and model.mean, DML each net, FFSD Net.features of every network), so DDP, or its
# composable replicate(), on the top model never sees those forward passes and would synchronise
# nothing, and wrapping each part would change every method file. The hook sees every gradient of
# every optimiser (FFSD's Adams too), however the forward passes are composed; the price is that
# communication does not overlap the backward pass.
def world():
    """Processes of this run: torchrun's WORLD_SIZE once dist_setup has joined the group, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def dist_setup(args, device):
    """Under torchrun (WORLD_SIZE > 1): check the launch, join the process group (nccl on CUDA,
    gloo on CPU), use GPU LOCAL_RANK, silence stdout on ranks > 0. Returns the device to train on
    (unchanged for one process)."""
    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc == 1:
        return device
    if args.batch_size % nproc:
        fail(f"--batch-size {args.batch_size} is not divisible by the {nproc} processes torchrun "
             f"started (each takes batch-size / processes images of every global batch)")
    if args.sync_bn and device.type != "cuda":
        fail("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernels); without it "
             "BatchNorm runs per process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available():
        fail(f"torchrun started {nproc} processes but this PyTorch build has no torch.distributed; "
             f"run one process")
    if not (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()):
        fail(f"torchrun on {device.type.upper()} needs the {backend} backend, which this PyTorch "
             f"build lacks" + ("; try --device cpu (gloo)" if backend == "nccl" else ""))
    if device.type == "cuda":
        local_world, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", nproc)), torch.cuda.device_count()
        if local_world > gpus:
            fail(f"torchrun started {local_world} processes on this machine but {gpus} GPU(s) are "
                 f"visible; use --nproc-per-node {gpus} or fewer (one GPU per process)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            fail(f"torchrun: cannot join the process group ({type(e).__name__}: {first})")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints (and writes)
    bn = "synchronised (--sync-bn)" if args.sync_bn else "per process"
    print(f"torchrun: {nproc} processes ({backend}), {args.batch_size // nproc} images of every global "
          f"batch of {args.batch_size} each, BatchNorm {bn}", flush=True)
    return device


def dist_prepare(run, model, optimizers):
    """Under torchrun, before the first step: SyncBatchNorm if asked; every process starts from
    rank 0's weights and buffers (as DDP does); every optimiser averages the gradients over the
    processes before it steps."""
    if run.steps_per_epoch == 0:
        fail(f"the train split ({len(run.data.train_y)} images) is smaller than one global batch "
             f"(--batch-size {run.args.batch_size}); under torchrun only full global batches are "
             f"used")
    if run.args.sync_bn:  # in place: the optimisers keep the same Parameter objects
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    _broadcast(list(model.parameters()) + list(model.buffers()))
    for opt in optimizers.values():
        opt.register_step_pre_hook(_average_gradients)


@torch.no_grad()
def _average_gradients(optimizer, args, kwargs):
    """Optimiser step pre-hook: every gradient becomes its mean over the processes (one all_reduce
    per dtype), so that every process takes the same step, the step of the whole global batch."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat)  # sum over the processes
        flat /= world()
        for g, v in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(v.view(g.shape))


@torch.no_grad()
def _broadcast(tensors):
    """Rank 0's values into `tensors` on every process (one broadcast per dtype)."""
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.broadcast(flat, 0)
        for t, v in zip(same, flat.split([t.numel() for t in same])):
            t.copy_(v.view(t.shape))


# =================================================================================================
# 4. The run common.fit drives
# =================================================================================================
class BeyondRun(common.Run):
    """A common.Run whose batches, scoring, preparation and launch know about streamed folders and
    torchrun. Everything else (the loop, the logs, the checkpoints) is common.fit's."""

    @property
    def main_process(self):
        return rank() == 0  # under torchrun only rank 0 prints and writes

    @property
    def steps_per_epoch(self):
        if world() > 1:  # only full global batches (equal shares)
            return len(self.data.train_y) // self.args.batch_size
        return common.Run.steps_per_epoch.fget(self)

    def batches(self, gen, views=1):
        for batch in shared_batches(self, gen, views):
            yield batch
            if world() > 1:  # after the step: every process takes rank 0's buffers (BN statistics,
                _broadcast(list(self.model.buffers()))  # as DDP and nn.DataParallel do)

    def score(self, model, evaluate):
        if isinstance(self.data, StreamData):  # decoded from disk, scored in shards
            return evaluate_stream(self, model, evaluate)
        return super().score(model, evaluate)

    def prepare(self, model, optimizers):
        self.model = model
        if world() > 1:
            dist_prepare(self, model, optimizers)
        return super().prepare(model, optimizers)

    def launcher(self):
        return ["torchrun", f"--nproc-per-node={world()}"] if world() > 1 else super().launcher()

    def summary(self):
        if world() == 1:
            return super().summary()
        script = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
        return {**super().summary(), "processes": world(), "sync_bn": self.args.sync_bn,
                "command": f"torchrun --nproc-per-node={world()} {script}"}


def load_data(args, device):
    """A streamed folder's StreamData, or common.load_data's in-memory Data."""
    if args.dataset == "folder" and common.folder_loader(args) == "stream":
        if not args.augment:
            fail("--no-augment: a streamed folder's training images are always random-resized crops")
        return load_stream(args, device)
    return common.load_data(args, device)


def setup(args, method):
    """common.setup for a run of this module: the recipe's flags, the torchrun process group, then
    the usual start with this module's data and Run."""
    apply_recipe(args)
    common.check_args(args)  # the recipe's values pass the same checks as typed flags
    device = dist_setup(args, common.pick_device(args.device))
    return common.start_run(args, method, device, load=load_data, cls=BeyondRun)
