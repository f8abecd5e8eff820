"""Layer 4, evaluation: models, corpora and their real keys and values, the perplexity protocol, the
baselines, the harness that runs every method through the same windows, rate–distortion measurements
and the statistics they share.

Modules: :mod:`~lqlib.evaluation.models`, :mod:`~lqlib.evaluation.corpus`, :mod:`~lqlib.evaluation.capture`,
:mod:`~lqlib.evaluation.perplexity`, :mod:`~lqlib.evaluation.baselines`,
:mod:`~lqlib.evaluation.harness`, :mod:`~lqlib.evaluation.rate_distortion`.
"""
