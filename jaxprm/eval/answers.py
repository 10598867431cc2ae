"""Answer extraction and matching, the graders, and the benchmark loader, as eval uses them.

The code lives below eval so that synthesis and the data readers share it: extraction, matching and
the ``official`` / ``vlprm`` / ``lenient`` graders in ``jaxprm.data.answers`` (rules in
``jaxprm.data.answer_rules``), ``\\boxed{}`` in ``jaxprm.data.solution``, the benchmark files in
``jaxprm.data.formats.benchmarks``. This module re-exports their names
(``from jaxprm.eval.answers import is_correct, Grader, load_benchmark_jsonl`` keeps working) and
adds ``openai_text_fn``: an OpenAI-compatible model as the graders' MathVista extractor or VL-PRM
judge (eval sits above ``jaxprm.search``, whose client it uses).
"""
from __future__ import annotations

from typing import Callable

from jaxprm.data import answers as _answers
from jaxprm.data.answers import *  # noqa: F403
from jaxprm.data.answers import DEFAULT_NUM_CHOICES, KINDS, LETTERS
from jaxprm.data.formats.benchmarks import FORMAT_FIELDS, FORMATS, BenchmarkFormatError, load_benchmark_jsonl

__all__ = [*_answers.__all__, "DEFAULT_NUM_CHOICES", "KINDS", "LETTERS", "BenchmarkFormatError", "FORMATS",
           "FORMAT_FIELDS", "load_benchmark_jsonl", "openai_text_fn"]


def openai_text_fn(base_url: str, model: str, api_key: str | None = None, max_tokens: int = 256,
                   **client_kwargs) -> Callable[[str], str]:
    """``prompt -> text`` on an OpenAI-compatible server (``jaxprm.search.openai_client``): one user
    message, temperature 0, as MathVista's extractor and VL-PRM's judge are called. Pass it as a
    ``Grader``'s ``extractor`` or ``judge``. Errors are the client's (the ``Grader`` treats a failed
    call as the official scripts do: an empty extraction, a judge miss)."""
    from jaxprm.search.openai_client import OpenAIChatClient

    client = OpenAIChatClient(base_url, model, api_key=api_key, **client_kwargs)

    def ask(prompt: str) -> str:
        return client.chat([{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens)[0]

    ask.client = client  # type: ignore[attr-defined]
    return ask
