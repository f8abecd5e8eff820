"""Layer 5, Paper IV's attention-aware bit allocation: per-slot sensitivities, water-filling with
budget-safe rounding, and bit schedules fitted to a measured budget.

Modules: :mod:`~lqlib.alloc.sensitivity`, :mod:`~lqlib.alloc.allocation`, :mod:`~lqlib.alloc.schedule`.
"""
