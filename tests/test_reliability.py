"""Resume exactly, survive interruption, stop cleanly on a numerical fault.

Exact resume is checked for every method file that exists among METHODS (missing ones are printed, never
silently passed); the rest uses baseline.py, since the loop and checkpoint code are shared (common.fit).
"""
import contextlib
import dataclasses
import importlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import unittest
from unittest import mock

import torch

from helpers import ROOT, tiny, tmpdir

import baseline
import common
import dml

METHODS = ["baseline", "dml", "pcl", "ffsd"]
PRESENT = [m for m in METHODS if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
# 3 steps per epoch, 2 epochs: the LR milestone (epoch 2 at --lr-decay-at 0.5) falls after the stop.
SMALL = dict(subset=96, test_subset=50, batch_size=32, epochs=2, lr_decay_at="0.5")
TIMING = ("sec", "images_per_s")  # the only fields allowed to differ between two identical runs


def quiet(fn, *a, **kw):
    """Call fn with stdout captured; returns (result, printed text)."""
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        result = fn(*a, **kw)
    return result, buf.getvalue()


def checkpoint(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def error_line(testcase, fn, *a):
    """Run fn, expecting a one-line `error: ...` stop; returns the line."""
    with testcase.assertRaises(SystemExit) as cm:
        quiet(fn, *a)
    msg = str(cm.exception.code)
    testcase.assertTrue(msg.startswith("error: "), msg)
    testcase.assertNotIn("\n", msg)
    return msg


class ExactResume(unittest.TestCase):
    def test_stop_after_then_resume_is_bit_identical_to_one_run(self):
        print(f"exact resume covers: {', '.join(PRESENT)}; not present yet: "
              f"{', '.join(m for m in METHODS if m not in PRESENT) or 'none'}", file=sys.stderr)
        self.assertIn("baseline", PRESENT)
        self.assertIn("dml", PRESENT)
        for name in PRESENT:
            with self.subTest(method=name):
                method = importlib.import_module(name)
                straight = tiny(method.Args, self, **SMALL)
                final, _ = quiet(method.main, straight)
                # The same run in two invocations: stop after epoch 1, then --resume.
                first = tiny(method.Args, self, stop_after=1, **SMALL)
                stopped, printed = quiet(method.main, first)
                self.assertEqual(stopped["stopped_after_epoch"], 1)
                self.assertEqual(checkpoint(first.out)["epoch"], 1)
                self.assertFalse(os.path.exists(os.path.join(first.out, "final.json")))
                self.assertIn("continue with: ", printed)
                resumed, printed = quiet(method.main, dataclasses.replace(first, stop_after=0, resume=True))
                self.assertIn("resumed from", printed)
                for key in ("test_acc", "best_test_acc", "best_epoch", "models"):
                    self.assertEqual(resumed[key], final[key], key)
                self.assertEqual(rows(first.out), rows(straight.out))  # losses and accuracies of every epoch
                a, b = checkpoint(straight.out), checkpoint(first.out)
                self.assertEqual(a["model"].keys(), b["model"].keys())
                for k in a["model"]:  # weights and BN buffers
                    self.assertTrue(torch.equal(a["model"][k], b["model"][k]), k)
                for opt in a["optimizers"]:  # momentum buffers and learning rates
                    sa, sb = a["optimizers"][opt], b["optimizers"][opt]
                    self.assertEqual([g["lr"] for g in sa["param_groups"]], [g["lr"] for g in sb["param_groups"]])
                    for i in sa["state"]:
                        for k, v in sa["state"][i].items():
                            self.assertTrue(torch.equal(v, sb["state"][i][k]) if torch.is_tensor(v) else v == sb["state"][i][k])
                self.assertTrue(torch.equal(a["gen"], b["gen"]))  # the data stream is where it would have been

    def test_printed_resume_command_parses_back_to_the_same_arguments(self):
        args = tiny(dml.Args, self, lr=0.05, nesterov=False, temperature=2.5, update="sequential", stop_after=3,
                    out=os.path.join(tmpdir(self), "dir with space"))
        run = common.Run(args, "dml", torch.device("cpu"), None, args.out, amp=False, channels_last=False)
        argv = shlex.split(common.resume_command(run))
        self.assertEqual(argv[1], "dml.py")
        self.assertEqual(common.parse_args(dml.Args, argv[2:]), dataclasses.replace(args, resume=True))


class Interruption(unittest.TestCase):
    def test_failed_save_leaves_previous_checkpoint(self):
        args = tiny(baseline.Args, self, **SMALL)
        real_save, calls = torch.save, []

        def save_then_fail_on_second_call(obj, path):
            calls.append(path)
            if len(calls) == 1:
                return real_save(obj, path)
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")

        with mock.patch.object(torch, "save", save_then_fail_on_second_call):
            msg = error_line(self, baseline.main, args)
        self.assertEqual(len(calls), 2)
        self.assertIn("cannot write checkpoint", msg)
        self.assertIn("No space left on device", msg)
        self.assertEqual(checkpoint(args.out)["epoch"], 1)  # the epoch-1 checkpoint, intact and loadable
        self.assertEqual(sorted(os.listdir(args.out)), ["checkpoint.pt", "config.json", "metrics.jsonl"])

    def test_ctrl_c_during_save_keeps_previous_checkpoint_and_reaches_caller(self):
        path = os.path.join(tmpdir(self), "checkpoint.pt")
        common.save_checkpoint(path, {"epoch": 1})
        with mock.patch.object(torch, "save", side_effect=KeyboardInterrupt):
            with self.assertRaises(KeyboardInterrupt):  # not turned into an error: fit's handler deals with it
                common.save_checkpoint(path, {"epoch": 2})
        self.assertEqual(torch.load(path)["epoch"], 1)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["checkpoint.pt"])

    @unittest.skipIf(os.name == "nt", "sends SIGINT to a child process (POSIX)")
    def test_sigint_exits_130_with_one_resume_line_and_the_command_works(self):
        out = os.path.join(tmpdir(self), "run")
        argv = ["baseline.py", "--arch", "resnet8", "--dataset", "fake", "--subset", "96", "--test-subset", "50",
                "--batch-size", "32", "--epochs", "200", "--device", "cpu", "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        # SIGINT may be ignored in a background job's children; give the child Python's default handling.
        p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(out, "checkpoint.pt")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 130, err)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertRegex(lines[0], r"^interrupted in epoch \d+; the checkpoint of epoch \d+ is kept in .*; resume with: ")
        done = int(lines[0].split("the checkpoint of epoch ")[1].split()[0])
        self.assertGreaterEqual(done, 1)
        self.assertEqual(checkpoint(out)["epoch"], done)
        self.assertNotIn("checkpoint.pt.tmp", os.listdir(out))
        # The printed command continues the run (one more epoch here, so the test stays short).
        cmd = shlex.split(lines[0].split("resume with: ")[1])
        self.assertEqual(cmd[-1], "--resume")
        again = subprocess.run([sys.executable, *cmd[1:], "--stop-after", "1"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn(f"resumed from {os.path.join(out, 'checkpoint.pt')} after epoch {done}", again.stdout)
        self.assertIn(f"stopped after epoch {done + 1} of 200", again.stdout)


class ResumeRefusals(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._dir = __import__("tempfile").TemporaryDirectory()
        cls.args = baseline.Args(arch="resnet8", dataset="fake", device="cpu", out=os.path.join(cls._dir.name, "b"),
                                 epochs=2, stop_after=1, subset=32, test_subset=20, batch_size=16)
        quiet(baseline.main, cls.args)  # a real one-epoch checkpoint of baseline / resnet8 / fake

    @classmethod
    def tearDownClass(cls):
        cls._dir.cleanup()

    def resume(self, module=baseline, **kw):
        args = dataclasses.replace(self.args, resume=True, stop_after=0, **kw)
        if module is not baseline:
            args = module.Args(**{**dataclasses.asdict(args), **kw})
        return error_line(self, module.main, args)

    def broken_copy(self, write):
        out = os.path.join(tmpdir(self), "run")
        os.makedirs(out)
        write(os.path.join(out, "checkpoint.pt"))
        return out

    def test_no_checkpoint(self):
        msg = self.resume(out=tmpdir(self))
        self.assertIn("--resume: no checkpoint at", msg)

    def test_existing_run_without_resume(self):
        msg = error_line(self, baseline.main, dataclasses.replace(self.args, stop_after=0))
        self.assertIn("already holds a run; continue it with --resume", msg)

    def test_corrupt_truncated_and_foreign_files(self):
        with open(os.path.join(self.args.out, "checkpoint.pt"), "rb") as f:
            good = f.read()
        writers = {"garbage": lambda p: open(p, "wb").write(b"\x00not a checkpoint" * 10),
                   "truncated": lambda p: open(p, "wb").write(good[:len(good) // 2]),
                   "empty": lambda p: open(p, "wb").close()}
        for name, write in writers.items():
            with self.subTest(name):
                msg = self.resume(out=self.broken_copy(write))
                self.assertIn("cannot read checkpoint", msg)
                self.assertIn("corrupt or not a checkpoint", msg)
        with self.subTest("a torch file that is not a checkpoint"):
            msg = self.resume(out=self.broken_copy(lambda p: torch.save([1, 2, 3], p)))
            self.assertIn("is from another run (unknown)", msg)

    def test_another_method_arch_or_dataset(self):
        msg = self.resume(dml)
        self.assertIn("is from another run (method baseline, arch resnet8, dataset fake, num_classes 10), "
                      "not this one (method dml, arch resnet8", msg)
        msg = self.resume(arch="resnet20")
        self.assertIn("not this one (method baseline, arch resnet20,", msg)
        # The same run's checkpoint offered to a folder data set (10 classes of one 32x32 image each).
        from torchvision.io import write_png
        root = tmpdir(self)
        for split in ("train", "test"):
            for c in range(10):
                os.makedirs(os.path.join(root, split, f"c{c}"))
                write_png(torch.full((3, 32, 32), 20 * c, dtype=torch.uint8), os.path.join(root, split, f"c{c}", "0.png"))
        msg = self.resume(dataset="folder", data_dir=root, subset=0, test_subset=0)
        self.assertIn("not this one (method baseline, arch resnet8, dataset folder, num_classes 10)", msg)

    def test_changed_model_flag_is_named(self):
        args = tiny(dml.Args, self, subset=32, test_subset=20, batch_size=16, stop_after=1)
        quiet(dml.main, args)
        msg = error_line(self, dml.main, dataclasses.replace(args, resume=True, num_peers=3))
        self.assertIn("do not fit this model", msg)
        self.assertIn("--num-peers 2 -> 3", msg)

    def test_failed_resume_keeps_the_config(self):
        with open(os.path.join(self.args.out, "config.json")) as f:
            before = f.read()
        self.resume(arch="resnet20")
        with open(os.path.join(self.args.out, "config.json")) as f:
            self.assertEqual(f.read(), before)


class CrossDeviceResume(unittest.TestCase):
    def test_checkpoint_keeps_the_run_device_and_a_cuda_checkpoint_resumes_on_cpu(self):
        args = tiny(baseline.Args, self, subset=32, test_subset=20, batch_size=16, epochs=2,
                    stop_after=1)
        quiet(baseline.main, args)
        path = os.path.join(args.out, "checkpoint.pt")
        ck = torch.load(path, weights_only=False)
        self.assertEqual((ck["device"], ck["device_rng"]), ("cpu", None))
        self.assertNotIn("cuda_rng", ck)  # no longer every visible GPU's RNG state
        # The checkpoint as a CUDA run writes it: a CUDA generator's state (seed and offset, 16
        # bytes, which a CPU generator cannot take), the GPU's RNG state, the LR as a tensor.
        cuda_state = torch.zeros(16, dtype=torch.uint8)
        ck.update(device="cuda", gen=cuda_state, device_rng=cuda_state)
        for g in ck["optimizers"]["sgd"]["param_groups"]:
            g["lr"] = torch.tensor(g["lr"], dtype=torch.float32)
        torch.save(ck, path)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            resumed = dataclasses.replace(args, resume=True, stop_after=0)
            final, printed = quiet(baseline.main, resumed)
        warnings = [line for line in err.getvalue().splitlines() if line.startswith("warning:")]
        self.assertEqual(len(warnings), 1, err.getvalue())
        self.assertRegex(warnings[0], r"^warning: --resume: .* was written on cuda, this run is "
                                      r"on cpu: weights, optimiser state and schedule continue, "
                                      r".* not bit-for-bit")
        self.assertIn("resumed from", printed)
        self.assertEqual(final["epochs"], 2)
        history = rows(args.out)
        self.assertEqual(history[0], {k: v for k, v in ck["history"][0].items() if k not in TIMING})
        self.assertAlmostEqual(history[1]["lr"], 0.01, places=12)
        after = checkpoint(args.out)
        self.assertEqual(after["device"], "cpu")
        self.assertIsInstance(after["optimizers"]["sgd"]["param_groups"][0]["lr"], float)

    def test_checkpoint_of_an_older_version_is_one_line(self):
        first = tiny(baseline.Args, self, stop_after=1, **SMALL)
        quiet(baseline.main, first)
        path = os.path.join(first.out, "checkpoint.pt")
        ck = torch.load(path, weights_only=False)
        del ck["device"], ck["device_rng"]  # how checkpoints looked before the device was recorded
        torch.save(ck, path)
        with self.assertRaises(SystemExit) as e:
            quiet(baseline.main, dataclasses.replace(first, stop_after=0, resume=True))
        self.assertRegex(str(e.exception), r"^error: --resume: checkpoint .* was written by an older "
                                           r"version of this repository .*; start the run again$")


class NumericalFaults(unittest.TestCase):
    def test_nan_in_epoch_2_names_epoch_step_term_and_keeps_epoch_1(self):
        args = tiny(baseline.Args, self, **SMALL)
        run, _ = quiet(common.setup, args, "baseline")
        model = baseline.build_model(args, run.num_classes)
        optimizers = baseline.build_optimizers(model, args)

        def poisoned_step(model, optimizers, x, y, epoch, step, run):
            if (epoch, step) == (1, 4):  # the 2nd step of epoch 2 (3 steps per epoch)
                with torch.no_grad():
                    model.fc.weight[0, 0] = float("nan")
            return baseline.train_step(model, optimizers, x, y, epoch, step, run)

        msg = error_line(self, common.fit, run, model, optimizers, poisoned_step, baseline.evaluate, "net")
        self.assertIn("non-finite loss ('loss', 'ce') at epoch 2, step 2 of 3", msg)
        self.assertIn("the checkpoint of epoch 1 is kept", msg)
        ck = checkpoint(args.out)
        self.assertEqual(ck["epoch"], 1)
        self.assertTrue(all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point()))
        self.assertEqual(len(rows(args.out)), 1)
        self.assertFalse(os.path.exists(os.path.join(args.out, "final.json")))

    def test_nan_in_first_epoch_says_no_checkpoint(self):
        args = tiny(baseline.Args, self, **SMALL)
        run, _ = quiet(common.setup, args, "baseline")
        model = baseline.build_model(args, run.num_classes)
        with torch.no_grad():
            model.fc.bias.fill_(float("inf"))
        msg = error_line(self, common.fit, run, model, baseline.build_optimizers(model, args), baseline.train_step,
                         baseline.evaluate, "net")
        self.assertIn("at epoch 1, step 1 of 3", msg)
        self.assertIn("no checkpoint was written", msg)
        self.assertFalse(os.path.exists(os.path.join(args.out, "checkpoint.pt")))

    def test_exploding_lr_stops_in_epoch_2_with_epoch_1_kept(self):
        # A real blow-up, not a planted NaN: the LR jumps from 0.1 to 1e29 at epoch 2 (x --lr-gamma at the
        # milestone) and the loss overflows within epoch 2's three steps.
        args = tiny(baseline.Args, self, **{**SMALL, "lr_gamma": 1e30})
        msg = error_line(self, baseline.main, args)
        self.assertRegex(msg, r"^error: non-finite loss \('loss', 'ce'\) at epoch 2, step [123] of 3; stopped, "
                              r"the checkpoint of epoch 1 is kept in ")
        self.assertEqual(checkpoint(args.out)["epoch"], 1)


class BeforeTraining(unittest.TestCase):
    """Ctrl-C or bad data before the first epoch: one line, and no half-made run folder (--out is
    created only when training starts)."""
    # A real process whose data loading is made slow (the signal lands there); it says when it is.
    DRIVER = ("import sys, time, common, baseline\n"
              "def slow(*a, **kw):\n"
              "    print('loading', flush=True)\n"
              "    time.sleep(120)\n"
              "common.load_data = slow\n"
              "baseline.main(common.parse_args(baseline.Args, sys.argv[1:]))\n")

    @unittest.skipIf(os.name == "nt", "sends SIGINT to a child process (POSIX)")
    def test_sigint_while_the_data_loads_is_one_line_and_writes_nothing(self):
        out = os.path.join(tmpdir(self), "run")
        argv = ["--arch", "resnet8", "--dataset", "fake", "--device", "cpu", "--out", out]
        p = subprocess.Popen([sys.executable, "-c", self.DRIVER, *argv], cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.assertEqual(p.stdout.readline(), "loading\n")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 130, err)
        self.assertEqual(err, f"interrupted while loading the data; nothing was written to "
                              f"{out!r}\n")
        self.assertFalse(os.path.exists(out))

    def test_a_data_error_leaves_no_run_folder(self):
        out = os.path.join(tmpdir(self), "run")
        args = baseline.Args(arch="resnet8", dataset="folder", device="cpu", out=out,
                             data_dir=os.path.join(tmpdir(self), "none"))
        self.assertIn("has no train/ folder", error_line(self, baseline.main, args))
        self.assertFalse(os.path.exists(out))
        # a resumed run's folder is left exactly as it was
        os.makedirs(out)
        torch.save({"epoch": 1}, os.path.join(out, "checkpoint.pt"))
        error_line(self, baseline.main, dataclasses.replace(args, resume=True))
        self.assertEqual(os.listdir(out), ["checkpoint.pt"])


if __name__ == "__main__":
    unittest.main()
