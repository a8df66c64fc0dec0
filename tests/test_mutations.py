"""The grader catches mistakes: every mutation in tests/mutations.py (a single mistake in the
reference file) fails the grading tests listed for it, with an AssertionError beside the test's
docstring (the property); every grading test is shown failing on at least one mutation; the
equivalent rewrites pass every grading test; docs/assignments.md lists the catalogue."""
import ast
import os
import sys
import unittest

from helpers import ROOT, tmpdir
import mutations

sys.path.insert(0, os.path.join(ROOT, "tools"))
import assignment  # noqa: E402


def grading_tests(method):
    """{`Class.test_name`: its docstring's first paragraph, on one line} for every test in
    tests/grade/test_<method>.py."""
    with open(os.path.join(ROOT, "tests", "grade", f"test_{method}.py")) as f:
        tree = ast.parse(f.read())
    return {f"{c.name}.{fn.name}": " ".join((ast.get_docstring(fn) or "").split("\n\n")[0].split())
            for c in tree.body if isinstance(c, ast.ClassDef)
            for fn in c.body if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")}


class TestCatalogue(unittest.TestCase):
    def mutant(self, method, edits, what):
        with open(os.path.join(ROOT, f"{method}.py")) as f:
            text = mutations.apply(f.read(), edits, f"{method}: {what}")
        path = os.path.join(tmpdir(self), f"{method}.py")
        with open(path, "w") as f:
            f.write(text)
        return path

    def check_method(self, method):
        found = mutations.MUTATIONS[method]
        self.assertGreaterEqual(len(found), 10, f"{method}: fewer than 10 mutations")
        names, caught = grading_tests(method), set()
        for what, edits, catchers in found:
            self.assertTrue(set(catchers) <= set(names), f"{method}: {catchers} are not grading tests")
            outcome = assignment.grade(method, self.mutant(method, edits, what), only=catchers)
            self.assertEqual(set(outcome), set(catchers), f"{method}: {what}: tests not run")
            for test, (doc, reason) in outcome.items():
                self.assertIsNotNone(reason, f"{method}: {what!r} passes {test}")
                self.assertRegex(reason, r"^AssertionError: ", f"{method}: {what}: {test}")
                self.assertTrue(doc, f"{method} {test}: no docstring naming the property")
                self.assertEqual(doc, names[test], f"{method} {test}: the grader prints the docstring's "
                                                   f"first paragraph, whole")
            caught |= set(catchers)
        self.assertEqual(set(names) - caught, set(), f"{method}: grading tests no mutation makes fail")
        for what, edits in mutations.REWRITES[method]:
            outcome = assignment.grade(method, self.mutant(method, edits, what))
            bad = {t: r for t, (_, r) in outcome.items() if r is not None}
            self.assertEqual(bad, {}, f"{method}: the correct rewrite {what!r} fails")

    def test_dml(self):
        self.check_method("dml")

    def test_one(self):
        self.check_method("one")

    def test_okddip(self):
        self.check_method("okddip")

    def test_pcl(self):
        self.check_method("pcl")

    def test_ffsd(self):
        self.check_method("ffsd")

    def test_docs_list_the_catalogue(self):
        self.assertEqual(mutations.documented(), mutations.table(),
                         "docs/assignments.md: run python tests/mutations.py --write")


if __name__ == "__main__":
    unittest.main()
