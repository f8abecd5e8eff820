"""The fixed-rate nested E8 format (:mod:`lqlib.coding.nested`) in the harness, against the entropy-coded
codec, the int8 device format and the TurboQuant-style baseline, at measured total rates.

* :class:`NestedE8` and :class:`Int8DeviceFormat` are in-loop quantizers (``KVMethod``) with their
  storage rates: the nested format's words + step code + flag bytes, and the device cache's int8
  codes ``2·p`` + int16 step code of :class:`lqlib.cache.device.DeviceKVCache` (the E8 codec's
  points at ``b`` bits/dim, so its quality is the codec's at ``b``, its size about twice);
* :func:`fixed_rate_specs` builds the comparison: the nested format, the entropy-coded codec with
  its rate solved so that the real compressed cache stores what the nested format stores
  (:func:`lqlib.evaluation.harness.e8_bits_for_rate`), the int8 device format at 4 bits and the
  TurboQuant-style baseline at 4 bits;
* :func:`quality_verdicts` turns :func:`lqlib.evaluation.harness.compare_methods` rows into ΔPPL
  with paired 95% intervals and the ratios the GPU issue asks for, each with its interval and a
  verdict (met only where the whole interval lies at or below the target; inconclusive where it
  straddles it);
* :func:`gaussian_gaps` measures each quantizer's MSE on Gaussian vectors against ``4^-4``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..coding.codec import E8Codec
from ..coding.nested import NestedE8Codec
from ..errors import InputError
from .baselines import KVMethod, TurboQuantStyle
from .capture import KVSample
from .harness import MethodSpec, e8_bits_for_rate, e8_spec, method_ratio
from .stats import RatioEstimate, paired_delta_pct

__all__ = [
    "NestedE8",
    "Int8DeviceFormat",
    "fixed_rate_specs",
    "quality_verdicts",
    "verdict",
    "gaussian_gaps",
    "TARGET_VS_ENTROPY",
    "TARGET_VS_TURBOQUANT",
    "NESTED_LABEL",
    "nested_label",
    "ratio_text",
    "EC_LABEL",
    "TURBO_LABEL",
    "INT8_LABEL",
]

TARGET_VS_ENTROPY = 1.15
"""The issue's bound on ΔPPL(nested) / ΔPPL(entropy-coded E8) at the same measured bits."""
TARGET_VS_TURBOQUANT = 0.6
"""The issue's bound on ΔPPL(nested) / ΔPPL(TurboQuant-style)."""
NESTED_LABEL = "nested E8, fixed rate"
EC_LABEL = "E8 + EC, same bits"
TURBO_LABEL = "TurboQuant-style 4"
INT8_LABEL = "int8 device format (E8 4)"


@dataclass(frozen=True)
class NestedE8(KVMethod):
    """The nested E8 format in the loop; ``bits`` is its nominal 4 (the stored rate depends on d)."""

    bits: float = 4.0
    rotation: str = "rht"
    peak: float = 11.0
    search: int = 0

    @property
    def name(self) -> str:
        return f"NestedE8(peak={self.peak:g}" + (f", search={self.search})" if self.search else ")")

    @property
    def codec(self) -> NestedE8Codec:
        return NestedE8Codec(self.rotation, peak=self.peak, search=self.search)

    def quantize(self, x: Tensor) -> Tensor:
        return self.codec.quantize(x)

    def bits_per_dim(self, x: Tensor) -> float:
        return self.codec.bits_per_dim(x.shape[-1])


@dataclass(frozen=True)
class Int8DeviceFormat(KVMethod):
    """The device cache's int8 codes of the E8 codec at ``bits`` (1 byte per coordinate + int16 step)."""

    rotation: str = "rht"

    def quantize(self, x: Tensor) -> Tensor:
        return E8Codec(self.bits, rotation=self.rotation).quantize(x)

    def bits_per_dim(self, x: Tensor) -> float:
        return 8.0 + 16.0 / x.shape[-1]


def nested_label(search: int = 0) -> str:
    """The nested format's label in the comparison: :data:`NESTED_LABEL`, with its step search if any."""
    return NESTED_LABEL + (f", step search {search}" if search else "")


def fixed_rate_specs(
    kv: KVSample, peak: float = 11.0, page_size: int = 64, searches: tuple[int, ...] = (0,)
) -> list[MethodSpec]:
    """The nested format (once per encoder step search in ``searches``: same format and bits), the
    entropy-coded codec at the nested format's measured rate, the int8 device format and
    TurboQuant-style, all at 4 bits nominal; labels are the module's constants and :func:`nested_label`."""
    if not searches:
        raise InputError("fixed_rate_specs needs at least one step search (0: none)")
    nested = [
        MethodSpec(nested_label(s), NestedE8(peak=peak, search=s), NestedE8(peak=peak, search=s), family="nested E8")
        for s in searches
    ]
    target = nested[0].rate(kv)
    ec_bits = e8_bits_for_rate(target, kv, page_size=page_size)
    int8 = Int8DeviceFormat(4.0)
    return [
        *nested,
        e8_spec(ec_bits, label=EC_LABEL, page_size=page_size),
        MethodSpec(INT8_LABEL, int8, int8, family="int8 device format"),
        MethodSpec(TURBO_LABEL, TurboQuantStyle(4), TurboQuantStyle(4), family="TurboQuant-style"),
    ]


