"""The solution text format, in one place: steps, sections, ``<step_k>`` tags and ``\\boxed{}``.

Data importers, search, synthesis and eval read and write solutions through this module.

Two layouts are understood:

* **blank-line separated** steps (what ``format_solution`` writes and what a policy generating one
  step at a time with the stop string ``"\\n\\n"`` produces). A section header (``[Visual Elements]``,
  ``[Perception]``, ``[Reasoning]``) at the start of a step is taken off the step and gives the
  step's kind (and the kind of the steps after it)::

      [Visual Elements]
      There are 2 red circles: ...

      [Reasoning]
      Adding the two numbers: 2 + 3 = 5.

      So ... The answer is \\boxed{5}.

* the **VL-PRM tagged** layout, recognised when the text holds ``<step_k>`` tags::

      [Visual Elements]
      <step_1>
      ...perception step...
      </step_1>
      ...
      [Reasoning]
      <step_1>
      ...reasoning step...
      </step_1>
      ...
      <correct_answer>
      $\\boxed{...}$
      </correct_answer>

  This is the format of the VL-PRM rollouts (github.com/rohitsinha-iitfellow/vlprm,
  ``rollout_data_generation/rollout_generation/rollout.py``: the user prompt asks for
  "[Visual Elements]" and "[Reasoning]" sections with ``<step_1>, <step_2>, ...`` tags and a
  ``<correct_answer>$\\boxed{...}$</correct_answer>`` block; its parser
  ``parse_response_to_perception_and_reasoning_steps_and_correct_answer`` takes matching
  ``<step_k>...</step_k>`` pairs per section and rejects outputs without either section, without
  steps or without the answer block; MC prefixes are rebuilt with the section headers and tags,
  ``max_perception_steps = max_reasoning_steps = 12``). ``theogbrand/mmr_rollout_data``
  (``convert_mc_to_prm_signal.py``) also accepts ``[Perception]`` as the first section's name.

Reading is lenient (``split_steps``, ``split_steps_with_kinds``, ``split_tagged_steps``,
``parse_prefix``, ``clean_step``): headers in any case and with spaces inside the brackets, a
header followed by text on the same line, a ``<step_k>`` block closed by any ``</step_j>``, by the
next tag or header, or not at all. Empty steps are dropped. Validation is strict
(``parse_solution``): it follows the VL-PRM parser and returns one of ``MALFORMED_REASONS``.

``extract_boxed`` takes the last ``\\boxed{...}`` (nested braces handled); ``extract_final_answer``
/ ``has_answer`` also read a ``<correct_answer>`` block. ``join_steps``, ``format_solution`` and the
``render_*`` functions write the two layouts.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from jaxprm.data.schema import PERCEPTION, REASONING, Step

__all__ = [
    "KIND_OF_SECTION",
    "MALFORMED_REASONS",
    "MAX_STEPS_PER_SECTION",
    "ParsedSolution",
    "REASON",
    "SECTIONS",
    "SECTION_HEADER_RE",
    "SECTION_OF_KIND",
    "STEP_SEPARATOR",
    "VISUAL",
    "clean_step",
    "clean_step_with_kind",
    "extract_boxed",
    "extract_final_answer",
    "format_solution",
    "has_answer",
    "join_prefix",
    "join_steps",
    "mark_up_steps",
    "parse_prefix",
    "parse_solution",
    "render_continuation",
    "render_prefix",
    "render_solution",
    "render_steps",
    "split_steps",
    "split_steps_with_kinds",
    "split_tagged_steps",
]

STEP_SEPARATOR = "\n\n"
VISUAL = "Visual Elements"
REASON = "Reasoning"
SECTIONS = (VISUAL, REASON)
KIND_OF_SECTION = {VISUAL: PERCEPTION, REASON: REASONING}
SECTION_OF_KIND = {PERCEPTION: VISUAL, REASONING: REASON}
MAX_STEPS_PER_SECTION = 12

MALFORMED_REASONS = (
    "empty_output",
    "no_visual_section",
    "no_reasoning_section",
    "sections_out_of_order",
    "no_perception_steps",
    "no_reasoning_steps",
    "bad_step_tags",
    "bad_step_numbering",
    "empty_step",
    "too_many_perception_steps",
    "too_many_reasoning_steps",
    "no_boxed_answer",
)

_HEADER = r"\[\s*(Visual Elements|Perception|Reasoning)\s*\]"
# "[Visual Elements]", "[ perception ]", "[Reasoning]", ...; group 1 is the section name
SECTION_HEADER_RE = re.compile(_HEADER, re.I)
_LEADING_HEADER_RE = re.compile(r"^\s*" + _HEADER + r"\s*", re.I)
_STEP_TAG_RE = re.compile(r"<step_\d+>", re.I)
_STEP_WRAP_RE = re.compile(r"^\s*<step_(\d+)>\s*(.*?)\s*(?:</step_\d+>)?\s*$", re.S | re.I)
_STEP_BLOCK_RE = re.compile(
    r"<step_(\d+)>(.*?)(?:</step_\d+>|(?=<step_\d+>)|(?=" + _HEADER.replace("(", "(?:") + r")|(?=<correct_answer>)|$)",
    re.S | re.I,
)
_ANSWER_TAG_RE = re.compile(r"<correct_answer>\s*(.*?)\s*(?:</correct_answer>|$)", re.S | re.I)
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")
# strict forms, for parse_solution (as the VL-PRM parser reads them)
_STEP_OPEN_RE = re.compile(r"<step_(\d+)>")
_STEP_PAIR_RE = re.compile(r"<step_(\d+)>(.*?)</step_(\d+)>", re.S)
_ANSWER_BLOCK_RE = re.compile(r"<correct_answer>(.*?)</correct_answer>", re.S)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)")


def _kind_of(header: str) -> str:
    return REASONING if header.lower() == "reasoning" else PERCEPTION


# ----------------------------------------------------------------------------- \boxed{}


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces
    handled; ``\\boxed 5`` (no braces) is accepted too. Returns None when there is none or the
    last one is unterminated (e.g. a truncated generation) and no earlier one is complete."""
    if not text:
        return None
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for pos in reversed(starts):
        i = pos
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                c = text[j]
                if c == "{" and (j == 0 or text[j - 1] != "\\"):
                    depth += 1
                elif c == "}" and (j == 0 or text[j - 1] != "\\"):
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
            continue  # unterminated: try an earlier one
        if i > pos:  # "\boxed 5"
            m = re.match(r"[^\s$]+", text[i:])
            if m:
                return m.group(0)
    return None


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


