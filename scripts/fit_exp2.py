"""The coefficients of the scan kernel's 2^f polynomial (dmclip/csrc/scan_lanes.h, `vexp2`).

    python scripts/fit_exp2.py            # degree 5, the one the kernel uses
    python scripts/fit_exp2.py --degree 6

Minimax in relative error on [-1/2, 1/2] with p(0) = 1 exactly (so decays close to 1, which multiply over many
steps, carry an error proportional to |f|), solved as a linear programme on a dense grid; then the float32
coefficients are evaluated by Horner's rule in float32, as the kernel does, and the worst error is printed.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.optimize import linprog


def fit(degree: int, points: int = 4001) -> tuple[np.ndarray, float]:
    """Coefficients c_1..c_degree of 1 + c_1 f + ... (float64) and the minimax relative error on the grid."""
    f = np.linspace(-0.5, 0.5, points)
    exact = 2.0 ** f
    powers = np.stack([f ** k / exact for k in range(1, degree + 1)], 1)
    offset = 1 / exact - 1  # relative error = powers @ c + offset
    ones = np.ones((points, 1))
    a_ub = np.vstack([np.hstack([powers, -ones]), np.hstack([-powers, -ones])])
    b_ub = np.concatenate([-offset, offset])
    res = linprog(np.r_[np.zeros(degree), 1.0], A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * (degree + 1),
                  method="highs")
    if not res.success:
        raise SystemExit(f"the linear programme failed: {res.message}")
    return res.x[:degree], float(res.x[-1])


def float32_error(coefficients: np.ndarray, points: int = 200001) -> float:
    """Worst relative error of Horner's rule in float32 with float32 coefficients, as the kernel runs it."""
    c = coefficients.astype(np.float32)
    f = np.linspace(-0.5, 0.5, points).astype(np.float32)
    p = np.full_like(f, c[-1])
    for k in range(len(c) - 2, -1, -1):
        p = (p * f + c[k]).astype(np.float32)
    p = (p * f + np.float32(1)).astype(np.float32)
    return float(np.max(np.abs(p.astype(np.float64) / 2.0 ** f.astype(np.float64) - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--degree", type=int, default=5, help="polynomial degree (default 5)")
    args = parser.parse_args()
    if not 2 <= args.degree <= 10:
        parser.error(f"--degree must be between 2 and 10, got {args.degree}")
    c, err = fit(args.degree)
    print(f"degree {args.degree}: minimax relative error {err:.2e}, in float32 {float32_error(c):.2e}")
    print("highest power first:", ", ".join(f"{x:.10e}f" for x in c.astype(np.float32)[::-1]))


if __name__ == "__main__":
    main()
