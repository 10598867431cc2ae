"""Solutions as lists of steps: splitting, joining, cleaning, answer detection.

Two solution layouts are understood:

* **blank-line separated** steps (what ``jaxprm.data.synthetic.format_solution`` writes and what
  a policy generating one step at a time with the stop string ``"\\n\\n"`` produces). A section
  header (``[Visual Elements]``, ``[Perception]``, ``[Reasoning]``) on the first line of a step is
  taken off the step and gives the step's kind::

      [Visual Elements]
      There are 2 red circles: ...

      [Reasoning]
      Adding the two numbers: 2 + 3 = 5.

      So ... The answer is \\boxed{5}.

* the **VL-PRM tagged** layout, recognised when the text holds ``<step_k>...</step_k>`` blocks::

      [Visual Elements]
      <step_1>
      ...
      </step_1>
      [Reasoning]
      <step_1>
      ...
      </step_1>
      <correct_answer>
      ...
      </correct_answer>

  each ``<step_k>`` block is one step (its kind from the section it sits in); a trailing
  ``<correct_answer>`` block is not a step (``extract_final_answer`` reads it).

``join_steps`` is the inverse of the blank-line split for steps without headers. Answer detection
(``has_answer`` / ``extract_final_answer``) looks for a ``\\boxed{...}`` (nested braces allowed) or
a ``<correct_answer>`` block.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from jaxprm.data.schema import PERCEPTION, REASONING
from jaxprm.eval.answers import extract_boxed

__all__ = [
    "STEP_SEPARATOR",
    "clean_step",
    "extract_final_answer",
    "has_answer",
    "join_steps",
    "split_steps",
    "split_steps_with_kinds",
]

STEP_SEPARATOR = "\n\n"
_HEADER_RE = re.compile(r"^\s*\[(Visual Elements|Perception|Reasoning)\][ \t]*(?:\n|$)", re.I)
_ANY_HEADER_RE = re.compile(r"\[(Visual Elements|Perception|Reasoning)\]", re.I)
_STEP_BLOCK_RE = re.compile(r"<step_(\d+)>(.*?)(?:</step_\1>|(?=<step_\d+>)|(?=\[(?:Visual Elements|Perception|Reasoning)\])|(?=<correct_answer>)|$)", re.S | re.I)
_STEP_WRAP_RE = re.compile(r"^\s*<step_(\d+)>\s*(.*?)\s*(?:</step_\1>)?\s*$", re.S | re.I)
_ANSWER_TAG_RE = re.compile(r"<correct_answer>\s*(.*?)\s*(?:</correct_answer>|$)", re.S | re.I)
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")


def _kind_of(header: str) -> str:
    return REASONING if header.lower() == "reasoning" else PERCEPTION


def clean_step(text: str) -> str:
    """A step as the PRM should see it: leading section header, ``<step_k>`` wrapper and
    surrounding whitespace removed (``"[Reasoning]\\n2 + 3 = 5."`` -> ``"2 + 3 = 5."``)."""
    return _clean(text)[0]


def _clean(text: str) -> tuple[str, str | None]:
    kind = None
    m = _HEADER_RE.match(text)
    if m:
        kind = _kind_of(m.group(1))
        text = text[m.end():]
    m = _STEP_WRAP_RE.match(text)
    if m:
        text = m.group(2)
    return text.strip(), kind


def _split_tagged(text: str) -> list[tuple[str, str | None]]:
    body = _ANSWER_TAG_RE.split(text, maxsplit=1)[0]
    # section boundaries: (start offset, kind)
    sections = [(m.start(), _kind_of(m.group(1))) for m in _ANY_HEADER_RE.finditer(body)]
    out = []
    for m in _STEP_BLOCK_RE.finditer(body):
        kind = None
        for start, k in sections:
            if start <= m.start():
                kind = k
        step = m.group(2).strip()
        if step:
            out.append((step, kind))
    return out


def split_steps_with_kinds(text: str) -> list[tuple[str, str | None]]:
    """``[(step text, kind)]`` where kind is ``"perception"`` / ``"reasoning"`` from the section
    headers (a step inherits the last header above it) or None when the text has no headers."""
    if text is None:
        return []
    text = str(text).replace("\r\n", "\n")
    if re.search(r"<step_\d+>", text, re.I):
        tagged = _split_tagged(text)
        if tagged:
            return tagged
    out: list[tuple[str, str | None]] = []
    kind = None
    for chunk in _BLANK_LINE_RE.split(text):
        step, k = _clean(chunk)
        if k is not None:
            kind = k
        if step:
            out.append((step, kind))
    return out


def split_steps(text: str) -> list[str]:
    """Split a solution into step texts (see the module docstring); empty chunks are dropped."""
    return [s for s, _ in split_steps_with_kinds(text)]


def join_steps(steps: Sequence[str], sep: str = STEP_SEPARATOR) -> str:
    """Steps back to one solution text, blank-line separated (the inverse of ``split_steps`` for
    header-free steps that contain no blank line themselves)."""
    if isinstance(steps, str):
        raise TypeError("join_steps expects a list of step strings, got a single string")
    return sep.join(s.strip("\n") for s in steps)


def extract_final_answer(text: str) -> str | None:
    """The final answer a solution commits to: the last ``\\boxed{...}`` content, else the
    content of a ``<correct_answer>`` block; None when there is neither."""
    if not text:
        return None
    b = extract_boxed(text)
    if b is not None and b.strip():
        return b.strip()
    m = _ANSWER_TAG_RE.search(text)
    if m and m.group(1).strip():
        return m.group(1).strip()
    return None


def has_answer(text: str) -> bool:
    """Whether ``text`` (a step or a whole solution) states a final answer (see ``extract_final_answer``)."""
    return extract_final_answer(text) is not None
