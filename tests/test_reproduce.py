"""tools/reproduce.py: a grid runs the method scripts as subprocesses and records one JSON per finished run,
skips recorded runs, continues interrupted ones with --resume, and the report renders mean +- std, gains
over baseline and the paper column (never for synthetic data). Everything is written into temp folders."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

from helpers import ROOT, tmpdir

sys.path.insert(0, os.path.join(ROOT, "tools"))
import reproduce  # noqa: E402

TINY = ["--methods", "baseline,dml", "--seeds", "0", "--epochs", "1", "--subset", "128", "--quiet"]


def grid(results, runs, *extra):
    return reproduce.main(["run", "tiny", "--results", results, "--runs", runs, *TINY, *extra])


def read(path):
    with open(path) as f:
        return json.load(f)


class TestGrid(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # One real tiny grid (baseline + dml, 1 epoch on 128 synthetic images), shared by the tests below.
        cls._tmp = tempfile.TemporaryDirectory()
        cls.results, cls.runs = os.path.join(cls._tmp.name, "results"), os.path.join(cls._tmp.name, "runs")
        cls.calls = []
        real = reproduce.launch

        def counting(argv, log_path, quiet, *rest):
            cls.calls.append(argv)
            return real(argv, log_path, quiet)
        with mock.patch.object(reproduce, "launch", counting):
            cls.planned = grid(cls.results, cls.runs)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_runs_are_user_commands_and_results_carry_the_required_fields(self):
        self.assertEqual([a[0] for a in self.calls], ["baseline.py", "dml.py"])
        for argv in self.calls:
            self.assertNotIn("--resume", argv)
            self.assertEqual(argv[argv.index("--epochs") + 1], "1")
            self.assertEqual(argv[argv.index("--subset") + 1], "128")
            self.assertEqual(argv.count("--subset"), 1)  # the override replaces the grid's value
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        for r in self.planned:
            res, final = read(r["result"]), read(os.path.join(r["out"], "final.json"))
            self.assertEqual(os.path.dirname(r["result"]), os.path.join(self.results, "tiny"))
            self.assertEqual(os.path.dirname(r["out"]), os.path.join(self.runs, "tiny"))
            self.assertEqual(res["command"], "python " + " ".join(r["argv"]))
            self.assertTrue(res["command"].startswith(f"python {r['method']}.py --arch resnet8 --dataset fake"))
            for k in ("test_acc", "best_test_acc", "best_epoch", "models", "deployed", "device", "date"):
                self.assertEqual(res[k], final[k], k)
            self.assertEqual(res["deployed"], {"baseline": "net", "dml": "peer1"}[r["method"]])
            self.assertEqual(res["test_acc"], final["models"][res["deployed"]])
            self.assertEqual(res["device"], "cpu")
            self.assertTrue(res["synthetic"])
            self.assertEqual((res["data"], res["epochs"], res["seed"]), ("fake", 1, 0))
            self.assertIsInstance(res["code"]["dirty"], bool)
            if head.returncode == 0:
                self.assertEqual(res["code"]["commit"], head.stdout.strip())
            self.assertGreater(res["wall_time_s"], 0)
            self.assertEqual([s["resumed"] for s in res["sessions"]], [False])

    def test_second_invocation_starts_no_subprocess(self):
        stamps = {r["result"]: os.path.getmtime(r["result"]) for r in self.planned}
        with mock.patch.object(reproduce, "launch", side_effect=AssertionError("a run was started")) as launch, \
                mock.patch.object(subprocess, "Popen", side_effect=AssertionError("a process was started")):
            grid(self.results, self.runs)
        launch.assert_not_called()
        self.assertEqual(stamps, {p: os.path.getmtime(p) for p in stamps})

    def test_interrupted_run_continues_from_its_checkpoint(self):
        # Simulate a 2-epoch dml run stopped after epoch 1: its folder holds config, metrics and the epoch-1
        # checkpoint, but no final.json and no recorded result.
        runs, results = tmpdir(self), tmpdir(self)
        src = next(r["out"] for r in self.planned if r["method"] == "dml")
        dst = os.path.join(runs, "tiny", os.path.basename(src))
        shutil.copytree(src, dst)
        os.remove(os.path.join(dst, "final.json"))
        config = read(os.path.join(dst, "config.json"))
        config["epochs"] = 2
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f)
        first_row = read_rows(dst)[0]
        calls, real = [], reproduce.launch
        with mock.patch.object(reproduce, "launch", lambda a, l, q, *rest: calls.append(a) or real(a, l, q, *rest)):
            grid(results, runs, "--methods", "dml", "--epochs", "2")
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0][-1], "--resume")
        rows = read_rows(dst)
        self.assertEqual([r["epoch"] for r in rows], [1, 2])  # epoch 1 kept from the checkpoint, epoch 2 trained
        self.assertEqual(rows[0], first_row)
        res = read(os.path.join(results, "tiny", os.path.basename(dst) + ".json"))
        self.assertEqual(res["epochs"], 2)
        self.assertEqual(res["test_acc"], rows[-1]["acc/peer1"])
        self.assertNotIn("--resume", res["command"])  # the recorded command is the run's, not the continuation
        self.assertEqual([s["resumed"] for s in res["sessions"]], [False, True])

    def test_finished_but_unrecorded_run_is_recorded_without_running(self):
        runs, results = tmpdir(self), tmpdir(self)
        for r in self.planned:
            shutil.copytree(r["out"], os.path.join(runs, "tiny", os.path.basename(r["out"])))
        with mock.patch.object(reproduce, "launch", side_effect=AssertionError("a run was started")):
            grid(results, runs)
        self.assertEqual(sorted(os.listdir(os.path.join(results, "tiny"))),
                         ["baseline-resnet8-fake-seed0.json", "baseline-resnet8-fake-seed0.metrics.jsonl",
                          "dml-resnet8-fake-seed0.json", "dml-resnet8-fake-seed0.metrics.jsonl"])
        # the kept per-epoch log is the run's own, one row per epoch
        with open(os.path.join(results, "tiny", "dml-resnet8-fake-seed0.metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        self.assertEqual([row["epoch"] for row in rows], list(range(1, len(rows) + 1)))
        self.assertIn("kd/peer1", rows[0])

    def test_run_folder_from_other_settings_is_refused(self):
        runs = tmpdir(self)
        dst = os.path.join(runs, "tiny", "baseline-resnet8-fake-seed0")
        shutil.copytree(next(r["out"] for r in self.planned if r["method"] == "baseline"), dst)
        os.remove(os.path.join(dst, "final.json"))
        with mock.patch.object(reproduce, "launch", side_effect=AssertionError("a run was started")):
            with self.assertRaises(SystemExit) as cm:
                grid(tmpdir(self), runs, "--methods", "baseline", "--epochs", "3")
        self.assertIn("--epochs 1", str(cm.exception))


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def fake_result(grid, data, method, seed, last, best, arch="resnet32", epochs=30):
    deployed = {"baseline": "net", "dml": "peer1", "ffsd": "leader"}[method]
    return {"grid": grid, "name": f"{method}-{arch}-{data}-seed{seed}", "method": method, "arch": arch,
            "data": data, "synthetic": data == "fake", "seed": seed, "epochs": epochs,
            "command": f"python {method}.py --seed {seed}", "device": "NVIDIA H100", "date": "2025-01-0%d" % (seed + 1),
            "code": {"commit": "0123456789abcdef", "dirty": False}, "wall_time_s": 1.0, "train_time_s": 1.0,
            "deployed": deployed, "test_acc": last, "best_test_acc": best, "best_epoch": 30,
            "models": {deployed: last, **({"peer2": last - 1.0, "ensemble": last + 1.0} if method == "dml" else {})}}


class TestReport(unittest.TestCase):
    def setUp(self):
        self.dir = tmpdir(self)
        rs = [fake_result("short", "cifar10-jpeg", "baseline", s, v, v + 0.5) for s, v in enumerate([93.0, 94.0, 95.0])]
        rs += [fake_result("short", "cifar10-jpeg", "dml", s, v, v + 1.0) for s, v in enumerate([94.5, 95.5, 96.5])]
        rs += [fake_result("short", "cifar10-jpeg", "ffsd", s, v, v) for s, v in enumerate([95.0, 95.0])]
        # Synthetic runs on the same backbone: must never meet the paper column.
        rs += [fake_result("tiny", "fake", "baseline", 0, 40.0, 41.0), fake_result("tiny", "fake", "dml", 0, 46.0, 47.0)]
        for r in rs:
            os.makedirs(os.path.join(self.dir, "results", r["grid"]), exist_ok=True)
            with open(os.path.join(self.dir, "results", r["grid"], r["name"] + ".json"), "w") as f:
                json.dump(r, f)
        self.readme = os.path.join(self.dir, "README.md")
        with open(self.readme, "w") as f:
            f.write("intro\n<!-- results:start -->\nold table\n<!-- results:end -->\noutro\n")

    def report(self):
        return reproduce.main(["report", "--results", os.path.join(self.dir, "results"), "--readme", self.readme,
                               "--results-md", os.path.join(self.dir, "RESULTS.md")])

    def rows(self):
        return {(r["grid"], r["method"]): r for r in reproduce.summarize(reproduce.load_results(os.path.join(self.dir, "results")))}

    def test_mean_and_sample_std_over_seeds(self):
        rows = self.rows()
        m, s = rows["short", "baseline"]["last"]
        self.assertAlmostEqual(m, 94.0)
        self.assertAlmostEqual(s, 1.0)  # sample std (n-1) of 93, 94, 95; the population std would be 0.816
        self.assertEqual(rows["short", "baseline"]["seeds"], [0, 1, 2])
        self.assertAlmostEqual(rows["short", "dml"]["best"][0], 96.5)
        self.assertAlmostEqual(rows["short", "ffsd"]["last"][1], 0.0)
        self.assertIsNone(rows["tiny", "dml"]["last"][1])  # one seed: no std

    def test_rendered_lines(self):
        text = self.report()
        line = lambda grid, method: next(l for l in text.splitlines() if l.startswith(f"| {method} |")
                                         and l in section(text, grid))
        self.assertEqual(line("short", "baseline"),
                         "| baseline | resnet32 | 3 | net | 94.00 ± 1.00 | 94.50 ± 1.00 | — | — | 93.26 ± 0.15 | — | "
                         + reproduce.PAPER_SOURCE + " |")
        self.assertEqual(line("short", "dml"),
                         "| dml | resnet32 | 3 | peer1 | 95.50 ± 1.00 | 96.50 ± 1.00 | +1.50 | "
                         "peer2 94.50 ± 1.00, ensemble 96.50 ± 1.00 | 93.94 ± 0.07 | +0.68 | "
                         + reproduce.PAPER_SOURCE + " |")
        self.assertIn("FFSD publishes CIFAR-100 only", line("short", "ffsd"))
        self.assertIn("| +1.00 | — | — | — |", line("short", "ffsd"))
        self.assertIn("JPEG", section(text, "short"))
        self.assertEqual(line("tiny", "dml"),
                         "| dml | resnet32 | 1 | peer1 | 46.00 | 47.00 | +6.00 | peer2 45.00, ensemble 47.00 |")

    def test_synthetic_results_stay_out_of_the_paper_comparison(self):
        rows, text = self.rows(), self.report()
        for method in ("baseline", "dml"):
            self.assertTrue(rows["tiny", method]["synthetic"])
            self.assertIsNone(rows["tiny", method]["paper"])
            self.assertIsNone(rows["tiny", method]["paper_gain"])
        tiny = section(text, "tiny")
        self.assertIn("SYNTHETIC", tiny)
        self.assertNotIn("paper", tiny.split("\n| method")[1].splitlines()[0])  # no paper column in that table
        for value in ("93.26", "93.94", reproduce.PAPER_SOURCE):
            self.assertNotIn(value, tiny)
        self.assertNotIn("46.00", section(text, "short"))

    def test_readme_section_replaced_between_markers_only(self):
        text = self.report()
        with open(self.readme) as f:
            readme = f.read()
        self.assertTrue(readme.startswith("intro\n<!-- results:start -->\n"))
        self.assertTrue(readme.endswith("<!-- results:end -->\noutro\n"))
        self.assertNotIn("old table", readme)
        compact = reproduce.render_compact(reproduce.summarize(reproduce.load_results(
            os.path.join(self.dir, "results"))))
        self.assertIn(compact, readme)  # the front page: compact tables; RESULTS.md: the full ones
        self.assertNotIn("    python dml.py", readme)
        self.report()  # idempotent
        with open(self.readme) as f:
            self.assertEqual(f.read(), readme)
        with open(os.path.join(self.dir, "RESULTS.md")) as f:
            self.assertIn(text, f.read())

    def test_compact_tables_for_the_front_page(self):
        text = reproduce.render_compact(reproduce.summarize(reproduce.load_results(
            os.path.join(self.dir, "results"))))
        lines = text.splitlines()
        self.assertIn("**`short`**: resnet32, real CIFAR-10 images (JPEG), 30 epochs, 2/3 seed(s); "
                      "NVIDIA H100, 2025-01-03.", lines)
        dml = "| dml | peer1 | 95.50 ± 1.00 | 96.50 ± 1.00 | +1.50 | 93.94 ± 0.07 | +0.68 |"
        self.assertIn(dml, lines)
        self.assertIn("| ffsd | leader | 95.00 ± 0.00 | 95.00 ± 0.00 | +1.00 | — | — |", lines)
        tiny = text[text.index("**`tiny`**"):]
        self.assertIn("| dml | peer1 | 46.00 | 47.00 | +6.00 |", tiny)  # synthetic: no paper column
        self.assertNotIn("93.26", tiny.split("Top-1 %")[0])
        self.assertIn("[RESULTS.md](RESULTS.md)", lines[-1])


def section(text, grid):
    """The part of the report for one grid (from its heading to the next heading)."""
    start = text.index(f"#### Grid `{grid}`")
    end = text.find("#### Grid", start + 1)
    return text[start:end if end >= 0 else None]


if __name__ == "__main__":
    unittest.main()
