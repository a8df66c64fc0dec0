"""tools/plot.py: the per-epoch logs of a results grid, averaged over seeds (mean, min-max band),
drawn as <grid>-acc.png, <grid>-losses.png and, where methods log internals, <grid>-internals.png.
Reading and averaging need no plotting library; drawing needs matplotlib (an optional extra): the
picture test is skipped where it is absent."""
import json
import os
import shutil
import struct
import sys
import unittest
from unittest import mock

from helpers import ROOT, tmpdir

sys.path.insert(0, os.path.join(ROOT, "tools"))
import plot  # noqa: E402

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


def write_grid(root, grid="g", old=False):
    """results/<grid>/: baseline and dml, seeds 0 and 1, 3 epochs, accuracy = 10 * epoch + seed
    (+ 5 for dml); old=True: one more run recorded without a per-epoch log (as before logs were)."""
    d = os.path.join(root, grid)
    os.makedirs(d, exist_ok=True)
    for method, deployed, extra in (("baseline", "net", 0), ("dml", "peer1", 5)):
        for seed in (0, 1):
            name = f"{method}-resnet8-fake-seed{seed}"
            with open(os.path.join(d, name + ".json"), "w") as f:
                json.dump({"grid": grid, "name": name, "method": method, "arch": "resnet8",
                           "data": "fake", "synthetic": True, "seed": seed, "epochs": 3,
                           "deployed": deployed}, f)
            with open(os.path.join(d, name + ".metrics.jsonl"), "w") as f:
                for e in (1, 2, 3):
                    row = {"epoch": e, "lr": 0.1, "loss": 3.0 / e + seed, "ce": 2.0 / e,
                           f"acc/{deployed}": 10.0 * e + seed + extra, "sec": 1.0, "images": 512,
                           "images_per_s": 512.0}
                    if method == "dml":
                        row.update({"kd/peer1": 0.1 * e, "acc/peer2": 1.0, "w": e / 3})
                    f.write(json.dumps(row) + "\n")
    if old:
        with open(os.path.join(d, "one-resnet8-fake-seed0.json"), "w") as f:
            json.dump({"grid": grid, "method": "one", "arch": "resnet8", "data": "fake", "seed": 0,
                       "epochs": 3, "deployed": "branch1"}, f)
    return root


def write_run(root, name, method="pcl", deployed="mt_peer1", finished=True, epochs=3):
    """A training run's --out folder: config.json, metrics.jsonl (accuracy = 10 * epoch, 'w' logged),
    and final.json when finished (naming a deployed model unlike the method's usual one, to see which
    is read)."""
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"method": method, "arch": "resnet8", "dataset": "folder",
                   "data_dir": "data/cifar10-jpeg/", "seed": 0}, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps({"epoch": e, "loss": 1.0 / e, f"acc/{deployed}": 10.0 * e,
                                "acc/other": 1.0, "w": 0.5, "sec": 1.0}) + "\n")
    if finished:
        with open(os.path.join(d, "final.json"), "w") as f:
            json.dump({"deployed": deployed}, f)
    return d


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", head[:8]
    return struct.unpack(">II", head[16:24])  # IHDR: width, height


