"""A VLM judge that finds the first incorrect step of a tagged solution, and a scripted one.

VL-PRM's judge (o4-mini through the Azure batch API; prompt as sent in
github.com/rohitsinha-iitfellow/vlprm ``rollout_data_generation/llm_judge_verification/
verification_pipeline_outputs/o4-mini/vqav2/verification_batches/batch_0001.jsonl``) gets the
problem and the "[Visual Elements]"/"[Reasoning]" tagged solution (and the image), reviews the
steps in order, writes one ``<analysis_k>`` per step under the same section headings, stops at
the first step with a material perception or reasoning error, and ends with
``<conclusion>Correct|Incorrect</conclusion>``. ``theogbrand/mmr_rollout_data``
(``convert_mc_to_prm_signal.py``, ``parse_first_incorrect_step_from_verification``) reads the
first incorrect step as the *last* analysis block: ``(section, k - 1)``, zero-based in its section.

Our prompt (``JUDGE_PROMPT_TEMPLATE``, a paraphrase) keeps that review procedure, adds the gold
answer (optional, ``include_answer``; VL-PRM's judge did not see it) and asks for a final JSON
line ``{"section": "Visual Elements" | "Reasoning" | null, "index": k | null}`` (zero-based
within the section; nulls = no error). ``parse_judge_output`` accepts that JSON (also with
``"step"`` = the 1-based tag number, a ``"first_incorrect_step"`` wrapper, or "no error"), and
VL-PRM's analysis/conclusion format. Parsing takes linear time: outputs over
``MAX_JUDGE_OUTPUT_CHARS`` and JSON nested deeper than a verdict are parse failures, never a
``RecursionError``. Unparseable or out-of-range answers are re-asked up to
``max_attempts`` times; HTTP retries and backoff (the ``openai`` package's), rate limiting and the
cost counter come from ``OpenAIChatClient``.

``ScriptedJudge`` is the offline judge for the puzzle task: it knows the ground-truth first error
and is wrong with probability ``noise`` (missing the error, pointing at another step, or flagging
a correct solution).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

import numpy as np

from jaxprm.data.schema import NEGATIVE, PERCEPTION, POSITIVE, Step
from jaxprm.data.solution import SECTION_HEADER_RE
from jaxprm.synth import format as F
from jaxprm.synth.policies import client_usage
from jaxprm.synth.questions import Question, stable_hash

JUDGE_PROMPT_TEMPLATE = """You will check a student's solution to a visual reasoning problem about the attached image, one step at a time.

The solution has a [Visual Elements] section (what the student perceives in the image) and a [Reasoning] section (how the student reasons from those observations to the answer). Steps are numbered <step_1>, <step_2>, ... and the numbering restarts in each section.
{answer_line}
Review the steps in order:
- check each [Visual Elements] step against the image: are the objects, attributes, positions, counts, text and numbers it states really there?
- check each [Reasoning] step for logical and arithmetic validity, given the problem and the steps before it.
Stop at the first step that contains a material perception or reasoning error; do not review the steps after it, since they may depend on it. Wording, style or harmless redundancy are not errors.

Write a short analysis of each step you review. Then end your reply with exactly one line of JSON and nothing after it:
{{"section": "Visual Elements", "index": k}} or {{"section": "Reasoning", "index": k}} for the first incorrect step, where k is its zero-based position within its section (<step_1> is index 0);
{{"section": null, "index": null}} if every step is correct.

<question>
{question}
</question>

<solution>
{solution}
</solution>"""

_ANSWER_LINE = (
    "The correct final answer to the problem is: {answer}. A solution that reaches a different answer contains "
    "at least one incorrect step.\n"
)

_NO_ERROR_WORDS = {"", "none", "null", "no error", "no_error", "noerror", "correct", "n/a", "all correct"}


class JudgeParseError(ValueError):
    """The judge's output has no usable verdict."""


@dataclasses.dataclass
class JudgeVerdict:
    ok: bool
    first_error: int | None = None  # flat step index; None = no error (when ok)
    section: str | None = None
    index: int | None = None  # zero-based within the section
    attempts: int = 0
    parse_failures: int = 0
    error: str | None = None
    raw: str | None = None

    def step_values(self, n: int) -> list[int | None]:
        """``Step.judge`` values: 1 before the first error, 0 at it, None after it (all None when
        the judge gave no verdict)."""
        if not self.ok:
            return [None] * n
        if self.first_error is None:
            return [POSITIVE] * n
        return [POSITIVE] * self.first_error + [NEGATIVE] + [None] * (n - self.first_error - 1)

    def to_meta(self, raw_chars: int = 0) -> dict[str, Any]:
        d = {
            "ok": self.ok,
            "first_error": self.first_error,
            "section": self.section,
            "index": self.index,
            "attempts": self.attempts,
            "parse_failures": self.parse_failures,
            "error": self.error,
        }
        if raw_chars and self.raw is not None:
            d["raw"] = self.raw[-raw_chars:]
        return d


