"""Every method file x the backbones of matrix.HALF_B: one train step and one evaluation each (see matrix.py)."""
import unittest

from matrix import HALF_B, MatrixChecks


class TestMatrixB(MatrixChecks, unittest.TestCase):
    ARCHS = HALF_B


if __name__ == "__main__":
    unittest.main()
