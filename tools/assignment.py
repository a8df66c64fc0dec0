"""Assignment mode: a handout for students (the method file with its algorithm blanked), and a grader.

The lines a student writes are marked in every method file (docs/assignments.md):

    # ===== BEGIN ALGO: <name> =====          or    # ===== BEGIN ALGO: <name> -- <hint> =====
    ... code and # ALGO: comments ...
    # ===== END ALGO =====

`make` keeps each region's markers and comment lines (the instructions) and replaces its code by
`raise NotImplementedError("<function> [<name>]: <hint and comments>")`, and adds the graded
contract (CONTRACT: the log keys, names and flags the grader reads) under the module docstring.
`handout` writes a folder a student can be given (handout.py: what it holds and leaves out). `grade`
imports a file as the method module and runs tests/grade/test_<method>.py against it; those tests
call only the public functions (<method>_loss on hand-made tensors, build_model, train_step,
evaluate) and read their outputs.

    python tools/assignment.py handout pcl --out handout/pcl     # the student's folder
    python tools/assignment.py grade pcl handout/pcl/pcl.py      # one line per test, then the score
    python tools/assignment.py make pcl --out hw/pcl.py --only "loss,phi(g)"   # the blank file only
    python tools/assignment.py list pcl                          # the marked regions
"""
import argparse
import ast
import importlib.util
import os
import re
import sys
import textwrap
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
METHODS = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]
BEGIN = re.compile(r"^(\s*)# ===== BEGIN ALGO: (.+?)(?: -- (.+?))? =====\s*$")
END = re.compile(r"^(\s*)# ===== END ALGO =====\s*$")
WIDTH = 100
# What train_step returns, in every method's contract.
LOGS = "a non-empty dict of 0-d tensors with 'loss', which fit averages and prints"
# What the grading tests read besides the function signatures: a correct solution must use these names.
OPTIONAL = "evaluate may also return internals (entries named 'int/...'); they are not graded."
CONTRACT = {
    "baseline": ["baseline_loss returns (loss, logs), logs = exactly {'loss', 'ce'}.",
                 f"train_step returns baseline_loss's logs ({LOGS}).",
                 "evaluate returns {'net': logits}.", OPTIONAL],
    "dml": ["dml_loss returns (L, logs); logs has 'loss', 'ce/peer<k>' and 'kd/peer<k>' for k = 1..K "
            "(kd/peer<k> = network k's KD term, already averaged over its K - 1 peers).",
            f"train_step returns dml_loss's logs ({LOGS}).",
            "train_step follows --update (run.args.update): 'joint' = one step of all networks, "
            "'sequential' = the paper's Algorithm 1.",
            "evaluate returns 'peer1'..'peerK' and 'ensemble' (logits).", OPTIONAL],
    "one": ["one_loss returns (loss, logs); logs has 'loss', 'ce/branch<i>', 'kd/branch<i>' "
            "(i = 1..m, unweighted), 'ce/one_e' and 'w' (the weight it was given).",
            f"train_step returns one_loss's logs ({LOGS}; the grader reads 'w').",
            "evaluate returns 'branch1'..'branchm', 'one_e' and 'ensemble' (logits).", OPTIONAL],
    "okddip": ["okddip_loss returns (loss, logs); logs has 'loss', 'ce/peer<a>', 'kd/peer<a>' "
               "(a = 1..m, unweighted), 'ce/leader', 'kd/leader' and 'w' (the weight it was given).",
               f"train_step returns okddip_loss's logs ({LOGS}; the grader reads 'w').",
               "--exclude-self (self.exclude_self in attention): peer a gets weight 0 in its own "
               "target t_a; every row of A still sums to 1.",
               "evaluate returns 'peer1'..'peerm', 'ensemble' and 'leader' (logits).", OPTIONAL],
    "pcl": ["pcl_loss returns (L, logs); logs has 'loss', 'ce/ens', 'ce/peers', 'kd/ens', 'kd/mean' "
            "(unweighted sums over the peers); train_step calls pcl_loss once per step and returns "
            f"its logs ({LOGS}).",
            "--ema-per-epoch (run.args.ema_per_epoch): one temporal-mean update at the last step of "
            "each epoch (step + 1 = a multiple of run.steps_per_epoch) with phi(epoch), none "
            "inside the epoch.",
            "evaluate returns 'peer1'..'peerm', 'pe_teacher', 'mt_peer1'..'mt_peerm' and 'pcl_e' "
            "(logits).", OPTIONAL],
    "ffsd": ["student_loss logs 'ce/student<k+1>', 'kd/student<k+1>' and, for k >= 1, "
             "'div/student<k+1>', 'sd/student<k+1>' (student 1 logs only the first two).",
             "leader_loss logs 'ce/leader', 'kd/leader', 'fmap/leader', 'recon/leader', 'sd/leader'; "
             "sd_fit_loss logs 'sdfit/<network>'; every logged term carries its weight.",
             f"train_step returns ffsd_loss's logs ({LOGS}).",
             "evaluate returns 'student1'..'studentM', 'ensemble', 'fusion' and 'leader' (logits).", OPTIONAL],
}


