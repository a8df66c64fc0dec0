"""Reproduce a results grid and render it: methods x backbones x data x seeds under one schedule.

Each run is exactly a user's command (`python <method>.py ...`, started as a subprocess) with a fixed output
folder `runs/<grid>/<method>-<arch>-<data>-seed<seed>/`. When a run finishes, one small JSON is written to
`results/<grid>/<same name>.json` (commit it): the command, device, date, code version (git commit and a
dirty flag), wall time and the run's final.json numbers. Running the same grid again skips recorded runs,
continues an unfinished run from its checkpoint (`--resume`) and starts the rest, so a long grid can be
filled over several sessions: stop it at any time (Ctrl-C) and run the same command again.

    python tools/reproduce.py run tiny                                   # CPU, synthetic data, ~1 min/run
    python tools/reproduce.py run short --data-dir data/cifar10-jpeg     # GPU, 6 scripts x 30 epochs
    python tools/reproduce.py run table1                                 # GPU, 6 scripts x 300 epochs x 3 seeds
    python tools/reproduce.py list short                                 # the commands, and what is done
    python tools/reproduce.py report      # results/ -> RESULTS.md and README.md (between the results markers)

Grids (`GRIDS` below): tiny = every method script present, resnet8, synthetic `fake` data, 3 epochs, 512
images, batch 32, 3 seeds (a check of the pipeline, never compared with a paper); short = the six scripts, resnet32, real
CIFAR-10 images as JPEG (`--dataset folder`), 30 epochs, 1 seed; table1 = the six scripts, resnet32,
CIFAR-10 (torchvision), the full 300-epoch recipe, 3 seeds; table1-jpeg = table1 on the JPEG folder (for
machines without internet). The report puts PCL Table 1's CIFAR-10 ResNet-32 figures beside ours.
"""
import argparse
import datetime
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_METHODS = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]  # table order
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# What each kind of data is, how a run reads it, and whether a paper figure may stand beside it.
DATA = {
    "fake": dict(flags=["--dataset", "fake"], synthetic=True, paper=None, folder=False,
                 label="SYNTHETIC data (`--dataset fake`, 10 classes, chance 10 %): a check that the pipeline "
                       "runs and learns; not comparable to any published figure"),
    "cifar10-jpeg": dict(flags=["--dataset", "folder"], synthetic=False, paper="cifar10", folder=True,
                         label="real CIFAR-10 images re-encoded as JPEG (quality 75), read with `--dataset "
                               "folder`: absolute accuracy runs a little below published CIFAR-10 figures; "
                               "compare gains and the ordering of methods"),
    "cifar10": dict(flags=["--dataset", "cifar10"], synthetic=False, paper="cifar10", folder=False,
                    label="CIFAR-10 (torchvision download)"),
}

