"""Started by test_distributed under torchrun (not a test module itself):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py DUMP RUNS

RUNS = JSON [[name, method, [flags...]], ...]: each run is `<method>.py flags` as a user starts it
(its main(), in the same process group, one after the other); when its fit() returns, every process
saves its model's state_dict to DUMP/<name>-rank<r>.pt, to compare processes and a reference.
"""
import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import beyond  # noqa: E402
import common  # noqa: E402

torch.set_num_threads(1)  # the same float sums as the test's one-thread reference


def main(dump, runs):
    fit = common.fit
    for name, method, flags in runs:
        def recording_fit(run, model, *a, **kw):
            result = fit(run, model, *a, **kw)
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            torch.save(state, os.path.join(dump, f"{name}-rank{beyond.rank()}.pt"))
            return result
        common.fit = recording_fit
        module = importlib.import_module(method)
        module.main(common.parse_args(module.Args, flags))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
