"""deployed.pt, tools/export.py and tools/evaluate.py.

Every method's finished run writes its deployed network as a plain backbone: build_backbone(arch,
C) loads it with strict=True, and that network, alone, scores exactly the run's test_acc on the same
test images (its logits equal the method's own evaluation of that model). The export tool makes the
same file from a checkpoint (also one written before checkpoints recorded the deployed model and the
normalisation); the evaluation tool scores a checkpoint's models or a deployed.pt without training,
with one-line errors.
One tiny 1-epoch CPU run per case, shared by every test here.
"""
import contextlib
import dataclasses
import importlib
import io
import json
import os
import sys
import tempfile
import unittest
from unittest import mock

import torch
from torchvision.io import write_png

from helpers import ROOT, run_script, tmpdir

import common

sys.path.insert(0, os.path.join(ROOT, "tools"))
import evaluate  # noqa: E402
import export  # noqa: E402

SMALL = dict(dataset="fake", subset=256, test_subset=200, batch_size=32, epochs=1, device="cpu")
# (method, --arch, method flags, the deployed backbone). wrn16_2: a non-ResNet whose stem is a bare
# conv and whose stage 3 ends in BN + ReLU; OKDDip deploys its LAST branch. DML with mixed peers
# deploys peer 1 with its own backbone.
METHODS = ["baseline", "dml", "one", "okddip", "pcl", "ffsd"]
CASES = {**{m: (m, "resnet8", {}, "resnet8") for m in METHODS},
         "okddip-wrn": ("okddip", "wrn16_2", {"num_peers": 2}, "wrn16_2"),
         "dml-mixed": ("dml", "wrn16_2,resnet8", {}, "wrn16_2")}
DIR, RUNS, DATA = None, {}, {}


def quiet(fn, *a, **kw):
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        result = fn(*a, **kw)
    return result, buf.getvalue()


def setUpModule():
    global DIR
    DIR = tempfile.TemporaryDirectory()
    for case, (method, arch, flags, _) in CASES.items():
        module = importlib.import_module(method)
        args = module.Args(arch=arch, out=os.path.join(DIR.name, case), **SMALL, **flags)
        final, _ = quiet(module.main, args)
        RUNS[case] = (module, args, final)


def tearDownModule():
    DIR.cleanup()