# ----------------------------------------------------------------------------- index mapping


def section_counts(steps: Sequence[Step]) -> tuple[int, int]:
    n_perc = sum(1 for s in steps if s.kind == PERCEPTION)
    return n_perc, len(steps) - n_perc


def to_flat_index(section: str, index: int, n_perc: int, n_reas: int) -> int:
    if section == F.VISUAL:
        if not 0 <= index < n_perc:
            raise JudgeParseError(f"index {index} out of range for [Visual Elements] ({n_perc} steps)")
        return index
    if not 0 <= index < n_reas:
        raise JudgeParseError(f"index {index} out of range for [Reasoning] ({n_reas} steps)")
    return n_perc + index


def from_flat_index(i: int, n_perc: int) -> tuple[str, int]:
    return (F.VISUAL, i) if i < n_perc else (F.REASON, i - n_perc)


# ----------------------------------------------------------------------------- parsing


def _norm_section(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip().strip("[]").strip().lower()
    if s in _NO_ERROR_WORDS:
        return None
    if s in ("visual elements", "visual", "perception", "visual_elements", "visualelements"):
        return F.VISUAL
    if s in ("reasoning", "reason"):
        return F.REASON
    raise JudgeParseError(f"unknown section {v!r}")


def _as_int(v: Any, what: str) -> int:
    if isinstance(v, bool):
        raise JudgeParseError(f"{what} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
        return int(v)
    raise JudgeParseError(f"{what} must be an integer, got {v!r}")


_VERDICT_KEYS = {"section", "index", "step", "first_incorrect_step", "first_error", "verdict", "conclusion"}


def _from_obj(d: Any) -> tuple[str | None, int | None]:
    """(section, zero-based index) or (None, None) for "no error"."""
    if d is None:
        return None, None
    if isinstance(d, str):
        if d.strip().lower() in _NO_ERROR_WORDS:
            return None, None
        raise JudgeParseError(f"unrecognised verdict {d!r}")
    if isinstance(d, (list, tuple)):
        if len(d) == 2:
            sec = _norm_section(d[0])
            if sec is None:
                return None, None
            return sec, _as_int(d[1], "index")
        raise JudgeParseError(f"unrecognised verdict {d!r}")
    if not isinstance(d, dict):
        raise JudgeParseError(f"unrecognised verdict {d!r}")
    for wrap in ("first_incorrect_step", "first_error"):
        if wrap in d:
            return _from_obj(d[wrap])
    verdict = d.get("verdict", d.get("conclusion"))
    if isinstance(verdict, str) and verdict.strip().lower() in _NO_ERROR_WORDS and d.get("section") is None:
        return None, None
    sec = _norm_section(d.get("section"))
    idx, step = d.get("index"), d.get("step")
    if sec is None:
        if idx is None and step is None:
            return None, None
        raise JudgeParseError(f"an index without a section: {d!r}")
    if idx is not None:
        return sec, _as_int(idx, "index")
    if step is not None:
        return sec, _as_int(step, "step") - 1
    raise JudgeParseError(f"a section without an index: {d!r}")


MAX_JUDGE_OUTPUT_CHARS = 200_000  # longer judge outputs are a parse failure, not parsed
_MAX_VERDICT_HEIGHT = 3  # a verdict object nests at most this deep (a wrapper around {section, index})


def _json_objects(text: str) -> list[Any]:
    """The JSON objects in ``text`` nested at most ``_MAX_VERDICT_HEIGHT`` deep, by start position.

    One pass matches braces (braces in strings are not special, as they rarely are in a verdict);
    only balanced ``{...}`` spans of small height are decoded. Spans of one height are disjoint, so
    the decoding reads each character at most ``_MAX_VERDICT_HEIGHT`` times: linear time, and no
    recursion deeper than the height."""
    stack: list[list[int]] = []  # [start, height of the tallest child]
    spans: list[tuple[int, int]] = []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append([m.start(), 0])
        elif stack:
            start, child = stack.pop()
            height = child + 1
            if stack and stack[-1][1] < height:
                stack[-1][1] = height
            if height <= _MAX_VERDICT_HEIGHT:
                spans.append((start, m.end()))
    out = []
    for start, end in sorted(spans):
        try:
            out.append(json.loads(text[start:end]))
        except (ValueError, RecursionError):
            continue
    return out


_CONCLUSION_OPEN_RE = re.compile(r"<conclusion>", re.IGNORECASE)
_CONCLUSION_CLOSE_RE = re.compile(r"</conclusion>", re.IGNORECASE)
_ANALYSIS_OPEN_RE = re.compile(r"<analysis_(\d+)>")
_ANALYSIS_CLOSE_RE = re.compile(r"</analysis_\d+>")


def _analysis_numbers(seg: str) -> list[int]:
    """k of each complete ``<analysis_k>...</analysis_j>`` block, in order (linear time: once an
    opening tag has no closing tag after it, no later one has)."""
    out, pos = [], 0
    while True:
        m = _ANALYSIS_OPEN_RE.search(seg, pos)
        if not m:
            return out
        close = _ANALYSIS_CLOSE_RE.search(seg, m.end())
        if not close:
            return out
        out.append(int(m.group(1)))
        pos = close.end()


def _from_vlprm_tags(text: str) -> tuple[str | None, int | None] | None:
    m = _CONCLUSION_OPEN_RE.search(text)
    close = _CONCLUSION_CLOSE_RE.search(text, m.end()) if m else None
    if not close:
        return None
    concl_text = text[m.end() : close.start()]
    concl = concl_text.strip().lower().strip(".")
    if concl == "correct":
        return None, None
    if concl != "incorrect":
        raise JudgeParseError(f"conclusion must be Correct or Incorrect, got {concl_text.strip()[:200]!r}")
    body = text[: m.start()]
    last = None
    heads = list(SECTION_HEADER_RE.finditer(body))
    for h, nxt in zip(heads, heads[1:] + [None]):
        seg = body[h.end() : nxt.start() if nxt else len(body)]
        for k in _analysis_numbers(seg):
            last = (_norm_section(h.group(1)), k - 1)
    if last is None:
        raise JudgeParseError("conclusion Incorrect but no <analysis_k> block under a section heading")
    return last


def parse_judge_output(text: str, n_perc: int, n_reas: int) -> tuple[str | None, int | None, int | None]:
    """``(section, index, flat_index)`` of the first incorrect step, ``(None, None, None)`` for no
    error; raises ``JudgeParseError`` when there is no usable verdict."""
    text = text or ""
    if not isinstance(text, str):
        raise JudgeParseError(f"judge output must be text, got {type(text).__name__}")
    if len(text) > MAX_JUDGE_OUTPUT_CHARS:
        raise JudgeParseError(f"judge output has {len(text)} characters, more than {MAX_JUDGE_OUTPUT_CHARS}")
    found = None
    for obj in reversed(_json_objects(text)):
        if isinstance(obj, dict) and _VERDICT_KEYS & set(obj):
            found = _from_obj(obj)
            break
    if found is None:
        found = _from_vlprm_tags(text)
    if found is None:
        bare = text.strip().strip("`").strip().lower().strip(".")
        if bare in _NO_ERROR_WORDS - {""}:
            found = (None, None)
    if found is None:
        raise JudgeParseError("no JSON verdict or <conclusion> found")
    sec, idx = found
    if sec is None:
        return None, None, None
    return sec, idx, to_flat_index(sec, idx, n_perc, n_reas)


# ----------------------------------------------------------------------------- judges


def build_judge_prompt(
    q: Question, steps: Sequence[Step], include_answer: bool = True, template: str | None = None
) -> str:
    answer_line = _ANSWER_LINE.format(answer=q.answer_str) if include_answer and q.answer is not None else ""
    return (template or JUDGE_PROMPT_TEMPLATE).format(
        question=F.format_question(q.question, q.choices),
        solution=F.render_steps(steps),
        answer_line=answer_line,
    )


class VLMJudge:
    """The judge behind an OpenAI-compatible server (o4-mini, GPT-4.1, a local VLM...)."""

    def __init__(
        self,
        client,
        name: str = "vlm",
        max_attempts: int = 3,
        temperature: float | None = None,
        max_tokens: int | None = None,
        include_answer: bool = True,
        prompt_template: str | None = None,
        system_prompt: str | None = None,
        extra: dict | None = None,
        keep_raw_chars: int = 2000,
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.client = client
        self.name = name
        self.max_attempts = int(max_attempts)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.include_answer = bool(include_answer)
        self.prompt_template = prompt_template or None
        self.system_prompt = system_prompt or None
        self.extra = dict(extra or {})
        self.keep_raw_chars = int(keep_raw_chars)

    def usage_snapshot(self) -> dict:
        return client_usage(self.client)

    def judge(self, q: Question, steps: Sequence[Step]) -> JudgeVerdict:
        from jaxprm.search.openai_client import build_messages

        n_perc, n_reas = section_counts(steps)
        prompt = build_judge_prompt(q, steps, self.include_answer, self.prompt_template)
        msgs = build_messages(q.images or None, prompt, self.system_prompt)
        failures, last_err, raw = 0, None, None
        for attempt in range(1, self.max_attempts + 1):
            texts = self.client.chat(msgs, temperature=self.temperature, max_tokens=self.max_tokens, n=1, **self.extra)
            raw = texts[0] if texts else ""
            try:
                sec, idx, flat = parse_judge_output(raw, n_perc, n_reas)
            except JudgeParseError as e:
                failures += 1
                last_err = str(e)
                continue
            return JudgeVerdict(True, flat, sec, idx, attempt, failures, None, raw)
        return JudgeVerdict(False, None, None, None, self.max_attempts, failures, f"unparseable: {last_err}", raw)


class ScriptedJudge:
    """Offline judge for the puzzle task: the ground-truth first error, wrong with probability
    ``noise`` (``perception_noise`` when the true first error is a perception step: VLM judges err
    more on perception, as the VL-PRM paper reports; None = ``noise``). When wrong on a solution with
    an error it misses the error with probability ``miss_share`` and otherwise points at another step
    (uniformly); on a correct solution it flags a random step. Deterministic in ``(seed, question id,
    steps)``."""

    name = "scripted"

    def __init__(self, noise: float = 0.2, miss_share: float = 0.5, seed: int = 0,
                 perception_noise: float | None = None):
        perception_noise = noise if perception_noise is None or perception_noise < 0 else perception_noise
        if not 0.0 <= noise <= 1.0 or not 0.0 <= miss_share <= 1.0 or not 0.0 <= perception_noise <= 1.0:
            raise ValueError("noise, perception_noise and miss_share must be in [0, 1]")
        self.noise = float(noise)
        self.perception_noise = float(perception_noise)
        self.miss_share = float(miss_share)
        self.seed = int(seed)
        self.calls = 0

    def usage_snapshot(self) -> dict:
        return {"prompt_tokens": 0, "completion_tokens": 0, "requests": self.calls, "retries": 0, "cost": 0.0}

    def first_error(self, q: Question, steps: Sequence[Step]) -> int | None:
        from jaxprm.synth.puzzle import ground_truth_first_error

        flat = [(s.kind, s.text) for s in steps]
        truth = ground_truth_first_error(q, flat)
        n = len(steps)
        rng = np.random.default_rng(stable_hash("judge", self.seed, q.id, flat))
        noise = self.perception_noise if truth is not None and flat[truth][0] == "perception" else self.noise
        if n == 0 or rng.random() >= noise:
            return truth
        if truth is None:
            return int(rng.integers(n))
        if rng.random() < self.miss_share or n == 1:
            return None
        other = [i for i in range(n) if i != truth]
        return other[int(rng.integers(len(other)))]

    def judge(self, q: Question, steps: Sequence[Step]) -> JudgeVerdict:
        self.calls += 1
        fe = self.first_error(q, steps)
        if fe is None:
            return JudgeVerdict(True, None, None, None, 1, 0, None, None)
        n_perc, _ = section_counts(steps)
        sec, idx = from_flat_index(fe, n_perc)
        return JudgeVerdict(True, fe, sec, idx, 1, 0, None, None)

    def respond(self, q: Question, steps: Sequence[Step]) -> str:
        """The judge's answer as a VLM would write it (analysis + JSON line); for mock servers."""
        v = self.judge(q, steps)
        payload = {"section": v.section, "index": v.index}
        reviewed = len(steps) if v.first_error is None else v.first_error + 1
        return f"I reviewed {reviewed} step(s).\n{json.dumps(payload)}"


__all__ = [
    "JUDGE_PROMPT_TEMPLATE",
    "JudgeParseError",
    "MAX_JUDGE_OUTPUT_CHARS",
    "JudgeVerdict",
    "ScriptedJudge",
    "VLMJudge",
    "build_judge_prompt",
    "from_flat_index",
    "parse_judge_output",
    "section_counts",
    "to_flat_index",
]