# ----------------------------------------------------------------------------- reading steps


def clean_step_with_kind(text: str) -> tuple[str, str | None]:
    """``(step, kind)``: a leading section header and a ``<step_k>`` wrapper removed, the kind the
    header gives (``"perception"`` / ``"reasoning"``) or None without a header."""
    kind = None
    m = _LEADING_HEADER_RE.match(text)
    if m:
        kind = _kind_of(m.group(1))
        text = text[m.end():]
    m = _STEP_WRAP_RE.match(text)
    if m:
        text = m.group(2)
    return text.strip(), kind


def clean_step(text: str) -> str:
    """A step as the PRM should see it: leading section header, ``<step_k>`` wrapper and
    surrounding whitespace removed (``"[Reasoning]\\n2 + 3 = 5."`` -> ``"2 + 3 = 5."``)."""
    return clean_step_with_kind(text)[0]


def split_tagged_steps(text: str) -> list[tuple[str, str | None]]:
    """``[(step text, kind)]`` of the ``<step_k>`` blocks of a tagged solution, up to a
    ``<correct_answer>`` block (which is not a step); a block's kind comes from the last section
    header above it (None before any header). ``[]`` when the text has no step tags."""
    text = "" if text is None else str(text).replace("\r\n", "\n")
    m = _ANSWER_TAG_RE.search(text)
    body = text[: m.start()] if m else text
    sections = [(h.start(), _kind_of(h.group(1))) for h in SECTION_HEADER_RE.finditer(body)]
    out = []
    for b in _STEP_BLOCK_RE.finditer(body):
        kind = None
        for start, k in sections:
            if start <= b.start():
                kind = k
        step = b.group(2).strip()
        if step:
            out.append((step, kind))
    return out


