"""Shared test helpers: tiny CPU arguments, temporary output folders, running a script as a user would."""
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # deterministic float sums, and two test processes share the two cores


def tmpdir(testcase):
    """A fresh temporary folder removed when the test ends."""
    d = tempfile.TemporaryDirectory()
    testcase.addCleanup(d.cleanup)
    return d.name


def tiny(Args, testcase, **kw):
    """Args for a tiny CPU run on the synthetic set (the real code path, small sizes)."""
    base = dict(arch="resnet8", dataset="fake", subset=512, test_subset=200, epochs=2, batch_size=64,
                device="cpu", out=os.path.join(tmpdir(testcase), "run"))
    base.update(kw)
    return Args(**base)


def run_script(*argv, timeout=300):
    """Run `python <argv...>` in the repository root; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def fake_run(args, n=64):
    """A common.Run on n synthetic CPU images, without an output folder: for calling a method's
    build_model / build_optimizers / train_step / evaluate directly."""
    import common
    x, y = common.make_fake(n, seed=1)
    f = x.float() / 255
    data = common.Data(x, y, x, y, f.mean(dim=(0, 2, 3), keepdim=True), f.std(dim=(0, 2, 3), keepdim=True),
                       [f"class{i}" for i in range(10)])
    return common.Run(args, "test", torch.device("cpu"), data, out="", amp=False, channels_last=False)
