"""make gpu-check: every figure a GPU session should bring back, from one command, in one folder.

Run it first whenever a GPU is available (one H100/H200, a clean checkout). Each stage runs in child
processes with its own slice of --budget; a stage that fails or runs out of time is recorded in
summary.json and the next one still runs; the whole check stops by the budget.

  env      GPU, driver, torch / CUDA / cuDNN versions, code version, the step-compiling flags of
           each script (always runs).
  steps    every method on resnet32 (and baseline, pcl on wrn20_8), driven through the method
           file's own build_model / build_optimizers / train_step on synthetic images held on the
           GPU, as fit() drives them: ms/step (CUDA events, >= 50 steps after warm-up), kernels and
           ATen ops per step (profiler), GPU-busy time, peak memory, host syncs per step (CUDA sync
           debug mode: must be 0), evaluation time, and the first losses with bf16 autocast vs fp32
           (same seed, same batches).
  compile  every script that lists --compile (or a CUDA-graph flag), run as a user runs it (3 short
           epochs) with and without it: ms/step of the last epoch, the speed-up, the one-time cost.
  bench    tools/bench.py: the reference DataLoader + PIL + fp32 path against ours, every method.
  resume   baseline and pcl (resnet8, synthetic): --stop-after 2 then --resume, against one run.
  grid     the `short` grid (tools/reproduce.py) on real CIFAR-10, unpacked from --npz by
           tools/unpack_cifar10_jpeg.py: the runs projected to finish, several at once, stopped at
           the budget (checkpoints kept).

The output folder holds at most 8 files: summary.json, gpu-check.log, speed.md, results.tar.gz
(results/ additions, logs) and checkpoints-<k>.tar.gz (unfinished grid runs, whole, at most 4 parts
of <= 15 MiB).

    python tools/gpu_check.py run --out runs/gpu-check --npz local/cifar10_jpeg.npz   # GPU machine
    python tools/gpu_check.py ingest runs/gpu-check    # here: results/, runs/, speed tables, report
    python tools/gpu_check.py run --out runs/gc --dry-run --device cpu    # CPU plumbing check
"""
import argparse
import collections
import dataclasses
import datetime
import gc
import hashlib
import importlib
import io
import json
import math
import os
import platform
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
for _p in (ROOT, TOOLS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

METHODS = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]
STAGES = ["env", "steps", "compile", "bench", "resume", "grid"]
# Share of --budget each stage may use; the grid takes whatever is left (at least its share).
SLICES = {"env": 0.05, "steps": 0.30, "compile": 0.24, "bench": 0.16, "resume": 0.10}
RESERVE_S = 20  # kept at the end for packing the output folder
MAX_FILES, PART_MIB, MAX_PARTS = 8, 15, 4
OUT_FILES = ["summary.json", "gpu-check.log", "speed.md", "results.tar.gz"]
# The paper recipe: 300 epochs of ceil(50,000 / 128) steps and 300 evaluations of 10,000 images.
EPOCHS_300, STEPS_PER_EPOCH = 300, math.ceil(50000 / 128)
TARGET_MIN = {("baseline", "resnet32"): 3.0, ("pcl", "resnet32"): 10.0}  # 300-epoch wall time
# Flags of a method script that compile or capture the training step (a bool, or a choice of modes).
STEP_FLAGS = ("compile", "cuda_graph", "cuda_graphs", "cudagraphs", "graphs")
OFF_VALUES = ("", "none", "off", "no", "false", "eager")
# bf16 vs fp32 on the same batches: the first loss (same weights) within 2 %, the mean of the last
# 10 of the first N losses within 0.05 + 10 % (the trajectories drift apart as rounding adds up).
LOSS_TOL_FIRST, LOSS_TOL_ABS, LOSS_TOL_REL = 0.02, 0.05, 0.10
# Resume: bit-exact expected (deterministic kernels); if not, every per-epoch value within these.
RESUME_TOL_REL, RESUME_TOL_ACC = 1e-3, 0.5
# The grid starts only runs projected to finish: concurrent runs assumed to overlap 2x on the GPU,
# 20 % kept to spare; each run's start-up and data loading counted as 20 s.
GRID_OVERLAP, GRID_SPARE, GRID_START_S = 2.0, 0.8, 20.0

# What each stage does at full size (a GPU) and in the CPU plumbing check (--dry-run).
FULL = {
    "steps": dict(pairs=[(m, "resnet32") for m in ("baseline", "pcl", "dml", "one", "okddip",
                                                   "ffsd")]
                  + [("baseline", "wrn20_8"), ("pcl", "wrn20_8")],
                  batch_size=128, warmup=15, steps=50, sync_steps=10, profile_steps=5,
                  loss_steps=30,
                  images=10240, eval_images=10000, epoch=100, seed=0),
    "compile": dict(methods=["baseline", "pcl", "dml", "one", "okddip", "ffsd"], arch="resnet32",
                    subset=9984, batch_size=128,
                    flags=["--dataset", "fake", "--test-subset", "1000", "--epochs", "3"]),
    "resume": dict(methods=["baseline", "pcl"], stop_after=2,
                   flags=["--arch", "resnet8", "--dataset", "fake", "--subset", "2048",
                          "--test-subset", "500", "--batch-size", "128", "--epochs", "3"]),
    "bench": ["--methods", ",".join(METHODS), "--archs", "resnet32", "--steps", "50", "--warmup",
              "10", "--repeats", "1", "--workers", "8", "--images", "10240", "--batch-size", "128"],
    "grid": dict(name="short", args=[], jobs=6),
}
DRY = {
    "steps": dict(pairs=[(m, "resnet8") for m in METHODS], batch_size=16, warmup=1, steps=2,
                  sync_steps=2, profile_steps=1, loss_steps=2, images=64, eval_images=64, epoch=100,
                  seed=0),
    "compile": dict(methods=["baseline"], arch="resnet8", subset=64, batch_size=16,
                    flags=["--dataset", "fake", "--test-subset", "32", "--epochs", "2"]),
    "resume": dict(methods=["baseline"], stop_after=1,
                   flags=["--arch", "resnet8", "--dataset", "fake", "--subset", "128",
                          "--test-subset", "64", "--batch-size", "32", "--epochs", "2"]),
    "bench": ["--methods", "baseline", "--archs", "resnet8", "--steps", "2", "--warmup", "1",
              "--repeats", "1", "--workers", "0", "--images", "64", "--batch-size", "16"],
    "grid": dict(name="tiny", args=["--seeds", "0", "--epochs", "1", "--subset", "128"], jobs=1),
}


def fail(msg):
    raise SystemExit(f"error: {msg}")


def now_iso():
    return datetime.datetime.now().isoformat(timespec="seconds")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1) + "\n")