def split_steps_with_kinds(text: str) -> list[tuple[str, str | None]]:
    """``[(step text, kind)]`` where kind is ``"perception"`` / ``"reasoning"`` from the section
    headers (a step inherits the last header above it) or None when the text has no headers."""
    if text is None:
        return []
    text = str(text).replace("\r\n", "\n")
    if _STEP_TAG_RE.search(text):
        tagged = split_tagged_steps(text)
        if tagged:
            return tagged
    out: list[tuple[str, str | None]] = []
    kind = None
    for chunk in _BLANK_LINE_RE.split(text):
        step, k = clean_step_with_kind(chunk)
        if k is not None:
            kind = k
        if step:
            out.append((step, kind))
    return out


def split_steps(text: str) -> list[str]:
    """Split a solution into step texts (see the module docstring); empty chunks are dropped."""
    return [s for s, _ in split_steps_with_kinds(text)]


def parse_prefix(text: str) -> list[tuple[str, str]]:
    """The steps of a (possibly partial) tagged solution as ``[(kind, text)]``, leniently: no
    answer is required and the [Reasoning] section may be missing; steps above the first section
    header are left out. Used to read MC prefixes."""
    return [(kind, step) for step, kind in split_tagged_steps(text or "") if kind is not None]


# ----------------------------------------------------------------------------- validating


@dataclasses.dataclass
class ParsedSolution:
    """A policy output split into sections. ``error`` is None when the output is well formed."""

    perception: list[str]
    reasoning: list[str]
    answer: str | None
    text: str = ""
    error: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def num_steps(self) -> int:
        return len(self.perception) + len(self.reasoning)

    def steps(self) -> list[Step]:
        """Unlabelled ``Step``s: perception steps from [Visual Elements], then reasoning steps."""
        return [Step(text=t, kind=PERCEPTION) for t in self.perception] + [
            Step(text=t, kind=REASONING) for t in self.reasoning
        ]

    def flat(self) -> list[tuple[str, str]]:
        """[(kind, text)] in order."""
        return [(PERCEPTION, t) for t in self.perception] + [(REASONING, t) for t in self.reasoning]


def _section_steps(body: str) -> tuple[list[str] | None, str, str]:
    """(steps, error, detail) for one section body."""
    pairs = list(_STEP_PAIR_RE.finditer(body))
    opens = _STEP_OPEN_RE.findall(body)
    if not pairs:
        return None, "", ""
    for m in pairs:
        if m.group(1) != m.group(3):
            return None, "bad_step_tags", f"<step_{m.group(1)}> closed by </step_{m.group(3)}>"
    if len(opens) != len(pairs):
        return None, "bad_step_tags", f"{len(opens)} opening tags but {len(pairs)} complete steps"
    nums = [int(m.group(1)) for m in pairs]
    if nums != list(range(1, len(nums) + 1)):
        return None, "bad_step_numbering", f"steps numbered {nums}"
    texts = [m.group(2).strip() for m in pairs]
    for k, t in enumerate(texts):
        if not t:
            return None, "empty_step", f"<step_{k + 1}> is empty"
    return texts, "", ""


