"""Numbers quoted from the LatticeQuant papers, for display beside ours (always labelled "paper").

Nothing here is used to compute anything; these are the values our runs are compared against.
"""

from __future__ import annotations

__all__ = ["TABLE3_CODED_RATE", "TABLE3_GAP"]

#: Paper I, Table 3: coded bits/dim of E8 + parity-aware rANS on a Gaussian source, by target rate.
TABLE3_CODED_RATE: dict[float, float] = {2.0: 2.075, 2.5: 2.538, 3.0: 3.020, 4.0: 4.005, 5.0: 5.002, 6.0: 6.001}
#: Paper I, Table 3: gap D / D*(b) of the same runs ("1.224 throughout").
TABLE3_GAP: float = 1.224
