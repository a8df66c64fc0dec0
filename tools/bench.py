"""make bench: training speed of this repository's path against a reference-style pipeline, in one run.

For every method file present and every backbone asked for, two paths train the same method code
(`build_model`, `build_optimizers`, `train_step` of the method file) on the same data:

  ref   the papers' kind of pipeline: a torchvision DataLoader over PIL images with per-image transforms
        (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize), worker processes, fp32, NCHW,
        a `.item()` loss meter every step (what the reference codes do);
  okd   this repository's path: the uint8 set on the device, batched crop/flip there, bf16 autocast and
        channels_last on CUDA, fused SGD on CUDA, loss sums kept on the device (one sync per measurement).

Each measurement: warm-up steps, then timed steps (synchronised before reading the clock); the paths are
interleaved (ref, okd, ref, okd, ...) over --repeats and the median is kept. Prints one table with the ratio
okd/ref per row and writes it as JSON. Ratios are only comparable within one run (same machine, same load).

    python tools/bench.py                                  # defaults for the machine (CPU: a small size)
    python tools/bench.py --archs resnet32,wrn20_8 --steps 200 --repeats 3 --out bench.json
    python tools/bench.py --accuracy --methods baseline,pcl --archs resnet32 --dataset folder \
        --data-dir data/cifar10-jpeg --epochs 30 --seeds 0,1,2     # same accuracy on both paths?
"""
import argparse
import datetime
import importlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402

METHODS = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]


class PILSet(torch.utils.data.Dataset):
    """The reference pipeline's data set: HWC uint8 images -> PIL -> per-image transforms (one per view)."""

    def __init__(self, x, y, mean, std, views):
        self.x, self.y, self.views = x.permute(0, 2, 3, 1).numpy(), y.numpy(), views
        self.t = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                            T.Normalize(mean.flatten().tolist(), std.flatten().tolist())])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = Image.fromarray(self.x[i])
        xs = [self.t(img) for _ in range(self.views)]
        return (xs[0] if self.views == 1 else torch.stack(xs)), int(self.y[i])


def views_of(name, args):
    return getattr(args, "num_peers", 1) if name == "pcl" else 1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch_source(path, run, args, data, device, views, workers):
    """A function that yields one epoch of training batches of the given path (a list of views for PCL)."""
    if path == "okd":
        gen = torch.Generator(device=device).manual_seed(args.seed)
        return lambda: common.train_batches(run, gen, views)
    ds = PILSet(data.train_x.cpu(), data.train_y.cpu(), data.mean.cpu(), data.std.cpu(), views)
    torch.manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=False,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)

    def epoch():
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            yield (list(x.unbind(1)) if views > 1 else x), y.to(device, non_blocking=True)
    return epoch


def make_run(path, name, args, data, device):
    """okd: bf16 + channels_last on CUDA (the scripts' default); ref: fp32, NCHW, no fused optimiser."""
    cuda = device.type == "cuda"
    return common.Run(args, name, device, data, out="", amp=cuda and path == "okd", channels_last=cuda and path == "okd")


def build(path, mod, run, args):
    torch.manual_seed(args.seed)
    model = run.to_device(mod.build_model(args, len(run.data.classes)))
    optimizers = mod.build_optimizers(model, args)
    if path == "ref":  # the reference codes' optimisers: no fused kernel
        for o in optimizers.values():
            for g in o.param_groups:
                g["fused"] = False
    return model, optimizers