# A grid: which scripts, backbones, data, seeds and schedule; `flags` are passed to every run unchanged.
GRIDS = {
    "tiny": dict(methods=None, archs=["resnet8"], data="fake", seeds=[0, 1, 2], epochs=3,
                 flags=["--subset", "512", "--test-subset", "200", "--batch-size", "32", "--device", "cpu"]),
    "short": dict(methods=ALL_METHODS, archs=["resnet32"], data="cifar10-jpeg", seeds=[0], epochs=30, flags=[]),
    "table1": dict(methods=ALL_METHODS, archs=["resnet32"], data="cifar10", seeds=[0, 1, 2], epochs=300, flags=[]),
    "table1-jpeg": dict(methods=ALL_METHODS, archs=["resnet32"], data="cifar10-jpeg", seeds=[0, 1, 2], epochs=300,
                        flags=[]),
    # Lab 2 (docs/lab2.md): real CIFAR-10 images on a laptop CPU (an estimated hour for 18 runs on 2
    # idle cores, two runs at a time). 512 training images per class (80 full batches of 64 per epoch), 2,000 test images,
    # 15 epochs = 1,200 steps: the 300-epoch recipe shrunk 20x, and every length counted in epochs or steps
    # with it: LR steps at the same fractions, ramp-up 80 -> 4 epochs, FFSD's warm-up 5 -> 1 epoch, and PCL's
    # temporal-mean horizon 1 / (1 - beta) = 1,000 steps (0.85 % of 117,300 steps) -> 10 steps (beta 0.9).
    "lab": dict(methods=ALL_METHODS, archs=["resnet8"], data="cifar10-jpeg", seeds=[0, 1, 2], epochs=15,
                flags=["--subset", "5120", "--test-subset", "2000", "--batch-size", "64", "--device", "cpu"],
                method_flags={"one": ["--rampup-epochs", "4"], "okddip": ["--rampup-epochs", "4"],
                              "pcl": ["--rampup-epochs", "4", "--ema-decay", "0.9"],
                              "ffsd": ["--warmup-epochs", "1"]},
                data_choices=["cifar10-jpeg", "cifar10"], paper=False, show_time=True,
                note="A laptop-sized lab, not a reproduction: 5,120 training images, 15 epochs, resnet8. It "
                     "shows what each method does to a small network early in training on real images; it "
                     "cannot show the papers' gains (those need the full data and 300 epochs), and a gain "
                     "within one std of the baseline is no gain. Every schedule length is scaled with the "
                     "schedule (ramp-up 4 epochs, FFSD warm-up 1 epoch, PCL's temporal-mean horizon 10 steps, "
                     "beta 0.9: the lab's one deviation from the recipe's beta 0.999, whose 1,000-step horizon "
                     "would span most of these 1,200 steps). min/run: wall minutes (data loading included) of the "
                     "fastest of the seeds' runs, each on one core of a 2-core CPU (`--jobs 2`) that other work "
                     "shared: the least disturbed run, still an upper bound"),
    # The course lab where distillation has something to do (docs/reproduce.md, "A lab where distillation
    # shows"): resnet20 (272 k parameters) on 2,560 images without augmentation memorises its training set
    # (training CE 0.02 by epoch 22), so the peers' soft targets act as the regulariser the papers describe.
    # 30 epochs = 1,200 steps, as in `lab`: the same scaled lengths (ramp-up 80 -> 8 epochs at 10x fewer
    # epochs, FFSD's warm-up 5 -> 1 epoch, PCL's temporal-mean horizon 10 steps: beta 0.9).
    "lab-fit": dict(methods=ALL_METHODS, archs=["resnet20"], data="cifar10-jpeg", seeds=[0, 1, 2], epochs=30,
                    flags=["--subset", "2560", "--test-subset", "2000", "--batch-size", "64", "--device", "cpu"],
                    switches=["--no-augment"],
                    method_flags={"one": ["--rampup-epochs", "8"], "okddip": ["--rampup-epochs", "8"],
                                  "pcl": ["--rampup-epochs", "8", "--ema-decay", "0.9"],
                                  "ffsd": ["--warmup-epochs", "1"]},
                    data_choices=["cifar10-jpeg", "cifar10"], paper=False, show_time=True,
                    note="A CPU-sized lab, not a reproduction: 2,560 training images (256 per class), no "
                         "augmentation (the lab's deviation from the recipe, chosen so that the baseline memorises "
                         "its training set), 30 epochs, resnet20. Schedule lengths scaled as in `lab` (ramp-up 8 "
                         "epochs, FFSD warm-up 1 epoch, PCL beta 0.9). min/run: wall minutes of the fastest seed's "
                         "run, each on one core of a 2-core CPU (`--jobs 2`) that other work shared: an upper bound"),
}

# Models reported beside the deployed one (last epoch): the student a teacher came from, the ensembles.
BESIDE = {"dml": ["peer2", "ensemble"], "one": ["branch_avg", "one_e"], "okddip": ["peer_avg", "ensemble"],
          "pcl": ["peer1", "pcl_e"], "ffsd": ["student1", "fusion"]}

