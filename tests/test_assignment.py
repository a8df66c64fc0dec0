"""tools/assignment.py and tools/handout.py: the markers are well formed, every reference file passes
its grading tests (and they run every marked region), a generated assignment fails every one of them
with the region's hint and states the graded contract, and a handout holds no line of the answer, and
its checks run. (Wrong solutions: tests/test_mutations.py.)"""
import os
import shutil
import subprocess
import sys
import unittest

from helpers import ROOT, tmpdir

sys.path.insert(0, os.path.join(ROOT, "tools"))
import assignment  # noqa: E402
import handout  # noqa: E402

GRADED = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]


def source(method):
    with open(os.path.join(ROOT, f"{method}.py")) as f:
        return f.read()


def failed(outcome):
    return {name: reason for name, (_, reason) in outcome.items() if reason is not None}


class TestMarkers(unittest.TestCase):
    def test_regions_well_formed_and_named_once(self):
        for method in GRADED:
            found = assignment.regions(source(method), f"{method}.py")
            names = [r["name"] for r in found]
            self.assertGreaterEqual(len(found), 3, method)
            self.assertEqual(len(names), len(set(names)), f"{method}: a region name is used twice")
            self.assertIn("loss", names, method)

    def test_bad_markers_are_one_line_errors(self):
        good = ("def f():\n    # ===== BEGIN ALGO: x =====\n    return 1\n"
                "    # ===== END ALGO =====\n")
        found = [(r["begin"], r["end"], r["owner"], r["name"]) for r in assignment.regions(good)]
        self.assertEqual(found, [(1, 3, "f", "x")])
        for text, says in ((good.replace("    # ===== END ALGO =====\n", ""), "without an END"),
                           (good.replace("    return 1\n", ""), "holds no code"),
                           (good.replace("    # ===== END", "# ===== END"), "indented unlike"),
                           ("# ===== END ALGO =====\n", "without a BEGIN")):
            with self.assertRaises(SystemExit) as cm:
                assignment.regions(text, "f.py")
            self.assertIn(says, str(cm.exception))
            self.assertTrue(str(cm.exception).startswith("error: f.py:"))


class TestGrading(unittest.TestCase):
    def test_reference_files_pass_and_run_every_region(self):
        for method in GRADED:
            path = os.path.join(ROOT, f"{method}.py")
            hit = set()

            def local(frame, event, arg):
                if event == "line":
                    hit.add(frame.f_lineno)
                return local

            sys.settrace(lambda frame, *_: local if frame.f_code.co_filename == path else None)
            try:
                outcome = assignment.grade(method, path)
            finally:
                sys.settrace(None)
            self.assertGreaterEqual(len(outcome), 3, method)
            self.assertEqual(failed(outcome), {}, method)
            for r in assignment.regions(source(method)):
                inside = set(range(r["begin"] + 2, r["end"] + 1))  # 1-based, between the markers
                self.assertTrue(inside & hit, f"{method}.py {r['name']!r}: no grading test runs it")

    def test_assignment_fails_with_the_region_hints(self):
        for method in GRADED:
            out = os.path.join(tmpdir(self), f"{method}.py")
            assignment.make(method, out)
            with open(out) as f:
                text = f.read()
            found = assignment.regions(text)
            self.assertEqual(text.count("raise NotImplementedError("), len(found), method)
            reference = assignment.regions(source(method))
            self.assertEqual([r["name"] for r in found], [r["name"] for r in reference])
            outcome = assignment.grade(method, out)
            bad = failed(outcome)
            self.assertEqual(set(bad), set(outcome), f"{method}: a blank file passes a grading test")
            for item in assignment.CONTRACT[method]:  # the graded names, in the student's file
                self.assertIn(" ".join(item.split()[:4]), " ".join(text.replace("#", "").split()))
            for name, reason in bad.items():
                hint = r"^NotImplementedError: [\w.]+ \[[^\]]+\]: \S"
                self.assertRegex(reason, hint, f"{method} {name}")

    def test_only_blanks_the_named_region(self):
        out = os.path.join(tmpdir(self), "pcl.py")
        assignment.make("pcl", out, only=["phi(g)"])
        bad = failed(assignment.grade("pcl", out))
        steps = ["ema_per_epoch", "mean_teacher_gets_no_gradient",  # train_step calls ema_decay
                 "peer_j_and_mean_peer_k_see_their_own_view", "rampup_weight_from_the_epoch",
                 "mean_updated_after_the_optimiser_step", "mean_teacher_in_train_mode",
                 "phi_capped_by_ema_decay", "returns_the_loss_logs"]
        phi = "TestTemporalMean.test_phi_schedule"
        self.assertEqual(set(bad), {phi} | {f"TestTrainStep.test_{t}" for t in steps})
        self.assertIn("ema_decay [phi(g)]: the decay of update g, see the header", bad[phi])
        with self.assertRaises(SystemExit) as cm:
            assignment.make("pcl", out, only=["nope"])
        self.assertIn("no region 'nope' in pcl.py; regions: ensemble teacher, loss,",
                      str(cm.exception))

    def test_a_file_that_does_not_import_is_one_failure(self):
        path = os.path.join(tmpdir(self), "dml.py")
        with open(path, "w") as f:
            f.write(source("dml").replace("def dml_loss(logits, y, args):", "def dml_loss(logits)"))
        outcome = assignment.grade("dml", path)
        self.assertEqual(list(outcome), ["import"])
        self.assertRegex(outcome["import"][1], r"^SyntaxError \(line \d+\): ")


