"""The teaching pages point at code that exists. In docs/tutorial.md and docs/instructor.md a code pointer
is written `` `file.py`: `code` ``: the file must exist and contain that code (whitespace-insensitive, so
re-wrapping a line does not break it); every other backticked `path.py` or `.md` must exist; every
relative link must resolve; every question of the tutorial (Q) and of Lab 1 (L) has its answer in the
instructor's page, and neither student page carries answers. Text only: fast."""
import os
import re
import unittest

from helpers import ROOT

PAGES = ["docs/tutorial.md", "docs/instructor.md", "docs/lab1.md"]
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


def lab_questions():
    section = read("docs/lab1.md").split("## Questions", 1)[1].split("\n## ", 1)[0]
    return [f"L{n}" for n in re.findall(r"^(\d+)\. ", section, re.M)]


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


class Answers(unittest.TestCase):
    def test_every_question_has_an_answer_apart(self):
        asked = QUESTION.findall(read("docs/tutorial.md")) + lab_questions()
        self.assertGreaterEqual(len(asked), 20)
        self.assertEqual(len(asked), len(set(asked)), "question numbers are unique")
        answered = re.findall(r"^\*\*([QL][\d.]+)\*\*", read("docs/instructor.md"), re.M)
        self.assertEqual(sorted(answered), sorted(asked), "docs/instructor.md answers exactly the questions")

    def test_student_pages_carry_no_answers(self):
        for page in ["docs/tutorial.md", "docs/lab1.md"]:
            text = read(page)
            self.assertFalse("instructor.md" in text, f"{page} links the answers")
            self.assertFalse(re.search(r"(?i)\banswer:", text), f"{page} gives an answer")


if __name__ == "__main__":
    unittest.main()
