"""Run the test suite: every tests/test_*.py module in its own process, two at a time (the CI machine has
two cores; each process pins torch to one thread). Prints each failure in full, then one closing line
`N passed, M failed`; exits non-zero if anything failed or errored.

    python tests/run.py                 # whole suite
    python tests/run.py test_common     # some modules
"""
import glob
import json
import os
import subprocess
import sys
import time
import unittest
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_module(name):
    """In a child process: run one module, print its result as JSON on the last line."""
    sys.path[:0] = [ROOT, HERE]
    suite = unittest.defaultTestLoader.loadTestsFromName(name)
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=1).run(suite)
    problems = [f"{kind}: {test.id()}\n{tb}" for kind, items in (("FAIL", result.failures), ("ERROR", result.errors))
                for test, tb in items]
    try:  # this module's CPU seconds, its subprocesses included (POSIX only)
        import resource
        cpu = sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                              resource.RUSAGE_CHILDREN)))
    except ImportError:
        cpu = 0.0
    print(json.dumps({"ran": result.testsRun, "bad": len(problems), "skipped": len(result.skipped),
                      "problems": problems, "cpu": cpu}))


# The longest modules start first, so the two workers finish together (the rest follow in name order).
SLOW_FIRST = ["test_reliability", "test_deploy", "test_gpu_check", "test_distributed", "test_matrix_b",
              "test_matrix_a", "test_mutations", "test_baseline", "test_errors", "test_beyond", "test_reproduce",
              "test_assignment", "test_lab"]


def main(names):
    found = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "test_*.py")))
    names = names or [n for n in SLOW_FIRST if n in found] + [n for n in found if n not in SLOW_FIRST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

    def child(name):
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, cwd=ROOT, env=env)
        try:
            res = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            res = {"ran": 0, "bad": 1, "skipped": 0, "problems": [f"CRASH: {name}\n{p.stdout}\n{p.stderr}"]}
        print(f"{name:<28} {res['ran'] - res['bad']:>3} passed {res['bad']:>2} failed  {time.time() - t0:6.1f}s"
              f"  (cpu {res.get('cpu', 0):5.1f}s)", flush=True)
        return res

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(child, names))
    for r in results:
        for problem in r["problems"]:
            print("\n" + "=" * 100 + "\n" + problem)
    ran, bad, skipped = (sum(r[k] for r in results) for k in ("ran", "bad", "skipped"))
    print(f"{ran - bad - skipped} passed, {bad} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if bad or ran == 0 else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        run_module(sys.argv[2])
    else:
        sys.exit(main(sys.argv[1:]))
