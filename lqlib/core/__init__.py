"""Layer 1, the math core: lattices and their nearest-point maps, closed forms, the randomized Hadamard
transform, parity-aware E8 symbols, log-grid step codes, scalar quantizers. numpy and torch only.

Modules: :mod:`~lqlib.core.lattices`, :mod:`~lqlib.core.theory`, :mod:`~lqlib.core.rht`,
:mod:`~lqlib.core.symbols`, :mod:`~lqlib.core.steps`, :mod:`~lqlib.core.scalar`.
"""
