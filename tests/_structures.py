"""Small hand-built structures shared by the tests (importable: tests/ is on sys.path)."""
from __future__ import annotations

import numpy as np
import torch

# Ethanol (C2H5OH) by hand, in Angstrom: C-C 1.51, C-O 1.43, C-H 1.09, O-H 0.97.
# Atom order: C (methyl), C (methylene), O, then the methyl H, methylene H, hydroxyl H.
ETHANOL_Z = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1], dtype=np.int64)
ETHANOL_POSITIONS = np.array(
    [
        [1.1879, -0.3829, 0.0000],
        [0.0000, 0.5526, 0.0000],
        [-1.1867, -0.2472, 0.0000],
        [2.1180, 0.1890, 0.0000],
        [1.1655, -1.0186, 0.8849],
        [1.1655, -1.0186, -0.8849],
        [0.0403, 1.2023, 0.8809],
        [0.0403, 1.2023, -0.8809],
        [-1.9451, 0.3487, 0.0000],
    ],
    dtype=np.float64,
)
# Covalent bonds of the molecule above, as (i, j) index pairs.
ETHANOL_BONDS = [(0, 1), (1, 2), (0, 3), (0, 4), (0, 5), (1, 6), (1, 7), (2, 8)]


class Harmonic(torch.nn.Module):
    """U = k x^2 / 2 summed over the coordinates of each frame (eV, Angstrom): the exactly
    solvable case the estimator tests check against (<x^2> = kT/k)."""

    def __init__(self, k: float):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=torch.float64))

    def forward(self, frames):
        return 0.5 * self.k * (frames**2).sum(dim=(1, 2))
