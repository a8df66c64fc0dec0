"""tools/gpu_check.py (make gpu-check) and tools/unpack_cifar10_jpeg.py, on the CPU: the dry run end
to end (an output folder of at most 8 files, the summary's keys, null for every CUDA-only figure,
ingest into results/ and the tables), packing unfinished runs into size-capped parts and restoring
them, the archive unpacker, the discovery of step-compiling flags, the resume comparison, the grid
plan, stage guards and time limits."""
import argparse
import dataclasses
import io
import json
import os
import sys
import tarfile
import tempfile
import time
import unittest
from contextlib import redirect_stdout
from types import SimpleNamespace

import numpy as np
import torch

from helpers import ROOT, run_script, tmpdir
import common
from common import arg

sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402
import reproduce  # noqa: E402
import unpack_cifar10_jpeg as unpack  # noqa: E402

RUN = "baseline-resnet8-fake-seed0"


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def write(path, data):
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def load(path):
    return json.loads(read(path))


class TestDryRun(unittest.TestCase):
    """One `run --dry-run --device cpu` (tiny sizes, one run of the tiny grid), shared below."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        cls.out, cls.results, cls.runs = (os.path.join(d, n) for n in ("out", "results", "runs"))
        before = gpu_check.files_under(os.path.join(ROOT, "results"))
        # a generous budget: every stage's slice (a share of it) holds on a loaded 2-core machine
        cls.proc = run_script("tools/gpu_check.py", "run", "--dry-run", "--device", "cpu",
                              "--budget", "1800", "--methods", "baseline,pcl", "--out", cls.out,
                              "--work", os.path.join(d, "work"), "--results", cls.results,
                              "--runs", cls.runs, timeout=600)
        cls.repo_untouched = before == gpu_check.files_under(os.path.join(ROOT, "results"))
        path = os.path.join(cls.out, "summary.json")
        cls.summary = load(path) if os.path.isfile(path) else None

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        out = self.proc.stdout[-3000:] + self.proc.stderr[-3000:]
        self.assertEqual(self.proc.returncode, 0, out)

    def test_out_folder_holds_at_most_eight_files(self):
        names = sorted(os.listdir(self.out))
        self.assertLessEqual(len(names), gpu_check.MAX_FILES)
        # no unfinished run, so no checkpoint part
        self.assertEqual(names, ["gpu-check.log", "results.tar.gz", "speed.md", "summary.json"])
        self.assertTrue(self.repo_untouched, "the dry run wrote into the repository's results/")
        with tarfile.open(os.path.join(self.out, "results.tar.gz")) as tar:
            members = set(tar.getnames())
        self.assertIn(f"results/tiny/{RUN}.json", members)
        self.assertIn("gpu-check/steps.jsonl", members)
        self.assertIn("gpu-check summary (DRY RUN)", self.proc.stdout)

    def test_summary_keys_and_no_cuda_figure_on_a_cpu(self):
        s = self.summary
        self.assertEqual((s["mode"], s["device"], s["check"]), ("dry-run", "cpu", "gpu-check"))
        self.assertEqual({k: v["status"] for k, v in s["stages"].items()},
                         {"env": "ok", "steps": "ok", "compile": "skipped", "bench": "ok",
                          "resume": "ok", "grid": "ok"},
                         {k: v.get("error") for k, v in s["stages"].items()})
        for name, st in s["stages"].items():
            self.assertGreaterEqual(st["seconds"], 0, name)
        self.assertLess(s["elapsed_s"], s["budget_s"])
        rows = {r["method"]: r for r in s["stages"]["steps"]["rows"]}
        self.assertEqual(sorted(rows), ["baseline", "pcl"])
        for r in rows.values():
            self.assertGreater(r["ms_per_step"], 0)
            self.assertEqual(r["timer"], "perf_counter (CPU)")
            for k in ("kernels_per_step", "gpu_busy_ms_per_step", "syncs_per_step", "peak_mib"):
                self.assertIsNone(r[k], k)  # never a made-up number
                self.assertTrue(r["skipped"][k].startswith("skipped: no CUDA"), k)
            self.assertIsNone(r["loss"]["bf16"])
            self.assertEqual(len(r["loss"]["fp32"]), gpu_check.DRY["steps"]["loss_steps"])
            self.assertTrue(all(0 < v < 20 for v in r["loss"]["fp32"]))
        self.assertEqual((rows["baseline"]["views"], rows["pcl"]["views"]), (1, 3))
        # PCL: three peers on three views and the temporal-mean model, several times baseline's ops
        self.assertGreater(rows["pcl"]["aten_ops_per_step"],
                           2.5 * rows["baseline"]["aten_ops_per_step"])
        self.assertEqual(s["projections"], [])  # only from CUDA timings
        eager = s["stages"]["compile"]["rows"][0]["eager"]
        self.assertEqual(len(eager["ms_per_step_by_epoch"]), 2)
        self.assertGreater(eager["ms_per_step"], 0)
        (res,) = s["stages"]["resume"]["rows"]
        self.assertEqual((res["method"], res["exact"], res["epochs"]), ("baseline", True, [2, 2]))
        (b,) = s["stages"]["bench"]["rows"]
        self.assertAlmostEqual(b["ratio"], b["okd"]["images_per_s"] / b["ref"]["images_per_s"])
        grid = s["stages"]["grid"]
        self.assertEqual((grid["recorded"], grid["unfinished"]), ([RUN], []))
        self.assertEqual(sorted(s["files"]), sorted(os.listdir(self.out)))

    def test_ingest_fills_results_and_renders_both_tables(self):
        d = tmpdir(self)
        results, readme = os.path.join(d, "results"), os.path.join(d, "README.md")
        write(readme, f"intro\n{reproduce.MARK_START}\nold\n{reproduce.MARK_END}\n")
        argv = ["ingest", self.out, "--results", results, "--runs", os.path.join(d, "runs"),
                "--readme", readme, "--results-md", os.path.join(d, "RESULTS.md")]
        with redirect_stdout(io.StringIO()) as said:
            done = gpu_check.main(argv)
        self.assertEqual(sorted(done["results"]), [f"tiny/{RUN}.json", f"tiny/{RUN}.metrics.jsonl"])
        record = os.path.join("tiny", RUN + ".json")
        self.assertEqual(read(os.path.join(self.results, record)),
                         read(os.path.join(results, record)))
        self.assertEqual(load(os.path.join(results, "gpu-check", "summary.json")), self.summary)
        speed = read(os.path.join(results, "gpu-check", "speed.md"))
        self.assertIn("| baseline | resnet8 |", speed)
        self.assertIn("DRY RUN", speed)
        self.assertIn("speed.md", said.getvalue())
        self.assertIn("the same Python sources", said.getvalue())
        # results/gpu-check/summary.json is not mistaken for a run record by the report
        self.assertIn("#### Grid `tiny`", read(os.path.join(d, "RESULTS.md")))
        self.assertNotIn("\nold\n", read(readme))
        # a result recorded here already is never overwritten
        write(os.path.join(results, record), "{}")
        with redirect_stdout(io.StringIO()):
            again = gpu_check.main(argv + ["--no-report"])
        self.assertIn(f"tiny/{RUN}.json", again["kept"])
        self.assertEqual(read(os.path.join(results, record)), "{}")


class TestPack(unittest.TestCase):
    def setUp(self):
        d = tmpdir(self)
        self.check = SimpleNamespace(out=os.path.join(d, "out"), work=os.path.join(d, "work"),
                                     results=os.path.join(d, "results"),
                                     runs=os.path.join(d, "runs"),
                                     cfg={"grid": {"name": "short"}},
                                     summary={"stages": {"grid": {"status": "ok"}}})
        for p in (self.check.out, self.check.work, self.check.results):
            os.makedirs(p)
        self.snapshot = gpu_check.files_under(self.check.results)
        rng = np.random.default_rng(0)
        self.ckpt = {}
        for name, epochs, mib in (("a", 3, 0.6), ("b", 1, 0.6), ("c", 2, 0.3), ("e", 1, 0.6)):
            run = os.path.join(self.check.runs, "short", name)
            os.makedirs(run)
            self.ckpt[name] = rng.bytes(int(mib * 2 ** 20))  # random: gzip cannot shrink it
            write(os.path.join(run, "checkpoint.pt"), self.ckpt[name])
            lines = "".join(f'{{"epoch": {i + 1}}}\n' for i in range(epochs))
            write(os.path.join(run, "metrics.jsonl"), lines)
            write(os.path.join(run, "config.json"), json.dumps({"epochs": 30}))
        done = os.path.join(self.check.runs, "short", "d")  # finished, recorded: not in a part
        os.makedirs(done)
        write(os.path.join(done, "final.json"), "{}")
        write(os.path.join(done, "stdout.log"), "epoch rows\n")
        os.makedirs(os.path.join(self.check.results, "short"))
        write(os.path.join(self.check.results, "short", "d.json"), json.dumps({"grid": "short"}))

    def test_unfinished_runs_go_into_capped_parts_furthest_first(self):
        old = gpu_check.PART_MIB, gpu_check.MAX_PARTS
        gpu_check.PART_MIB, gpu_check.MAX_PARTS = 1.0, 2
        try:
            gpu_check.pack(self.check, self.snapshot)
        finally:
            gpu_check.PART_MIB, gpu_check.MAX_PARTS = old
        packed = self.check.summary["packed"]
        self.assertEqual([p["runs"] for p in packed["checkpoint_parts"]], [["a", "c"], ["b"]])
        self.assertEqual(packed["not_brought_back"], ["e"])  # no room left in 2 parts of 1 MiB
        self.assertEqual(packed["results_files"], ["short/d.json"])
        names = sorted(os.listdir(self.check.out))
        self.assertEqual(names, ["checkpoints-1.tar.gz", "checkpoints-2.tar.gz", "results.tar.gz"])
        for n in names:
            size = os.path.getsize(os.path.join(self.check.out, n))
            self.assertLess(size, 2 ** 20 + 64 * 1024, n)
        with tarfile.open(os.path.join(self.check.out, "results.tar.gz")) as tar:
            self.assertEqual(sorted(tar.getnames()),
                             ["gpu-check/logs/short/d.log", "results/short/d.json"])

        # ingest restores the runs byte for byte; a folder here that is further along is kept
        write(os.path.join(self.check.out, "summary.json"),
              json.dumps({"check": "gpu-check", "stages": {}}))
        runs, results = os.path.join(tmpdir(self), "runs"), os.path.join(tmpdir(self), "results")
        os.makedirs(os.path.join(runs, "short", "b"))
        write(os.path.join(runs, "short", "b", "checkpoint.pt"), b"mine")
        write(os.path.join(runs, "short", "b", "metrics.jsonl"), '{"epoch": 1}\n{"epoch": 2}\n')
        with redirect_stdout(io.StringIO()):
            done = gpu_check.main(["ingest", self.check.out, "--results", results, "--runs", runs,
                                   "--no-report"])
        self.assertEqual(done["older"], [os.path.join("short", "b")])
        for name in ("a", "c"):
            self.assertEqual(read(os.path.join(runs, "short", name, "checkpoint.pt"), "rb"),
                             self.ckpt[name])
        self.assertEqual(read(os.path.join(runs, "short", "b", "checkpoint.pt"), "rb"), b"mine")
        self.assertFalse(os.path.exists(os.path.join(runs, "short", "e")))
        self.assertTrue(os.path.isfile(os.path.join(results, "short", "d.json")))
        # a restored folder is one `reproduce.py run short` continues: checkpoint, no final.json
        r = {"result": os.path.join(results, "short", "a.json"),
             "out": os.path.join(runs, "short", "a")}
        self.assertEqual(reproduce.state(r), "resume")


def jpeg(seed):
    from torchvision.io import encode_jpeg
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
    return encode_jpeg(img, quality=90).numpy().tobytes()


class TestUnpack(unittest.TestCase):
    def archive(self, path, per_class=(2, 1), **override):
        arrays, self.blobs = {"classes": np.array(reproduce.CIFAR10_CLASSES)}, {}
        for split, n in zip(("train", "test"), per_class):
            labels = np.array([c for _ in range(n) for c in range(10)], dtype=np.int64)  # mixed
            blobs = [jpeg(1000 * (split == "test") + i) for i in range(len(labels))]
            arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
            arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
            arrays[f"{split}_labels"] = labels
            self.blobs[split] = blobs
        arrays.update(override)
        np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
        return path

    def test_folder_layout_bytes_and_loader(self):
        d = tmpdir(self)
        npz, out = self.archive(os.path.join(d, "c.npz")), os.path.join(d, "cifar10-jpeg")
        with redirect_stdout(io.StringIO()):
            self.assertEqual(unpack.main([npz, out]), {"train": 20, "test": 10})
        self.assertEqual(sorted(os.listdir(out)), ["test", "train"])
        reproduce.check_data_folder(out)  # the layout the short grid asks for
        self.assertEqual(sorted(os.listdir(os.path.join(out, "train", "cat"))),
                         ["0000.jpg", "0001.jpg"])
        # image i of the archive, the k-th of its class, is <class>/<k>.jpg, byte for byte
        self.assertEqual(read(os.path.join(out, "train", "airplane", "0001.jpg"), "rb"),
                         self.blobs["train"][10])
        self.assertEqual(read(os.path.join(out, "test", "truck", "0000.jpg"), "rb"),
                         self.blobs["test"][9])
        x, y, classes = common._folder(out, "train")
        self.assertEqual((tuple(x.shape), classes), ((20, 3, 32, 32), reproduce.CIFAR10_CLASSES))
        self.assertEqual(y.tolist(), [c for c in range(10) for _ in range(2)])
        self.assertFalse(os.path.exists(out + ".partial"))
        with redirect_stdout(io.StringIO()) as said:  # complete already: left alone
            self.assertEqual(unpack.main([npz, out]), {"train": 0, "test": 0})
        self.assertIn("already holds", said.getvalue())

    def test_bad_archives_stop_with_one_line(self):
        d = tmpdir(self)
        cases = {"lacks test_labels": dict(test_labels=None),
                 "test_offsets must rise": dict(test_offsets=np.array([0, 5, 3], dtype=np.int64)),
                 "not a JPEG": dict(train_jpeg=np.zeros(20 * 8, dtype=np.uint8),
                                    train_offsets=np.arange(0, 161, 8, dtype=np.int64))}
        for i, (msg, override) in enumerate(cases.items()):
            npz = self.archive(os.path.join(d, f"bad{i}.npz"), **override)
            with self.assertRaises(SystemExit) as e, redirect_stdout(io.StringIO()):
                unpack.main([npz, os.path.join(d, f"out{i}")])
            text = str(e.exception)
            self.assertTrue(text.startswith("error: ") and msg in text, text)
            self.assertNotIn("\n", text)
            self.assertFalse([n for n in os.listdir(d) if "out" in n])  # no tree, no .partial left
        with self.assertRaises(SystemExit) as e:
            unpack.main([os.path.join(d, "missing.npz"), os.path.join(d, "o")])
        self.assertIn("no archive at", str(e.exception))


def namespace(d, **kw):
    """`run` options for a Check built in the test (no folder emptied, nothing started)."""
    base = dict(budget=460.0, dry_run=False, out=os.path.join(d, "out"), work=os.path.join(d, "w"),
                results=os.path.join(d, "results"), runs=os.path.join(d, "runs"), methods="",
                device="cuda", npz="", stages="", grid_jobs=0, grid_methods="", argv=[])
    opts = argparse.Namespace(**{**base, **kw})
    os.makedirs(opts.out)
    return opts


class TestParts(unittest.TestCase):
    def test_step_flags_are_discovered_from_the_args(self):
        @dataclasses.dataclass
        class Plain:  # no step-compiling flag at all (common.TrainArgs itself has --compile)
            lr: float = arg(0.1, "learning rate")

        @dataclasses.dataclass
        class Opt(common.TrainArgs):
            compile: bool = arg(False, "torch.compile the step")

        @dataclasses.dataclass
        class On(common.TrainArgs):
            compile: bool = arg(True, "torch.compile the step")

        @dataclasses.dataclass
        class Modes(common.TrainArgs):
            compile: str = arg("none", "mode", choices=["none", "default", "reduce-overhead"])

        self.assertEqual(gpu_check.step_variants(Plain), ([], []))
        self.assertEqual(gpu_check.step_variants(common.TrainArgs), ([], [("compile", ["--compile"])]))
        self.assertEqual(gpu_check.step_variants(Opt), ([], [("compile", ["--compile"])]))
        self.assertEqual(gpu_check.step_variants(On),
                         (["--no-compile"], [("compile", ["--compile"])]))
        self.assertEqual(gpu_check.step_variants(Modes),
                         ([], [("compile=default", ["--compile", "default"]),
                               ("compile=reduce-overhead", ["--compile", "reduce-overhead"])]))

    def test_resume_comparison(self):
        d = tmpdir(self)
        rows = [{"epoch": 1, "lr": 0.1, "loss": 2.0, "acc/net": 40.0, "sec": 1.0},
                {"epoch": 2, "lr": 0.1, "loss": 1.5, "acc/net": 50.0, "sec": 1.0}]

        def make(name, rows, acc):
            os.makedirs(os.path.join(d, name), exist_ok=True)
            lines = "".join(json.dumps(r) + "\n" for r in rows)
            write(os.path.join(d, name, "metrics.jsonl"), lines)
            final = {"test_acc": acc, "models": {"net": acc}}
            write(os.path.join(d, name, "final.json"), json.dumps(final))
            return os.path.join(d, name)
        full = make("full", rows, 50.0)
        same = gpu_check.compare_runs(full, make("same", [dict(r, sec=9.0) for r in rows], 50.0))
        # timings are not compared
        self.assertEqual((same["exact"], same["within_tolerance"]), (True, True))
        near_rows = [rows[0], dict(rows[1], loss=1.5 * (1 + 1e-5))]
        near = gpu_check.compare_runs(full, make("near", near_rows, 50.0))
        self.assertEqual((near["exact"], near["within_tolerance"], near["max_diff_key"]),
                         (False, True, "loss"))
        far_rows = [rows[0], dict(rows[1], **{"acc/net": 51.0})]
        far = gpu_check.compare_runs(full, make("far", far_rows, 51.0))
        self.assertEqual((far["exact"], far["within_tolerance"]), (False, False))
        short = gpu_check.compare_runs(full, make("short", rows[:1], 50.0))
        self.assertFalse(short["within_tolerance"])

    def test_a_failing_stage_is_recorded_and_the_next_runs_and_the_budget_holds(self):
        opts = namespace(tmpdir(self), budget=100.0, dry_run=True, device="cpu")
        check = gpu_check.Check(opts)
        seen = []
        with redirect_stdout(io.StringIO()):
            check.stage("steps", lambda deadline: 1 / 0, 50)
            check.stage("bench",
                        lambda deadline: seen.append(deadline - time.time()) or {"status": "ok"},
                        500)
            check.end = time.time() + gpu_check.RESERVE_S + 2  # (almost) no time left: not started
            check.stage("grid", lambda deadline: self.fail("started without time"), 100)
        saved = load(os.path.join(opts.out, "summary.json"))["stages"]
        self.assertEqual(saved["steps"]["status"], "failed")
        self.assertIn("ZeroDivisionError", saved["steps"]["error"])
        self.assertEqual(saved["bench"]["status"], "ok")
        self.assertLessEqual(seen[0], 100 - gpu_check.RESERVE_S)  # the slice is cut to the budget
        self.assertEqual(saved["grid"]["status"], "skipped")

    def test_grid_starts_only_runs_projected_to_finish(self):
        opts = namespace(tmpdir(self))
        check = gpu_check.Check(opts)
        methods = ["baseline", "dml", "one", "pcl"]
        self.assertEqual(check.grid_plan("short", methods, 200)[0], methods)  # no timing: all start

        def row(m, ms, ev, arch="resnet32"):
            return {"method": m, "arch": arch, "device": "cuda", "ms_per_step": ms, "eval_s": ev,
                    "eval_images": 10000}
        # 30 epochs x (391 steps x ms + eval) + 20 s: baseline 84.7 s, dml 146.3 s, pcl 504.4 s;
        # one has no resnet32 timing
        rows = [row("baseline", 5.0, 0.2), row("dml", 10.0, 0.3), row("pcl", 40.0, 0.5),
                row("one", 1.0, 0.1, arch="wrn20_8")]
        os.makedirs(os.path.join(opts.results, "gpu-check"))  # the last ingested check
        write(os.path.join(opts.results, "gpu-check", "summary.json"),
              json.dumps({"stages": {"steps": {"rows": rows}}}))
        chosen, plan = check.grid_plan("short", methods, 200)  # room: 2 x 0.8 x 200 s
        self.assertEqual(chosen, ["baseline", "dml"])
        self.assertAlmostEqual(plan["projected_s"]["baseline"], 30 * (391 * 0.005 + 0.2) + 20,
                               places=1)
        self.assertEqual((plan["not_started"], plan["timing_from"]),
                         (["one", "pcl"], "results/gpu-check/summary.json"))
        self.assertEqual(check.grid_plan("short", methods, 40)[0], [])
        # this check's own timing comes first
        check.summary["stages"]["steps"] = {"rows": [row("pcl", 1.0, 0.1)]}
        run = os.path.join(opts.runs, "short", "one-resnet32-cifar10-jpeg-seed0")
        os.makedirs(run)
        write(os.path.join(run, "checkpoint.pt"), b"x")
        chosen, plan = check.grid_plan("short", methods, 40)
        self.assertEqual(chosen, ["one", "pcl"])  # an unfinished run always continues
        self.assertEqual((plan["timing_from"], plan["continued"]), ("this check", ["one"]))

    def test_missing_commit_is_filled_in_only_where_there_is_none(self):
        here = {"commit": "abc", "dirty": False}
        record = {"grid": "short", "code": {"commit": None, "dirty": None}, "test_acc": 90.0}
        filled = json.loads(gpu_check._fill_commit(json.dumps(record).encode(), here, "f00"))
        self.assertEqual((filled["code"]["commit"], filled["test_acc"]), ("abc", 90.0))
        self.assertIn("f00", filled["code"]["note"])
        kept = json.dumps(dict(record, code={"commit": "def", "dirty": True})).encode()
        self.assertEqual(gpu_check._fill_commit(kept, here, "f00"), kept)
        self.assertEqual(gpu_check._fill_commit(b"not json", here, "f00"), b"not json")

    def test_a_child_past_its_time_is_stopped(self):
        lines = []
        t0 = time.time()
        code = "import time; print('up', flush=True); time.sleep(60)"
        rc, timed_out, tail = gpu_check.child(["-c", code], 4,
                                              lambda line, echo=False: lines.append(line), "t")
        self.assertLess(time.time() - t0, 20)
        self.assertTrue(timed_out)
        self.assertNotEqual(rc, 0)
        self.assertEqual(tail[0], "up")
        self.assertEqual(tail[-1], "KeyboardInterrupt")  # SIGINT first: the checkpoint is kept
        self.assertEqual(lines[0], "  [t] up")

    def test_bad_command_lines_stop_with_one_line(self):
        d = tmpdir(self)
        used = os.path.join(d, "used")
        os.makedirs(used)
        write(os.path.join(used, "notes.txt"), "")
        dry = ["run", "--dry-run", "--device", "cpu"]
        cases = [(["run", "--device", "cpu", "--out", os.path.join(d, "o")],
                  "--dry-run gives the CPU"),
                 (dry + ["--out", used], "did not write (notes.txt)"),
                 (dry + ["--stages", "steps,nosuch"], "--stages nosuch: not a stage"),
                 (dry + ["--grid-methods", "pcl,dmll"], "dmll: not a method"),
                 (dry + ["--out", os.path.join(d, "o2"), "--work", used], "not a scratch folder"),
                 (["ingest", os.path.join(d, "nothing")], "holds no summary.json")]
        for argv, msg in cases:
            p = run_script("tools/gpu_check.py", *argv, timeout=60)
            self.assertEqual(p.returncode, 1, argv)
            self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
            self.assertIn(msg, p.stderr)
        self.assertEqual(os.listdir(used), ["notes.txt"])  # nothing removed
        self.assertFalse(os.path.exists(os.path.join(d, "o")))


if __name__ == "__main__":
    unittest.main()