def parse_solution(
    text: str,
    max_steps_per_section: int = MAX_STEPS_PER_SECTION,
    require_answer: bool = True,
) -> ParsedSolution:
    """Split a tagged solution into perception/reasoning steps and its boxed answer; validate.

    Never raises on bad input: a malformed output comes back with ``error`` set to one of
    ``MALFORMED_REASONS`` and a human-readable ``detail``. The boxed answer is taken from
    ``<correct_answer>`` when present, else from the last ``\\boxed{}`` of the output (the
    embedded puzzle solutions box it in their last step)."""
    text = text if isinstance(text, str) else ""

    def bad(reason: str, detail: str = "", perception=(), reasoning=(), answer=None) -> ParsedSolution:
        return ParsedSolution(list(perception), list(reasoning), answer, text, reason, detail)

    if not text.strip():
        return bad("empty_output", "the output is empty")
    headers = list(SECTION_HEADER_RE.finditer(text))
    vis = [h for h in headers if h.group(1).lower() != "reasoning"]
    rea = [h for h in headers if h.group(1).lower() == "reasoning"]
    if not vis:
        return bad("no_visual_section", "no [Visual Elements] heading")
    if not rea:
        return bad("no_reasoning_section", "no [Reasoning] heading")
    v, r = vis[0], rea[0]
    if r.start() < v.start():
        return bad("sections_out_of_order", "[Reasoning] comes before [Visual Elements]")
    ans_block = _ANSWER_BLOCK_RE.search(text, r.end())
    v_body = text[v.end() : r.start()]
    r_end = ans_block.start() if ans_block else len(text)
    r_body = text[r.end() : r_end]

    perception, err, detail = _section_steps(v_body)
    if err:
        return bad(err, "[Visual Elements]: " + detail)
    if not perception:
        return bad("no_perception_steps", "no <step_k>...</step_k> under [Visual Elements]")
    reasoning, err, detail = _section_steps(r_body)
    if err:
        return bad(err, "[Reasoning]: " + detail, perception)
    if not reasoning:
        return bad("no_reasoning_steps", "no <step_k>...</step_k> under [Reasoning]", perception)
    if len(perception) > max_steps_per_section:
        return bad("too_many_perception_steps", f"{len(perception)} > {max_steps_per_section}", perception, reasoning)
    if len(reasoning) > max_steps_per_section:
        return bad("too_many_reasoning_steps", f"{len(reasoning)} > {max_steps_per_section}", perception, reasoning)
    answer = extract_boxed(ans_block.group(1)) if ans_block else None
    if answer is None:
        answer = extract_boxed(text)
    if require_answer and (answer is None or not answer.strip()):
        return bad("no_boxed_answer", "no \\boxed{...} answer", perception, reasoning)
    return ParsedSolution(perception, reasoning, answer, text)


# ----------------------------------------------------------------------------- writing


def join_steps(steps: Sequence[str], sep: str = STEP_SEPARATOR) -> str:
    """Steps back to one solution text, blank-line separated (the inverse of ``split_steps`` for
    header-free steps that contain no blank line themselves)."""
    if isinstance(steps, str):
        raise TypeError("join_steps expects a list of step strings, got a single string")
    return sep.join(s.strip("\n") for s in steps)


def mark_up_steps(texts: Sequence[str], kinds: Sequence[str]) -> list[str]:
    """Each step in VL-PRM's markup, as the released VL-PRM training turns hold it: ``<step_k>\\n{text}\\n
    </step_k>`` with ``k`` counted within the step's section, and the section header (``[Visual
    Elements]`` / ``[Reasoning]``) in front of the first step of each section.

    A step that already holds a ``<step_k>`` tag is kept as it is (it still counts in its section);
    a leading header in a step's text gives its kind and is moved into the markup. ``kinds`` are
    ``"perception"`` / ``"reasoning"`` (``jaxprm.data.schema``).
    """
    if isinstance(texts, str):
        raise TypeError("mark_up_steps expects a list of step strings, got a single string")
    texts, kinds = list(texts), list(kinds)
    if len(texts) != len(kinds):
        raise ValueError(f"got {len(kinds)} kinds for {len(texts)} steps")
    seen = {PERCEPTION: 0, REASONING: 0}
    out = []
    for i, (t, k) in enumerate(zip(texts, kinds)):
        body, hdr = clean_step_with_kind(t)
        kind = hdr or k
        if kind not in seen:
            raise ValueError(f"step {i}: kind must be {PERCEPTION!r} or {REASONING!r}, got {kind!r}")
        seen[kind] += 1
        if _STEP_TAG_RE.search(t):
            out.append(t)
            continue
        n = seen[kind]
        head = f"[{SECTION_OF_KIND[kind]}]\n" if n == 1 else ""
        out.append(f"{head}<step_{n}>\n{body}\n</step_{n}>")
    return out


