"""The VL-PRM step format: the rollout prompt, a parser/validator of tagged solutions, renderers.

A policy is asked (``build_rollout_prompt``) to answer in two sections, each step wrapped in
numbered tags, and to finish with the answer boxed inside ``<correct_answer>``::

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
(``convert_mc_to_prm_signal.py``) also accepts ``[Perception]`` as the first section's name, as
``parse_solution`` does. Our prompt paraphrases the VL-PRM one (it is not copied) and is
answer-type agnostic (VL-PRM had one prompt per dataset, e.g. "a single numeric string").

``parse_solution`` returns a ``ParsedSolution`` whose ``error`` is ``None`` for a valid output or
one of ``MALFORMED_REASONS`` (with ``detail``) -- the pipeline counts those and re-asks.
The boxed answer is taken from ``<correct_answer>`` when present, else from the last
``\\boxed{}`` of the output (the embedded puzzle solutions box it in their last step).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from jaxprm.data.schema import PERCEPTION, REASONING, Step
from jaxprm.eval.answers import extract_boxed

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

ROLLOUT_PROMPT_TEMPLATE = """You are an expert at visual reasoning. Look carefully at the image and answer the question below.

<question>
{question}
</question>

Work in two stages.
1. Under a [Visual Elements] heading, describe step by step what you see in the image that matters for the question: objects, shapes, colours, positions, counts, text and numbers. Keep each step short and factual.
2. Under a [Reasoning] heading, reason step by step from those observations to the answer, one computation or inference per step.

Wrap every step in numbered tags, restarting the numbering in each section: <step_1>...</step_1>, <step_2>...</step_2>, and so on. Use at most {max_steps} steps per section. Finish with the final answer in LaTeX box notation inside <correct_answer> tags. Follow exactly this layout:

[Visual Elements]
<step_1>
...first observation...
</step_1>
<step_2>
...second observation...
</step_2>

[Reasoning]
<step_1>
...first reasoning step...
</step_1>
<step_2>
...second reasoning step...
</step_2>

<correct_answer>
$\\boxed{{answer}}$
</correct_answer>

{answer_hint}Write nothing outside these sections."""

_HEADER_RE = re.compile(r"\[\s*(Visual Elements|Perception|Reasoning)\s*\]", re.IGNORECASE)
_STEP_OPEN_RE = re.compile(r"<step_(\d+)>")
_STEP_PAIR_RE = re.compile(r"<step_(\d+)>(.*?)</step_(\d+)>", re.DOTALL)
_ANSWER_BLOCK_RE = re.compile(r"<correct_answer>(.*?)</correct_answer>", re.DOTALL)


def format_question(question: str, choices: Sequence[str] | None = None) -> str:
    """The question text, with lettered options appended when the question has ``choices``."""
    q = question.strip()
    if choices:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        opts = "\n".join(f"({letters[i]}) {c}" for i, c in enumerate(choices))
        q = f"{q}\n\nOptions:\n{opts}"
    return q


def build_rollout_prompt(
    question: str,
    choices: Sequence[str] | None = None,
    max_steps: int = MAX_STEPS_PER_SECTION,
    template: str | None = None,
) -> str:
    """The user prompt asking a policy for a "[Visual Elements]"/"[Reasoning]" tagged solution.

    ``template`` (optional) may use ``{question}``, ``{max_steps}`` and ``{answer_hint}``."""
    hint = "For a multiple-choice question, box the letter of the correct option. " if choices else ""
    return (template or ROLLOUT_PROMPT_TEMPLATE).format(
        question=format_question(question, choices), max_steps=max_steps, answer_hint=hint
    )


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
    ``MALFORMED_REASONS`` and a human-readable ``detail``."""
    text = text if isinstance(text, str) else ""

    def bad(reason: str, detail: str = "", perception=(), reasoning=(), answer=None) -> ParsedSolution:
        return ParsedSolution(list(perception), list(reasoning), answer, text, reason, detail)

    if not text.strip():
        return bad("empty_output", "the output is empty")
    headers = list(_HEADER_RE.finditer(text))
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


# ----------------------------------------------------------------------------- rendering


def _tagged(steps: Sequence[str], start: int = 1) -> str:
    return "\n".join(f"<step_{i}>\n{t.strip()}\n</step_{i}>" for i, t in enumerate(steps, start))


def render_solution(
    perception: Sequence[str], reasoning: Sequence[str], answer: str | None = None
) -> str:
    """A full tagged solution (the inverse of ``parse_solution``)."""
    parts = ["[Visual Elements]\n" + _tagged(perception), "[Reasoning]\n" + _tagged(reasoning)]
    if answer is not None:
        parts.append(f"<correct_answer>\n$\\boxed{{{answer}}}$\n</correct_answer>")
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
        return "[Visual Elements]\n" + _tagged(perc) + "\n\n[Reasoning]\n" + _tagged(reas)
    return "[Visual Elements]\n" + _tagged(perc)


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
            parts.append("[Reasoning]\n" + _tagged(reas, 1))
        else:
            parts.append(_tagged(reas, n_reas_prefix + 1))
    if answer is not None:
        parts.append(f"<correct_answer>\n$\\boxed{{{answer}}}$\n</correct_answer>")
    body = "\n\n".join(parts)
    return "\n" + body if body else ""


def join_prefix(prefix: str, continuation: str) -> str:
    """Prefix + continuation, tolerating a policy that repeats the prefix (chat servers without
    assistant-prefill continue in a new message, often restating the solution)."""
    c = continuation or ""
    if c.lstrip().startswith("[Visual Elements]") or c.lstrip().startswith("[Perception]"):
        return c
    return prefix + c


__all__ = [
    "KIND_OF_SECTION",
    "MALFORMED_REASONS",
    "MAX_STEPS_PER_SECTION",
    "ParsedSolution",
    "REASON",
    "ROLLOUT_PROMPT_TEMPLATE",
    "SECTIONS",
    "SECTION_OF_KIND",
    "VISUAL",
    "build_rollout_prompt",
    "format_question",
    "join_prefix",
    "parse_solution",
    "render_continuation",
    "render_prefix",
    "render_solution",
    "render_steps",
]


def parse_prefix(text: str) -> list[tuple[str, str]]:
    """The steps of a (possibly partial) tagged solution as ``[(kind, text)]``, leniently: no
    answer is required and the [Reasoning] section may be missing. Used to read MC prefixes."""
    text = text or ""
    headers = list(_HEADER_RE.finditer(text))
    out: list[tuple[str, str]] = []
    for h, nxt in zip(headers, headers[1:] + [None]):
        kind = REASONING if h.group(1).lower() == "reasoning" else PERCEPTION
        end = nxt.start() if nxt is not None else len(text)
        body = text[h.end() : end]
        m = _ANSWER_BLOCK_RE.search(body)
        if m:
            body = body[: m.start()]
        out += [(kind, p.group(2).strip()) for p in _STEP_PAIR_RE.finditer(body)]
    return out


__all__ += ["parse_prefix"]