def test_batch(info, args):
    """The run's test images normalised with the file's statistics, as evaluate_all does it."""
    key = (args.dataset, args.subset, args.test_subset)  # the same for every case: load it once
    if key not in DATA:
        DATA[key] = common.load_data(args, torch.device("cpu"))
    data = DATA[key]
    mean, std = (torch.tensor(info[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (data.test_x.float() / 255 - mean) / std, data.test_y, data


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


class DeployedFile(unittest.TestCase):
    def test_plain_backbone_loads_strictly_and_scores_the_runs_test_acc_exactly(self):
        for case, (module, args, final) in RUNS.items():
            with self.subTest(case):
                d = load(os.path.join(args.out, "deployed.pt"))  # plain tensors and values only
                arch = CASES[case][3]
                self.assertEqual((d["arch"], d["num_classes"], d["method"], d["model"]),
                                 (arch, 10, CASES[case][0], final["deployed"]))
                self.assertEqual(d["dataset"], "fake")
                self.assertEqual(final["deployed_arch"], arch)
                net = common.build_backbone(d["arch"], d["num_classes"])
                self.assertEqual(set(d["state_dict"]), set(net.state_dict()))
                net.load_state_dict(d["state_dict"], strict=True)
                x, y, data = test_batch(d, args)
                self.assertEqual(d["classes"], data.classes)
                self.assertEqual(d["mean"], data.mean.flatten().tolist())  # the training subset's
                with torch.no_grad():
                    acc = 100.0 * (net.eval()(x).argmax(-1) == y).sum().item() / len(y)
                self.assertEqual(acc, final["test_acc"])
                self.assertEqual(d["test_acc"], final["test_acc"])
                self.assertEqual((d["epoch"], d["test_subset"], d["bf16"]), (1, 200, False))

    def test_logits_are_the_methods_own_evaluation_of_the_deployed_model(self):
        # Stronger than equal accuracy (which a network predicting one class could match by chance).
        for case, (module, args, final) in RUNS.items():
            with self.subTest(case):
                d = load(os.path.join(args.out, "deployed.pt"))
                net = common.build_backbone(d["arch"], d["num_classes"])
                net.load_state_dict(d["state_dict"])
                ckpt = os.path.join(args.out, "checkpoint.pt")
                _, _, model = export.load_model(export.read_checkpoint(ckpt), ckpt)
                x, _, _ = test_batch(d, args)
                with torch.no_grad():
                    own = module.evaluate(model.eval(), x)[final["deployed"]]
                    self.assertTrue(torch.equal(net.eval()(x), own))
                    outs = module.evaluate(model, x)
                    for other in [k for k in outs if k != final["deployed"]][:1]:
                        self.assertFalse(torch.equal(net(x), outs[other]), other)

    def test_mixed_dml_names_peers_by_backbone(self):
        final = RUNS["dml-mixed"][2]
        self.assertEqual(final["deployed"], "peer1_wrn16_2")
        self.assertEqual(set(final["models"]),
                         {"peer1_wrn16_2", "peer2_resnet8", "ensemble", "peer_avg"})
        # one backbone: the names of before
        self.assertEqual(set(RUNS["dml"][2]["models"]), {"peer1", "peer2", "ensemble", "peer_avg"})


class Export(unittest.TestCase):
    def same_file(self, a, b):
        self.assertEqual({k: v for k, v in a.items() if k != "state_dict"},
                         {k: v for k, v in b.items() if k != "state_dict"})
        self.assertEqual(set(a["state_dict"]), set(b["state_dict"]))
        for k in a["state_dict"]:
            self.assertTrue(torch.equal(a["state_dict"][k], b["state_dict"][k]), k)

    def test_export_from_a_checkpoint_is_the_runs_own_file(self):
        for case, (module, args, final) in RUNS.items():
            with self.subTest(case):
                out = os.path.join(tmpdir(self), "d.pt")
                export.export(args.out, out)  # the run folder
                self.same_file(load(out), load(os.path.join(args.out, "deployed.pt")))

    def test_export_from_a_checkpoint_written_before_deployed_files(self):
        # A checkpoint without the recorded deployed name and normalisation, no final.json beside
        # it: both are recovered (the name per method, the statistics from the run's own data).
        _, args, _ = RUNS["pcl"]
        ck = torch.load(os.path.join(args.out, "checkpoint.pt"), weights_only=False)
        del ck["deployed"], ck["data"]
        old = os.path.join(tmpdir(self), "old")
        os.makedirs(old)
        torch.save(ck, os.path.join(old, "checkpoint.pt"))
        p = run_script("tools/export.py", old)  # also: the tool runs as a script
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("wrote ", p.stdout)
        self.assertIn("mt_peer1 of pcl (resnet8, 10 classes, epoch 1, test_acc", p.stdout)
        self.same_file(load(os.path.join(old, "deployed.pt")),
                       load(os.path.join(args.out, "deployed.pt")))

    def test_not_a_checkpoint(self):
        bad = os.path.join(tmpdir(self), "checkpoint.pt")
        with open(bad, "wb") as f:
            f.write(b"\x00not a checkpoint" * 10)
        for path, needle in ((bad, "cannot read checkpoint"), (tmpdir(self), "no checkpoint at")):
            with self.assertRaises(SystemExit) as cm:
                export.export(path, os.path.join(tmpdir(self), "d.pt"))
            self.assertIn(needle, str(cm.exception.code))
            self.assertTrue(str(cm.exception.code).startswith("error: "))


class Evaluate(unittest.TestCase):
    def run_tool(self, *argv):
        accs, printed = quiet(evaluate.main, list(argv))
        return accs, printed.splitlines()

    def error(self, *argv):
        with self.assertRaises(SystemExit) as cm:
            quiet(evaluate.main, list(argv))
        msg = str(cm.exception.code)
        self.assertTrue(msg.startswith("error: "), msg)
        self.assertNotIn("\n", msg)
        return msg

    def test_a_checkpoint_gives_every_model_of_the_method_as_at_training(self):
        for case in ("pcl", "ffsd", "dml-mixed"):
            with self.subTest(case):
                _, args, final = RUNS[case]
                accs, lines = self.run_tool(args.out, "--device", "cpu")
                averages = {"peer_avg", "student_avg", "branch_avg"}
                self.assertEqual(accs, {k: v for k, v in final["models"].items()
                                        if k not in averages})
                self.assertEqual(len(lines), 1 + len(accs))  # a header, then one line per model
                marked = [ln for ln in lines if ln.endswith("(deployed)")]
                self.assertEqual(len(marked), 1)
                self.assertTrue(marked[0].startswith(f"{final['deployed']} "), marked)
                self.assertIn("fake (200 test images, 10 classes) | cpu", lines[0])

    def test_a_deployed_file_gives_its_one_network(self):
        _, args, final = RUNS["okddip-wrn"]
        path = os.path.join(args.out, "deployed.pt")
        accs, lines = self.run_tool(path)
        self.assertEqual(accs, {"leader": final["test_acc"]})
        self.assertEqual(len(lines), 2)
        # another test subset: other images, other figure, same network
        accs, lines = self.run_tool(path, "--test-subset", "100", "--arch", "wrn16_2")
        self.assertIn("fake (100 test images", lines[0])

    def test_as_a_script(self):
        _, args, final = RUNS["baseline"]
        p = run_script("tools/evaluate.py", os.path.join(args.out, "deployed.pt"),
                       "--device", "cpu")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.splitlines()[-1], f"net {final['test_acc']:6.2f}  (deployed)")

    def test_one_line_errors(self):
        _, args, _ = RUNS["baseline"]
        deployed = os.path.join(args.out, "deployed.pt")
        d = tmpdir(self)
        for split in ("train", "test"):  # an image folder with 2 classes
            for c in ("cat", "dog"):
                os.makedirs(os.path.join(d, "two", split, c))
                write_png(torch.zeros(3, 32, 32, dtype=torch.uint8),
                          os.path.join(d, "two", split, c, "0.png"))
        two = ["--dataset", "folder", "--data-dir", os.path.join(d, "two"), "--test-subset", "0"]
        for path in (deployed, args.out):  # the deployed network, or the run's checkpoint
            msg = self.error(path, *two)
            self.assertIn("holds a resnet8 for 10 classes, but --dataset folder has 2", msg)
        msg = self.error(deployed, "--arch", "resnet20")
        self.assertIn("holds a resnet8, not --arch resnet20", msg)
        # a file that claims one backbone but holds another's weights
        tampered = {**load(deployed), "arch": "resnet20"}
        torch.save(tampered, os.path.join(d, "tampered.pt"))
        msg = self.error(os.path.join(d, "tampered.pt"))
        self.assertIn("do not fit a resnet20 for 10 classes", msg)
        with open(os.path.join(d, "garbage.pt"), "wb") as f:
            f.write(b"\x00\x01garbage" * 20)
        self.assertIn("cannot read", self.error(os.path.join(d, "garbage.pt")))
        torch.save({"some": "dict"}, os.path.join(d, "other.pt"))
        msg = self.error(os.path.join(d, "other.pt"))
        self.assertIn("neither a checkpoint nor a deployed.pt", msg)
        self.assertIn("holds neither checkpoint.pt nor deployed.pt", self.error(d))
        with mock.patch.object(common, "_mps_available", return_value=False):
            msg = self.error(deployed, "--device", "mps")
        self.assertIn("--device mps but Apple's MPS backend is not available", msg)
        msg = self.error(deployed, "--dataset", "imagenet")
        self.assertIn("--dataset 'imagenet' is not one of", msg)

    def test_device_is_honoured(self):
        _, args, final = RUNS["baseline"]
        seen = []
        real = common.pick_device

        def spy(name):
            seen.append(name)
            return real("cpu")

        with mock.patch.object(common, "pick_device", spy):
            accs, lines = self.run_tool(os.path.join(args.out, "deployed.pt"), "--device", "auto")
        self.assertEqual(seen, ["auto"])
        self.assertEqual(accs["net"], final["test_acc"])


if __name__ == "__main__":
    unittest.main()