def check(folder, *argv):
    """check.py of a handout, run there: (exit status, output)."""
    p = subprocess.run([sys.executable, "check.py", *argv], cwd=folder, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stdout + p.stderr


class TestHandout(unittest.TestCase):
    def test_lab1_line_is_the_labs_command(self):
        with open(os.path.join(ROOT, "docs", "lab1.md")) as f:
            lab = f.read().splitlines()
        for method in GRADED:
            md = handout.assignment_md(method, source(method))
            self.assertIn(handout.longer_run(method), md.splitlines(), method)
            self.assertEqual(handout.longer_run(method) in lab, method in handout.LAB1, method)
            self.assertEqual("Lab 1" in md, method in ("baseline", "dml", "one", "okddip"),
                             f"{method}: Lab 1 trains the baseline, DML, ONE and OKDDip")
            self.assertIn("(a minute or two)", md)  # as check.py says

    def test_no_line_of_the_answer_and_the_checks_run(self):
        for method in GRADED[1:]:
            out = os.path.join(tmpdir(self), method)
            handout.write(method, out)
            self.assertEqual(set(os.listdir(out)), {f"{method}.py", "common.py", "beyond.py", "requirements.txt",
                                                    "ASSIGNMENT.md", "check.py"})  # beyond.py: common imports it
            text = source(method).splitlines()
            inside = {i for r in assignment.regions(source(method)) for i in range(r["begin"] + 1, r["end"])}
            answer = {text[i].strip() for i in inside if assignment._is_code(text[i])}
            answer -= {ln.strip() for i, ln in enumerate(text) if i not in inside}  # the file's own
            shared = ("baseline.py", "common.py", "beyond.py", "tools/student_check.py")  # every method's
            for name in shared:  # (`with torch.no_grad():`, `loss.backward()`): syntax, not the answer
                with open(os.path.join(ROOT, name)) as f:
                    answer -= {ln.strip() for ln in f}
            for name in os.listdir(out):
                with open(os.path.join(out, name)) as f:
                    leaked = answer & {ln.strip() for ln in f}
                self.assertEqual(leaked, set(), f"{method} handout: {name} holds lines of the answer")
            rc, said = check(out, "--quick")
            self.assertEqual(rc, 1, said)
            self.assertRegex(said, r"not implemented: \w", method)
            self.assertNotIn("Traceback", said, method)
            shutil.copy(os.path.join(ROOT, f"{method}.py"), out)  # the reference passes the checks
            rc, said = check(out, *(() if method == "dml" else ("--quick",)))  # one full run: time
            self.assertEqual(rc, 0, said)
            self.assertIn("every check passes", said)
            self.assertIn("learns: " if method == "dml" else "(4, 10)", said)

    def test_refuses_a_used_folder_or_one_beside_the_answer(self):
        used = tmpdir(self)
        with open(os.path.join(used, "x"), "w") as f:
            f.write("x")
        for out, says in ((used, "is not an empty folder"), (os.path.join(ROOT, "docs", "hw"), "not ignored"),
                          (os.path.join(ROOT, "hw"), "not ignored")):
            with self.assertRaises(SystemExit) as cm:
                handout.check_out(out)
            self.assertIn(says, str(cm.exception))
            self.assertEqual(len(str(cm.exception).splitlines()), 1)
        handout.check_out(os.path.join(ROOT, "handout", "pcl"))  # ignored by git: allowed
        with self.assertRaises(SystemExit) as cm:
            handout.main(["nope", "x"])
        self.assertIn("unknown method 'nope'; choices: baseline, dml,", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