def verdict(ratio: RatioEstimate, target: float) -> str:
    """ "met" where the whole interval lies at or below ``target``, "not met" where it lies above,
    "inconclusive" where it straddles it, "undefined" where the baseline's ΔPPL interval reaches 0."""
    if not ratio.defined:
        return "undefined"
    if ratio.high <= target:
        return "met"
    if ratio.low > target:
        return "not met"
    return "inconclusive"


def quality_verdicts(rows: list[dict], draws: int = 4000, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(method rows, ratio rows) from :func:`compare_methods` rows that hold the four labels (the nested
    format's once per step search, :func:`nested_label`).

    Method rows: label, measured bits/dim, PPL, ΔPPL % with its paired 95% interval against full
    precision. Ratio rows, for each nested row: ΔPPL(nested) over ΔPPL(baseline) for the entropy-coded
    codec and TurboQuant-style, with the paired bootstrap interval (windows resampled together), the
    target and the verdict ("met", "not met" or "inconclusive")."""
    fp = rows[0]
    methods = []
    for r in rows[1:]:
        ci = paired_delta_pct(r["window_nll"], fp["window_nll"], fp["window_tokens"], draws=draws, seed=seed)
        methods.append(
            {
                "method": r["method"],
                "bits_per_dim": r["bits_per_dim"],
                "ppl": r["ppl"],
                "delta_pct": ci.value,
                "low": ci.low,
                "high": ci.high,
                "windows": ci.n,
            }
        )
    ratios = []
    by_name = {r["method"]: r for r in rows}
    for nested in (r["method"] for r in rows[1:] if r["method"].startswith(NESTED_LABEL)):
        for baseline, target in ((EC_LABEL, TARGET_VS_ENTROPY), (TURBO_LABEL, TARGET_VS_TURBOQUANT)):
            ratio = method_ratio(rows, nested, baseline, draws=draws, seed=seed)
            ratios.append(
                {
                    "nested": nested,
                    "baseline": baseline,
                    "nested_bits": by_name[nested]["bits_per_dim"],
                    "baseline_bits": by_name[baseline]["bits_per_dim"],
                    "ratio": ratio.value,
                    "low": ratio.low,
                    "high": ratio.high,
                    "target": target,
                    "verdict": verdict(ratio, target),
                    "windows": ratio.n,
                }
            )
    return methods, ratios


def ratio_text(ratios: list[dict], nested: str, baseline: str) -> tuple[str, str]:
    """(``"1.94× [1.81, 2.10]"``, verdict) of the ratio row of ``nested`` over ``baseline`` in
    :func:`quality_verdicts`' ratio rows."""
    for r in ratios:
        if r["nested"] == nested and r["baseline"] == baseline:
            return f"{r['ratio']:.2f}× [{r['low']:.2f}, {r['high']:.2f}]", r["verdict"]
    raise InputError(f"no ratio of {nested!r} over {baseline!r} among {[(r['nested'], r['baseline']) for r in ratios]}")


def gaussian_gaps(
    dims: tuple[int, ...] = (64, 128), n: int = 20000, seed: int = 0, searches: tuple[int, ...] = (0,)
) -> list[dict]:
    """MSE per coordinate / ``4^-4`` (the Gaussian bound at 4 bits) of each quantizer on ``n`` standard
    Gaussian vectors per head dim, with its stored bits/dim: the nested format once per step search in
    ``searches``; the entropy-coded codec at 4 bits and at the rate whose payload matches the nested
    format's stored bits (its coded rate is measured)."""
    rows = []
    for d in dims:
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + d), dtype=torch.float32)
        nested = [NestedE8Codec(search=s) for s in searches]
        ec_bits = nested[0].bits_per_dim(d) - 16.0 / d  # payload of the same total, less a step code per vector
        cases = [
            *((nested_label(c.search), c.quantize, c.bits_per_dim(d)) for c in nested),
            ("E8 + EC 4", E8Codec(4.0).quantize, None),
            (f"E8 + EC {ec_bits:.3f}", E8Codec(ec_bits).quantize, None),
            (TURBO_LABEL, TurboQuantStyle(4).quantize, 4.0 + 16.0 / d),
        ]
        for label, quantize, bits in cases:
            mse = float((quantize(x).double() - x.double()).square().mean())
            if bits is None:  # the codec's coded rate, from its bytes
                codec = E8Codec(float(label.split()[-1]))
                bits = codec.bits_per_dim(codec.encode(x))
            rows.append({"dim": d, "method": label, "bits_per_dim": bits, "mse_over_bound": mse / 4.0**-4})
    return rows
