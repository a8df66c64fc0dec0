"""GPU check for beyond.py (not part of `make test`, which is CPU only):

    python tests/gpu_check.py          # on a machine with one GPU or more; a few minutes

1. (1 GPU)  nvJPEG decoding (torchvision.io.decode_jpeg(list, device='cuda')) against the CPU
            decoder on generated JPEGs: mean absolute difference in grey levels.
2. (1 GPU)  a streamed folder of generated 500x375 JPEGs at 224 px, ResNet-18, bf16: images/s.
3. (2 GPUs) torchrun, nccl: two processes with per-process BatchNorm hold identical weights; with
            --sync-bn their weights are close to one process on the whole global batch (BatchNorm
            over all images), much closer than per-process BatchNorm's.
Prints one line per check and exits non-zero when a check fails.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from torchvision.io import write_jpeg  # noqa: E402

import beyond  # noqa: E402
import common  # noqa: E402

FAILED = []


def report(name, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def jpeg_folder(root, n, size):
    """root/{train,test}/c<k>/<i>.jpg: n smooth random images per split, 4 classes."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for i in range(n):
            os.makedirs(os.path.join(root, split, f"c{i % 4}"), exist_ok=True)
            img = torch.rand(3, size[0] // 8, size[1] // 8, generator=g)
            img = torch.nn.functional.interpolate(img[None], size=size, mode="bilinear")[0]
            path = os.path.join(root, split, f"c{i % 4}", f"{i}.jpg")
            write_jpeg((img * 255).to(torch.uint8), path)
    return root


def decoding(tmp):
    root = jpeg_folder(os.path.join(tmp, "dec"), 64, (120, 160))
    paths, _, _ = common.list_folder(root, "train")
    gpu = beyond._collect(beyond._submit(paths, torch.device("cuda")), torch.device("cuda"))
    cpu = beyond._collect(beyond._submit(paths, torch.device("cpu")), torch.device("cpu"))
    diff = max((a.cpu().float() - b.float()).abs().mean().item() for a, b in zip(gpu, cpu))
    report("nvJPEG vs CPU decoding", diff <= 1.5, f"largest mean |difference| {diff:.3f} levels")


def stream_speed(tmp):
    root = jpeg_folder(os.path.join(tmp, "speed"), 1024, (375, 500))
    cmd = [sys.executable, "baseline.py", "--dataset", "folder", "--data-dir", root, "--loader",
           "stream", "--arch", "resnet18", "--epochs", "2", "--batch-size", "128", "--out",
           os.path.join(tmp, "speed-run")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        return report("streamed training", False, res.stderr.strip().splitlines()[-1])
    with open(os.path.join(tmp, "speed-run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    speed = rows[-1]["images_per_s"]
    report("streamed training", True, f"{speed:.0f} images/s (epoch 2, ResNet-18, 224 px, "
                                      f"{torch.cuda.get_device_name()})")


def sync_bn(tmp):
    flags = ["--arch", "resnet8", "--dataset", "fake", "--subset", "256", "--test-subset", "100",
             "--batch-size", "64", "--epochs", "1", "--no-bf16", "--no-channels-last", "--device",
             "cuda"]
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0"}
    worker = os.path.join("tests", "dist_worker.py")

    def launch(name, extra, nproc):
        runs = json.dumps([[name, "baseline", flags + extra + ["--out", os.path.join(tmp, name)]]])
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
        cmd = launcher + [worker, tmp, runs]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if res.returncode:
            raise RuntimeError(res.stderr[-2000:])
        return [torch.load(os.path.join(tmp, f"{name}-rank{r}.pt")) for r in range(nproc)]

    per, sync, one = launch("per", [], 2), launch("sync", ["--sync-bn"], 2), launch("one", [], 1)
    same = all(torch.equal(per[0][k], per[1][k]) and torch.equal(sync[0][k], sync[1][k])
               for k in per[0])
    report("identical processes (nccl)", same, "per-process and --sync-bn runs, every tensor")
    dist = lambda a, b: max((a[k].double() - b[k].double()).abs().max().item() for k in a
                            if a[k].is_floating_point())
    d_sync, d_per = dist(sync[0], one[0]), dist(per[0], one[0])
    report("--sync-bn = one process on the global batch", d_sync < 0.1 * d_per,
           f"max |difference| {d_sync:.2e} (per-process BatchNorm: {d_per:.2e})")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU visible; this check needs one (two for the multi-GPU part)")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        decoding(tmp)
        stream_speed(tmp)
        if torch.cuda.device_count() >= 2:
            sync_bn(tmp)
        else:
            print("skip the torchrun and --sync-bn checks: they need 2 GPUs (one process per GPU)")
        print(f"{len(FAILED)} failed, {time.time() - t0:.0f} s")
    sys.exit(1 if FAILED else 0)