def measure(path, mod, name, args, data, device, opt):
    """Train `opt.warmup` + `opt.steps` steps of method `mod` on one path; returns images/s and peak memory."""
    cuda = device.type == "cuda"
    run = make_run(path, name, args, data, device)
    model, optimizers = build(path, mod, run, args)
    epoch_batches = batch_source(path, run, args, data, device, views_of(name, args), opt.workers)

    def batches():
        while True:
            yield from epoch_batches()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    it, total, images = batches(), torch.zeros((), device=device), 0
    for i in range(opt.warmup + opt.steps):
        if i == opt.warmup:
            sync(device)
            t0 = time.perf_counter()
        x, y = next(it)
        images += len(y) if i >= opt.warmup else 0
        logs = mod.train_step(model, optimizers, x, y, 0, i, run)
        if path == "ref":
            total += logs["loss"].item()  # the reference codes' per-step meter: a host sync every step
        else:
            total += logs["loss"].detach().float()
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else float("nan")
    return {"images_per_s": images / dt, "peak_mib": peak, "final_loss": float(total) / (opt.warmup + opt.steps)}


DEPLOYED = {"baseline": "net", "dml": "peer1", "one": "branch1", "okddip": "leader", "pcl": "mt_peer1", "ffsd": "leader"}


def accuracy(path, mod, name, args, data, device, workers):
    """Train a whole (short) schedule on one path, as fit() does (LR per epoch), and score the test set."""
    run = make_run(path, name, args, data, device)
    model, optimizers = build(path, mod, run, args)
    epoch_batches = batch_source(path, run, args, data, device, views_of(name, args), workers)
    for o in optimizers.values():
        for g in o.param_groups:
            g["base_lr"] = g["lr"]
    step = 0
    for epoch in range(args.epochs):
        for o in optimizers.values():
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * common.lr_factor(epoch, args)
        model.train()
        for x, y in epoch_batches():
            mod.train_step(model, optimizers, x, y, epoch, step, run)
            step += 1
    return common.evaluate_all(run, model, mod.evaluate)[DEPLOYED[name]]


def accuracy_check(opt, device):
    """Same schedule, same seeds, both paths: the deployed model's test accuracy, mean +- std over seeds."""
    rows = []
    print(f"accuracy | {opt.dataset} | {opt.epochs} epochs | seeds {opt.seeds} | {datetime.date.today().isoformat()}")
    print(f"{'method':<9} {'arch':<10} {'model':<9} {'ref acc %':>16} {'okd acc %':>16}", flush=True)
    for arch in opt.archs.split(","):
        for name in opt.methods.split(","):
            mod = importlib.import_module(name)
            got = {"ref": [], "okd": []}
            for seed in [int(v) for v in opt.seeds.split(",")]:
                args = common.check_args(mod.Args(arch=arch, dataset=opt.dataset, data_dir=opt.data_dir,
                                                  subset=opt.subset, test_subset=opt.test_subset, epochs=opt.epochs,
                                                  batch_size=opt.batch_size, seed=seed, device=device.type))
                data = common.load_data(args, device)
                for path in ("ref", "okd"):
                    got[path].append(accuracy(path, mod, name, args, data, device, opt.workers))
            ms = {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in got.items()}
            rows.append({"method": name, "arch": arch, "model": DEPLOYED[name], "ref": got["ref"], "okd": got["okd"]})
            print(f"{name:<9} {arch:<10} {DEPLOYED[name]:<9} {ms['ref'][0]:>9.2f} +- {ms['ref'][1]:<4.2f} "
                  f"{ms['okd'][0]:>9.2f} +- {ms['okd'][1]:<4.2f}", flush=True)
    return rows


