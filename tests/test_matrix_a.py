"""Every method file x the backbones of matrix.HALF_A: one train step and one evaluation each (see matrix.py)."""
import unittest

from matrix import HALF_A, MatrixChecks


class TestMatrixA(MatrixChecks, unittest.TestCase):
    ARCHS = HALF_A


if __name__ == "__main__":
    unittest.main()
