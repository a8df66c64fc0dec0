"""Export the network a run deploys as a plain backbone file (deployed.pt), from any checkpoint.

    python tools/export.py runs/pcl-resnet32-cifar10-seed0               # -> runs/.../deployed.pt
    python tools/export.py runs/pcl-resnet32-cifar10-seed0/checkpoint.pt --out pcl-resnet32.pt

A finished run writes deployed.pt itself. This tool makes it from a checkpoint written before runs
did, or from an unfinished run (its last completed epoch). The file holds `state_dict`, loadable
with strict=True into `common.build_backbone(arch, num_classes)`, and beside it arch, num_classes,
the input normalisation (mean, std), the class names, the method and which of its models it is
(e.g. 'mt_peer1'): see docs/using-results.md. The method comes from the checkpoint; its script is
imported by name from the repository root, and its `deployed_net(model, args)` says which network
is deployed.
"""
import argparse
import dataclasses
import importlib
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import common  # noqa: E402

METHODS = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]
# The deployed model's name, for checkpoints written before checkpoints recorded it.
LEGACY_DEPLOYED = {"baseline": "net", "dml": "peer1", "one": "branch1", "okddip": "leader",
                   "pcl": "mt_peer1", "ffsd": "leader"}


def checkpoint_path(path):
    """A run folder or a checkpoint file -> the checkpoint file's path (one-line error if none)."""
    ckpt = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(ckpt):
        common.fail(f"no checkpoint at {ckpt!r}")
    return ckpt


def read_checkpoint(path):
    """Load a checkpoint on the CPU; one-line error for a file that is not one."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)  # it also holds RNG states
    except Exception as e:
        common.fail(f"cannot read checkpoint {path!r} ({type(e).__name__}); it is corrupt or not a "
                    f"checkpoint")
    if not isinstance(ck, dict) or not {"meta", "args", "model", "epoch"} <= set(ck):
        common.fail(f"{path!r} is not a checkpoint of a training run (no meta/args/model)")
    return ck


def load_model(ck, path):
    """The method module, its Args and its whole model (every network it trains, CPU, eval mode)."""
    method = ck["meta"].get("method")
    if method not in METHODS or not os.path.isfile(os.path.join(ROOT, f"{method}.py")):
        common.fail(f"{path!r} is from method {method!r}, which this checkout has no script for")
    module = importlib.import_module(method)
    fields = {f.name for f in dataclasses.fields(module.Args)}
    args = module.Args(**{k: v for k, v in ck["args"].items() if k in fields})
    model = module.build_model(args, ck["meta"]["num_classes"])
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError) as e:
        common.fail(f"the weights in {path!r} do not fit {method}'s model for --arch {args.arch} "
                    f"({type(e).__name__}: {str(e).splitlines()[0]})")
    return module, args, model.eval()


def deployed_name(ck, path):
    """Which of the method's models is deployed: recorded in the checkpoint, else in final.json."""
    if ck.get("deployed"):
        return ck["deployed"]
    final = os.path.join(os.path.dirname(path), "final.json")
    if os.path.isfile(final):
        with open(final) as f:
            return json.load(f)["deployed"]
    return LEGACY_DEPLOYED[ck["meta"]["method"]]


def data_info(ck, args):
    """Normalisation and class names: recorded in the checkpoint, else from the run's data."""
    if ck.get("data"):
        return ck["data"]
    return common.data_info(common.load_data(args, torch.device("cpu")))


def export(path, out=""):
    """Write the deployed.pt of the checkpoint at `path` (run folder or file) to `out` (default:
    beside the checkpoint). Returns (output path, the file's dict)."""
    ckpt = checkpoint_path(path)
    ck = read_checkpoint(ckpt)
    module, args, model = load_model(ck, ckpt)
    name = deployed_name(ck, ckpt)
    net = module.deployed_net(model, args)
    last = ck["history"][-1] if ck.get("history") else {}
    payload = common.deployed_payload(
        net, name, ck["meta"]["method"], ck["meta"]["dataset"], data_info(ck, args),
        test_acc=last.get(f"acc/{name}"), epoch=ck["epoch"], test_subset=args.test_subset,
        bf16=bool(args.bf16 and ck.get("cuda_rng") is not None))  # bf16 evaluation: CUDA runs only
    out = out or os.path.join(os.path.dirname(ckpt), "deployed.pt")
    common.save_checkpoint(out, payload, what="deployed network")
    common.load_deployed(out)  # the contract: build_backbone(arch, num_classes) loads it strictly
    return out, payload


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", help="a run folder (--out of a run) or its checkpoint.pt")
    p.add_argument("--out", default="", help="output file (default: deployed.pt beside the "
                                             "checkpoint)")
    opts = p.parse_args(argv)
    out, d = export(opts.path, opts.out)
    acc = "" if d["test_acc"] is None else f", test_acc {d['test_acc']:.2f} on {d['dataset']}"
    print(f"wrote {out}: {d['model']} of {d['method']} ({d['arch']}, {d['num_classes']} classes, "
          f"epoch {d['epoch']}{acc})")
    return d


if __name__ == "__main__":
    main()