class Curves(unittest.TestCase):
    def test_mean_and_min_max_over_seeds_per_epoch(self):
        curves = plot.load_curves(write_grid(tmpdir(self), old=True))
        self.assertEqual(list(curves), ["g"])
        self.assertEqual(list(curves["g"]), ["baseline", "dml"])  # 'one': no log, left out
        dml = curves["g"]["dml"]
        self.assertEqual((dml["deployed"], dml["seeds"]), ("peer1", [0, 1]))
        self.assertEqual(plot.band(dml["rows"], "acc/peer1"),
                         ([1, 2, 3], [15.5, 25.5, 35.5], [15, 25, 35], [16, 26, 36]))
        self.assertEqual(plot.band(curves["g"]["baseline"]["rows"], "loss")[1], [3.5, 2.0, 1.5])

    def test_loss_terms_exclude_accuracies_time_lr_and_weight(self):
        curves = plot.load_curves(write_grid(tmpdir(self)))
        self.assertEqual(plot.loss_terms(curves["g"]["dml"]["rows"]), ["loss", "ce", "kd/peer1"])
        self.assertEqual(plot.loss_terms(curves["g"]["baseline"]["rows"]), ["loss", "ce"])

    def test_several_archs_in_a_grid_are_labelled(self):
        root = write_grid(tmpdir(self))
        src = os.path.join(root, "g", "dml-resnet8-fake-seed0")
        with open(src + ".json") as f:
            r = json.load(f)
        r["arch"] = "wrn16_2"
        with open(os.path.join(root, "g", "dml-wrn16_2-fake-seed0.json"), "w") as f:
            json.dump(r, f)
        shutil.copy(src + ".metrics.jsonl",
                    os.path.join(root, "g", "dml-wrn16_2-fake-seed0.metrics.jsonl"))
        self.assertEqual(list(plot.load_curves(root)["g"]),
                         ["baseline resnet8", "dml resnet8", "dml wrn16_2"])

    def test_no_logs_is_one_line(self):
        for argv, needle in (([], "grid(s) any"), (["--grids", "lab"], "grid(s) lab")):
            with self.subTest(argv), self.assertRaises(SystemExit) as cm:
                root = write_grid(tmpdir(self), old=True) if argv else tmpdir(self)
                plot.main(["--results", root, *argv])
            msg = str(cm.exception.code)
            self.assertTrue(msg.startswith("error: no per-epoch logs"), msg)
            self.assertIn(needle, msg)

    def test_without_matplotlib_one_line_saying_how_to_install_it(self):
        out = tmpdir(self)
        with mock.patch.dict(sys.modules, {"matplotlib": None}), \
                self.assertRaises(SystemExit) as cm:
            plot.main(["--results", write_grid(tmpdir(self)), "--out", out])
        self.assertEqual(str(cm.exception.code),
                         "error: plotting needs matplotlib, an optional extra: pip install -r "
                         "requirements-plot.txt (or pip install matplotlib)")
        self.assertEqual(os.listdir(out), [])


INTERNAL_ROWS = [  # two epochs of what ONE, OKDDip (m = 2) and PCL (2 peers) log inside
    {"epoch": e, "loss": 1.0, "int/gate": [0.2 * e, 1 - 0.2 * e],
     "int/attention": [[0.5, 0.5], [0.1 * e, 1 - 0.1 * e]], "int/attention_entropy": [0.69, 0.3 / e],
     "int/acc_gap_peer1": 2.0 * e, "int/acc_gap_peer2": -1.0 * e, "int/agreement": 0.5 + 0.1 * e}
    for e in (1, 2)]


class Internals(unittest.TestCase):
    """The 'int/...' entries of metrics.jsonl: one panel each, a line per element, not loss terms."""

    def test_panels_lines_per_element_and_numbered_scalars_together(self):
        panels = {k: (kind, [line[0] for line in lines]) for k, kind, lines in plot.internal_panels(INTERNAL_ROWS)}
        self.assertEqual(panels, {
            "int/gate": ("lines", ["rank 1", "rank 2"]),
            "int/attention": ("matrix", []),
            "int/attention_entropy": ("lines", ["peer 1", "peer 2"]),
            "int/acc_gap_peer": ("lines", ["peer 1", "peer 2"]),
            "int/agreement": ("lines", ["fraction of test images"])})

    def test_band_of_a_list_element_and_not_a_loss_term(self):
        runs = [INTERNAL_ROWS, [dict(r, **{"int/gate": [0.0, 1.0]}) for r in INTERNAL_ROWS]]
        self.assertEqual(plot.band(runs, "int/gate", (1,)), ([1, 2], [0.9, 0.8], [0.8, 0.6], [1.0, 1.0]))
        self.assertEqual(plot.band(runs, "int/attention", (1, 0))[1], [0.1, 0.2])
        self.assertEqual(plot.band(runs, "int/gate", (1,), ranked=True)[1], [0.1, 0.2])  # the smaller of each
        self.assertEqual(plot.loss_terms(runs), ["loss"])