# Published CIFAR-10 ResNet-32 top-1 accuracy (%) = 100 - error of PCL (Wu & Gong, AAAI 2021) Table 1,
# mean +- std as published. PCL reports the other methods as re-run by its authors (model not stated).
PAPER_SOURCE = "PCL Table 1 (error % converted to accuracy)"
PAPER = {("cifar10", "resnet32"): {"baseline": (93.26, 0.15), "dml": (93.94, 0.07), "one": (94.20, 0.12),
                                   "okddip": (94.17, 0.15), "pcl": (94.33, 0.12)}}
NO_PAPER = {"ffsd": "none: FFSD publishes CIFAR-100 only"}

MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def fail(msg):
    raise SystemExit(f"error: {msg}")


# =====================================================================================================
# 1. The runs of a grid
# =====================================================================================================
def _rel(path):
    """A path as the method script (cwd = repository root) should see it: relative when inside the root."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, ROOT]) == ROOT
    return os.path.relpath(path, ROOT) if inside else path


def plan(grid, opts):
    """The grid's runs: [{name, method, arch, data, seed, epochs, argv, out, result}] (argv without --resume)."""
    if grid not in GRIDS:
        fail(f"unknown grid {grid!r}; choices: {', '.join(GRIDS)}")
    g = GRIDS[grid]
    present = [m for m in ALL_METHODS if os.path.isfile(os.path.join(ROOT, f"{m}.py"))]
    methods = opts.methods.split(",") if opts.methods else (g["methods"] or present)
    missing = [m for m in methods if m not in present]
    if missing:
        fail(f"grid {grid!r} needs {', '.join(m + '.py' for m in missing)}, not in this checkout; "
             f"run a part with --methods {','.join(m for m in methods if m in present) or 'baseline'}")
    seeds = [int(s) for s in opts.seeds.split(",")] if opts.seeds else g["seeds"]
    data_name = g["data"]
    if getattr(opts, "data", ""):
        if opts.data not in g.get("data_choices", [g["data"]]):
            fail(f"grid {grid!r} reads --data {' or '.join(g.get('data_choices', [g['data']]))}, not {opts.data!r}")
        data_name = opts.data
    data = DATA[data_name]
    # flag -> value, in command order; an override replaces the grid's value rather than repeating the flag
    flags = dict(zip(data["flags"][0::2], data["flags"][1::2]))
    if data["folder"] or data_name == "cifar10":
        flags["--data-dir"] = _rel(opts.data_dir or os.path.join(ROOT, "data", "cifar10-jpeg" if data["folder"] else ""))
    flags["--epochs"] = str(opts.epochs or g["epochs"])
    flags.update(zip(g["flags"][0::2], g["flags"][1::2]))
    if opts.subset:
        flags["--subset"] = str(opts.subset)
    if opts.device and "--device" not in g["flags"]:
        flags["--device"] = opts.device
    flags = [x for kv in flags.items() for x in kv]
    epochs = int(flags[flags.index("--epochs") + 1])
    runs = []
    for seed in seeds:  # seed-major: a grid stopped early has every method at the first seeds
        for arch in g["archs"]:
            for method in methods:
                name = f"{method}-{arch}-{data_name}-seed{seed}"
                out = os.path.join(opts.runs, grid, name)
                argv = [f"{method}.py", "--arch", arch, *flags, *g.get("method_flags", {}).get(method, []),
                        "--seed", str(seed), "--out", _rel(out), *g.get("switches", [])]
                runs.append(dict(name=name, grid=grid, method=method, arch=arch, data=data_name, seed=seed,
                                 epochs=epochs, argv=argv, out=out,
                                 result=os.path.join(opts.results, grid, name + ".json")))
    return runs


def state(r):
    """'done' (result JSON recorded), 'finished' (final.json, not yet recorded), 'resume' (checkpoint, no
    final.json: interrupted) or 'new'."""
    if os.path.isfile(r["result"]):
        return "done"
    if os.path.isfile(os.path.join(r["out"], "final.json")):
        return "finished"
    if os.path.isfile(os.path.join(r["out"], "checkpoint.pt")):
        return "resume"
    return "new"


