"""The folder a student is given for one method: `make handout METHOD=pcl OUT=handout/pcl`.

It holds the blanked method file (tools/assignment.py: the regions raise NotImplementedError, the
graded contract is written under the docstring), what it imports from this repository (common.py and
the repository modules common imports), requirements.txt, ASSIGNMENT.md (the task, the regions, the
contract, how to run and what to hand in) and check.py (tools/student_check.py: checks that give no
answer away). It leaves out the reference solution, the tests and their numpy references, and docs/.
The instructor grades a handed-in file with `make grade METHOD=pcl FILE=...`.

    python tools/handout.py pcl handout/pcl
"""
import ast
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import assignment  # noqa: E402
import reproduce  # noqa: E402
from assignment import ROOT, fail  # noqa: E402


def imported_files(name="common", seen=None):
    """`name`.py and, recursively, the repository modules it imports (file names)."""
    seen = seen if seen is not None else []
    path = os.path.join(ROOT, f"{name}.py")
    if name in seen or not os.path.isfile(path):
        return seen
    seen.append(name)
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for n in names:
            imported_files(n.split(".")[0], seen)
    return seen


def check_out(out):
    """Refuse a non-empty folder, and a folder inside the repository that git does not ignore."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        fail(f"{out} exists and is not an empty folder; choose a new --out")
    if os.path.commonpath([out, ROOT]) == ROOT:
        rel = os.path.relpath(out, ROOT)
        ignored = subprocess.run(["git", "-C", ROOT, "check-ignore", "-q", rel + "/"],
                                 capture_output=True).returncode == 0
        if rel == "." or not ignored:
            fail(f"{rel} is inside the repository and not ignored by git (the handout must not sit "
                 f"next to the answer): use handout/<method> (ignored) or a folder outside")


def own_flags(method):
    """[(--flag, help)] of the fields the method's Args defines itself (beyond common.TrainArgs)."""
    module = assignment.load(f"reference_{method}", os.path.join(ROOT, f"{method}.py"))
    fields = {f.name: f for f in module.Args.__dataclass_fields__.values()}
    return [("--" + n.replace("_", "-"), fields[n].metadata.get("help", ""))
            for n in module.Args.__dict__.get("__annotations__", {}) if n in fields]


def functions(text):
    """{function or Class.method name: its docstring's first paragraph} for the file's text."""
    found = {}
    for node in ast.walk(ast.parse(text)):
        for fn in (node.body if isinstance(node, (ast.Module, ast.ClassDef)) else []):
            if isinstance(fn, ast.FunctionDef):
                name = fn.name if isinstance(node, ast.Module) else f"{node.name}.{fn.name}"
                doc = ast.get_docstring(fn) or ""
                found[name] = " ".join(doc.split("\n\n")[0].split())
    return found


LAB1 = ["baseline", "dml", "one", "okddip"]  # the methods Lab 1 (docs/lab1.md) trains


def longer_run(method):
    """ASSIGNMENT.md's run on real images, in the setting of Lab 1 and the `lab-fit` grid (its sizes,
    no augmentation, the method's scaled schedule flags): Lab 1's command (its JPEG folder) for the
    methods Lab 1 trains, the same run on downloaded CIFAR-10 for the others."""
    size = "--subset 2560 --test-subset 2000 --batch-size 64 --epochs 30 --device cpu"
    own = "".join(f" {a}" for a in reproduce.GRIDS["lab-fit"]["method_flags"].get(method, []))
    if method in LAB1:
        return (f"python {method}.py --arch resnet20 --dataset folder --data-dir data/cifar10-jpeg {size}"
                f" --no-augment{own} --out runs/lab1/{method}")
    return (f"python {method}.py --arch resnet20 --dataset cifar10 {size} --no-augment{own}"
            f" --out runs/{method}-cifar10")


def assignment_md(method, text):
    """ASSIGNMENT.md: the task, the regions, the contract, the runs, what to hand in."""
    title = ast.get_docstring(ast.parse(text)).splitlines()[0]
    docs = functions(text)
    rows = [f"| `{r['owner']}` | {r['name']} | {docs.get(r['owner'], '') or 'see the file'} |"
            for r in assignment.regions(text, f"{method}.py")]
    run = (f"python {method}.py --arch resnet8 --dataset fake --epochs 3 --subset 512 "
           f"--test-subset 200 --device cpu --out runs/{method}-fake")
    return "\n".join([
        f"# Assignment: {title}", "",
        f"`{method}.py` is a complete training script with its algorithm taken out: each marked region",
        "(`# ===== BEGIN ALGO: ...` to `# ===== END ALGO =====`) raises `NotImplementedError`. Write",
        "every region, following its comments and the file's header docstring, which is the",
        "specification (objective, equations, what is detached, deviations). Change nothing outside",
        "the regions. `common.py` is the shared infrastructure (backbones, data, training loop, and",
        "helpers such as `common.kd_loss`); read the parts your file calls.", "",
        "## The regions", "", "| function | region | what it takes and returns |", "|---|---|---|",
        *rows, "",
        "## The contract (graded)", "",
        "The grader calls these functions on small hand-made tensors and models and reads:", "",
        *[f"- {item}" for item in assignment.CONTRACT[method]], "",
        "The method's own flags (`--help` lists the common ones too):", "",
        *[f"- `{flag}`: {help}" for flag, help in own_flags(method)], "",
        "## Run and check", "", "```bash",
        "pip install -r requirements.txt   # torch, torchvision, numpy",
        "python check.py --quick           # it imports, shapes (seconds)",
        "python check.py                   # + a short run that must learn above chance (a minute or two)",
        f"{run}", longer_run(method), "```", "",
        *(["The last command is Lab 1's run: it reads `data/cifar10-jpeg`, the JPEG copy of CIFAR-10",
            "your instructor provides."] if method in LAB1 else
          ["The last command is a longer run on real images (CIFAR-10 is downloaded into `./data`)."]), "",
        "The checks give no answer away: passing them means the file runs and learns, not that the",
        "algorithm is the paper's. Compare the `final |` line of your runs with a classmate's, or with",
        "the numbers your instructor gives.", "",
        "## Hand in", "",
        f"Your `{method}.py`, under that name, and nothing else. It is graded with",
        f"`make grade METHOD={method} FILE=<your file>`: one line per property checked, then the score.",
        ""])


def write(method, out):
    check_out(out)
    with open(assignment.method_path(method)) as f:
        text = f.read()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{method}.py"), "w") as f:
        f.write(assignment.blank(text, method, path=f"{method}.py"))
    for name in imported_files():
        shutil.copy(os.path.join(ROOT, f"{name}.py"), os.path.join(out, f"{name}.py"))
    shutil.copy(os.path.join(ROOT, "requirements.txt"), out)
    shutil.copy(os.path.join(ROOT, "tools", "student_check.py"), os.path.join(out, "check.py"))
    with open(os.path.join(out, "ASSIGNMENT.md"), "w") as f:
        f.write(assignment_md(method, text))
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}; "
          f"grade a handed-in file with: make grade METHOD={method} FILE=<file>")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[1]:
        fail(f"usage: make handout METHOD=<one of {', '.join(assignment.METHODS)}> OUT=<new folder>")
    assignment.method_path(argv[0])
    write(*argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