class StudentRuns(unittest.TestCase):
    """`python tools/plot.py runs/a runs/b`: a student's own run folders, one curve each."""

    def test_one_group_per_run_labelled_by_its_folder(self):
        root = tmpdir(self)
        runs = [write_run(root, "base", "baseline", "net"), write_run(root, "pcl", deployed="peer3"),
                write_run(root, "pcl-slow", finished=False, epochs=2)]
        groups = plot.load_runs(runs)
        self.assertEqual(list(groups), ["base", "pcl", "pcl-slow"])
        self.assertEqual([g["deployed"] for g in groups.values()], ["net", "peer3", "mt_peer1"],
                         "final.json's deployed model, else (unfinished) the method's own")
        self.assertEqual(plot.band(groups["pcl-slow"]["rows"], "acc/mt_peer1")[:2], ([1, 2], [10.0, 20.0]))
        self.assertEqual((groups["pcl"]["data"], groups["pcl"]["seeds"]), ("folder cifar10-jpeg", [0]))
        other = write_run(os.path.join(root, "x"), "pcl")
        self.assertEqual(list(plot.load_runs([runs[1], other])), [runs[1], other],
                         "two folders of one name: labelled by their paths")

    def test_not_a_run_folder_is_one_line(self):
        root = tmpdir(self)
        for argv, needle in (([root], "is not a training run's folder"),
                             ([write_run(root, "a"), "--grids", "lab"], "not both")):
            with self.subTest(needle), self.assertRaises(SystemExit) as cm:
                plot.main(argv)
            msg = str(cm.exception.code)
            self.assertTrue(msg.startswith("error: ") and needle in msg and "\n" not in msg, msg)


@unittest.skipUnless(HAVE_MPL, "no matplotlib (optional: pip install -r requirements-plot.txt)")
class Pictures(unittest.TestCase):
    def test_student_runs_drawn_next_to_them(self):
        root = tmpdir(self)
        runs = [write_run(root, "base", "baseline", "net"), write_run(root, "pcl")]
        written = plot.main(runs)
        self.assertEqual(written, [os.path.join(root, "runs-acc.png"), os.path.join(root, "runs-losses.png")])
        self.assertEqual(png_size(written[0]), (700, 450))
        self.assertEqual(png_size(written[1]), (920, 380))  # one panel per run


    def test_internals_drawn_where_logged(self):
        root = tmpdir(self)
        plain = write_run(root, "base", "baseline", "net")
        inside = write_run(root, "one", "one", "branch1")
        with open(os.path.join(inside, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(dict(r, **{"acc/branch1": 10.0 * r["epoch"]})) + "\n" for r in INTERNAL_ROWS)
        written = plot.main([plain, inside])
        self.assertEqual([os.path.basename(p) for p in written], ["runs-acc.png", "runs-losses.png", "runs-internals.png"])
        self.assertEqual(png_size(written[2]), (1380, 760))  # 5 panels: 3 columns, 2 rows
        self.assertEqual(len(plot.main([plain])), 2, "no internals logged: no internals picture")

    def test_two_pngs_per_grid(self):
        out = os.path.join(tmpdir(self), "img")
        root = write_grid(write_grid(tmpdir(self), "g"), "h")
        written = plot.main(["--results", root, "--out", out])
        self.assertEqual(sorted(os.listdir(out)),
                         ["g-acc.png", "g-losses.png", "h-acc.png", "h-losses.png"])
        self.assertEqual(sorted(written), [os.path.join(out, n) for n in sorted(os.listdir(out))])
        self.assertEqual(png_size(os.path.join(out, "g-acc.png")), (700, 450))  # 7 x 4.5 in
        self.assertEqual(png_size(os.path.join(out, "g-losses.png")), (920, 380))  # 2 panels, 1 row
        with open(os.path.join(out, "g-acc.png"), "rb") as f:
            first = f.read()
        plot.main(["--results", root, "--out", out, "--grids", "g"])
        with open(os.path.join(out, "g-acc.png"), "rb") as a, \
                open(os.path.join(out, "h-acc.png"), "rb") as b:
            self.assertEqual(a.read(), first)  # same logs, same bytes (no version stamp)
            self.assertNotEqual(b.read(), first)  # the grid's name is in the title


if __name__ == "__main__":
    unittest.main()
