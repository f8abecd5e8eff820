"""CPU throughput of the E8 codec next to constriction's raw speed on the same symbols.

Prints MB/s of float16 input (2 bytes per element) for:

* codec encode (validate, RHT, E8, symbols, rANS) and decode (rANS, points, inverse RHT);
* constriction alone: one ``encode_reverse`` / ``decode`` per symbol group, on exactly the
  symbols and models the codec uses, without any of our work around it.

All numbers come from the same run on the same data (median of ``--repeats``); the ratio
codec / raw is what to compare across machines, not the absolute MB/s.

    python benchmarks/codec_throughput.py [--vectors 16384] [--dim 128] [--bits 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import constriction
import numpy as np
import torch

from lqlib import E8Codec
from lqlib.coding.entropy_model import gaussian_symbol_model
from lqlib.coding.rans import coder_models
from lqlib.core.symbols import points_to_symbols


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def raw_constriction(symbols: np.ndarray, bits: float):
    """Encode/decode closures running constriction alone on the codec's symbol groups."""
    model = gaussian_symbol_model(bits)
    coset_model, per_coset = coder_models(model)
    coset = symbols[:, 0].astype(np.int32)
    groups = []
    for c in (0, 1):
        rows = symbols[coset == c]
        groups.append(((rows[:, 1:8].reshape(-1) + model.radius).astype(np.int32), per_coset[c][0]))
        groups.append(((rows[:, 8] + model.radius).astype(np.int32), per_coset[c][1]))

    def encode():
        coder = constriction.stream.stack.AnsCoder()
        for idx, m in reversed(groups):
            coder.encode_reverse(idx, m)
        coder.encode_reverse(coset, coset_model)
        return coder.get_compressed()

    words = encode()

    def decode():
        coder = constriction.stream.stack.AnsCoder(words)
        coder.decode(coset_model, coset.size)
        for idx, m in groups:
            coder.decode(m, idx.size)

    return encode, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.vectors, args.dim).to(torch.float16)
    megabytes = 2 * x.numel() / 1e6
    codec = E8Codec(args.bits, rotation="rht", scale="vector")
    encoded = codec.encode(x)
    assert torch.equal(codec.decode(encoded), codec.quantize(x))

    symbols = points_to_symbols(codec._analyse(codec._validate(x))[0].reshape(-1, 8)).numpy()
    raw_encode, raw_decode = raw_constriction(symbols, args.bits)

    rows = [
        ("codec encode", median_seconds(lambda: codec.encode(x), args.repeats)),
        ("constriction encode (raw)", median_seconds(raw_encode, args.repeats)),
        ("codec decode", median_seconds(lambda: codec.decode(encoded), args.repeats)),
        ("constriction decode (raw)", median_seconds(raw_decode, args.repeats)),
    ]
    print(
        f"input: {args.vectors} x {args.dim} float16 = {megabytes:.1f} MB, {symbols.size} symbols, "
        f"b = {args.bits}, coded {codec.bits_per_dim(encoded):.4f} bits/dim, "
        f"torch threads = {torch.get_num_threads()}"
    )
    print(f"{'stage':<28}{'ms':>10}{'MB/s fp16':>12}{'Msymbols/s':>12}")
    for name, seconds in rows:
        print(f"{name:<28}{1e3 * seconds:>10.1f}{megabytes / seconds:>12.1f}{symbols.size / seconds / 1e6:>12.1f}")
    print(f"codec / raw time: encode {rows[0][1] / rows[1][1]:.2f}x, decode {rows[2][1] / rows[3][1]:.2f}x")


if __name__ == "__main__":
    main()