def mib(m):
    return "-" if m["peak_mib"] != m["peak_mib"] else f"{m['peak_mib']:.0f}"  # NaN on CPU: no device memory


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method files to measure")
    p.add_argument("--archs", default="resnet32,wrn20_8" if cuda else "resnet8", help="comma-separated backbones")
    p.add_argument("--batch-size", type=int, default=128 if cuda else 64)
    p.add_argument("--steps", type=int, default=200 if cuda else 6, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=30 if cuda else 2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3 if cuda else 1, help="interleaved repeats; the median is kept")
    p.add_argument("--workers", type=int, default=8 if cuda else 2, help="DataLoader workers of the reference path")
    p.add_argument("--images", type=int, default=10000 if cuda else 2000, help="synthetic training images")
    p.add_argument("--out", default=os.path.join("runs", "bench.json"), help="where the JSON goes")
    a = p.add_argument_group("accuracy check (--accuracy): both paths train the same schedule and seeds")
    a.add_argument("--accuracy", action="store_true", help="compare test accuracy instead of speed")
    a.add_argument("--dataset", default="fake", help="fake, folder, cifar10 or cifar100")
    a.add_argument("--data-dir", default="./data", help="as the scripts' --data-dir")
    a.add_argument("--epochs", type=int, default=3, help="the schedule (LR x0.1 at 50%% and 75%%)")
    a.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    a.add_argument("--subset", type=int, default=0, help="class-balanced training subset (0 = all)")
    a.add_argument("--test-subset", type=int, default=0, help="class-balanced test subset (0 = all)")
    opt = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    if opt.accuracy:
        rows = accuracy_check(opt, device)
        _save(opt, {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "settings": vars(opt),
                    "accuracy": rows})
        return rows
    x, y = common.make_fake(opt.images, seed=1)
    f = x.float() / 255
    data = common.Data(x.to(device), y.to(device), x[:0].to(device), y[:0].to(device),
                       f.mean(dim=(0, 2, 3), keepdim=True).to(device), f.std(dim=(0, 2, 3), keepdim=True).to(device),
                       [f"class{i}" for i in range(10)])
    rows = []
    names = [m for m in opt.methods.split(",") if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
    archs = [a for a in opt.archs.split(",") if a in common.BACKBONES]
    skipped = sorted(set(opt.archs.split(",")) - set(archs)) + sorted(set(opt.methods.split(",")) - set(names))
    env = (f"{torch.cuda.get_device_name(device) if cuda else 'cpu'} | torch {torch.__version__} | "
           f"{os.cpu_count()} CPUs | {opt.workers} workers | batch {opt.batch_size} | {opt.steps} steps x {opt.repeats}")

    def save(rows, complete):
        _save(opt, {"env": env, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                    "settings": vars(opt), "rows": rows, "complete": complete}, quiet=not complete)

    print(f"bench | {env} | {datetime.date.today().isoformat()}" + (f" | not available: {', '.join(skipped)}" if skipped else ""))
    print(f"{'method':<9} {'arch':<10} {'ref img/s':>10} {'okd img/s':>10} {'ratio':>6} {'ref s/ep':>9} {'okd s/ep':>9} "
          f"{'ref MiB':>8} {'okd MiB':>8}", flush=True)
    for arch in archs:
        for name in names:
            mod = importlib.import_module(name)
            args = mod.Args(arch=arch, dataset="fake", batch_size=opt.batch_size, device=device.type)
            got = {"ref": [], "okd": []}
            for _ in range(opt.repeats):
                for path in ("ref", "okd"):
                    got[path].append(measure(path, mod, name, args, data, device, opt))
            med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in got.items()}
            row = {"method": name, "arch": arch, "ref": med["ref"], "okd": med["okd"],
                   "ratio": med["okd"]["images_per_s"] / med["ref"]["images_per_s"]}
            rows.append(row)
            save(rows, complete=False)  # a run stopped part-way keeps the rows measured so far
            ep = lambda k: 50000 / med[k]["images_per_s"]  # noqa: E731  (seconds per 50k-image epoch)
            print(f"{name:<9} {arch:<10} {med['ref']['images_per_s']:>10.0f} {med['okd']['images_per_s']:>10.0f} "
                  f"{row['ratio']:>5.2f}x {ep('ref'):>9.1f} {ep('okd'):>9.1f} {mib(med['ref']):>8} {mib(med['okd']):>8}",
                  flush=True)
    save(rows, complete=True)
    return rows


def _save(opt, obj, quiet=False):
    os.makedirs(os.path.dirname(opt.out) or ".", exist_ok=True)
    with open(opt.out + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(opt.out + ".tmp", opt.out)
    if not quiet:
        print(f"wrote {opt.out}")


if __name__ == "__main__":
    main()
