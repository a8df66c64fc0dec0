"""make gpu-check: every GPU measurement of this repository from one command, into one folder.

Needs Python 3.10 or newer. Runs the user-facing tools as child processes, each with a time limit,
its output shown and kept in OUT/<stage>.log, and writes everything into OUT (created if missing; other
files there are left alone, this check's own are replaced):

  probe      a child process asks torch for the GPU, its driver and Triton (time limit 120 s); its error
             output is printed when it fails, hangs or finds no GPU (an old driver reads as no GPU)
  preflight  can --compile work here? a C compiler, Python's headers (Python.h) and, on CUDA, Triton:
             said before any time is spent; if not, bench runs without --compile
  unpack     with --npz: tools/unpack_cifar10_jpeg.py into --data-dir (skipped if already there)
  bench      tools/bench.py --out OUT/bench.json (make bench: every method's step, fp32, bf16, the
             reference pipeline, --compile for baseline and pcl, kernels and syncs per step)
  stream     with --data-dir: baseline.py --loader stream on that folder, 2 short epochs into
             OUT/stream/: the streamed loader's images/s
  grid       with --data-dir: tools/reproduce.py run short --time-budget --grid-budget into
             OUT/results/ and OUT/runs/; run the check again to continue unfinished runs
  beyond     tests/gpu_check.py: nvJPEG decoding against the CPU's, a streamed folder of 224-px
             JPEGs with ResNet-18, and with 2 GPUs torchrun and --sync-bn (docs/distributed.md)
  summary    OUT/summary.json and OUT/summary.md: each stage's status, time, command and figures

    python tools/gpu_check.py --out runs/gpu-check --npz local/cifar10_jpeg.npz     # on a GPU machine
    python tools/gpu_check.py --dry-run --out runs/gc    # the whole check on a CPU at tiny sizes
    tar czf gpu-check.tgz -C runs gpu-check              # to move the folder as one file
"""
import argparse
import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_S, NVSMI_S = 120, 30  # seconds: the GPU probe, nvidia-smi
LIMIT_S = {"unpack": 600, "bench": 1500, "stream": 600, "beyond": 900}  # seconds; grid: its budget + 180
GRID_JOBS = 6
PROBE = r"""
import json, torch
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda": torch.cuda.is_available()}
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mib=p.total_memory // 2 ** 20,
                cudnn=torch.backends.cudnn.version())
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(info))
"""


def fail(msg):
    raise SystemExit(f"gpu_check.py: error: {msg}")


def now():
    return datetime.datetime.now().isoformat(timespec="seconds")


def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


def read_jsonl(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ===== Probe and preflight =====
def probe(cmd=None, timeout=PROBE_S):
    """Run the GPU probe (or `cmd`) in a child process with a time limit. Returns its JSON answer, or
    {'error': ...}; the child's error output is printed whenever something is wrong."""
    cmd = cmd or [sys.executable, "-c", PROBE]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:  # its output so far comes as bytes
        out, err, rc = "", (e.stderr or b"").decode(errors="replace"), None
    err = err.strip()
    try:
        info = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        why = f"timed out after {timeout} s" if rc is None else f"exit status {rc}"
        info = {"error": f"the GPU probe failed ({why}): {err[-2000:] or 'no error output'}"}
    if err:
        info["stderr"] = err[-2000:]
    if "error" in info or not info.get("cuda"):
        print("probe: " + info.get("error", "torch sees no CUDA GPU") + (
            f"\nprobe's error output:\n{err[-2000:]}" if err and "error" not in info else ""), flush=True)
    return info


def nvidia_smi():
    cmd = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=NVSMI_S)
        return (p.stdout or p.stderr).strip() or None
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not available ({type(e).__name__})"


def preflight(info):
    """Whether --compile can work: torch.compile (inductor) builds C code with a compiler and Python's
    headers, and on CUDA generates Triton kernels."""
    cc = os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    missing = [] if cc else ["a C compiler (cc, gcc or clang; or set CC)"]
    if not os.path.isfile(headers):
        missing.append(f"Python's headers ({headers}; e.g. the python3-dev package)")
    if info.get("cuda") and "triton" not in info:
        missing.append(f"Triton ({info.get('triton_error', 'not importable')})")
    return {"compile_ok": not missing, "compiler": cc, "python_h": os.path.isfile(headers),
            "triton": info.get("triton"), "missing": missing}


# ===== Child processes =====
def child(argv, log_path, timeout):
    """`python argv` in the repository root, its output shown and written to log_path; after `timeout`
    seconds its whole process group gets SIGINT (runs keep their checkpoints), then SIGKILL. Returns
    (exit status or None when timed out, last lines)."""
    tail = []
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def pump():
            for line in p.stdout:
                log.write(line)
                log.flush()
                print("  " + line, end="", flush=True)
                tail[:] = (tail + [line.rstrip()])[-5:]
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGINT, 20), (signal.SIGKILL, 5)):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        reader.join(timeout=5)
    return rc, tail


