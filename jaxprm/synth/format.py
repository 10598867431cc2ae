"""The rollout prompt of the VL-PRM step format; the format itself lives in ``jaxprm.data.solution``.

A policy is asked (``build_rollout_prompt``) to answer in two sections, each step wrapped in
numbered tags, and to finish with the answer boxed inside ``<correct_answer>`` (the layout is
described in ``jaxprm.data.solution``, which parses, validates and renders it; its names are
re-exported here). Our prompt paraphrases the VL-PRM one (it is not copied) and is answer-type
agnostic (VL-PRM had one prompt per dataset, e.g. "a single numeric string").

``parse_solution`` returns a ``ParsedSolution`` whose ``error`` is ``None`` for a valid output or
one of ``MALFORMED_REASONS`` (with ``detail``) -- the pipeline counts those and re-asks.
"""
from __future__ import annotations

from typing import Sequence

from jaxprm.data.solution import (  # noqa: F401  (re-exported: F.parse_solution, F.render_prefix, ...)
    KIND_OF_SECTION,
    MALFORMED_REASONS,
    MAX_STEPS_PER_SECTION,
    REASON,
    SECTION_OF_KIND,
    SECTIONS,
    VISUAL,
    ParsedSolution,
    join_prefix,
    parse_prefix,
    parse_solution,
    render_continuation,
    render_prefix,
    render_solution,
    render_steps,
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


# ``continuation="user_prompt"`` (servers that cannot continue an assistant message): the partial
# solution is quoted in the user turn after the rollout prompt, with this request
ROLLOUT_CONTINUE_INSTRUCTION = (
    "Here is the beginning of a solution in this format. Continue it from exactly where it stops, keeping the "
    "same format and numbering, and finish with the <correct_answer> block. Write only the continuation.\n\n"
    "{partial}"
)


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


__all__ = ["ROLLOUT_CONTINUE_INSTRUCTION", "ROLLOUT_PROMPT_TEMPLATE", "build_rollout_prompt", "format_question"]  # and the format names imported above