def fail(msg):
    raise SystemExit(f"error: {msg}")


def method_path(method):
    if method not in METHODS:
        fail(f"unknown method {method!r}; choices: {', '.join(METHODS)}")
    return os.path.join(ROOT, f"{method}.py")


def _owner(lines, i, indent):
    """`Class.function` or `function` around line i (the nearest less indented defs above it)."""
    names = []
    for line in reversed(lines[:i]):
        m = re.match(r"^(\s*)(?:def|class) (\w+)", line)
        if m and len(m.group(1)) < indent:
            names.insert(0, m.group(2))
            indent = len(m.group(1))
    return ".".join(names) or "module"


def _is_code(line):
    return bool(line.strip()) and not line.strip().startswith("#")


def regions(text, path="<file>"):
    """The marked regions: dicts with `begin`/`end` (0-based line indices of the two markers),
    `indent`, `name`, `hint` and `owner`. A misplaced marker is a one-line error naming the line."""
    lines, found, region = text.splitlines(), [], None
    for i, line in enumerate(lines):
        b, e, at = BEGIN.match(line), END.match(line), f"{path}:{i + 1}"
        if b:
            if region:
                fail(f"{at}: BEGIN ALGO inside the region opened at line {region['begin'] + 1}")
            region = {"begin": i, "indent": b.group(1), "name": b.group(2).strip(),
                      "hint": b.group(3) or "", "owner": _owner(lines, i, len(b.group(1)))}
        elif e:
            if not region:
                fail(f"{at}: END ALGO without a BEGIN ALGO")
            opened = region["begin"] + 1
            if e.group(1) != region["indent"]:
                fail(f"{at}: END ALGO indented unlike its BEGIN ALGO (line {opened})")
            if not any(_is_code(ln) for ln in lines[region["begin"] + 1:i]):
                fail(f"{at}: the region opened at line {opened} holds no code")
            found.append({**region, "end": i})
            region = None
    if region:
        fail(f"{path}:{region['begin'] + 1}: BEGIN ALGO without an END ALGO")
    return found


def _message(region, comments):
    """The NotImplementedError text: the function, the region, then its hint and comments."""
    said = [region["hint"]] + [re.sub(r"^(ALGO|NOTE\(deviation\)):\s*", "", c) for c in comments]
    text = f"{region['owner']} [{region['name']}]: " + (" ".join(s for s in said if s)
                                                       or "see the docstring")
    return text


