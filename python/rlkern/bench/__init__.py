"""Benchmarks: rlkern against its peers and the machine's floor (``rlkern bench``).

* :mod:`~rlkern.bench.harness` — timing (warm-up, median of repeats) and peak memory of a call.
* :mod:`~rlkern.bench.allocator` — glibc settings for timing and for measuring memory on CPU.
* :mod:`~rlkern.bench.cases` — the registry; one module per op (``cases/logprobs.py``).
* :mod:`~rlkern.bench.kit` — what the cases share: backend choice, peers, floors, inputs.
* :mod:`~rlkern.bench.check` — agreement with rlkern's outputs before anything is timed.
* :mod:`~rlkern.bench.runner` — runs a case over sizes × modes × implementations.
* :mod:`~rlkern.bench.report` — rich tables and progress, JSON, Markdown, PNG plots.
* :mod:`~rlkern.bench.cli` — the ``rlkern bench`` command.
"""
