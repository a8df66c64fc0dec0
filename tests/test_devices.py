"""--device on laptops: auto picks CUDA, then Apple's MPS, then the CPU; cuda / mps asked for but
absent is a one-line error; bf16 and channels_last stay CUDA-only. GPUs are mocked (none needed)."""
import os
import unittest
from unittest import mock

import torch

from helpers import fake_run, tmpdir
import baseline
import common


def pick(name, cuda, mps):
    with mock.patch.object(torch.cuda, "is_available", return_value=cuda), \
            mock.patch.object(common, "_mps_available", return_value=mps):
        return common.pick_device(name)


class DevicePick(unittest.TestCase):
    def test_auto_prefers_cuda_then_mps_then_cpu(self):
        self.assertEqual(pick("auto", cuda=True, mps=True), torch.device("cuda"))
        self.assertEqual(pick("auto", cuda=False, mps=True), torch.device("mps"))
        self.assertEqual(pick("auto", cuda=False, mps=False), torch.device("cpu"))

    def test_an_explicit_device_is_used_as_asked(self):
        self.assertEqual(pick("cpu", cuda=True, mps=True), torch.device("cpu"))
        self.assertEqual(pick("mps", cuda=True, mps=True), torch.device("mps"))
        self.assertEqual(pick("cuda", cuda=True, mps=True), torch.device("cuda"))

    def test_absent_device_is_one_line(self):
        for name, needle in (("mps", "--device mps but Apple's MPS backend is not available"),
                             ("cuda", "--device cuda but no CUDA GPU is visible")):
            with self.subTest(name), self.assertRaises(SystemExit) as cm:
                pick(name, cuda=False, mps=False)
            msg = str(cm.exception.code)
            self.assertTrue(msg.startswith(f"error: {needle}"), msg)
            self.assertTrue(msg.endswith("choices: auto, cpu, cuda, mps"), msg)

    def test_mps_availability_comes_from_torch_backends(self):
        with mock.patch.object(torch.backends.mps, "is_available", return_value=True):
            self.assertTrue(common._mps_available())
        with mock.patch.object(torch.backends.mps, "is_available", return_value=False):
            self.assertFalse(common._mps_available())
        with mock.patch.object(torch, "backends", object()):  # a build without any MPS backend
            self.assertFalse(common._mps_available())

    def test_flag_accepts_mps(self):
        self.assertEqual(common.parse_args(baseline.Args, ["--device", "mps"]).device, "mps")


class FastPath(unittest.TestCase):
    def setup_on(self, device_type):
        """common.setup as on a machine whose picked device is `device_type` (data on the CPU)."""
        args = baseline.Args(arch="resnet8", dataset="fake", out=os.path.join(tmpdir(self), "run"))
        data = fake_run(args, 16).data
        benchmark = torch.backends.cudnn.benchmark
        self.addCleanup(setattr, torch.backends.cudnn, "benchmark", benchmark)
        with mock.patch.object(common, "pick_device", return_value=torch.device(device_type)), \
                mock.patch.object(common, "load_data", return_value=data):
            run = common.setup(args, "baseline")
        self.assertFalse(os.path.exists(args.out))  # nothing written before training starts
        return run

    def test_bf16_and_channels_last_are_cuda_only(self):
        runs = [self.setup_on(device) for device in ("cuda", "mps", "cpu")]
        self.assertEqual([(r.amp, r.channels_last) for r in runs],
                         [(True, True), (False, False), (False, False)])

    def test_epoch_timing_waits_for_the_device(self):
        for device, fn in (("cuda", "torch.cuda.synchronize"), ("mps", "torch.mps.synchronize")):
            with self.subTest(device), mock.patch(fn) as sync:
                common._sync(torch.device(device))
                sync.assert_called_once()
        with mock.patch("torch.cuda.synchronize") as a, mock.patch("torch.mps.synchronize") as b:
            common._sync(torch.device("cpu"))
        self.assertFalse(a.called or b.called)


if __name__ == "__main__":
    unittest.main()