def _raise(msg, indent):
    """`raise NotImplementedError(...)`, the message split into string literals that fit WIDTH."""
    chunks = textwrap.wrap(msg, WIDTH - len(indent) - 6, drop_whitespace=False,
                           break_on_hyphens=False)
    assert "".join(chunks) == msg
    quoted = ['"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks]
    return ([f"{indent}raise NotImplementedError("] + [f"{indent}    {q}" for q in quoted[:-1]]
            + [f"{indent}    {quoted[-1]})"])


def blank(text, method, only=None, path="<file>"):
    """The student copy of a method file's text: every region (or those named in `only`) keeps its
    markers and comment lines; its code becomes one `raise NotImplementedError(...)`."""
    lines, out, at = text.splitlines(), [], 0
    found = regions(text, path)
    names = [r["name"] for r in found]
    for name in only or []:
        if name not in names:
            fail(f"no region {name!r} in {method}.py; regions: {', '.join(names)}")
    for r in found:
        if only and r["name"] not in only:
            continue
        body = lines[r["begin"] + 1:r["end"]]
        comments = [ln.strip()[1:].strip() for ln in body if ln.strip().startswith("#")]
        out += lines[at:r["begin"] + 1]
        out += [f"{r['indent']}# {c}".rstrip() for c in comments]
        out += _raise(_message(r, comments), r["indent"])
        at = r["end"]
    out += lines[at:]
    # A note right after the module docstring (which stays the module's __doc__).
    doc_end = ast.parse(text).body[0].end_lineno if text.lstrip().startswith('"""') else 0
    note = [f"# ASSIGNMENT: a copy of {method}.py whose marked regions (BEGIN ALGO ... END ALGO)",
            "# raise NotImplementedError. Write each one following its comments and the header",
            "# above; ASSIGNMENT.md says how to run and check it.",
            "# GRADED: besides the functions' signatures, the grader reads these names:"]
    note += [ln for item in CONTRACT[method] for ln in textwrap.wrap(
        item, WIDTH, initial_indent="#   - ", subsequent_indent="#     ")]
    return "\n".join(out[:doc_end] + note + out[doc_end:]) + "\n"


def make(method, out, only=None):
    with open(method_path(method)) as f:
        text = f.read()
    student = blank(text, method, only, path=f"{method}.py")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        f.write(student)
    os.replace(out + ".tmp", out)
    n = len(only) if only else len(regions(text))
    print(f"wrote {out}: {n} region(s) of {method}.py to write; "
          f"grade it with: make grade METHOD={method} FILE={out}")


def load(method, path):
    """The file at `path` imported as the module `method` (the repository root on sys.path for
    `common`, tests/ for the grading tests' helpers)."""
    for d in (ROOT, TESTS):
        if d not in sys.path:
            sys.path.insert(0, d)
    spec = importlib.util.spec_from_file_location(method, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reason(traceback_text):
    """A traceback's exception, as one line (`NotImplementedError: dml_loss [loss]: ...`)."""
    lines = [ln.strip() for ln in traceback_text.strip().splitlines() if ln.strip()]
    heads = [i for i, ln in enumerate(lines) if re.match(r"^\w[\w.]*(Error|Exception|Exit)\b", ln)]
    return " ".join(lines[heads[-1] if heads else -1:])


def _flatten(suite):
    for t in suite:
        yield from (_flatten(t) if isinstance(t, unittest.TestSuite) else [t])


def _property(test):
    """What a grading test checks: its docstring's first paragraph, on one line."""
    doc = getattr(type(test), test._testMethodName).__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def grade(method, path, only=None):
    """Run tests/grade/test_<method>.py (or the tests named in `only`, e.g. "TestLoss.test_total")
    against the file at `path`. Returns {test name: (what it checks, None if it passed or the
    one-line reason it failed)} in the tests' order."""
    method_path(method)
    if not os.path.isfile(path):
        fail(f"no file {path!r} to grade")
    saved = sys.modules.get(method)
    try:
        try:
            sys.modules[method] = load(method, path)
        except Exception as e:  # a syntax error or a failing import: one line, no traceback
            where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
            return {"import": (f"import {path}", f"{type(e).__name__}{where}: {e}")}
        tests_file = os.path.join(TESTS, "grade", f"test_{method}.py")
        spec = importlib.util.spec_from_file_location(f"grade_{method}", tests_file)
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)  # its `import <method>` finds the file under test
        suite = unittest.defaultTestLoader.loadTestsFromModule(tests)
        if only is not None:
            suite = unittest.TestSuite(t for t in _flatten(suite) if t.id().split(".", 1)[1] in only)
        cases = [(t.id(), _property(t)) for t in _flatten(suite)]  # before the run
        result = unittest.TestResult()
        suite.run(result)
    finally:
        if saved is None:
            sys.modules.pop(method, None)
        else:
            sys.modules[method] = saved
    bad = {t.id(): _reason(tb) for t, tb in result.failures + result.errors}
    return {i.split(".", 1)[1]: (doc, bad.get(i)) for i, doc in cases}


def report(method, path, outcome, verbose=False):
    """One line per test (a failure adds what the test checks and why it failed), then the score."""
    passed = sum(reason is None for _, reason in outcome.values())
    for name, (doc, reason) in outcome.items():
        if reason is None:
            print(f"  ok    {name}")
            continue
        print(textwrap.fill(f"FAIL  {name}" + (f": {doc}" if doc else ""), WIDTH, initial_indent="  ",
                            subsequent_indent="        "))
        short = verbose or reason.startswith("NotImplementedError") or len(reason) <= 300
        print(textwrap.fill(reason if short else reason[:297] + "...", WIDTH,
                            initial_indent="        ", subsequent_indent="        "))
    print(f"{method}: {passed} of {len(outcome)} grading tests pass ({path})")
    return 0 if passed == len(outcome) else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["make", "grade", "list"])
    p.add_argument("method", nargs="?", default="", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("file", nargs="?", default="", help="grade: the handed-in file")
    p.add_argument("--out", default="", help="make: where to write the blank file")
    p.add_argument("--only", default="", help="make: comma-separated names of the regions to blank")
    p.add_argument("-v", "--verbose", action="store_true", help="grade: print the reasons in full")
    a = p.parse_args(argv)
    if not a.method:
        fail(f"which method? make {a.action} METHOD=<one of {', '.join(METHODS)}>")
    if a.action == "list":
        with open(method_path(a.method)) as f:
            for r in regions(f.read(), f"{a.method}.py"):
                print(f"  {a.method}.py:{r['begin'] + 1:<5} {r['owner']:<24} {r['name']}")
        return 0
    if a.action == "make":
        if not a.out:
            fail("where to? --out <file> (for a student's folder: make handout METHOD=... OUT=...)")
        make(a.method, a.out, [s.strip() for s in a.only.split(",") if s.strip()])
        return 0
    if not a.file:
        fail(f"which file? make grade METHOD={a.method} FILE=<the handed-in {a.method}.py>")
    return report(a.method, a.file, grade(a.method, a.file), a.verbose)


if __name__ == "__main__":
    sys.exit(main())
