"""make bench: the speed of every method's training step, measured in one run (a table and JSON).

Each row times the step `common.fit` runs, built as the script builds it (`common.parse_args` on the
method's Args, `common.setup`, `build_model`, `build_optimizers`), on the synthetic set with every batch
full (`--dataset fake --drop-last`): `common.set_lr` at each epoch's start, then the method's
`train_step` on each batch `run.batches` yields (fit's batches). In one process, for every method and
backbone:

  fp32       ms/step with --no-bf16 --no-channels-last
  bf16       ms/step of the scripts' CUDA default (bf16 autocast, channels_last); on a CPU, where both
             flags do nothing, '-'
  ref        ms/step of the papers' kind of pipeline on the same method code: a DataLoader over PIL
             images with per-image crop and flip in worker processes, fp32, no fused SGD, a `.item()`
             loss meter every step; 'x ref' = ref / the default step (bf16 on CUDA, fp32 on a CPU)
  bf16~fp32  the relative difference of the mean loss of the first --loss-steps steps, bf16 against
             fp32, from the same weights on the same batches (same seed); CUDA only
  peak MiB   peak GPU memory of the default step, the data set excluded
  compile    --compile as a ratio: the default step's ms over the compiled one's (--compile-methods,
             after every eager row: the process is warm), and the seconds its first steps took
  kernels, syncs, ops   CUDA kernels, host synchronisations (CUDA's sync debug mode) and ATen ops per
             step of the default step, counted after all timing (a profiler session slows what follows)

Timing: --warmup untimed steps, then --steps steps, each between two CUDA events (on a CPU the clock);
the median step is kept. Times compare within one run only (same machine, same load).

    python tools/bench.py                              # sizes for the machine (CPU: resnet8, a few steps)
    python tools/bench.py --archs resnet32,wrn20_8 --steps 200 --out runs/bench.json
"""
import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402

METHODS = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]
FP32 = ["--no-bf16", "--no-channels-last"]


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


def build(name, arch, opt, flags=()):
    """(module, run, model, optimizers, views, MiB in use) as `<name>.py --arch arch ...flags` builds
    them; on CUDA the peak memory counter starts after the data set is on the device."""
    mod = importlib.import_module(name)
    argv = ["--arch", arch, "--dataset", "fake", "--subset", str(opt.images), "--test-subset", "100",
            "--batch-size", str(opt.batch_size), "--device", opt.device, "--drop-last",
            "--out", os.path.join(opt.scratch, name), *flags]
    run = common.setup(common.parse_args(mod.Args, argv), name)
    in_use = 0
    if run.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        in_use = torch.cuda.memory_allocated() / 2 ** 20  # the data set, held on the device
    model = run.to_device(mod.build_model(run.args, run.num_classes))
    views = run.args.num_peers if name == "pcl" else 1  # what pcl.py's main passes to fit(views=)
    return mod, run, model, mod.build_optimizers(model, run.args), views, in_use


def fit_steps(run, optimizers, epoch_batches, epoch=100):
    """(epoch, step, x, y) as fit produces them from `epoch` on (ramp-ups done): set_lr at each
    epoch's start, then that epoch's batches."""
    step = epoch * run.steps_per_epoch
    while True:
        common.set_lr(run, optimizers, epoch)
        for x, y in epoch_batches():
            yield epoch, step, x, y
            step += 1
        epoch += 1


def device_batches(run, views):
    gen = torch.Generator(device=run.device).manual_seed(run.args.seed)
    return lambda: run.batches(gen, views)  # the batches fit trains on


def reference_batches(run, views, workers):
    """The papers' pipeline: a shuffling DataLoader over PIL images, copied to the device per batch."""
    d, dev = run.data, run.device
    ds = PILSet(d.train_x.cpu(), d.train_y.cpu(), d.mean.cpu(), d.std.cpu(), views)
    torch.manual_seed(run.args.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=run.args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=dev.type == "cuda",
                                         persistent_workers=workers > 0)

    def epoch():
        for x, y in loader:
            x = x.to(dev, non_blocking=True)
            yield (list(x.unbind(1)) if views > 1 else x), y.to(dev, non_blocking=True)
    return epoch


def mark(cuda):
    if not cuda:
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def run_steps(mod, run, model, optimizers, steps, opt, meter=False):
    """opt.warmup + opt.steps steps; returns (ms of each timed step, every step's loss, warm-up s)."""
    cuda = run.device.type == "cuda"
    model.train()
    losses, t0 = [], time.perf_counter()
    for i in range(opt.warmup + opt.steps):
        if i == opt.warmup:
            if cuda:
                torch.cuda.synchronize()
            warm_s, marks = time.perf_counter() - t0, [mark(cuda)]
        epoch, step, x, y = next(steps)
        loss = mod.train_step(model, optimizers, x, y, epoch, step, run)["loss"]
        losses.append(loss.item() if meter else loss)  # meter: the reference codes' per-step sync
        if i >= opt.warmup:
            marks.append(mark(cuda))
    if cuda:
        marks[-1].synchronize()
        ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    else:
        ms = [1000 * (b - a) for a, b in zip(marks, marks[1:])]
    return ms, [float(v) for v in losses], warm_s