class Check:
    def __init__(self, opts):
        self.opts, self.out = opts, os.path.abspath(opts.out)
        self.summary = {"check": "gpu-check", "mode": "dry-run" if opts.dry_run else "full",
                        "python": sys.version.split()[0], "started": now(), "out": opts.out,
                        "command": " ".join(["tools/gpu_check.py", *opts.argv]), "stages": {}}

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def save(self):
        write(self.path("summary.json"), json.dumps(self.summary, indent=1) + "\n")
        write(self.path("summary.md"), render(self.summary))

    def stage(self, name, argv, timeout):
        """Run one user-facing tool as a stage; records status, seconds, command and log."""
        print(f"== {name}: python {' '.join(argv)}", flush=True)
        t0 = time.time()
        rc, tail = child(argv, self.path(f"{name}.log"), timeout)
        status = "ok" if rc == 0 else "timeout" if rc is None else "failed"
        res = {"status": status, "seconds": round(time.time() - t0, 1), "command": "python " + " ".join(argv),
               "log": f"{name}.log"}
        if status != "ok":
            res["error"] = (f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}") + (
                ": " + " | ".join(tail[-3:]) if tail else "")
        self.summary["stages"][name] = res
        self.save()
        print(f"== {name}: {status} ({res['seconds']} s)", flush=True)
        return res

    def skip(self, name, why):
        self.summary["stages"][name] = {"status": "skipped", "note": why}

    def run(self):
        o, dry = self.opts, self.opts.dry_run
        info = probe()
        info["nvidia_smi"] = nvidia_smi()
        self.summary["probe"], self.summary["preflight"] = info, preflight(info)
        self.save()
        if not info.get("cuda") and not dry:
            fail(f"no CUDA GPU ({info.get('error', 'torch sees none')}); the probe's output is in "
                 f"{self.path('summary.json')}; --dry-run runs the check on a CPU")
        pre = self.summary["preflight"]
        print(f"preflight: --compile {'can' if pre['compile_ok'] else 'cannot'} work here"
              + (f"; missing: {'; '.join(pre['missing'])}" if pre["missing"] else ""), flush=True)
        data = o.data_dir
        if dry:
            data = self.dry_folder()
        elif o.npz:
            unpacked = self.stage("unpack", ["tools/unpack_cifar10_jpeg.py", o.npz, data], LIMIT_S["unpack"])
            data = data if unpacked["status"] == "ok" else ""
        self.bench(dry, pre["compile_ok"])
        self.stream(dry, data)
        self.grid(dry, data)
        if dry:
            self.skip("beyond", "dry run: tests/gpu_check.py needs a GPU")
        else:
            self.stage("beyond", ["tests/gpu_check.py"], LIMIT_S["beyond"])
        self.summary["finished"] = now()
        self.save()
        print(render(self.summary), end="")
        return self.summary

    def bench(self, dry, compile_ok):
        argv = ["tools/bench.py", "--out", self.path("bench.json")]
        if dry:
            argv += ["--device", "cpu", "--methods", "baseline", "--images", "32", "--batch-size", "8",
                     "--warmup", "1", "--steps", "2", "--loss-steps", "2", "--profile-steps", "1",
                     "--workers", "0"]
        if dry or not compile_ok:
            argv += ["--compile-methods", ""]
        if os.path.isfile(self.path("bench.json")):
            os.remove(self.path("bench.json"))  # last time's: never read as this time's
        res = self.stage("bench", argv, LIMIT_S["bench"])
        got = read_json(self.path("bench.json")) or {}
        res.update(env=got.get("env"), complete=got.get("complete", False), rows=got.get("rows", []))
        if not compile_ok or dry:
            res["note"] = "no --compile: " + ("dry run" if dry else "the preflight failed")
        self.save()

    def stream(self, dry, data):
        if not data:
            return self.skip("stream", "no image folder (no --data-dir or --npz, or unpacking failed)")
        run = self.path("stream", "run")
        shutil.rmtree(self.path("stream"), ignore_errors=True)  # this check's own run of last time
        size = ["--arch", "resnet8", "--epochs", "1", "--batch-size", "8", "--device", "cpu"] if dry else \
            ["--arch", "resnet32", "--epochs", "2", "--subset", "10000", "--test-subset", "2000"]
        argv = ["baseline.py", "--dataset", "folder", "--data-dir", data, "--loader", "stream",
                "--image-size", "32", *size, "--out", run]
        res = self.stage("stream", argv, LIMIT_S["stream"])
        epochs = read_jsonl(os.path.join(run, "metrics.jsonl"))
        res["images_per_s"] = round(epochs[-1]["images_per_s"], 1) if epochs else None
        self.save()

    def grid(self, dry, data):
        o = self.opts
        if not data or not o.grid_budget:
            return self.skip("grid", "--grid-budget 0" if data else "no image folder (no --data-dir or "
                                                                    "--npz, or unpacking failed)")
        grid = "tiny" if dry else "short"
        argv = ["tools/reproduce.py", "run", grid, "--time-budget", str(o.grid_budget), "--quiet",
                "--jobs", "1" if dry else str(GRID_JOBS), "--results", self.path("results"),
                "--runs", self.path("runs")]
        argv += ["--seeds", "0", "--epochs", "1", "--subset", "64", "--methods", "baseline"] if dry else \
            ["--data-dir", data]
        res = self.stage("grid", argv, o.grid_budget + 180)
        runs = sorted(glob.glob(self.path("runs", grid, "*")))
        records = glob.glob(self.path("results", grid, "*.json"))
        res["recorded"] = sorted(os.path.basename(p)[:-len(".json")] for p in records)
        res["unfinished"] = [os.path.basename(r) for r in runs if os.path.basename(r) not in res["recorded"]]
        self.save()

    def dry_folder(self):
        """A tiny CIFAR-like JPEG folder for the dry run's stream and its own grid: 10 classes."""
        from PIL import Image
        root = self.path("dry-data")
        for split, n in (("train", 4), ("test", 2)):
            for c in range(10):
                os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
                for i in range(n):
                    img = Image.effect_noise((32, 32), 40 + 20 * c).convert("RGB")
                    img.save(os.path.join(root, split, f"c{c}", f"{i}.jpg"), quality=90)
        return root


