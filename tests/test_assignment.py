"""tools/assignment.py: the markers are well formed, every reference file passes its grading tests
(and they run every marked region), a generated assignment fails them with the region's hint, and a
deliberately wrong solution fails the test about that mistake (the reference file is patched through
its syntax tree, so line wrapping does not matter)."""
import ast
import os
import sys
import unittest

from helpers import ROOT, tmpdir

sys.path.insert(0, os.path.join(ROOT, "tools"))
import assignment  # noqa: E402

GRADED = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]


def source(method):
    with open(os.path.join(ROOT, f"{method}.py")) as f:
        return f.read()


def failed(outcome):
    return {name: reason for name, (_, reason) in outcome.items() if reason is not None}


def patched(testcase, method, function, target, new_line):
    """The method file with `new_line` inserted after the first assignment to `target` inside
    `function`, at that statement's indentation, written to a temporary file: returns its path."""
    text = source(method)
    fn = next(n for n in ast.walk(ast.parse(text))
              if isinstance(n, ast.FunctionDef) and n.name == function)
    node = next((n for n in ast.walk(fn) if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == target for t in n.targets)), None)
    testcase.assertIsNotNone(node, f"no {target!r} = ... in {method}.{function}: patch not applied")
    lines = text.splitlines()
    lines.insert(node.end_lineno, " " * node.col_offset + new_line)
    path = os.path.join(tmpdir(testcase), f"{method}.py")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


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
            bad = failed(assignment.grade(method, out))
            self.assertTrue(bad, f"{method}: the blank assignment passes its grading tests")
            for name, reason in bad.items():
                hint = r"^NotImplementedError: [\w.]+ \[[^\]]+\]: \S"
                self.assertRegex(reason, hint, f"{method} {name}")

    def test_only_blanks_the_named_region(self):
        out = os.path.join(tmpdir(self), "pcl.py")
        assignment.make("pcl", out, only=["phi(g)"])
        bad = failed(assignment.grade("pcl", out))
        steps = ["ema_per_epoch", "mean_teacher_gets_no_gradient",  # train_step calls ema_decay
                 "peer_j_and_mean_peer_k_see_their_own_view",
                 "mean_updated_after_the_optimiser_step"]
        phi = "TestTemporalMean.test_phi_schedule"
        self.assertEqual(set(bad), {phi} | {f"TestTrainStep.test_{t}" for t in steps})
        self.assertIn("ema_decay [phi(g)]: min(1 - 1/(g+1), beta)", bad[phi])
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


class TestWrongSolutions(unittest.TestCase):
    """Each deliberate mistake fails exactly the tests about it."""

    def check(self, path, method, expected):
        bad = failed(assignment.grade(method, path))
        self.assertEqual(set(bad), expected, bad)
        for reason in bad.values():
            self.assertRegex(reason, r"^AssertionError: ")

    def test_dml_without_T_squared(self):
        path = patched(self, "dml", "dml_loss", "kd", "kd = kd / args.temperature ** 2  # mistake")
        self.check(path, "dml", {"TestLoss.test_kd_scaled_by_T_squared"})

    def test_pcl_ensemble_target_not_detached(self):
        path = patched(self, "pcl", "pcl_loss", "target_ens", "target_ens = ens_logits  # mistake")
        self.check(path, "pcl", {"TestLoss.test_ensemble_is_a_detached_target"})

    def test_pcl_mean_instead_of_sum_over_peers(self):
        mean = "loss = ce_ens + (loss - ce_ens) / logits.shape[0]  # mistake"
        path = patched(self, "pcl", "pcl_loss", "loss", mean)
        self.check(path, "pcl", {"TestLoss.test_total"})

    def test_okddip_detached_targets(self):
        path = patched(self, "okddip", "okddip_loss", "t", "t = t.detach()  # the mistake")
        self.check(path, "okddip", {"TestLoss.test_nothing_detached",
                                    "TestAttention.test_projections_learn_through_the_targets"})


if __name__ == "__main__":
    unittest.main()
