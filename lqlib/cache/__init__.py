"""Layer 3, transformers KV caches: the in-loop quantize–dequantize cache, the compressed cache that stores
E8 + rANS bitstreams, and the device cache that keeps E8 codes on the GPU.

Modules: :mod:`~lqlib.cache.quantized`, :mod:`~lqlib.cache.compressed`, :mod:`~lqlib.cache.device`.
"""