# ===== summary.md =====
def fmt(v, f="{:.2f}"):
    return "-" if v is None else f.format(v)


def render(s):
    p, pre = s.get("probe", {}), s.get("preflight", {})
    lines = [f"# GPU check ({s['mode']}), {s['started']}", "",
             f"GPU: {p.get('gpu') or 'none'} (nvidia-smi: {p.get('nvidia_smi')}); torch {p.get('torch')}, "
             f"CUDA {p.get('cuda_build')}, cuDNN {p.get('cudnn')}, Triton {p.get('triton')}; "
             f"Python {s['python']}.",
             "--compile preflight: " + ("ok." if pre.get("compile_ok") else
                                        "missing " + "; ".join(pre.get("missing", [])) + "."),
             "", "| stage | status | seconds | note |", "|---|---|---|---|"]
    for name, st in s["stages"].items():
        note = st.get("error") or st.get("note") or ""
        lines.append(f"| {name} | {st['status']} | {fmt(st.get('seconds'), '{:.0f}')} | {note[:200]} |")
    rows = s["stages"].get("bench", {}).get("rows", [])
    if rows:
        lines += ["", "| method | arch | fp32 ms | bf16 ms | ref ms | x ref | bf16~fp32 | peak MiB | compile "
                      "| kernels/step | syncs/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ms = r["ms_per_step"]
            lines.append(f"| {r['method']} | {r['arch']} | {fmt(ms.get('fp32'))} | {fmt(ms.get('bf16'))} | "
                         f"{fmt(ms.get('ref'))} | {fmt(r['x_ref'], '{:.2f}x')} | "
                         f"{fmt(r['bf16_fp32_loss_rel_diff'], '{:.2%}')} | {fmt(r['peak_mib'], '{:.0f}')} | "
                         f"{fmt(r['compile_speedup'], '{:.2f}x')} | {fmt(r['kernels_per_step'], '{:.0f}')} | "
                         f"{fmt(r['syncs_per_step'], '{:g}')} |")
        lines += [f"\n{r['method']} {r['arch']}: {k} {v}" for r in rows for k, v in r.items()
                  if k.endswith("_error")]
    st = s["stages"]
    if "images_per_s" in st.get("stream", {}):
        lines += ["", f"Streamed folder loader: {fmt(st['stream']['images_per_s'], '{:.0f}')} images/s."]
    if "recorded" in st.get("grid", {}):
        lines += ["", f"Grid: recorded {', '.join(st['grid']['recorded']) or 'none'}; unfinished "
                      f"{', '.join(st['grid']['unfinished']) or 'none'}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    if sys.version_info < (3, 10):
        fail(f"Python {sys.version.split()[0]}: this check needs Python 3.10 or newer")
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "gpu-check"), help="the output folder")
    p.add_argument("--data-dir", default="", help="a CIFAR-10 image folder (train/, test/) for the stream "
                                                  "and grid stages (default with --npz: data/cifar10-jpeg)")
    p.add_argument("--npz", default="", help="a CIFAR-10 JPEG archive, unpacked into --data-dir first")
    p.add_argument("--grid-budget", type=float, default=300, help="seconds for the grid (0: no grid)")
    p.add_argument("--dry-run", action="store_true", help="the whole check on a CPU at tiny sizes")
    opts = p.parse_args(argv)
    opts.argv = argv
    if opts.npz and not os.path.isfile(opts.npz):
        fail(f"--npz {opts.npz!r}: no such file")
    if opts.npz and not opts.data_dir:
        opts.data_dir = os.path.join("data", "cifar10-jpeg")
    if opts.data_dir and not opts.npz and not os.path.isdir(opts.data_dir):
        fail(f"--data-dir {opts.data_dir!r}: no such folder (give --npz to unpack one)")
    for name in ("npz", "data_dir"):  # the children run in the repository root
        setattr(opts, name, os.path.abspath(getattr(opts, name)) if getattr(opts, name) else "")
    if opts.grid_budget < 0:
        fail(f"--grid-budget must be at least 0, got {opts.grid_budget:g}")
    os.makedirs(opts.out, exist_ok=True)
    return Check(opts).run()


if __name__ == "__main__":
    main()
