"""The teaching pages point at code that exists. In docs/tutorial.md and docs/instructor.md a code pointer
is written `` `file.py`: `code` ``: the file must exist and contain that code (whitespace-insensitive, so
re-wrapping a line does not break it); every other backticked `path.py` or `.md` must exist; every
relative link must resolve; every question of the tutorial (Q) and of the labs (L1.n, L2.n) has its answer in the
instructor's page, and neither student page carries answers; the instructor's page lists every line of
a marked region's code (an assignment's answer) that the tutorial quotes. Text only: fast."""
import os
import re
import sys
import unittest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import assignment  # noqa: E402

LABS = ["docs/lab1.md", "docs/lab2.md"]
PAGES = ["docs/tutorial.md", "docs/instructor.md", *LABS]
POINTER = re.compile(r"`([\w./-]+\.\w+)`: `([^`]+)`")
PATH = re.compile(r"`([\w./-]+\.(?:py|md))`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
QUESTION = re.compile(r"\*\*(Q\d+\.\d+)\*\*")


def read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def squash(text):
    return " ".join(text.split())


def pointers(page):
    """[(file, code)] of the page's code pointers."""
    return POINTER.findall(re.sub(r"``.*?``", "", read(page)))


def broken(page, text=None):
    """Every unresolved pointer, path and link of the page (or of `text` as if it were that page), as one
    line each."""
    text, bad = read(page) if text is None else text, []
    text = re.sub(r"``.*?``", "", text)  # ``...`` spans show the notation itself
    for path, code in POINTER.findall(text):
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            bad.append(f"{page}: `{path}` does not exist (pointer `{code}`)")
        elif squash(code) not in squash(read(path)):
            bad.append(f"{page}: `{code}` does not occur in {path}")
    for path in PATH.findall(text):
        if not os.path.exists(os.path.join(ROOT, path)):
            bad.append(f"{page}: `{path}` does not exist")
    for link in LINK.findall(text):
        if "://" not in link and not os.path.exists(os.path.join(ROOT, os.path.dirname(page), link)):
            bad.append(f"{page}: link ({link}) does not resolve")
    return bad


def handout_view(path):
    """The file's text without the code lines of its marked regions (what a student's copy keeps)."""
    lines = read(path).splitlines()
    inside = {i for r in assignment.regions("\n".join(lines), path) for i in range(r["begin"] + 1, r["end"])
              if not lines[i].strip().startswith("#")}
    return "\n".join(ln for i, ln in enumerate(lines) if i not in inside)


def quoted_answers(text):
    """The pointers of `text` into a method file that quote code of a marked region only."""
    methods = {f"{m}.py" for m in assignment.METHODS}
    return {(path, code) for path, code in POINTER.findall(re.sub(r"``.*?``", "", text))
            if path in methods and squash(code) not in squash(handout_view(path))}


def withheld_paragraph():
    text = read("docs/instructor.md")
    return text.split("**What the tutorial quotes.**", 1)[1].split("\n\n", 1)[0]


def lab_questions():
    """Question n of Lab k is L<k>.<n>."""
    asked = []
    for k, page in enumerate(LABS, 1):
        section = read(page).split("## Questions", 1)[1].split("\n## ", 1)[0]
        asked += [f"L{k}.{n}" for n in re.findall(r"^(\d+)\. ", section, re.M)]
    return asked


class CodePointers(unittest.TestCase):
    def test_every_pointer_path_and_link_resolves(self):
        for page in PAGES:
            with self.subTest(page):
                self.assertEqual(broken(page), [])

    def test_the_tutorial_points_at_every_method(self):
        files = {path for path, _ in pointers("docs/tutorial.md")}
        for name in ["baseline.py", "common.py", "dml.py", "one.py", "okddip.py", "pcl.py", "ffsd.py"]:
            self.assertIn(name, files, f"docs/tutorial.md has no code pointer into {name}")

    def test_a_broken_pointer_is_reported(self):
        """The checker itself: a pointer to code that is not there, a missing file, a dead link."""
        text = ("`pcl.py`: `def ema_decay(g, beta)` `pcl.py`: `def no_such_function(` `gone.py`: `x` "
                "[a](nowhere.md)")
        page = "docs/probe.md"
        self.assertEqual(broken(page, text), [
            f"{page}: `def no_such_function(` does not occur in pcl.py",
            f"{page}: `gone.py` does not exist (pointer `x`)",
            f"{page}: `gone.py` does not exist",
            f"{page}: link (nowhere.md) does not resolve"])


class QuotedAnswers(unittest.TestCase):
    def test_the_instructor_page_lists_the_region_code_the_tutorial_quotes(self):
        """A tutorial pointer to region code quotes the reference solution: the instructor's page must
        name exactly those lines, so its advice on when to hand out the tutorial stays true."""
        quoted, listed = quoted_answers(read("docs/tutorial.md")), quoted_answers(withheld_paragraph())
        self.assertEqual(sorted(quoted - listed), [], "quoted by docs/tutorial.md, not listed in "
                         "docs/instructor.md's 'What the tutorial quotes'")
        self.assertEqual(sorted(listed - quoted), [], "listed in docs/instructor.md, no longer quoted")

    def test_a_comment_or_signature_is_no_quote(self):
        """The check itself: region code counts, a region's `# ALGO:` comment and a signature do not."""
        text = ("`pcl.py`: `return min(1.0 - 1.0 / (g + 1), beta)` `pcl.py`: `def ema_decay(g, beta)` "
                "`pcl.py`: `# ALGO: CE(z_e, y): the ensemble head's only loss` `common.py`: `def fit(`")
        self.assertEqual(quoted_answers(text), {("pcl.py", "return min(1.0 - 1.0 / (g + 1), beta)")})


class Answers(unittest.TestCase):
    def test_every_question_has_an_answer_apart(self):
        asked = QUESTION.findall(read("docs/tutorial.md")) + lab_questions()
        self.assertGreaterEqual(len(asked), 20)
        self.assertEqual(len(asked), len(set(asked)), "question numbers are unique")
        answered = re.findall(r"^\*\*([QL][\d.]+)\*\*", read("docs/instructor.md"), re.M)
        self.assertEqual(sorted(answered), sorted(asked), "docs/instructor.md answers exactly the questions")

    def test_student_pages_carry_no_answers(self):
        for page in ["docs/tutorial.md", *LABS]:
            text = read(page)
            self.assertFalse("instructor.md" in text, f"{page} links the answers")
            self.assertFalse(re.search(r"(?i)\banswer:", text), f"{page} gives an answer")


if __name__ == "__main__":
    unittest.main()