def format_solution(steps: Sequence[Step], sep: str = STEP_SEPARATOR) -> str:
    """``Step``s as a blank-line separated solution: "[Visual Elements]" then "[Reasoning]" sections."""
    perc = [s.text for s in steps if s.kind == PERCEPTION]
    reas = [s.text for s in steps if s.kind == REASONING]
    parts = []
    if perc:
        parts.append(f"[{VISUAL}]\n" + sep.join(perc))
    if reas:
        parts.append(f"[{REASON}]\n" + sep.join(reas))
    return sep.join(parts)


def _tagged(steps: Sequence[str], start: int = 1) -> str:
    return "\n".join(f"<step_{i}>\n{t.strip()}\n</step_{i}>" for i, t in enumerate(steps, start))


def _answer_block(answer: str) -> str:
    return f"<correct_answer>\n$\\boxed{{{answer}}}$\n</correct_answer>"


def render_solution(
    perception: Sequence[str], reasoning: Sequence[str], answer: str | None = None
) -> str:
    """A full tagged solution (the inverse of ``parse_solution``)."""
    parts = [f"[{VISUAL}]\n" + _tagged(perception), f"[{REASON}]\n" + _tagged(reasoning)]
    if answer is not None:
        parts.append(_answer_block(answer))
    return "\n\n".join(parts)


def render_steps(steps: Sequence[Step], answer: str | None = None) -> str:
    """A tagged solution from ``Step``s (kinds pick the section)."""
    return render_solution(
        [s.text for s in steps if s.kind == PERCEPTION], [s.text for s in steps if s.kind == REASONING], answer
    )


def render_prefix(flat: Sequence[tuple[str, str]], k: int) -> str:
    """The first ``k`` steps of a solution (``[(kind, text)]``, perception first) in the tagged
    format, as a policy continues it: section headers and tags, no answer; ends after the last
    closing tag. This is how VL-PRM rebuilds the prefix of each MC task."""
    if not 1 <= k <= len(flat):
        raise ValueError(f"prefix length must be in [1, {len(flat)}], got {k}")
    head = list(flat[:k])
    perc = [t for kind, t in head if kind == PERCEPTION]
    reas = [t for kind, t in head if kind == REASONING]
    if reas:  # perception steps come first, so a reasoning prefix carries all of them
        return f"[{VISUAL}]\n" + _tagged(perc) + f"\n\n[{REASON}]\n" + _tagged(reas)
    return f"[{VISUAL}]\n" + _tagged(perc)


def render_continuation(
    flat: Sequence[tuple[str, str]], k: int, answer: str | None = None
) -> str:
    """What a policy writes after ``render_prefix(flat, k)`` to complete the solution ``flat``:
    the remaining steps with the right tag numbers (and the [Reasoning] heading if the prefix
    stopped inside [Visual Elements]), then the answer block."""
    n_perc_prefix = sum(1 for kind, _ in flat[:k] if kind == PERCEPTION)
    n_reas_prefix = k - n_perc_prefix
    rest = list(flat[k:])
    perc = [t for kind, t in rest if kind == PERCEPTION]
    reas = [t for kind, t in rest if kind == REASONING]
    parts = []
    if perc:
        parts.append(_tagged(perc, n_perc_prefix + 1))
    if reas:
        if n_reas_prefix == 0:
            parts.append(f"[{REASON}]\n" + _tagged(reas, 1))
        else:
            parts.append(_tagged(reas, n_reas_prefix + 1))
    if answer is not None:
        parts.append(_answer_block(answer))
    body = "\n\n".join(parts)
    return "\n" + body if body else ""


def join_prefix(prefix: str, continuation: str) -> str:
    """Prefix + continuation, tolerating a policy that repeats the prefix (chat servers without
    assistant-prefill continue in a new message, often restating the solution)."""
    c = continuation or ""
    if c.lstrip().startswith(f"[{VISUAL}]") or c.lstrip().startswith("[Perception]"):
        return c
    return prefix + c