def write_text(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file


def write_bytes(path, data):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_jsonl(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rel(path):
    """A path as the children (cwd: the repository root) and records show it: relative inside."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if os.path.commonpath([path, ROOT]) == ROOT else path


def source_hash():
    """sha256 of the repository's Python sources (root and tools/): names the code without git."""
    h = hashlib.sha256()
    for d in (ROOT, TOOLS):
        for name in sorted(os.listdir(d)):
            if name.endswith(".py"):
                path = os.path.join(d, name)
                h.update(f"{rel(path)}\0".encode() + read_bytes(path))
    return h.hexdigest()[:16]


# =================================================================================================
# 1. Child processes: output into the log, a hard time limit, the whole process group stopped
# =================================================================================================
class Log:
    """Lines to stdout and to OUT/gpu-check.log, appended as they come (a killed check keeps it)."""
    LIMIT = 2 * 2 ** 20  # beside 4 checkpoint parts of <= 15 MiB the folder stays under 64 MiB

    def __init__(self, path):
        self.path, self.size, self.lock = path, 0, threading.Lock()

    def __call__(self, line, echo=True):
        with self.lock:
            if echo:
                print(line, flush=True)
            if self.size > self.LIMIT:
                return
            text = line + "\n" if self.size + len(line) < self.LIMIT else "... log truncated here\n"
            with open(self.path, "a") as f:
                f.write(text)
            self.size += len(text)


def child(argv, timeout, log, tag, env=None, echo=False):
    """Run `python <argv>` in the repository root, its output into the log (prefixed [tag]); after
    `timeout` seconds stop its whole process group (SIGINT, then SIGKILL). Returns (exit status,
    timed out, last lines)."""
    tail = collections.deque(maxlen=40)
    p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1, process_group=0,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def pump():
        for line in p.stdout:
            tail.append(line.rstrip("\n"))
            log(f"  [{tag}] {tail[-1]}", echo=echo)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        p.wait(timeout=max(1.0, timeout))
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
        timed_out = True
        _stop_group(p)
        if isinstance(e, KeyboardInterrupt):
            raise
    reader.join(timeout=5)
    p.stdout.close()
    return p.wait(), timed_out, list(tail)


def _stop_group(p):
    """SIGINT to the child's process group (a method script keeps its checkpoint), then SIGKILL."""
    for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# =================================================================================================
# 2. Workers: what runs in the child processes (they import torch; the parent never touches CUDA)
# =================================================================================================
def step_variants(Args):
    """A script's step-compiling flags: (flags that turn them all off, [(label, flags for one)])."""
    off, on = [], []
    for f in dataclasses.fields(Args):
        if f.name not in STEP_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            off += ["--no-" + flag[2:]] if f.default else []
            on.append((flag[2:], [flag]))
        elif f.metadata.get("choices"):
            choices = [str(c) for c in f.metadata["choices"]]
            offs = [c for c in choices if c.lower() in OFF_VALUES]
            if offs and str(f.default) not in offs:
                off += [flag, offs[0]]
            on += [(f"{flag[2:]}={c}", [flag, c]) for c in choices if c.lower() not in OFF_VALUES]
    return off, on


def worker_env(cfg, out_path):
    import torch
    import common
    cudnn = torch.backends.cudnn
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": cudnn.version() if cudnn.is_available() else None,
            "cpus": os.cpu_count(), "platform": platform.platform(), "device": cfg["device"],
            "cuda_available": torch.cuda.is_available()}
    if cfg["device"] == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible")
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    gpu_mib=p.total_memory // 2 ** 20, tf32_convs=cudnn.allow_tf32,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True,
                                            timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    info["backbones"] = list(common.BACKBONES)
    info["methods"], info["step_flags"] = [], {}
    for m in METHODS:
        if os.path.isfile(os.path.join(ROOT, f"{m}.py")):
            mod = importlib.import_module(m)
            off, on = step_variants(mod.Args)
            info["methods"].append(m)
            info["step_flags"][m] = {"off": off, "variants": on}
    write_json(out_path, info)
    print(json.dumps({k: info.get(k) for k in ("gpu", "torch", "cuda", "cudnn", "driver")}))


def _fake_data(cfg, device):
    import common
    x, y = common.make_fake(cfg["images"], seed=1)
    vx, vy = common.make_fake(cfg["eval_images"], seed=2)
    f = x.float() / 255
    mean, std = f.mean(dim=(0, 2, 3), keepdim=True), f.std(dim=(0, 2, 3), keepdim=True)
    return common.Data(x.to(device), y.to(device), vx.to(device), vy.to(device), mean.to(device),
                       std.to(device), [f"class{i}" for i in range(10)])


def _views(method, args):
    """How many augmented views of each batch the method's fit() call asks for (PCL: 1 per peer)."""
    import bench
    return bench.views_of(method, args)


def _driver(mod, method, args, data, device, fast, cfg):
    """A model, its optimisers and a step() that does what one iteration of common.fit does: the
    next augmented batch, then the method's train_step; step() returns the detached loss (a device
    tensor, never read on the host)."""
    import torch
    import common
    cuda = device.type == "cuda"
    run = common.Run(args=args, method=method, device=device, data=data, out="", amp=cuda and fast,
                     channels_last=cuda and fast)
    torch.manual_seed(cfg["seed"])
    model = run.to_device(mod.build_model(args, len(data.classes)))
    model.train()
    optimizers = mod.build_optimizers(model, args)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    views, spe = _views(method, args), run.steps_per_epoch

    def batches():
        while True:
            yield from common.train_batches(run, gen, views)
    it, count = batches(), [0]

    def step():
        x, y = next(it)
        i = count[0]
        count[0] += 1
        logs = mod.train_step(model, optimizers, x, y, cfg["epoch"], cfg["epoch"] * spe + i, run)
        return logs["loss"].detach()
    return run, model, step


def _profile(step, n, cuda):
    """ATen ops (the outermost: what Python dispatches) and CUDA kernels per step, GPU-busy ms."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")
            and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    out = {"aten_ops_per_step": round(len(aten) / n, 1)}
    if cuda:
        dev = [e for e in events if str(e.device_type).endswith("CUDA")]
        kernels = [e for e in dev if not e.name.startswith(("Memcpy", "Memset"))]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        out.update(kernels_per_step=round(len(kernels) / n, 1),
                   memcpy_memset_per_step=round((len(dev) - len(kernels)) / n, 1),
                   gpu_busy_ms_per_step=round(busy_us / n / 1000, 3))
    return out


def _count_syncs(step, n):
    """n steps under CUDA's sync debug mode ('warn'): every host synchronisation is one warning,
    raised at the Python line that caused it."""
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    sites = collections.Counter(f"{rel(w.filename)}:{w.lineno}" for w in syncs)
    return {"syncs_per_step": len(syncs) / n, "sync_sites": dict(sites.most_common(10))}


def _losses(values):
    return [round(float(v), 5) for v in values]


def _timed_steps(step, n, cuda, losses):
    """ms of each of n steps: a CUDA event before every step (the spread as well as the mean), or
    the host clock on a CPU (where a step is done when its value exists)."""
    import torch
    if cuda:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            losses.append(step())
            events[i + 1].record()
        events[-1].synchronize()
        return [events[i].elapsed_time(events[i + 1]) for i in range(n)]
    per = []
    for _ in range(n):
        t0 = time.perf_counter()
        losses.append(step())
        float(losses[-1])
        per.append((time.perf_counter() - t0) * 1000)
    return per


def _compare_losses(fast, ref):
    k = min(10, len(ref))
    mb, mf = sum(fast[-k:]) / k, sum(ref[-k:]) / k
    first = abs(fast[0] - ref[0]) / max(abs(ref[0]), 1e-12)
    ok = (first <= LOSS_TOL_FIRST and abs(mb - mf) <= LOSS_TOL_ABS + LOSS_TOL_REL * abs(mf)
          and all(map(math.isfinite, fast + ref)))
    return dict(bf16=fast, fp32=ref, first_rel_diff=round(first, 5), last_mean_bf16=round(mb, 5),
                last_mean_fp32=round(mf, 5), last_abs_diff=round(abs(mb - mf), 5),
                tolerance=f"first step <= {LOSS_TOL_FIRST:.0%} relative; mean of the last {k} <= "
                          f"{LOSS_TOL_ABS} + {LOSS_TOL_REL:.0%} of fp32", within_tolerance=bool(ok))


def measure_pair(method, arch, cfg, data, device):
    import torch
    import common
    cuda = device.type == "cuda"
    no_cuda = "skipped: no CUDA"
    mod = importlib.import_module(method)
    args = common.check_args(mod.Args(arch=arch, dataset="fake", batch_size=cfg["batch_size"],
                                      device=device.type, seed=cfg["seed"]))
    row = {"method": method, "arch": arch, "device": device.type, "batch_size": cfg["batch_size"],
           "views": _views(method, args), "epoch": cfg["epoch"], "warmup": cfg["warmup"],
           "steps": cfg["steps"], "skipped": {},
           "path": "bf16 autocast + channels_last + fused SGD" if cuda else "fp32 (CPU)"}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # the data set: not counted in peak_mib
    run, model, step = _driver(mod, method, args, data, device, True, cfg)
    losses = [step() for _ in range(cfg["warmup"])]
    per = sorted(_timed_steps(step, cfg["steps"], cuda, losses))
    row["timer"] = "CUDA events" if cuda else "perf_counter (CPU)"
    row["ms_per_step"] = round(sum(per) / len(per), 4)
    row["ms_per_step_median"] = round(per[len(per) // 2], 4)
    row["ms_per_step_p10_p90"] = [round(per[len(per) // 10], 4), round(per[9 * len(per) // 10], 4)]
    row["images_per_s"] = round(cfg["batch_size"] * 1000 / row["ms_per_step"], 1)
    if cuda:
        row["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
        row.update(_count_syncs(step, cfg["sync_steps"]))
    else:
        row["peak_mib"], row["syncs_per_step"], row["sync_sites"] = None, None, None
        row["skipped"].update(peak_mib=no_cuda,
                              syncs_per_step=no_cuda + " (sync debug mode is CUDA's)")
    row.update(_profile(step, cfg["profile_steps"], cuda))
    if not cuda:
        for k in ("kernels_per_step", "memcpy_memset_per_step", "gpu_busy_ms_per_step"):
            row[k], row["skipped"][k] = None, no_cuda
    common.evaluate_all(run, model, mod.evaluate)  # warm-up: the evaluation batch's own kernels
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    common.evaluate_all(run, model, mod.evaluate)  # ends with .item(): synchronised
    row["eval_s"], row["eval_images"] = round(time.perf_counter() - t0, 4), len(data.test_y)
    fast = _losses(torch.stack(losses[:cfg["loss_steps"]]).float().tolist())
    loss = {"steps": cfg["loss_steps"],
            "fp32_path": "--no-bf16 --no-channels-last (cuDNN may use TF32)"}
    if cuda:  # the same weights and batches again, in fp32 NCHW
        del model, step
        gc.collect()
        _, model, step = _driver(mod, method, args, data, device, False, cfg)
        ref = _losses(torch.stack([step() for _ in range(cfg["loss_steps"])]).float().tolist())
        loss.update(_compare_losses(fast, ref))
    else:
        loss.update(bf16=None, fp32=fast, within_tolerance=None)
        row["skipped"]["loss.bf16"] = no_cuda + " (bf16 autocast is the CUDA path; a CPU runs fp32)"
    row["loss"] = loss
    return row


def worker_steps(cfg, rows_path):
    import torch
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as common.setup
    data = _fake_data(cfg, device)
    for method, arch in cfg["pairs"]:
        if time.time() > cfg["deadline"]:
            print(f"time slice used up before {method} {arch}")
            return
        t0 = time.time()
        try:
            row = measure_pair(method, arch, cfg, data, device)
        except Exception as e:
            row = {"method": method, "arch": arch, "error": f"{type(e).__name__}: {str(e)[:500]}",
                   "traceback": traceback.format_exc()[-2000:]}
        row["seconds"] = round(time.time() - t0, 1)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if "error" in row:
            print(f"{method} {arch}: {row['error']}")
            if "cuda" in row["error"].lower():
                raise SystemExit(3)  # the CUDA context may be unusable: the parent starts anew
        else:
            print(f"{method:<9} {arch:<9} {row['ms_per_step']:9.3f} ms/step  syncs/step "
                  f"{row['syncs_per_step']}  kernels/step {row['kernels_per_step']}  "
                  f"({row['seconds']} s)")
        gc.collect()


def exec_script(argv):
    """`script [--deterministic] <method>.py ARGS...`: run a method script as `python <method>.py
    ARGS` would; --deterministic first asks torch for deterministic kernels and keeps cuDNN from
    benchmarking (its choice may differ between processes): a resumed run can match bit for bit."""
    if argv[:1] == ["--deterministic"]:
        argv = argv[1:]
        import torch
        torch.use_deterministic_algorithms(True, warn_only=True)
        import common
        setup = common.setup

        def deterministic_setup(*a, **kw):
            run = setup(*a, **kw)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            return run
        common.setup = deterministic_setup
    sys.argv = list(argv)
    runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")


# =================================================================================================
# 3. Stages (in the parent): each returns its part of summary.json
# =================================================================================================
def _failed_or_timeout(rc, timed_out, tail):
    return {"status": "timeout" if timed_out else "failed",
            "error": ("timed out: " if timed_out else f"exit status {rc}: ")
                     + " | ".join(tail[-3:])}


class Check:
    def __init__(self, opts):
        self.opts, self.t0 = opts, time.time()
        self.end = self.t0 + opts.budget
        self.cfg = DRY if opts.dry_run else FULL
        self.out, self.work = os.path.abspath(opts.out), os.path.abspath(opts.work)
        self.results, self.runs = os.path.abspath(opts.results), os.path.abspath(opts.runs)
        self.methods = opts.methods.split(",") if opts.methods else METHODS
        self.log = Log(os.path.join(self.out, "gpu-check.log"))
        self.env, self.unpack, self.unpacked, self.folder, self.cfgs = None, None, None, None, 0
        self.summary = {"check": "gpu-check", "format": 1,
                        "mode": "dry-run" if opts.dry_run else "full",
                        "device": opts.device, "started": now_iso(), "budget_s": opts.budget,
                        "command": "python " + shlex.join(["tools/gpu_check.py", *opts.argv]),
                        "stages": {}}

    def left(self):
        return self.end - time.time()

    def save(self):
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        write_json(os.path.join(self.out, "summary.json"), self.summary)

    def stage(self, name, fn, slice_s):
        """Run one stage within min(its slice, the budget); record its result or its failure."""
        t0 = time.time()
        deadline = min(t0 + slice_s, self.end - RESERVE_S)
        self.log(f"== {name} (slice {max(0, deadline - t0):.0f} s, {self.left():.0f} s left) ==")
        try:
            if deadline - t0 < 5:
                res = {"status": "skipped", "note": "skipped: no time left in the budget"}
            else:
                res = fn(deadline)
        except Exception as e:
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
        except KeyboardInterrupt:
            self.summary["stages"][name] = {"status": "failed", "error": "interrupted (Ctrl-C)",
                                            "seconds": round(time.time() - t0, 1)}
            raise
        res["seconds"], res["slice_s"] = round(time.time() - t0, 1), round(slice_s, 1)
        self.summary["stages"][name] = res
        why = res.get("note") or res.get("error")
        self.log(f"   {name}: {res['status']}{' - ' + why if why else ''} ({res['seconds']} s)")
        self.save()

    def _cfg(self, cfg):
        """A worker's settings, as a file in the scratch folder; returns its path."""
        self.cfgs += 1
        path = os.path.join(self.work, f"cfg-{self.cfgs}.json")
        write_json(path, {**cfg, "device": self.opts.device})
        return path

    # ----- env -----
    def stage_env(self, deadline):
        path = os.path.join(self.work, "env.json")
        rc, to, tail = child([__file__, "worker", "env", self._cfg({}), path],
                             deadline - time.time(),
                             self.log, "env")
        if rc != 0 or not os.path.isfile(path):
            return _failed_or_timeout(rc, to, tail)
        self.env = read_json(path)
        from reproduce import code_version
        code = {**code_version(), "source_sha256": source_hash()}
        return {"status": "ok", **self.env, "code": code}

    # ----- steps -----
    def stage_steps(self, deadline):
        cfg = dict(self.cfg["steps"])
        pending = [tuple(p) for p in cfg.pop("pairs")
                   if p[0] in self.methods and os.path.isfile(f"{ROOT}/{p[0]}.py")]
        rows_path, restarts = os.path.join(self.work, "steps.jsonl"), 0
        while pending and deadline - time.time() > 5:
            before = len(read_jsonl(rows_path))
            worker_cfg = self._cfg({**cfg, "pairs": pending, "deadline": deadline - 3})
            rc, to, tail = child([__file__, "worker", "steps", worker_cfg, rows_path],
                                 deadline - time.time(), self.log, "steps", echo=True)
            new = read_jsonl(rows_path)[before:]
            done = {(r["method"], r["arch"]) for r in new}
            pending = [p for p in pending if p not in done]
            if rc == 0 or to or not pending:
                break
            if not any("error" in r for r in new):  # died inside a pair: blame that pair, go on
                with open(rows_path, "a") as f:
                    f.write(json.dumps({"method": pending[0][0], "arch": pending[0][1],
                                        "error": f"process ended with status {rc}",
                                        "log_tail": tail[-8:]}) + "\n")
                pending = pending[1:]
            restarts += 1
        rows = read_jsonl(rows_path)
        bad = [r for r in rows if "error" in r]
        status = ("ok" if rows and not pending and not bad else
                  "partial" if len(rows) > len(bad) else "failed")
        res = {"status": status, "rows": rows, "settings": cfg, "restarts": restarts}
        if pending:
            res["note"] = ("not measured (time slice used up): "
                           + ", ".join(f"{m} {a}" for m, a in pending))
        return res

    # ----- compile -----
    def _script_epochs(self, method, label, flags, cfg, deadline):
        """Run `<method>.py` as a user would; ms/step of each epoch from its metrics.jsonl."""
        out = rel(os.path.join(self.work, "compile", f"{method}-{label}"))
        argv = [f"{method}.py", "--arch", cfg["arch"], "--subset", str(cfg["subset"]),
                "--batch-size",
                str(cfg["batch_size"]), *cfg["flags"], "--device", self.opts.device, "--seed", "0",
                "--out", out, *flags]
        t0 = time.time()
        rc, to, tail = child(argv, deadline - time.time(), self.log, f"compile {method} {label}")
        spe = len(range(0, cfg["subset"] - 1, cfg["batch_size"]))
        epochs = read_jsonl(os.path.join(ROOT, out, "metrics.jsonl"))
        res = {"label": label, "flags": flags, "command": "python " + shlex.join(argv),
               "wall_s": round(time.time() - t0, 1), "steps_per_epoch": spe,
               "ms_per_step_by_epoch": [round(e["sec"] * 1000 / spe, 4) for e in epochs]}
        if rc != 0 or not epochs:
            res["error"] = _failed_or_timeout(rc, to, tail)["error"]
        else:
            res["ms_per_step"] = res["ms_per_step_by_epoch"][-1]
        return res

    def stage_compile(self, deadline):
        if self.env is None:
            return {"status": "skipped", "note": "skipped: the env stage failed (no list of flags)"}
        cfg, rows = self.cfg["compile"], []
        todo = [m for m in cfg["methods"] if m in self.methods and m in self.env["methods"]]
        flags = {m: self.env["step_flags"][m] for m in todo}
        listed = [m for m in todo if flags[m]["variants"]]
        if self.opts.dry_run:  # the plumbing only: one eager script run, parsed as below
            rows = [{"method": m,
                     "eager": self._script_epochs(m, "eager", flags[m]["off"], cfg, deadline)}
                    for m in todo[:1]]
            return {"status": "skipped", "listed": listed, "rows": rows,
                    "note": "skipped: dry run (compiling takes minutes); one eager run parsed"}
        if not listed:
            return {"status": "skipped", "listed": [],
                    "note": "skipped: no method script lists --compile or a CUDA-graph flag"}
        for m in listed:
            if deadline - time.time() < 10:
                rows.append({"method": m, "error": "not measured: time slice used up"})
                continue
            eager = self._script_epochs(m, "eager", flags[m]["off"], cfg, deadline)
            row = {"method": m, "arch": cfg["arch"], "eager": eager, "variants": []}
            for label, on in flags[m]["variants"]:
                v = self._script_epochs(m, label, flags[m]["off"] + on, cfg, deadline)
                if "ms_per_step" in v and "ms_per_step" in eager:
                    v["speedup"] = round(eager["ms_per_step"] / v["ms_per_step"], 3)
                    v["one_time_s"] = round(v["wall_s"] - eager["wall_s"], 1)
                row["variants"].append(v)
            rows.append(row)
        ok = [r for r in rows if any("speedup" in v for v in r.get("variants", []))]
        return {"status": "ok" if len(ok) == len(rows) else ("partial" if ok else "failed"),
                "listed": listed, "rows": rows,
                "note": "ms/step of the last epoch; one_time_s = wall time over eager (compiling)"}

    # ----- bench -----
    def stage_bench(self, deadline):
        path = os.path.join(self.work, "bench.json")
        argv = ["tools/bench.py", *self.cfg["bench"], "--out", rel(path)]
        i = argv.index("--methods") + 1
        argv[i] = ",".join(m for m in argv[i].split(",") if m in self.methods)
        env = {"CUDA_VISIBLE_DEVICES": ""} if self.opts.device == "cpu" else None
        rc, to, tail = child(argv, deadline - time.time(), self.log, "bench", env=env, echo=True)
        got = read_json(path)
        if got is None:
            return _failed_or_timeout(rc, to, tail)
        done = got.get("complete", rc == 0) and rc == 0
        return {"status": "ok" if done else ("partial" if got.get("rows") else "failed"),
                "note": None if done else "stopped part-way (time slice): the rows measured so far",
                "command": "python " + shlex.join(argv[:-2]), **got}

    # ----- resume -----
    def stage_resume(self, deadline):
        cfg = self.cfg["resume"]
        todo = [m for m in cfg["methods"] if m in self.methods and os.path.isfile(f"{ROOT}/{m}.py")]
        if not todo:
            return {"status": "skipped", "note": "skipped: no method of this stage selected"}
        dirs = {m: {k: os.path.join(self.work, "resume", m, k) for k in ("full", "split")}
                for m in todo}

        def go(job):
            m, kind, extra = job
            argv = [__file__, "script", "--deterministic", f"{m}.py", *cfg["flags"], "--device",
                    self.opts.device, "--seed", "0", "--out", rel(dirs[m][kind]), *extra]
            return child(argv, deadline - time.time(), self.log, f"resume {m} {kind}",
                         env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
        first = [(m, "full", []) for m in todo]
        first += [(m, "split", ["--stop-after", str(cfg["stop_after"])]) for m in todo]
        with ThreadPoolExecutor(max_workers=len(first)) as pool:
            got = dict(zip([(m, k) for m, k, _ in first], pool.map(go, first)))
            second = [(m, "split", ["--resume"]) for m in todo if got[m, "split"][0] == 0]
            got.update({(m, "resumed"): r for (m, _, _), r in zip(second, pool.map(go, second))})
        rows = []
        for m in todo:
            row = {"method": m, "stop_after": cfg["stop_after"],
                   "command": f"{m}.py {shlex.join(cfg['flags'])} "
                              f"(--stop-after {cfg['stop_after']}, "
                              f"then --resume)"}
            for part in ("full", "split", "resumed"):
                rc, to, tail = got.get((m, part), (None, False, ["not started: a part failed"]))
                if rc != 0:
                    row["error"] = f"{part} run: " + _failed_or_timeout(rc, to, tail)["error"]
                    break
            else:
                row.update(compare_runs(dirs[m]["full"], dirs[m]["split"]))
            rows.append(row)
        good = [r for r in rows if r.get("within_tolerance")]
        return {"status": "ok" if len(good) == len(rows) else ("partial" if good else "failed"),
                "rows": rows,
                "mode": "deterministic kernels (torch.use_deterministic_algorithms, no cuDNN "
                        "benchmarking)",
                "tolerance": f"bit-exact expected; else every per-epoch value within "
                             f"{RESUME_TOL_REL:g} "
                             f"relative and accuracies within {RESUME_TOL_ACC} points"}

    # ----- grid -----
    def start_unpack(self):
        """Unpack --npz in the background (disk and one core) beside stages that time nothing."""
        if not self.opts.npz or self.unpack is not None:
            return
        self.folder = os.path.join(self.work, "cifar10-jpeg")
        argv = ["tools/unpack_cifar10_jpeg.py", rel(self.opts.npz), rel(self.folder)]

        def unpack():
            self.unpacked = child(argv, max(10.0, self.left()), self.log, "unpack")
        self.unpack = threading.Thread(target=unpack)
        self.unpack.start()

    def stage_grid(self, deadline):
        g = self.cfg["grid"]
        real = g["name"] != "tiny"
        if real and not self.opts.npz:
            return {"status": "skipped",
                    "note": "skipped: no --npz, so no real CIFAR-10 images (the timings ran on "
                            "synthetic data held on the device)"}
        if real:
            self.start_unpack()
            self.unpack.join(timeout=max(0, deadline - time.time()))
            rc, _, tail = self.unpacked or (None, True, ["still unpacking"])
            if self.unpack.is_alive() or rc != 0:
                return {"status": "failed",
                        "error": "unpacking --npz failed: " + " | ".join(tail[-3:])}
        methods = [m for m in self.methods if os.path.isfile(f"{ROOT}/{m}.py")]
        budget = max(10, deadline - time.time() - 25)  # runs stop at their last epoch, then record
        if self.opts.grid_methods:
            methods, plan = self.opts.grid_methods.split(","), {"note": "--grid-methods"}
        elif self.opts.dry_run:
            methods, plan = methods[:1], {"note": "dry run: one run of the tiny grid"}
        else:
            methods, plan = self.grid_plan(g["name"], methods, budget)
        if not methods:
            return {"status": "skipped", "plan": plan,
                    "note": f"skipped: no run of the grid is projected to finish in {budget:.0f} s"}
        jobs = str(self.opts.grid_jobs or g["jobs"])
        argv = ["tools/reproduce.py", "run", g["name"], "--jobs", jobs,
                "--time-budget", f"{budget:.0f}", "--quiet", "--results", rel(self.results),
                "--runs", rel(self.runs), "--methods", ",".join(methods), *g["args"]]
        argv += ["--data-dir", rel(self.folder)] if real else []
        rc, to, tail = child(argv, deadline - time.time(), self.log, "grid", echo=True)
        runs = grid_state(self.runs, self.results, g["name"])
        res = {"status": "ok" if rc == 0 and not to else "failed", "grid": g["name"], "plan": plan,
               "command": "python " + shlex.join(argv),
               "data": "real CIFAR-10 (JPEG) from --npz" if real else "synthetic, the tiny grid",
               **runs}
        if rc != 0 or to:
            res["error"] = _failed_or_timeout(rc, to, tail)["error"]
        if runs["unfinished"]:
            res["note"] = (f"{len(runs['unfinished'])} run(s) unfinished; their folders are in "
                           f"checkpoints-*.tar.gz: ingest, then bring runs/{g['name']}/ along "
                           f"next time")
        return res

    def grid_plan(self, grid, methods, budget):
        """Start only the runs projected to finish: a run stopped part-way leaves a checkpoint of
        4-14 MB that must travel to the next GPU session, a finished one a small JSON. A run's
        projection: the grid's epochs at the measured eager ms/step and evaluation time (this
        check's steps stage, else the last ingested check, results/gpu-check/summary.json) plus
        start-up. Concurrent runs share the GPU, assumed to overlap GRID_OVERLAP times (launch-bound
        steps leave it idle between kernels), GRID_SPARE of the budget used. Unfinished runs (a
        checkpoint here) always continue; with no timing at all, every run starts."""
        import reproduce
        spec = reproduce.GRIDS[grid]
        rows, source = self.summary["stages"].get("steps", {}).get("rows", []), "this check"
        if not any(r.get("device") == "cuda" and "ms_per_step" in r for r in rows):
            last = read_json(os.path.join(self.results, "gpu-check", "summary.json"), {})
            rows = last.get("stages", {}).get("steps", {}).get("rows", [])
            source = "results/gpu-check/summary.json"
        rows = {r["method"]: r for r in rows if r.get("arch") == spec["archs"][0]
                and r.get("device") == "cuda" and "ms_per_step" in r}
        if not rows:
            return methods, {"note": "no ms/step measured yet: every run starts"}
        proj = {m: round(spec["epochs"] * (STEPS_PER_EPOCH * rows[m]["ms_per_step"] / 1000
                                           + rows[m]["eval_s"]
                                           * 10000 / rows[m]["eval_images"]) + GRID_START_S, 1)
                for m in methods if m in rows}
        state = grid_state(self.runs, self.results, grid)
        unfinished = {u["name"].split("-")[0] for u in state["unfinished"]}
        chosen, total = [m for m in methods if m in unfinished], 0.0
        for m in sorted(proj, key=proj.get):
            if m not in chosen and total + proj[m] <= GRID_OVERLAP * GRID_SPARE * budget:
                chosen.append(m)
                total += proj[m]
        return [m for m in methods if m in chosen], {
            "projected_s": proj, "budget_s": round(budget), "timing_from": source,
            "continued": sorted(unfinished), "not_started": [m for m in methods if m not in chosen]}

    # ----- the whole check -----
    def main(self):
        snapshot = files_under(self.results)
        asked = self.opts.stages.split(",") if self.opts.stages else STAGES
        selected = [s for s in STAGES if s in asked or s == "env"]  # env: always (compile needs it)
        self.summary["data"] = {
            "timing": "synthetic images (common.make_fake) held on the device: steps, compile, "
                      "bench, "
                      "resume",
            "real": os.path.basename(self.opts.npz) if self.opts.npz else None,
            "note": None if self.opts.npz else "no --npz: no real CIFAR-10, so no grid stage"}
        self.save()
        fns = {"env": self.stage_env, "steps": self.stage_steps, "compile": self.stage_compile,
               "bench": self.stage_bench, "resume": self.stage_resume, "grid": self.stage_grid}
        try:
            for name in STAGES:
                if name not in selected:
                    self.summary["stages"][name] = {"status": "skipped",
                                                    "note": "skipped: not in --stages"}
                    continue
                if name == "resume" and "grid" in selected:
                    self.start_unpack()
                slice_s = self.left() if name == "grid" else SLICES[name] * self.opts.budget
                self.stage(name, fns[name], slice_s)
        except KeyboardInterrupt:
            self.log("interrupted: packing what is there")
            for name in STAGES:
                self.summary["stages"].setdefault(name, {"status": "skipped",
                                                         "note": "skipped: interrupted"})
        finally:
            if self.unpack is not None:
                self.unpack.join()
            self.summary["projections"] = projections(self.summary)
            self.summary["finished"] = now_iso()
            self.save()
            pack(self, snapshot)
            write_text(os.path.join(self.out, "speed.md"), render_speed(self.summary))
            self.summary["files"] = {n: os.path.getsize(os.path.join(self.out, n))
                                     for n in sorted(os.listdir(self.out))}
            self.save()
            self.log(brief(self.summary))
            if len(os.listdir(self.out)) > MAX_FILES:  # never, by construction: checked anyway
                fail(f"{self.out} holds {len(os.listdir(self.out))} files, more than {MAX_FILES}")


def compare_runs(full, split):
    """The stopped-and-resumed run against the uninterrupted one: every per-epoch value but the
    timings, and final.json's accuracies."""
    a = read_jsonl(os.path.join(full, "metrics.jsonl"))
    b = read_jsonl(os.path.join(split, "metrics.jsonl"))
    diffs = []
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if k not in ("sec", "images_per_s") and isinstance(v, (int, float)):
                diffs.append((abs(v - rb.get(k, float("nan"))), k, v))
    fa, fb = (read_json(os.path.join(d, "final.json")) for d in (full, split))
    models = {k: (v, fb["models"].get(k)) for k, v in fa["models"].items()}
    same_len = len(a) == len(b)
    exact = (same_len and all(d == 0 for d, _, _ in diffs)
             and all(x == y for x, y in models.values()))
    close = same_len and all(
        d <= (RESUME_TOL_ACC if k.startswith("acc/") else RESUME_TOL_REL * max(abs(v), 1e-12))
                             for d, k, v in diffs)
    worst = max(diffs, default=(0.0, None, None))
    return {"exact": exact, "within_tolerance": bool(exact or close), "epochs": [len(a), len(b)],
            "max_abs_diff": worst[0], "max_diff_key": worst[1], "models": models,
            "test_acc": [fa["test_acc"], fb["test_acc"]]}


def files_under(root):
    """{relative path: (size, mtime_ns)} of every file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), root)] = (st.st_size, st.st_mtime_ns)
    return out


def grid_state(runs_dir, results_dir, grid):
    """A grid's run folders: recorded (result JSON), unfinished (checkpoint, no final.json)."""
    recorded, unfinished = [], []
    d = os.path.join(runs_dir, grid)
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        run = os.path.join(d, name)
        if os.path.isfile(os.path.join(results_dir, grid, name + ".json")):
            recorded.append(name)
        elif os.path.isfile(os.path.join(run, "checkpoint.pt")) and \
                not os.path.isfile(os.path.join(run, "final.json")):
            mib = sum(os.path.getsize(os.path.join(run, n)) for n in os.listdir(run)) / 2 ** 20
            unfinished.append({"name": name,
                               "epochs_done": len(read_jsonl(os.path.join(run, "metrics.jsonl"))),
                               "epochs": read_json(os.path.join(run, "config.json"),
                                                   {}).get("epochs"),
                               "mib": round(mib, 2)})
    return {"recorded": recorded, "unfinished": unfinished}


# =================================================================================================
# 4. Packing the output folder, and reading it back (ingest)
# =================================================================================================
def _add_tail(tar, path, arcname, limit=256 * 1024):
    """The last `limit` bytes of a file, as arcname."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - limit))
        data = f.read()
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def _parts(unfinished):
    """Unfinished runs into at most MAX_PARTS parts of <= PART_MIB, furthest first (first fit);
    returns (parts, names left out)."""
    parts, dropped = [], []
    for run in sorted(unfinished, key=lambda r: -r["epochs_done"]):
        part = next((p for p in parts if p["mib"] + run["mib"] <= PART_MIB), None)
        if part is None and len(parts) < MAX_PARTS and run["mib"] <= PART_MIB:
            part = {"runs": [], "mib": 0.0}
            parts.append(part)
        if part is None:
            dropped.append(run["name"])
            continue
        part["runs"].append(run["name"])
        part["mib"] += run["mib"]
    return parts, dropped


def pack(check, snapshot):
    """results.tar.gz: new or changed files under results/, the grid runs' logs, the stages' raw
    files; checkpoints-<k>.tar.gz: unfinished grid runs (see _parts), each run folder whole."""
    out, grid = check.out, check.cfg["grid"]["name"]
    ran = check.summary["stages"].get("grid", {}).get("status", "skipped") != "skipped"
    added = sorted(p for p, st in files_under(check.results).items()
                   if snapshot.get(p) != st and not p.endswith(".tmp"))
    tmp = os.path.join(out, "results.tar.gz.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in added:
            tar.add(os.path.join(check.results, path), arcname=f"results/{path}", recursive=False)
        d = os.path.join(check.runs, grid)
        for name in sorted(os.listdir(d)) if ran and os.path.isdir(d) else []:
            if os.path.isfile(os.path.join(d, name, "stdout.log")):
                _add_tail(tar, os.path.join(d, name, "stdout.log"),
                          f"gpu-check/logs/{grid}/{name}.log")
        for name in ("env.json", "steps.jsonl", "bench.json"):
            if os.path.isfile(os.path.join(check.work, name)):
                tar.add(os.path.join(check.work, name), arcname=f"gpu-check/{name}")
    os.replace(tmp, os.path.join(out, "results.tar.gz"))
    state = grid_state(check.runs, check.results, grid) if ran else {"unfinished": []}
    parts, dropped = _parts(state["unfinished"])
    for k, part in enumerate(parts, 1):
        part["file"] = f"checkpoints-{k}.tar.gz"
        tmp = os.path.join(out, part["file"] + ".tmp")
        with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
            for run in part["runs"]:
                d = os.path.join(check.runs, grid, run)
                for n in sorted(os.listdir(d)):
                    if not n.endswith(".tmp"):
                        tar.add(os.path.join(d, n), arcname=f"runs/{grid}/{run}/{n}",
                                recursive=False)
        os.replace(tmp, os.path.join(out, part["file"]))
    check.summary["packed"] = {"results_files": added, "checkpoint_parts": parts,
                               "not_brought_back": dropped}


def _members(tar):
    """Regular files with a relative path and no '..': (member, path parts)."""
    for m in tar.getmembers():
        parts = m.name.split("/")
        if m.isfile() and not m.name.startswith("/") and ".." not in parts:
            yield m, parts


def _fill_commit(data, here, digest):
    """A run record written where git was absent (no commit) gets this checkout's commit: the Python
    sources it ran are byte-identical to this checkout's (same sha256)."""
    try:
        record = json.loads(data)
    except ValueError:
        return data
    code = record.get("code") if isinstance(record, dict) else None
    if not isinstance(code, dict) or code.get("commit"):
        return data
    record["code"] = {**here,
                      "note": f"commit filled in at ingest: same Python sources (sha256 {digest})"}
    return (json.dumps(record, indent=1) + "\n").encode()


def ingest(opts):
    src = opts.folder
    summary = read_json(os.path.join(src, "summary.json"))
    if summary is None:
        fail(f"{src!r} holds no summary.json; give the folder that `gpu_check.py run --out` wrote")
    if summary.get("check") != "gpu-check":
        fail(f"{os.path.join(src, 'summary.json')!r} is not a gpu-check summary")
    results, runs = os.path.abspath(opts.results), os.path.abspath(opts.runs)
    done = {"results": [], "unchanged": [], "kept": [], "runs": [], "older": [], "logs": 0}
    digest = summary.get("stages", {}).get("env", {}).get("code", {}).get("source_sha256")
    same = digest is not None and digest == source_hash()
    from reproduce import code_version
    here = code_version()
    tars = [os.path.join(src, "results.tar.gz")] + sorted(
        os.path.join(src, n) for n in os.listdir(src)
        if n.startswith("checkpoints-") and n.endswith(".tar.gz"))
    incoming = {}  # run folder (grid/name) -> {file name: bytes}
    for t in (t for t in tars if os.path.isfile(t)):
        with tarfile.open(t) as tar:
            for m, parts in _members(tar):
                data = tar.extractfile(m).read()
                if parts[0] == "results" and len(parts) >= 3:
                    name, dest = "/".join(parts[1:]), os.path.join(results, *parts[1:])
                    if same and name.endswith(".json"):
                        data = _fill_commit(data, here, digest)
                    if os.path.isfile(dest):  # recorded here already: never overwritten
                        done["unchanged" if read_bytes(dest) == data else "kept"].append(name)
                        continue
                    write_bytes(dest, data)
                    done["results"].append(name)
                elif parts[0] == "runs" and len(parts) == 4:
                    incoming.setdefault(os.path.join(*parts[1:3]), {})[parts[3]] = data
                elif parts[0] == "gpu-check":
                    write_bytes(os.path.join(runs, "gpu-check-logs", *parts[1:]), data)
                    done["logs"] += 1
    for run, files in sorted(incoming.items()):
        dest = os.path.join(runs, run)
        theirs = files.get("metrics.jsonl", b"").count(b"\n")
        if os.path.isfile(os.path.join(dest, "checkpoint.pt")) and \
                len(read_jsonl(os.path.join(dest, "metrics.jsonl"))) >= theirs:
            done["older"].append(run)  # the folder here is as far or further: keep it
            continue
        for n, data in files.items():
            write_bytes(os.path.join(dest + ".incoming", n), data)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.replace(dest + ".incoming", dest)
        done["runs"].append(f"{run} (epoch {theirs})")
    speed_dir = os.path.join(results, "gpu-check")
    write_json(os.path.join(speed_dir, "summary.json"), summary)
    write_text(os.path.join(speed_dir, "speed.md"), render_speed(summary))
    print(f"code: {'the same' if same else 'NOT the same'} Python sources as this checkout "
          f"(sha256 {digest} there, {source_hash()} here)")
    print(f"results: {len(done['results'])} file(s) added under {rel(results)}/"
          + (f"; kept the copy here of {', '.join(done['kept'])}" if done["kept"] else ""))
    print(f"runs: {', '.join(done['runs']) or 'no unfinished run folder'} -> {rel(runs)}/"
          + (f"; kept the further copy here of {', '.join(done['older'])}" if done["older"]
             else ""))
    print(f"speed tables: {rel(os.path.join(speed_dir, 'speed.md'))} (for the README's Speed "
          f"section); "
          f"every figure: {rel(os.path.join(speed_dir, 'summary.json'))}")
    if opts.report:
        import reproduce
        reproduce.main(["report", "--results", results, "--readme", opts.readme,
                        "--results-md", opts.results_md])
    grid = summary.get("stages", {}).get("grid", {})
    if grid.get("unfinished"):
        print(f"to continue the unfinished runs on the next GPU, bring runs/{grid['grid']}/ along "
              f"({sum(r['mib'] for r in grid['unfinished']):.0f} MiB) with the data; run the "
              f"check again")
    return done


# =================================================================================================
# 5. The speed tables (markdown) and the closing lines
# =================================================================================================
def _projection(method, arch, ms, eval_s, extra_s=0.0, variant=None):
    minutes = (EPOCHS_300 * (STEPS_PER_EPOCH * ms / 1000 + eval_s) + extra_s) / 60
    target = TARGET_MIN.get((method, arch))
    return {"method": method, "arch": arch, "variant": variant, "ms_per_step": ms,
            "eval_s_per_10k": round(eval_s, 3), "minutes_300_epochs": round(minutes, 2),
            "target_min": target, "meets_target": None if target is None else minutes <= target}


def projections(summary):
    """300-epoch wall time: 300 x ceil(50,000 / 128) steps at the measured ms/step plus 300
    evaluations of 10,000 images (plus the one-time cost of a compiled variant), against the targets
    where there is one. Only from CUDA measurements."""
    stages = summary.get("stages", {})
    rows = [r for r in stages.get("steps", {}).get("rows", [])
            if r.get("device") == "cuda" and "error" not in r]
    out = [_projection(r["method"], r["arch"], r["ms_per_step"],
                       r["eval_s"] * 10000 / r["eval_images"])
           for r in rows]
    evals = {(p["method"], p["arch"]): p["eval_s_per_10k"] for p in out}
    for r in stages.get("compile", {}).get("rows", []):
        for v in r.get("variants", []):
            if "ms_per_step" in v:
                out.append(_projection(r["method"], r["arch"], v["ms_per_step"],
                                       evals.get((r["method"], r["arch"]), 0.0),
                                       max(0.0, v.get("one_time_s", 0.0)), v["label"]))
    return out


def _f(v, fmt="{:.2f}", none="—"):
    return none if v is None else fmt.format(v)


def _why(stage):
    """One line for a stage without rows: its note or error, else its status."""
    why = stage.get("note") or stage.get("error") or stage.get("status") or "not run"
    return why.replace("\n", " ")[:300]


def _num(v):
    return None if v is None or v != v else v  # NaN (no device memory on a CPU) -> None


def _mark(p):
    return {True: " ✓", False: " ✗"}.get(p.get("meets_target"), "")


def _row(*cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _steps_md(steps, proj):
    rows = [r for r in steps.get("rows", []) if "error" not in r]
    if not rows:
        return [_why(steps), ""]
    cfg = steps.get("settings", {})
    head = ["method", "backbone", "ms/step", "img/s", "kernels/step", "ATen ops/step", "GPU busy",
            "peak MiB", "host syncs/step", "300 epochs (min)", "target (min)"]
    lines = [f"### Training step (eager, batch {cfg.get('batch_size')}, {cfg.get('steps')} timed "
             f"steps after {cfg.get('warmup')} warm-up, {rows[0].get('path')})", "",
             _row(*head), "|" + "---|" * len(head)]
    for r in rows:
        p = proj.get((r["method"], r["arch"], None), {})
        busy = r.get("gpu_busy_ms_per_step")
        busy = None if busy is None else 100 * busy / r["ms_per_step"]
        lines.append(_row(r["method"], r["arch"], f"{r['ms_per_step']:.3f}",
                          f"{r['images_per_s']:.0f}",
                          _f(r.get("kernels_per_step"), "{:.0f}"),
                          _f(r.get("aten_ops_per_step"), "{:.0f}"),
                          _f(busy, "{:.0f} %"), _f(r.get("peak_mib"), "{:.0f}"),
                          _f(r.get("syncs_per_step"), "{:g}"), _f(p.get("minutes_300_epochs")),
                          _f(p.get("target_min"), "{:g}") + _mark(p)))
    lines += ["", f"300 epochs = {EPOCHS_300} × {STEPS_PER_EPOCH} steps at the measured ms/step "
              f"plus {EPOCHS_300} evaluations of 10,000 images; data loading and compiling "
              "excluded.", "",
              "### bf16 vs fp32 (same weights, same batches)", "",
              _row("method", "backbone", "first loss bf16 / fp32", "rel. diff",
                   "mean of the last 10, bf16 / fp32", "within"), "|---|---|---|---|---|---|"]
    for r in rows:
        lo = r.get("loss", {})
        if lo.get("bf16") is None:
            why = r["skipped"].get("loss.bf16", "—")
            lines.append(_row(r["method"], r["arch"], "—", "—", "—", why))
            continue
        lines.append(_row(r["method"], r["arch"], f"{lo['bf16'][0]:.4f} / {lo['fp32'][0]:.4f}",
                          f"{lo['first_rel_diff']:.2%}",
                          f"{lo['last_mean_bf16']:.4f} / {lo['last_mean_fp32']:.4f}",
                          "yes" if lo["within_tolerance"] else "NO"))
    tol = next((r["loss"]["tolerance"] for r in rows if r.get("loss", {}).get("tolerance")), None)
    return lines + ([f"\nTolerance: {tol}."] if tol else []) + [""]


def _compile_md(comp, proj):
    rows = [r for r in comp.get("rows", []) if r.get("variants")]
    if not rows:
        return ["### Compiled step", "", _why(comp), ""]
    lines = ["### Compiled step", "",
             _row("method", "flag", "eager ms/step", "compiled ms/step", "speed-up", "one-time s",
                  "300 epochs (min)"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        for v in r["variants"]:
            p = proj.get((r["method"], r["arch"], v["label"]), {})
            lines.append(_row(r["method"], f"`{' '.join(v['flags'])}`",
                              _f(r["eager"].get("ms_per_step"), "{:.3f}"),
                              _f(v.get("ms_per_step"), "{:.3f}"),
                              _f(v.get("speedup"), "{:.2f}×"), _f(v.get("one_time_s"), "{:.0f}"),
                              _f(p.get("minutes_300_epochs")) + _mark(p)))
    return lines + [""]


def _bench_md(bench):
    lines = ["### Reference pipeline (DataLoader + PIL + fp32) vs ours (`make bench`, one run)", ""]
    if not bench.get("rows"):
        return lines + [_why(bench), ""]
    lines += [_row("method", "backbone", "ref img/s", "ours img/s", "ratio", "ref peak MiB",
                   "ours peak MiB"), "|---|---|---|---|---|---|---|"]
    for r in bench["rows"]:
        lines.append(_row(r["method"], r["arch"], f"{r['ref']['images_per_s']:.0f}",
                          f"{r['okd']['images_per_s']:.0f}", f"{r['ratio']:.2f}×",
                          _f(_num(r["ref"].get("peak_mib")), "{:.0f}"),
                          _f(_num(r["okd"].get("peak_mib")), "{:.0f}")))
    return lines + ["", f"{bench.get('env', '')}.", ""]


def _resume_md(res):
    lines = ["### Stop and resume on the device", ""]
    if not res.get("rows"):
        return lines + [_why(res), ""]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"- {r['method']}: FAILED ({r['error'][:200]})")
            continue
        how = "bit-exact" if r["exact"] else (
            f"{'within tolerance' if r['within_tolerance'] else 'DIFFERENT'}, largest difference "
            f"{r['max_abs_diff']:.3g} in {r['max_diff_key']}")
        lines.append(f"- {r['method']}: {how} (test accuracy {r['test_acc'][0]:.2f} uninterrupted, "
                     f"{r['test_acc'][1]:.2f} stopped after epoch {r.get('stop_after')}, resumed)")
    return lines + ["", f"{res.get('mode')}; {res.get('tolerance')}.", ""]


def _grid_md(grid):
    if not grid.get("grid"):
        return ["### Grid", "", _why(grid), ""]
    recorded = ", ".join(grid.get("recorded", [])) or "none"
    unfinished = ", ".join(f"{u['name']} ({u['epochs_done']}/{u['epochs']} epochs)"
                           for u in grid.get("unfinished", [])) or "none"
    not_started = ", ".join((grid.get("plan") or {}).get("not_started", []))
    later = f"; not started (projected not to finish): {not_started}" if not_started else ""
    return ["### Grid", "", f"`{grid['grid']}` ({grid.get('data')}): recorded {recorded}; "
            f"unfinished {unfinished}{later}.", ""]


def render_speed(s):
    st = s.get("stages", {})
    proj = {(p["method"], p["arch"], p.get("variant")): p for p in s.get("projections", [])}
    env = st.get("env", {})
    code = env.get("code", {})
    version = f"{(code.get('commit') or 'unknown')[:9]}{'+dirty' if code.get('dirty') else ''}"
    mode = ("DRY RUN (tiny sizes, the CPU plumbing check; not a measurement)"
            if s.get("mode") == "dry-run" else "full check")
    lines = [f"## GPU check: {env.get('gpu') or s.get('device')}, {s.get('started', '')[:10]}", "",
             "<!-- generated by `python tools/gpu_check.py ingest` from "
             "results/gpu-check/summary.json -->", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, driver "
             f"{env.get('driver')}; code {version} (sources {code.get('source_sha256')}); {mode}. "
             f"Timing data: {s.get('data', {}).get('timing')}.", ""]
    lines += _steps_md(st.get("steps", {}), proj)
    bad = [r for r in st.get("steps", {}).get("rows", []) if "error" in r]
    if bad:
        lines += ["Failed: " + "; ".join(f"{r['method']} {r['arch']}: {r['error']}"
                                         for r in bad), ""]
    lines += _compile_md(st.get("compile", {}), proj) + _bench_md(st.get("bench", {}))
    lines += _resume_md(st.get("resume", {})) + _grid_md(st.get("grid", {}))
    lines += ["### Stages", "", _row("stage", "status", "seconds", "note"), "|---|---|---|---|"]
    for name in STAGES:
        g = st.get(name, {})
        note = (g.get("note") or g.get("error") or "").replace("\n", " ")[:160]
        lines.append(_row(name, g.get("status", "—"), _f(g.get("seconds"), "{:.0f}"), note))
    return "\n".join(lines) + "\n"


def brief(s):
    """The closing lines of `run` (the end of the output is what a short session sees first)."""
    st = s["stages"]
    out = ["", "gpu-check summary" + (" (DRY RUN)" if s["mode"] == "dry-run" else ""),
           "  " + " | ".join(f"{k} {st.get(k, {}).get('status', '-')}" for k in STAGES)]
    for r in st.get("steps", {}).get("rows", []):
        if "error" in r:
            out.append(f"  {r['method']:<9} {r['arch']:<9} ERROR {r['error'][:80]}")
            continue
        out.append(f"  {r['method']:<9} {r['arch']:<9} {r['ms_per_step']:8.3f} ms/step  syncs/step "
                   f"{_f(r.get('syncs_per_step'), '{:g}', '-')}  kernels/step "
                   f"{_f(r.get('kernels_per_step'), '{:.0f}', '-')}  bf16~fp32 "
                   f"{_f(r.get('loss', {}).get('within_tolerance'), '{}', '-')}")
    for p in s.get("projections", []):
        target = f" (target {p['target_min']:g})" if p["target_min"] else ""
        out.append(f"  300 epochs {p['method']} {p['arch']} {p.get('variant') or 'eager'}: "
                   f"{p['minutes_300_epochs']:.1f} min{target}")
    for r in st.get("compile", {}).get("rows", []):
        for v in r.get("variants", []):
            got = f"{v['speedup']:.2f}x eager" if "speedup" in v else v.get("error", "-")[:80]
            out.append(f"  compile {r['method']} {v['label']}: {got}")
    for r in st.get("resume", {}).get("rows", []):
        got = ("exact" if r.get("exact") else "within tolerance" if r.get("within_tolerance")
               else "FAILED")
        out.append(f"  resume {r['method']}: {got}")
    for r in st.get("bench", {}).get("rows", []):
        out.append(f"  bench {r['method']} {r['arch']}: {r['ratio']:.2f}x the reference path")
    g = st.get("grid", {})
    if g.get("grid"):
        out.append(f"  grid {g['grid']}: recorded {len(g['recorded'])}, "
                   f"unfinished {len(g['unfinished'])}")
    files = s.get("files", {}).items()
    out.append("  files: " + ", ".join(f"{k} ({v / 2 ** 20:.1f} MiB)" for k, v in files))
    out.append(f"  elapsed {s.get('elapsed_s')} s of {s['budget_s']:g} s")
    return "\n".join(out)


# =================================================================================================
# 6. Command line
# =================================================================================================
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["script"]:  # (internal) everything after it belongs to the method script
        return exec_script(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True, metavar="{run,ingest}")
    r = sub.add_parser("run", help="run the check into --out")
    r.add_argument("--out", default=os.path.join("runs", "gpu-check"),
                   help="output folder (at most 8 files)")
    r.add_argument("--budget", type=float, default=460, help="seconds for all, packing included")
    r.add_argument("--npz", default="", help="CIFAR-10 JPEG archive for the grid (else: no grid)")
    r.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    r.add_argument("--dry-run", action="store_true",
                   help="tiny sizes, no compiling, one run of the tiny grid: the plumbing check")
    r.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    r.add_argument("--methods", default="", help="comma-separated subset of the methods")
    r.add_argument("--grid-jobs", type=int, default=0, help="runs at once in the grid (default 6)")
    r.add_argument("--grid-methods", default="",
                   help="start exactly these runs of the grid (default: those projected to finish "
                        "in the time left, from the measured ms/step)")
    r.add_argument("--work", default=os.path.join("runs", "gpu-check-work"),
                   help="scratch folder (emptied first)")
    r.add_argument("--results", default=os.path.join(ROOT, "results"),
                   help="the results/ the grid records into")
    r.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="where grid run folders go")
    i = sub.add_parser("ingest", help="a copied-back output folder -> results/, runs/, the tables")
    i.add_argument("folder")
    i.add_argument("--results", default=os.path.join(ROOT, "results"))
    i.add_argument("--runs", default=os.path.join(ROOT, "runs"))
    i.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                   help="README whose results section is rendered")
    i.add_argument("--results-md", default=os.path.join(ROOT, "RESULTS.md"))
    i.add_argument("--no-report", dest="report", action="store_false",
                   help="do not run `reproduce.py report`")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("kind", choices=["env", "steps"])
    w.add_argument("cfg")
    w.add_argument("out")
    opts = p.parse_args(argv)
    opts.argv = argv
    if opts.action == "worker":
        return (worker_env if opts.kind == "env" else worker_steps)(read_json(opts.cfg), opts.out)
    if opts.action == "ingest":
        return ingest(opts)
    return run_check(opts)


def run_check(opts):
    unknown = [s for s in opts.stages.split(",") if s and s not in STAGES]
    if unknown:
        fail(f"--stages {','.join(unknown)}: not a stage; choices: {', '.join(STAGES)}")
    bad = [m for m in f"{opts.methods},{opts.grid_methods}".split(",") if m and m not in METHODS]
    if bad:
        fail(f"--methods / --grid-methods {','.join(bad)}: not a method; choices: "
             f"{', '.join(METHODS)}")
    if opts.npz and not os.path.isfile(opts.npz):
        fail(f"--npz {opts.npz!r}: no such file")
    if not opts.budget > 2 * RESERVE_S:
        fail(f"--budget must exceed {2 * RESERVE_S} seconds, got {opts.budget:g}")
    out, marker = os.path.abspath(opts.out), os.path.join(opts.work, ".gpu-check-work")
    ours = set(OUT_FILES) | {f"checkpoints-{k}.tar.gz" for k in range(1, MAX_PARTS + 1)}
    found = os.listdir(out) if os.path.isdir(out) else []
    other = sorted(n for n in found if n not in ours and not n.endswith(".tmp"))
    if other:
        fail(f"--out {opts.out!r} holds files this check did not write ({', '.join(other[:3])}); "
             f"choose an empty or new folder")
    if os.path.isdir(opts.work) and os.listdir(opts.work) and not os.path.isfile(marker):
        fail(f"--work {opts.work!r} is not empty and not a scratch folder of this check")
    if opts.device == "auto":  # the parent never initialises CUDA: a short-lived process answers
        probe = [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"]
        has = subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "True"
        opts.device = "cuda" if has else "cpu"
    if opts.device == "cpu" and not opts.dry_run:
        fail("no CUDA device (or --device cpu): the full check is sized for a GPU; --dry-run gives "
             "the CPU plumbing check")
    for n in found:
        os.remove(os.path.join(out, n))  # only this check's own files (checked above)
    os.makedirs(out, exist_ok=True)
    shutil.rmtree(opts.work, ignore_errors=True)
    os.makedirs(opts.work)
    write_text(marker, "")
    check = Check(opts)
    check.main()
    return check.summary


if __name__ == "__main__":
    main()
