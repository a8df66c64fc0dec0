"""Score trained networks on a test set without training: every model of a run's checkpoint, or the
one network of a deployed.pt. One line per model: its name and top-1 accuracy (%).

    python tools/evaluate.py runs/dml-resnet32-cifar10-seed0              # the run's checkpoint
    python tools/evaluate.py runs/dml-resnet32-cifar10-seed0/deployed.pt  # the deployed network
    python tools/evaluate.py deployed.pt --dataset cifar10 --data-dir data --device cpu

The data set, --data-dir, --test-subset and the batch size default to what the run used, so the
figures reproduce the run's own (bit for bit on the same device); the normalisation is always the
training run's (recorded in the file). A file for another number of classes than the data set,
another --arch than asked, or one that cannot be read, stops with a one-line error.
"""
import argparse
import dataclasses
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "tools")) if p not in sys.path]
import common  # noqa: E402
import export  # noqa: E402


def read(path):
    """path: a run folder (its checkpoint.pt, else its deployed.pt), a checkpoint or a deployed.pt.
    Returns (kind 'checkpoint' or 'deployed', file path, the loaded dict)."""
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in ("checkpoint.pt", "deployed.pt")
                 if os.path.isfile(os.path.join(path, f))]
        if not found:
            common.fail(f"{path!r} holds neither checkpoint.pt nor deployed.pt")
        path = found[0]
    if not os.path.isfile(path):
        common.fail(f"no such file: {path!r}")
    try:  # a deployed.pt holds only tensors and plain values: read it without running pickled code
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # a checkpoint also holds RNG states (numpy objects)
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            common.fail(f"cannot read {path!r} ({type(e).__name__}); it is not a checkpoint or a "
                        f"deployed.pt, or it is corrupt")
    if isinstance(obj, dict) and obj.get("format") == common.DEPLOYED_FORMAT:
        return "deployed", path, obj
    if isinstance(obj, dict) and {"meta", "args", "model", "epoch"} <= set(obj):
        return "checkpoint", path, obj
    common.fail(f"{path!r} is neither a checkpoint nor a deployed.pt of this repository")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", help="a run folder, its checkpoint.pt, or a deployed.pt")
    p.add_argument("--dataset", default="",
                   help=f"{', '.join(common.DATASETS)} (default: the run's)")
    p.add_argument("--data-dir", default="",
                   help="as the scripts' --data-dir (default: the run's, or ./data)")
    p.add_argument("--test-subset", type=int, default=-1,
                   help="a class-balanced first N test images (0 = all; default: the run's)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda, else mps, else cpu), cpu, cuda or mps")
    p.add_argument("--eval-batch-size", type=int, default=0,
                   help="test-time batch size (default: the run's)")
    p.add_argument("--arch", default="", help="stop unless the file holds this backbone")
    opts = p.parse_args(argv)

    kind, path, obj = read(opts.path)
    if kind == "deployed":
        method, arch, recorded, info = obj["method"], obj["arch"], {"dataset": obj["dataset"]}, obj
        recorded["test_subset"] = obj.get("test_subset", 0)
        bf16, what = obj.get("bf16", False), f"{method}'s deployed {obj['model']}"
    else:
        module, args, model = export.load_model(obj, path)
        method, arch, info = obj["meta"]["method"], args.arch, obj.get("data")
        recorded = dataclasses.asdict(args)
        bf16, what = args.bf16, f"{method}, epoch {obj['epoch']}"
    if opts.arch and opts.arch != arch:
        common.fail(f"{path!r} holds a {arch}, not --arch {opts.arch}")
    targs = common.TrainArgs(
        dataset=opts.dataset or recorded["dataset"],
        data_dir=opts.data_dir or recorded.get("data_dir", "./data"),
        subset=recorded.get("subset", 0),  # only for old checkpoints (no recorded normalisation)
        test_subset=opts.test_subset if opts.test_subset >= 0 else recorded.get("test_subset", 0),
        eval_batch_size=opts.eval_batch_size or recorded.get("eval_batch_size", 1000),
        device=opts.device)
    common.check_args(targs)
    device = common.pick_device(targs.device)
    data = common.load_data(targs, device, test_only=info is not None)
    info = info or common.data_info(data)  # old checkpoints: the training split's, as at training
    if len(info["classes"]) != len(data.classes):
        common.fail(f"{path!r} holds a {arch} for {len(info['classes'])} classes, but --dataset "
                    f"{targs.dataset} has {len(data.classes)}")
    if list(info["classes"]) != list(data.classes):
        common.fail(f"the class names of {path!r} ({', '.join(info['classes'][:3])}, ...) differ "
                    f"from --dataset {targs.dataset}'s ({', '.join(data.classes[:3])}, ...)")
    stats = [torch.tensor(info[k], device=device).view(1, 3, 1, 1) for k in ("mean", "std")]
    data = dataclasses.replace(data, mean=stats[0], std=stats[1])  # the training normalisation
    cuda = device.type == "cuda"
    run = common.Run(targs, method, device, data, out="", amp=cuda and bf16,
                     channels_last=cuda and recorded.get("channels_last", True))
    if kind == "deployed":
        net, _ = common.load_deployed(path)
        accs = common.evaluate_all(run, run.to_device(net), lambda m, x: {obj["model"]: m(x)})
        deployed = obj["model"]
    else:
        accs = common.evaluate_all(run, run.to_device(model), module.evaluate)
        deployed = export.deployed_name(obj, path)
    accs = {k: v for k, v in accs.items() if not common.is_internal(k)}  # the models (internals: metrics.jsonl)
    print(f"{path} | {what} | {arch} | {targs.dataset} ({len(data.test_y)} test images, "
          f"{len(data.classes)} classes) | {device.type}{' bf16' if run.amp else ''}", flush=True)
    width = max(len(k) for k in accs)
    for name, acc in accs.items():
        print(f"{name:<{width}} {acc:6.2f}{'  (deployed)' if name == deployed else ''}", flush=True)
    return accs


if __name__ == "__main__":
    main()