def time_path(name, arch, opt, path):
    """One path of one row: {'ms': median ms/step, 'losses': [...], 'peak_mib', 'warm_s'}."""
    flags = {"fp32": FP32, "ref": FP32, "bf16": [], "compiled": ["--compile"]}[path]
    mod, run, model, optimizers, views, in_use = build(name, arch, opt, flags)
    cuda = run.device.type == "cuda"
    if path == "ref":
        for o in optimizers.values():  # the reference codes' optimisers: no fused kernel
            for g in o.param_groups:
                g["fused"] = False
        batches = reference_batches(run, views, opt.workers)
    else:
        batches = device_batches(run, views)
    if path == "compiled":
        run.prepare(model, optimizers)  # what fit does before the first step: --compile
    ms, losses, warm_s = run_steps(mod, run, model, optimizers, fit_steps(run, optimizers, batches), opt,
                                   meter=path == "ref")
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 - in_use if cuda else None
    return {"ms": statistics.median(ms), "losses": losses[:opt.loss_steps], "peak_mib": peak,
            "warm_s": warm_s}


def count_per_step(name, arch, opt):
    """Kernels (CUDA), host syncs (CUDA) and top-level ATen ops per step of the default step, from a few
    steps under torch.profiler and under CUDA's sync debug mode (every sync is one warning)."""
    from torch.profiler import ProfilerActivity, profile
    mod, run, model, optimizers, views, _ = build(name, arch, opt)
    cuda, n = run.device.type == "cuda", opt.profile_steps
    steps = fit_steps(run, optimizers, device_batches(run, views))

    def go(k):
        for _ in range(k):
            epoch, step, x, y = next(steps)
            mod.train_step(model, optimizers, x, y, epoch, step, run)
    go(2)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        go(n)
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    ops = [e for e in events if e.name.startswith("aten::")
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    out = {"aten_ops_per_step": len(ops) / n, "kernels_per_step": None, "syncs_per_step": None}
    if cuda:
        kernels = [e for e in events if str(e.device_type).endswith("CUDA")
                   and not e.name.startswith(("Memcpy", "Memset"))]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                go(n)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        out.update(kernels_per_step=len(kernels) / n, syncs_per_step=len(syncs) / n)
    return out


def rel_diff(a, b):
    return abs(statistics.mean(a) - statistics.mean(b)) / max(abs(statistics.mean(b)), 1e-12)


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_row(name, arch, opt, cuda):
    paths = {p: time_path(name, arch, opt, p) for p in (["fp32", "bf16", "ref"] if cuda else ["fp32", "ref"])}
    free()
    default = paths.get("bf16", paths["fp32"])
    return {"method": name, "arch": arch, "batch_size": opt.batch_size,
            "ms_per_step": {p: round(m["ms"], 4) for p, m in paths.items()},
            "images_per_s": round(opt.batch_size * 1000 / default["ms"], 1),
            "x_ref": round(paths["ref"]["ms"] / default["ms"], 3),
            "bf16_speedup": round(paths["fp32"]["ms"] / paths["bf16"]["ms"], 3) if cuda else None,
            "losses": {p: [round(v, 5) for v in m["losses"]] for p, m in paths.items()},
            "bf16_fp32_loss_rel_diff": (round(rel_diff(paths["bf16"]["losses"], paths["fp32"]["losses"]), 5)
                                        if cuda and opt.loss_steps else None),
            "peak_mib": None if default["peak_mib"] is None else round(default["peak_mib"], 1),
            "compile_speedup": None, "compile_s": None,
            "kernels_per_step": None, "syncs_per_step": None, "aten_ops_per_step": None}


def compiled(r, opt):
    got = time_path(r["method"], r["arch"], opt, "compiled")
    eager = r["ms_per_step"].get("bf16", r["ms_per_step"]["fp32"])  # the default step
    r["ms_per_step"]["compiled"] = round(got["ms"], 4)
    r["compile_speedup"] = round(eager / got["ms"], 3)
    r["compile_s"] = round(got["warm_s"], 1)
    print(f"  compiled {r['method']} {r['arch']}: {r['compile_speedup']}x", flush=True)


def attempt(row, what, fn):
    """fn(); a failure (a compiler error, no profiler) is written into the row, and the next goes on."""
    try:
        fn()
    except Exception as e:
        row[f"{what}_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        print(f"  {what} {row['method']} {row['arch']} failed: {row[f'{what}_error']}", flush=True)
    free()


def cell(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def table(rows):
    head = (f"{'method':<9} {'arch':<10} {'fp32 ms':>8} {'bf16 ms':>8} {'ref ms':>8} {'x ref':>6} "
            f"{'bf16~fp32':>9} {'peak MiB':>8} {'compile':>8} {'kernels':>8} {'syncs':>6} {'ops':>6}")
    lines = [head]
    for r in rows:
        ms = r["ms_per_step"]
        lines.append(f"{r['method']:<9} {r['arch']:<10} {ms['fp32']:>8.2f} {cell(ms.get('bf16')):>8} "
                     f"{ms['ref']:>8.2f} {r['x_ref']:>5.2f}x "
                     f"{cell(r['bf16_fp32_loss_rel_diff'], '{:.2%}'):>9} "
                     f"{cell(r['peak_mib'], '{:.0f}'):>8} {cell(r['compile_speedup'], '{:.2f}x'):>8} "
                     f"{cell(r['kernels_per_step'], '{:.0f}'):>8} {cell(r['syncs_per_step'], '{:g}'):>6} "
                     f"{cell(r['aten_ops_per_step'], '{:.0f}'):>6}")
    return "\n".join(lines)


def environment(device):
    cuda = device == "cuda"
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "python": platform.python_version(),
            "cpus": os.cpu_count(), "timer": "CUDA events" if cuda else "perf_counter"}


def save(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


# Settings that depend on the device: (on CUDA, on a CPU).
DEFAULTS = {"archs": ("resnet32", "resnet8"), "batch_size": (128, 32), "images": (10000, 256),
            "warmup": (20, 1), "steps": (100, 3), "profile_steps": (5, 1), "workers": (8, 2),
            "compile_methods": ("baseline,pcl", "")}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name, help, type=str):
        gpu, cpu = DEFAULTS[name]
        p.add_argument("--" + name.replace("_", "-"), type=type, help=f"{help} (default: {gpu or 'none'} on "
                                                                      f"CUDA, else {cpu or 'none'})")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method files")
    add("archs", "comma-separated backbones")
    add("batch_size", "images per step", int)
    add("images", "synthetic training images, at most 10000", int)
    add("warmup", "untimed steps first", int)
    add("steps", "timed steps", int)
    p.add_argument("--loss-steps", type=int, default=20, help="losses compared, bf16 against fp32")
    add("profile_steps", "steps counted for kernels, syncs and ops", int)
    add("workers", "DataLoader workers of the reference path", int)
    add("compile_methods", "methods also timed with --compile")
    p.add_argument("--out", default=os.path.join("runs", "bench.json"), help="the JSON")
    opt = p.parse_args(argv)
    if opt.device == "auto":
        opt.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opt.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: error: --device cuda but no CUDA GPU is visible; choices: auto, cuda, "
                         "cpu")
    for key, (gpu, cpu) in DEFAULTS.items():
        if getattr(opt, key) is None:
            setattr(opt, key, gpu if opt.device == "cuda" else cpu)
    for key, known in (("methods", METHODS), ("archs", common.BACKBONES),
                       ("compile_methods", opt.methods.split(","))):
        bad = [v for v in getattr(opt, key).split(",") if v and v not in known]
        if bad:
            raise SystemExit(f"bench.py: error: --{key.replace('_', '-')} {','.join(bad)}: not one of "
                             f"{', '.join(known)}")
    for key, least in (("steps", 1), ("profile_steps", 1), ("batch_size", 1), ("warmup", 0), ("workers", 0),
                       ("loss_steps", 0)):
        if getattr(opt, key) < least:
            raise SystemExit(f"bench.py: error: --{key.replace('_', '-')} must be at least {least}, "
                             f"got {getattr(opt, key)}")
    return opt


def main(argv=None):
    opt = parse(argv)
    cuda = opt.device == "cuda"
    env = environment(opt.device)
    command = " ".join(["tools/bench.py", *(sys.argv[1:] if argv is None else argv)])
    doc = {"date": datetime.date.today().isoformat(), "command": command,
           "env": env, "settings": {k: v for k, v in vars(opt).items() if k != "scratch"}, "rows": [],
           "complete": False}
    print(f"bench | {env['device']} | torch {env['torch']} | batch {opt.batch_size} | {opt.warmup} warm-up + "
          f"{opt.steps} timed steps | {doc['date']}", flush=True)
    rows = doc["rows"]
    with tempfile.TemporaryDirectory() as opt.scratch:  # --out of each run: never written (no fit)
        for arch in opt.archs.split(","):  # 1. every eager path of every row
            for name in opt.methods.split(","):
                rows.append(measure_row(name, arch, opt, cuda))
                print(f"  timed {name} {arch}: {rows[-1]['ms_per_step']}", flush=True)
                save(opt.out, doc)  # a run stopped part-way keeps the rows measured so far
        for r in rows:  # 2. --compile, in the warm process
            if r["method"] in opt.compile_methods.split(","):
                attempt(r, "compile", lambda: compiled(r, opt))
                save(opt.out, doc)
        for r in rows:  # 3. counting, after all timing
            attempt(r, "count", lambda: r.update(count_per_step(r["method"], r["arch"], opt)))
    doc["complete"] = True
    save(opt.out, doc)
    print(table(rows))
    print(f"wrote {opt.out}")
    return doc


if __name__ == "__main__":
    main()
