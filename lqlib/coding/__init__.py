"""Layer 1, coding: entropy models, rANS (one stack per tensor, and interleaved lanes), the wire format,
and the E8 codec that joins them to the core. numpy, torch and constriction only.

Modules: :mod:`~lqlib.coding.entropy_model`, :mod:`~lqlib.coding.rans`, :mod:`~lqlib.coding.rans_lanes`,
:mod:`~lqlib.coding.wire`, :mod:`~lqlib.coding.codec`; :mod:`~lqlib.coding.fuzz` fuzzes the decoders.
"""