def check_same_config(r):
    """An existing run folder must have been started with this run's flags; else stop (never mix settings)."""
    path = os.path.join(r["out"], "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        config = json.load(f)
    switches = GRIDS[r["grid"]].get("switches", [])  # valueless flags, last in argv: --no-augment
    argv = r["argv"][1:len(r["argv"]) - len(switches)]
    pairs = list(zip(argv[0::2], argv[1::2])) + [("--" + s[5:], "False") if s.startswith("--no-") else (s, "True")
                                                 for s in switches]
    for flag, value in pairs:
        key = flag[2:].replace("-", "_")
        # (--out and --data-dir may be spelled differently or moved; every other flag must match)
        if key in config and key not in ("out", "data_dir") and str(config[key]) != value:
            fail(f"{r['out']!r} was started with {flag} {config[key]}, this grid asks {value}; "
                 f"remove that folder or choose another --runs")


def code_version():
    """Git commit of the code and whether the code a run executes (common.py and the method scripts)
    differs from it; edits elsewhere (docs, tools, results/) do not mark a run dirty. None where this is
    not a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "common.py",
                                 *(f"{m}.py" for m in ALL_METHODS)],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def launch(argv, log_path, quiet, threads=0, deadline=None):
    """Run `python <argv>` in the repository root; its output goes to log_path (appended) and, unless
    quiet, to the console. `threads` > 0 pins the child's torch to that many threads; at `deadline` (a
    time.time() value) the child gets Ctrl-C (SIGINT): it keeps its last epoch's checkpoint and exits 130.
    Returns the exit status."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log_path, "a") as log:
        p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, bufsize=1, env=env)
        if deadline is not None:
            timer = threading.Timer(max(0.0, deadline - time.time()), p.send_signal, (signal.SIGINT,))
            timer.daemon = True
            timer.start()
        try:
            for line in p.stdout:
                log.write(line)
                log.flush()  # the log follows the run (tail -f), not only its end
                if not quiet:
                    print("    " + line, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C reached the child too: let it stop, then stop the grid
            p.wait()
            raise
        finally:
            if deadline is not None:
                timer.cancel()
        return p.wait()


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def record(r):
    """Write results/<grid>/<run>.json from the run folder's final.json and invocation log, and keep the
    run's per-epoch log (every loss term, lr, accuracies, time) beside it as <run>.metrics.jsonl."""
    with open(os.path.join(r["out"], "final.json")) as f:
        final = json.load(f)
    with open(os.path.join(r["out"], "metrics.jsonl")) as f:
        curve = f.read()
    os.makedirs(os.path.dirname(r["result"]), exist_ok=True)
    tmp = r["result"][:-len(".json")] + ".metrics.jsonl.tmp"
    with open(tmp, "w") as f:
        f.write(curve)
    os.replace(tmp, tmp[:-len(".tmp")])
    sessions = _read_sessions(r)
    _write_json(r["result"], {
        "grid": r["grid"], "name": r["name"], "method": r["method"], "arch": r["arch"], "data": r["data"],
        "synthetic": DATA[r["data"]]["synthetic"], "seed": r["seed"], "epochs": final["epochs"],
        "command": "python " + shlex.join(r["argv"]),
        "device": final["device"], "date": final["date"], "torch": final.get("torch"),
        "code": sessions[-1]["code"] if sessions else code_version(),
        "wall_time_s": round(sum(s["wall_s"] or 0 for s in sessions), 1),
        "train_time_s": round(final["train_time_s"], 1), "images_per_s": round(final["images_per_s"], 1),
        "sessions": sessions,  # one entry per invocation: resumed or not, code version, wall time
        "deployed": final["deployed"], "test_acc": final["test_acc"], "best_test_acc": final["best_test_acc"],
        "best_epoch": final["best_epoch"], "models": final["models"]})


def _read_sessions(r):
    path = os.path.join(r["out"], "reproduce-sessions.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def run_grid(grid, opts):
    runs = plan(grid, opts)
    todo = [r for r in runs if state(r) != "done"]
    print(f"grid {grid}: {len(runs)} runs, {len(runs) - len(todo)} already recorded in {_rel(opts.results)}/{grid}/",
          flush=True)
    if DATA[runs[0]["data"]]["folder"] and todo:
        check_data_folder(os.path.join(ROOT, runs[0]["argv"][runs[0]["argv"].index("--data-dir") + 1]))
    jobs = max(1, opts.jobs)
    # several runs at once share the cores: each child gets its share of torch threads (CPU), or of the GPU
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    deadline = time.time() + opts.time_budget if opts.time_budget else None

    def one(i, r):
        """Start or continue run r, record it; returns 'recorded', 'stopped' (Ctrl-C or time budget) or fails."""
        st = state(r)
        if st != "finished":
            if deadline is not None and time.time() >= deadline:
                return "skipped"
            check_same_config(r)
            argv = r["argv"] + (["--resume"] if st == "resume" else [])
            print(f"[{i + 1}/{len(todo)}] {'continue' if st == 'resume' else 'start'}: python {shlex.join(argv)}",
                  flush=True)
            os.makedirs(r["out"], exist_ok=True)
            sessions = _read_sessions(r)
            sessions.append({"resumed": st == "resume", "code": code_version(),
                             "started": datetime.datetime.now().isoformat(timespec="seconds"), "wall_s": None})
            t0 = time.time()
            try:
                rc = launch(argv, os.path.join(r["out"], "stdout.log"), opts.quiet or jobs > 1, threads, deadline)
            except KeyboardInterrupt:
                rc = 130
            sessions[-1]["wall_s"] = round(time.time() - t0, 1)
            _write_json(os.path.join(r["out"], "reproduce-sessions.json"), sessions)
            if rc == 130 or (rc != 0 and deadline is not None and time.time() >= deadline):
                return "stopped"
            if rc != 0:
                fail(f"{r['name']} exited with status {rc}; its output is in {_rel(os.path.join(r['out'], 'stdout.log'))}")
        record(r)
        print(f"  recorded {_rel(r['result'])}", flush=True)
        return "recorded"

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            outcome = list(pool.map(one, range(len(todo)), todo))
    except KeyboardInterrupt:
        outcome = ["stopped"]
    if "stopped" in outcome or "skipped" in outcome:
        why = "time budget reached" if deadline is not None and time.time() >= deadline else "stopped"
        print(f"{why}: {outcome.count('recorded')} run(s) recorded this time; run the same command again to "
              f"continue the rest from their checkpoints", flush=True)
    return runs


def check_data_folder(data_dir):
    train = os.path.join(data_dir, "train")
    found = sorted(os.listdir(train)) if os.path.isdir(train) else []
    if found != CIFAR10_CLASSES:
        fail(f"--data-dir {data_dir!r} is not the CIFAR-10 image folder (expected train/ and test/ with the "
             f"10 class folders {', '.join(CIFAR10_CLASSES)}); unpack the JPEG archive first (see README)")


# =====================================================================================================
# 2. The report: results/ -> markdown tables
# =====================================================================================================
def load_results(results_dir):
    """Every run record under results/<grid>/ (JSON elsewhere under results/ is not a run)."""
    out = []
    for grid in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        d = os.path.join(results_dir, grid)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if name.endswith(".json"):
                with open(os.path.join(d, name)) as f:
                    record = json.load(f)
                if isinstance(record, dict) and "grid" in record and "test_acc" in record:
                    out.append(record)
    return out


def mean_std(values):
    """Mean and SAMPLE standard deviation (n - 1; None for one value)."""
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else None)


def fmt(m, s):
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def summarize(results):
    """One row per (grid, data, arch, epochs, method), with mean/std over seeds, the gain over the same
    group's baseline, and the paper figure (never for synthetic data)."""
    groups = {}
    for r in results:
        groups.setdefault((r["grid"], r["data"], r["arch"], r["epochs"], r["method"]), []).append(r)
    rows = {}
    for (grid, data, arch, epochs, method), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        last, best = mean_std([r["test_acc"] for r in rs]), mean_std([r["best_test_acc"] for r in rs])
        synthetic = any(r.get("synthetic", True) for r in rs) or DATA.get(data, {}).get("synthetic", True)
        paper_key = None if synthetic or not GRIDS.get(grid, {}).get("paper", True) else (DATA[data]["paper"], arch)
        paper = PAPER.get(paper_key, {}) if paper_key else {}
        rows[(grid, data, arch, epochs, method)] = dict(
            grid=grid, data=data, arch=arch, epochs=epochs, method=method, synthetic=synthetic,
            seeds=[r["seed"] for r in rs], deployed=sorted({r["deployed"] for r in rs}),
            last=last, best=best, best_epochs=[r["best_epoch"] for r in rs],
            devices=sorted({r["device"] for r in rs}), dates=sorted({r["date"] for r in rs}),
            commits=sorted({(r["code"]["commit"] or "unknown")[:9] + ("+dirty" if r["code"]["dirty"] else "")
                            for r in rs}),
            command=rs[0]["command"],
            minutes=(min(r["wall_time_s"] for r in rs) / 60, 0.0),  # the least disturbed run (see the note)
            beside={m: mean_std([r["models"][m] for r in rs]) for m in BESIDE.get(method, [])
                    if all(m in r["models"] for r in rs)},
            paper=paper.get(method) if paper_key else None, paper_gain=None, gain=None,
            paper_note=None if synthetic else (NO_PAPER.get(method) or ("" if paper.get(method) else "none")))
    for key, row in rows.items():
        base = rows.get(key[:4] + ("baseline",))
        if base is not None and row["method"] != "baseline":
            row["gain"] = row["last"][0] - base["last"][0]
        if row["paper"] and row["method"] != "baseline" and base is not None and base["paper"]:
            row["paper_gain"] = row["paper"][0] - base["paper"][0]
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    grids = ["table1", "table1-jpeg", "short", "lab-fit", "lab", "tiny"]  # real data first, synthetic last
    return sorted(rows.values(), key=lambda r: (grids.index(r["grid"]) if r["grid"] in grids else 99,
                                                r["grid"], r["data"], r["arch"], r["epochs"],
                                                order.get(r["method"], 99), r["method"]))


# A few words per kind of data for the front page's compact tables (RESULTS.md has the full labels).
SHORT_DATA = {"fake": "SYNTHETIC data (checks the pipeline, not the methods)",
              "cifar10-jpeg": "real CIFAR-10 images (JPEG)", "cifar10": "CIFAR-10"}


def render(rows):
    """Markdown: one table per (grid, data, arch, epochs); synthetic tables carry no paper columns."""
    if not rows:
        return "No results recorded yet: `make reproduce GRID=short` (GPU), then `make report`.\n"
    parts, tables = [], {}
    for row in rows:
        tables.setdefault((row["grid"], row["data"], row["arch"], row["epochs"]), []).append(row)
    for (grid, data, arch, epochs), rs in tables.items():
        synthetic = any(r["synthetic"] for r in rs)
        seeds = sorted({len(r["seeds"]) for r in rs})
        parts.append(f"#### Grid `{grid}`: {arch}, {data}, {epochs} epochs, {'/'.join(map(str, seeds))} seed(s)\n")
        parts.append(f"Data: {DATA.get(data, {}).get('label', data)}.")
        if GRIDS.get(grid, {}).get("note"):
            parts.append(f" {GRIDS[grid]['note']}.")
        if not synthetic and epochs < 300:
            parts.append(f" Schedule: {epochs} epochs instead of the paper recipe's 300 (LR steps at the same "
                         f"fractions), so absolute accuracy is below the paper's; compare gains and ordering.")
        if not synthetic and any(" --subset " in r["command"] for r in rs):
            parts.append(" Trained on a SUBSET of the training images (see the commands): not the paper's setting.")
        parts.append(" Top-1 % of the deployed model at the last epoch (headline) and at its best test epoch, "
                     "mean ± sample std over seeds; gain = our mean minus our baseline's mean.\n\n")
        head = ["method", "backbone", "seeds", "deployed model", "last epoch", "best epoch", "gain vs baseline",
                "beside it (last epoch)"]
        paper_cols = not synthetic and GRIDS.get(grid, {}).get("paper", True)
        show_time = GRIDS.get(grid, {}).get("show_time", False)
        if show_time:
            head += ["min/run"]
        if paper_cols:
            head += ["paper", "paper gain", "paper source"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            cells = [r["method"], r["arch"], str(len(r["seeds"])), ", ".join(r["deployed"]), fmt(*r["last"]),
                     fmt(*r["best"]), "—" if r["gain"] is None else f"{r['gain']:+.2f}",
                     ", ".join(f"{m} {fmt(*v)}" for m, v in r["beside"].items()) or "—"]
            if show_time:
                cells.append(f"{r['minutes'][0]:.1f}")
            if paper_cols:
                if r["paper"]:
                    cells += [fmt(*r["paper"]), "—" if r["paper_gain"] is None else f"{r['paper_gain']:+.2f}",
                              PAPER_SOURCE]
                else:
                    cells += ["—", "—", r["paper_note"] or "none"]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n\n")
        devices = sorted({d for r in rs for d in r["devices"]})
        dates = sorted({d for r in rs for d in r["dates"]})
        commits = sorted({c for r in rs for c in r["commits"]})
        parts.append(f"Device: {', '.join(devices)}. Date: {dates[0]}{' to ' + dates[-1] if len(dates) > 1 else ''}. "
                     f"Code: {', '.join(commits)}. Per-run JSON (command, wall time, every model's accuracy): "
                     f"`results/{grid}/`. Commands (first seed):\n\n")
        parts.append("\n".join(f"    {r['command']}" for r in rs) + "\n\n")
    return "".join(parts)


def render_compact(rows):
    """The front page's version: per table one caption line, then method, deployed model, last and
    best epoch, gain (and on real data the paper's figure and gain). Commands, devices and code
    versions stay in RESULTS.md."""
    if not rows:
        return render(rows)
    parts, tables = [], {}
    for row in rows:
        tables.setdefault((row["grid"], row["data"], row["arch"], row["epochs"]), []).append(row)
    for (grid, data, arch, epochs), rs in tables.items():
        synthetic = any(r["synthetic"] for r in rs)
        seeds = "/".join(map(str, sorted({len(r["seeds"]) for r in rs})))
        found = (re.search(r" --subset (\d+)", r["command"]) for r in rs)
        subset = {m.group(1) for m in found if m}
        devices = ", ".join(sorted({d for r in rs for d in r["devices"]}))
        date = max(d for r in rs for d in r["dates"])
        caption = f"**`{grid}`**: {arch}, {SHORT_DATA.get(data, data)}"
        if len(subset) == 1:
            caption += f", {int(subset.pop()):,}-image training subset"
        caption += f", {epochs} epochs, {seeds} seed(s); {devices}, {date}."
        if GRIDS.get(grid, {}).get("note"):
            caption += f" {GRIDS[grid]['note']}."
        paper_cols = not synthetic and GRIDS.get(grid, {}).get("paper", True)
        beside = GRIDS.get(grid, {}).get("show_time", False)  # the lab: what sits beside the deployed model
        head = ["method", "deployed", "last epoch", "best epoch", "gain"]
        head += ["beside it (last epoch)", "min/run"] if beside else []
        head += ["paper", "paper gain"] if paper_cols else []
        lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            cells = [r["method"], ", ".join(r["deployed"]), fmt(*r["last"]), fmt(*r["best"]),
                     "—" if r["gain"] is None else f"{r['gain']:+.2f}"]
            if beside:
                cells += [", ".join(f"{m} {fmt(*v)}" for m, v in r["beside"].items()) or "—",
                          f"{r['minutes'][0]:.1f}"]
            if paper_cols:
                cells += ["—" if not r["paper"] else fmt(*r["paper"]),
                          "—" if r["paper_gain"] is None else f"{r['paper_gain']:+.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n\n")
    shown = any(not r["synthetic"] and GRIDS.get(r["grid"], {}).get("paper", True) for r in rows)
    paper = f"; paper: {PAPER_SOURCE}" if shown else ""
    parts.append("Top-1 % of the deployed model at the last and at its best epoch, mean ± sample "
                 f"std over seeds; gain = our mean minus our baseline's{paper}. Every table with "
                 "its commands, devices and code versions: [RESULTS.md](RESULTS.md).\n")
    return "".join(parts)


def write_report(opts):
    """RESULTS.md gets the full tables; README.md, between its results markers, the compact ones."""
    rows = summarize(load_results(opts.results))
    text = render(rows)
    header = ("<!-- generated by `python tools/reproduce.py report` from results/; edit the script, not this -->\n")
    if opts.results_md:
        with open(opts.results_md, "w") as f:
            f.write("# Results\n\n" + header + "\n" + text)
        print(f"wrote {_rel(opts.results_md)}")
    if opts.readme and not os.path.isfile(opts.readme):
        print(f"no {_rel(opts.readme)}; only the standalone table was written")
    elif opts.readme:
        with open(opts.readme) as f:
            readme = f.read()
        pattern = re.compile(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), re.S)
        if not pattern.search(readme):
            print(f"{_rel(opts.readme)} has no {MARK_START} ... {MARK_END} markers; left unchanged")
        else:
            block = MARK_START + "\n" + header + "\n" + render_compact(rows) + MARK_END
            new = pattern.sub(lambda _: block, readme, count=1)
            with open(opts.readme, "w") as f:
                f.write(new)
            print(f"updated the results section of {_rel(opts.readme)}")
    return text


# =====================================================================================================
# 3. Command line
# =====================================================================================================
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("action", choices=["run", "list", "report"], help="run a grid, list its runs, or render results/")
    p.add_argument("grid", nargs="?", help=f"grid name for run/list: {', '.join(GRIDS)}")
    p.add_argument("--data-dir", default=os.environ.get("OKD_DATA_DIR", ""),
                   help="CIFAR-10 image folder for the JPEG grids (default data/cifar10-jpeg), or torchvision's "
                        "download folder for table1 (default data); env OKD_DATA_DIR")
    p.add_argument("--results", default=os.path.join(ROOT, "results"), help="where the per-run JSONs go")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="where run folders (checkpoints) go")
    p.add_argument("--device", default="", help="pass --device to every run (auto, cpu, cuda, mps); tiny and lab are always cpu")
    p.add_argument("--methods", default="", help="comma-separated subset of the grid's method scripts")
    p.add_argument("--seeds", default="", help="comma-separated seeds instead of the grid's")
    p.add_argument("--epochs", type=int, default=0, help="override the grid's epochs (0 = the grid's)")
    p.add_argument("--subset", type=int, default=0, help="override the training subset (0 = the grid's)")
    p.add_argument("--quiet", action="store_true", help="send the runs' progress rows only to their stdout.log")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs torch threads; quiet)")
    p.add_argument("--time-budget", type=float, default=0, help="seconds: then stop every run at its last "
                   "checkpoint (Ctrl-C) and start no new one; run again to continue (0 = no limit)")
    p.add_argument("--data", default="", help="data of a grid that offers a choice (lab: cifar10-jpeg or cifar10)")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"), help="README to update (report)")
    p.add_argument("--results-md", default=os.path.join(ROOT, "RESULTS.md"), help="standalone table (report)")
    opts = p.parse_args(argv)
    if opts.action == "report":
        return write_report(opts)
    if not opts.grid:
        fail(f"{opts.action} needs a grid: {', '.join(GRIDS)}")
    if opts.action == "list":
        for r in plan(opts.grid, opts):
            print(f"{state(r):>8}  python {shlex.join(r['argv'])}")
        return None
    return run_grid(opts.grid, opts)


if __name__ == "__main__":
    main()
