"""Checks for your method file that give no answer away: it imports, build_model and evaluate run and
return what the training loop expects, and a short run on the synthetic set learns above chance.
Passing them does not mean the algorithm is right: the instructor's grader checks that.

    python check.py            # the checks, then a short training run (a minute or two on a CPU)
    python check.py --quick    # the checks without the training run
"""
import argparse
import importlib
import os
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]
CHANCE, ABOVE = 10.0, 30.0  # the synthetic set has 10 classes


def shapes(module):
    """build_model and evaluate on 4 random images: every output is (4, 10) logits."""
    import torch
    model = module.build_model(module.Args(arch="resnet8", device="cpu"), 10).eval()
    with torch.no_grad():
        outs = module.evaluate(model, torch.randn(4, 3, 32, 32))
    assert isinstance(outs, dict) and outs, f"evaluate must return a dict of logits, got {type(outs)}"
    outs = {k: v for k, v in outs.items() if not k.startswith("int/")}  # internals: optional, not checked
    wrong = {k: tuple(v.shape) for k, v in outs.items() if tuple(v.shape) != (4, 10)}
    assert not wrong, f"evaluate's outputs must be (4 images, 10 classes): {wrong}"
    return f"evaluate returns {', '.join(outs)}, each (4, 10)"


def learns(module):
    """A 3-epoch run on 128 synthetic images (no LR decay): its best model beats chance clearly."""
    with tempfile.TemporaryDirectory() as out:
        args = module.Args(arch="resnet8", dataset="fake", subset=128, test_subset=100, batch_size=16,
                           epochs=3, lr=0.05, lr_decay_at="1", device="cpu", out=os.path.join(out, "run"))
        final = module.main(args)
    name, best = max(final["models"].items(), key=lambda kv: kv[1])
    assert best > ABOVE, f"no model learned: the best, {name}, scored {best:.1f} % (chance {CHANCE:.0f} %)"
    return f"learns: {name} {best:.1f} % after 3 epochs (chance {CHANCE:.0f} %)"


def main(argv=None):
    found = [m for m in METHODS if os.path.isfile(os.path.join(HERE, f"{m}.py"))]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("method", nargs="?", default=found[0] if len(found) == 1 else None,
                   choices=found, help="the method file to check (default: the only one here)")
    p.add_argument("--quick", action="store_true", help="skip the training run")
    a = p.parse_args(argv)
    if a.method is None:
        p.error(f"which method? one of: {', '.join(found) or '(no method file here)'}")
    sys.path.insert(0, HERE)
    checks = [("imports", lambda m: f"{a.method}.py imports"), ("shapes", shapes)]
    checks += [] if a.quick else [("learns", learns)]
    name = "imports"
    try:
        module = importlib.import_module(a.method)
        for name, check in checks:
            print(f"  ok    {check(module)}", flush=True)
    except NotImplementedError as e:
        print(f"  not implemented: {e}")
        return 1
    except AssertionError as e:
        print(f"  FAIL  {name}: {e}")
        return 1
    except Exception:  # a bug in the file: the full traceback helps
        traceback.print_exc()
        print(f"  FAIL  {name}: see the error above")
        return 1
    print(f"{a.method}: every check passes (they do not grade the algorithm: the grader does)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
