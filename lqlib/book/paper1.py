"""Paper I's tables: rows built from our measurements with the paper's values beside them, and the
column specifications shared by the chapter and the command line."""

from __future__ import annotations

from .paper_values import TABLE3_CODED_RATE, TABLE3_GAP

__all__ = ["TABLE3_COLUMNS", "table3_rows"]

#: Paper I, Table 3: row key → header (and digits) for :func:`lqlib.book.tables.write_table`.
TABLE3_COLUMNS = {
    "target_bits": ("target b", 1),
    "coded_bits": "coded bits/dim (ours)",
    "paper_coded_bits": ("coded bits/dim (paper)", 3),
    "rate_vs_paper": "ours / paper − 1",
    "gap": "gap D/D* (ours)",
    "exact_gap": "2πe·G(E8)",
    "gap_vs_exact": "ours / exact − 1",
    "paper_gap": ("gap (paper)", 3),
    "lossless": "decode = quantize",
}


def table3_rows(measured: list[dict]) -> list[dict]:
    """:func:`lqlib.evaluation.rate_distortion.gaussian_validation`'s rows with the paper's coded rate
    and gap beside ours (``paper_coded_bits``, ``rate_vs_paper``, ``paper_gap``; NaN where the paper
    has no value for a rate)."""
    rows = []
    for row in measured:
        paper_rate = TABLE3_CODED_RATE.get(float(row["target_bits"]), float("nan"))
        rows.append(
            {
                **row,
                "paper_coded_bits": paper_rate,
                "rate_vs_paper": row["coded_bits"] / paper_rate - 1.0,
                "paper_gap": TABLE3_GAP,
            }
        )
    return rows
