"""Answer extraction and matching, and the benchmark loader, as eval uses them.

The code lives below eval so that synthesis and the data readers share it: extraction and matching
in ``jaxprm.data.answers``, ``\\boxed{}`` in ``jaxprm.data.solution``, the benchmark files in
``jaxprm.data.formats.benchmarks``. This module re-exports their names
(``from jaxprm.eval.answers import is_correct, load_benchmark_jsonl`` keeps working).
"""
from __future__ import annotations

from jaxprm.data import answers as _answers
from jaxprm.data.answers import *  # noqa: F403
from jaxprm.data.answers import DEFAULT_NUM_CHOICES, KINDS, LETTERS
from jaxprm.data.formats.benchmarks import FORMAT_FIELDS, FORMATS, BenchmarkFormatError, load_benchmark_jsonl

__all__ = [*_answers.__all__, "DEFAULT_NUM_CHOICES", "KINDS", "LETTERS", "BenchmarkFormatError", "FORMATS",
           "FORMAT_FIELDS", "load_benchmark_jsonl"]
