"""Answer extraction and matching for multimodal reasoning benchmarks.

Used by eval (accuracy, best-of-N curves), synthesis (Monte-Carlo values: does a rollout reach the
gold answer) and the benchmark readers (``jaxprm.data.formats.benchmarks``: which option a gold
answer names), so it sits in ``data``; ``jaxprm.eval.answers`` re-exports it.

Three ways to judge a response (``grade(response, problem, mode=...)`` / ``Grader``, the rules in
``jaxprm.data.answer_rules``):

- ``official``: each benchmark's own evaluator, quirks included (MMMU's ``eval_utils.py``,
  MathVista's ``extract_answer.py`` + ``calculate_score.py``, MATH-V's ``evaluate.py``,
  PuzzleVQA's last-"(X)" rule), so accuracies compare with published numbers;
- ``vlprm``: the check VL-PRM's test-time-scaling numbers were scored with (``\\boxed{}`` first);
- ``lenient``: this module's own answer-format-robust matcher (``extract_answer`` +
  ``is_correct``), which is *not* any benchmark's official rule.

The lenient matcher, what it does:

- ``extract_choice``: the letter a response commits to: the last ``\\boxed{}`` (a letter, "B. text"
  or an option's text), else a first line that is only a letter ("E\\n\\nExplanation: ..."), else
  the last answer phrase ("Answer: B", "the answer is (B)", "B is correct", "I choose B"), else the
  last "(B)", else a response that is only a letter or starts with "B." / "(B)", else (with
  ``choices``) the option whose text occurs last (numbers matched as whole numbers: "2" is not found
  in "2.5"; of two options ending at the same place the longer wins).
- ``extract_answer``: the cleaned ``\\boxed{}`` content, else the text after the last "answer is" /
  "Answer:", else a committed letter, else the last number.
- ``is_correct``: letters compared with letters (gold and prediction may each be a letter or an
  option's text), numbers by value and strings case-, whitespace- and LaTeX-insensitively.

Numbers: ints, decimals, "1,000"-style thousands separators, fractions "3/4" and ``\\frac{3}{4}``,
negatives (also the unicode minus), scientific notation and percentages (a percentage matches its
value and value/100). Values must be equal: there is no relative tolerance unless ``rel_tol`` /
``abs_tol`` are given. Rounding is accepted only where the benchmark's own rule rounds
(``benchmark=``): MMMU and MATH-V compare at 2 decimals; MathVista, and ``generic`` (no benchmark
named), accept a prediction that rounds to the gold's written decimals (gold "1.45" accepts 1.449;
MathVista's ``precision`` rule) and, for ``generic`` only, a fraction gold written as a decimal of
at least 2 places ("3.43" for 24/7); PuzzleVQA / AlgoPuzzleVQA compare exactly.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

from jaxprm.data.solution import extract_boxed

__all__ = [
    "clean_answer",
    "extract_answer",
    "extract_boxed",
    "extract_choice",
    "extract_number",
    "is_correct",
    "normalize_text",
    "parse_number",
    "BENCHMARKS",
    "MATCH_MODES",
    "MMMU_SEED",
    "Grader",
    "Verdict",
    "grade",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEFAULT_NUM_CHOICES = 10  # A..J when no choices are given
KINDS = ("auto", "boxed", "choice", "number")

# ----------------------------------------------------------------------------- latex cleanup

_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")  # \frac34
_SIMPLE_NUM = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _replace_fracs(s: str) -> str:
    def num_frac(m: re.Match) -> str:
        a, b = m.group(1).strip(), m.group(2).strip()
        if _SIMPLE_NUM.fullmatch(a) and _SIMPLE_NUM.fullmatch(b):
            return f"{a}/{b}"
        return f"({a})/({b})"

    prev = None
    while prev != s:
        prev = s
        s = _FRAC.sub(num_frac, s)
    return _FRAC_SHORT.sub(r"\1/\2", s)


def clean_answer(s: str) -> str:
    """Strip LaTeX decoration from an extracted answer: ``$``, ``\\text{}``-style wrappers,
    spacing commands, ``\\left``/``\\right``, degree signs, ``\\%``, trailing periods;
    ``\\frac{a}{b}`` becomes ``a/b``."""
    s = str(s).strip()
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "%").replace("\\!", "").replace("{,}", ",")
    s = re.sub(r"(?<=\d)\\[,;: ](?=\d{3})", "", s)  # 1\,000
    s = re.sub(r"\\[,;: ]", " ", s).replace("~", " ")
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "").replace("\\circ", "")
    prev = None
    while prev != s:
        prev = s
        s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = _replace_fracs(s)
    s = s.replace("\u2212", "-")
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip(".").strip()
    return s


def normalize_text(s: Any) -> str:
    """Case/whitespace-insensitive normal form used for string matching."""
    s = clean_answer(str(s)).lower()
    s = s.strip().strip("*").strip()
    s = s.rstrip(".!;:,").strip()
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and len(s) <= 3:  # "(b)" -> "b"
        s = s[1:-1].strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return re.sub(r"\s+", " ", s)


# ----------------------------------------------------------------------------- numbers

_NUM_RE = re.compile(
    r"""
    (?<![\w.])                                  # not glued to a word or another number
    (?=[-+]?\.?\d)
    (?P<sign>[-+])?
    (?P<int>\d{1,3}(?:,\d{3})+|\d+)?
    (?P<frac>\.\d+)?
    (?P<exp>[eE][-+]?\d+)?
    (?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?
    (?P<pct>\s*%)?
    """,
    re.VERBOSE,
)


def _match_value(m: re.Match) -> tuple[float, bool] | None:
    int_part = (m.group("int") or "").replace(",", "")
    frac = m.group("frac") or ""
    if not int_part and not frac:
        return None
    try:
        val = float(f"{int_part or '0'}{frac}{m.group('exp') or ''}")
    except ValueError:
        return None
    if m.group("den"):
        den = float(m.group("den"))
        if den == 0:
            return None
        val /= den
    if m.group("sign") == "-":
        val = -val
    if not math.isfinite(val):
        return None
    return val, bool(m.group("pct"))


def _parse_number_full(s: Any) -> tuple[float, bool] | None:
    """(value, is_percent) when the whole (cleaned) string is one number, else None."""
    if isinstance(s, bool):
        return None
    if isinstance(s, (int, float)):
        return (float(s), False) if math.isfinite(float(s)) else None
    s = clean_answer(str(s))
    s = re.sub(r"^\(([^()]*)\)$", r"\1", s).strip()  # "(3/4)"
    m = _NUM_RE.fullmatch(s)
    if not m:
        # "-(3)/(4)" style from \frac with parenthesised parts
        m2 = re.fullmatch(r"([-+]?)\((.+)\)/\((.+)\)", s)
        if m2:
            a, b = _parse_number_full(m2.group(2)), _parse_number_full(m2.group(3))
            if a and b and b[0] != 0:
                v = a[0] / b[0]
                return (-v if m2.group(1) == "-" else v), False
        return None
    return _match_value(m)


def parse_number(s: Any) -> float | None:
    """The value of ``s`` when all of it is one number ("1,000", "-3/4", "\\frac{1}{2}",
    "2.5e3", "50%" -> 50.0), else None."""
    r = _parse_number_full(s)
    return None if r is None else r[0]


def _numbers_in(text: str) -> list[tuple[float, bool]]:
    out = []
    for m in _NUM_RE.finditer(clean_answer(text)):
        v = _match_value(m)
        if v is not None:
            out.append(v)
    return out


def _fmt_number(v: float, pct: bool = False) -> str:
    if v == int(v) and abs(v) < 1e15:
        s = str(int(v))
    else:
        s = format(v, ".12g")
    return s + ("%" if pct else "")


def extract_number(text: str, which: str = "last") -> float | None:
    """The last (or first, ``which="first"``) number in ``text``; percentages give their
    value (``"50%"`` -> 50.0)."""
    nums = _numbers_in(text or "")
    if not nums:
        return None
    return nums[-1 if which == "last" else 0][0]


# ----------------------------------------------------------------------------- choices

_ANSWER_PHRASE = re.compile(
    r"\b(?:final\s+answer|correct\s+(?:answer|option|choice)|best\s+(?:answer|option|choice)|answer|option|choice)"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?\s*(?:[:=]|is)?\s*"
    r"(?:option\s+|choice\s+)?(?P<open>[(\[]\s*)?(?P<letter>[A-Za-z])(?P<close>\s*[)\]])?",
    re.IGNORECASE,
)


def _valid_letters(choices: Sequence | None, num_choices: int | None) -> str:
    if choices is not None:
        n = len(choices)
    elif num_choices is not None:
        n = num_choices
    else:
        n = DEFAULT_NUM_CHOICES
    return LETTERS[: max(0, min(n, len(LETTERS)))]


def _bare_letter(s: str, valid: str) -> str | None:
    """'B', '(b)', 'B.', 'B:' ,'Option B' as the whole string."""
    m = re.fullmatch(r"(?:option|choice)?\s*[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?", s.strip(), re.IGNORECASE)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    return None


def _leading_letter(s: str, valid: str) -> str | None:
    """'B. 12 cm', '(B) 12', 'B) 12', 'B: 12', 'B, i.e. 12' -> 'B' (uppercase only)."""
    m = re.match(r"\s*(?:\(([A-Z])\)|([A-Z])[.):,;])\s+\S", s)
    if m:
        letter = m.group(1) or m.group(2)
        if letter in valid:
            return letter
    return None


def _option_index(answer: str, choices: Sequence) -> int | None:
    """Index of the option whose text equals ``answer`` (normalised, or numerically)."""
    na = normalize_text(answer)
    if not na:
        return None
    for i, c in enumerate(choices):
        if normalize_text(c) == na:
            return i
    av = _parse_number_full(answer)
    if av is not None:
        for i, c in enumerate(choices):
            cv = _parse_number_full(c)
            if cv is not None and cv[0] == av[0]:
                return i
    return None


_CHOSEN = re.compile(
    r"(?:\b|(?<=\())(?P<letter>[A-Z])\)?\s+(?:is|would\s+be|must\s+be|seems\s+to\s+be)\s+(?:the\s+)?"
    r"(?:correct|right|best|answer|most\s+(?:likely|appropriate|suitable|accurate))\b"
    r"|\b(?:I\s+(?:would\s+|will\s+)?)?(?:choose|select|pick|go\s+with)\s+(?:option\s+|choice\s+)?"
    r"[(\[]?(?P<letter2>[A-Z])\b"
)
_FIRST_LINE_LETTER = re.compile(r"\s*[(\[]?([A-Z])[)\]]?[.:)]?[ \t]*\n")


def _option_in_text(text: str, choices: Sequence) -> int | None:
    """Index of the option whose text occurs last in ``text`` (MMMU's idea for long responses),
    with whole-word / whole-number matching: a numeric option matches a number *token* of equal
    value, so option "2" is not found in "2.5"; occurrences are ranked by where they end, and of two
    ending at the same place the longer (more specific) option wins."""
    low = normalize_text(text)
    numbers = []
    for m in _NUM_RE.finditer(low):
        v = _match_value(m)
        if v is not None and m.end() > m.start():
            numbers.append((m.start(), m.end(), v[0]))
    best: tuple | None = None
    for i, c in enumerate(choices):
        nc = normalize_text(c)
        if not nc:
            continue
        cv = _parse_number_full(c)
        spans = []
        if cv is not None:
            spans = [(st, en) for st, en, v in numbers if v == cv[0]]
        else:
            spans = [(m.start(), m.end()) for m in re.finditer(r"(?<![\w.])" + re.escape(nc) + r"(?![\w])", low)]
        for st, en in spans:
            key = (en, en - st, -i)
            if best is None or key > best:
                best = key
    return None if best is None else -best[2]


def extract_choice(text: str, choices: Sequence | None = None, num_choices: int | None = None) -> str | None:
    """The multiple-choice letter a response commits to, or None (the lenient rule; the benchmarks'
    own rules are in ``jaxprm.data.answer_rules``).

    Valid letters are the first ``len(choices)`` (or ``num_choices``, default 10) of A-Z. In
    order: the last ``\\boxed{}`` (a letter, "B. text", or an option's text); a first line that is
    only a letter ("E\\n\\nExplanation: ..."); the last answer phrase ("Answer: B", "the answer is
    (B)", "correct option is B.", "B is correct", "I choose B", capital letters only for the last
    two); the last "(B)"; a response that is only a letter or starts with "B." / "(B)"; finally, with
    ``choices``, the option whose text occurs last in the response (``_option_in_text``).
    """
    if not text:
        return None
    valid = _valid_letters(choices, num_choices)
    text = str(text).replace("**", "").replace("__", "")

    boxed = extract_boxed(text)
    if boxed is not None:
        b = clean_answer(boxed)
        letter = _bare_letter(b, valid) or _leading_letter(b, valid)
        if letter:
            return letter
        if choices is not None:
            idx = _option_index(b, choices)
            if idx is not None:
                return LETTERS[idx]

    m = _FIRST_LINE_LETTER.match(text)
    if m and m.group(1) in valid:
        return m.group(1)

    found, found_pos = None, -1
    for m in _ANSWER_PHRASE.finditer(text):
        letter = m.group("letter")
        if letter.upper() not in valid:
            continue
        bracketed = bool(m.group("open")) and bool(m.group("close"))
        rest = text[m.end() :]
        if not bracketed:
            # "the answer is a triangle": a lowercase letter followed by a word is an article
            if letter.islower() and re.match(r"\s*[A-Za-z]", rest):
                continue
            if re.match(r"[A-Za-z0-9]", rest):  # "answer is Bx"
                continue
        found, found_pos = letter.upper(), m.start("letter")
    for m in _CHOSEN.finditer(text):
        letter = m.group("letter") or m.group("letter2")
        pos = m.start("letter") if m.group("letter") else m.start("letter2")
        if letter in valid and pos > found_pos:
            found, found_pos = letter, pos
    if found:
        return found

    brackets = [l for l in re.findall(r"\(([A-Z])\)", text) if l in valid]
    if brackets:
        return brackets[-1]

    stripped = text.strip()
    letter = _bare_letter(stripped, valid) or _leading_letter(stripped, valid)
    if letter:
        return letter

    if choices is not None:
        idx = _option_in_text(text, choices)
        if idx is not None:
            return LETTERS[idx]
    return None


# ----------------------------------------------------------------------------- extraction

_SEGMENT = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|would\s+be|should\s+be|:|=)\s*[:=]?\s*(?P<seg>[^\n]+)",
    re.IGNORECASE,
)


def _answer_segment(text: str) -> str | None:
    """Content of the last ``\\boxed{}``, else the rest of the line after the last
    "answer is" / "Answer:", trimmed at the sentence end."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    last = None
    for m in _SEGMENT.finditer(text):
        last = m.group("seg")
    if last is None:
        return None
    # end of sentence: a period followed by a space/end that is not a decimal point
    last = re.split(r"(?<!\d)\.(?:\s|$)|\.\s", last, maxsplit=1)[0]
    last = last.strip().strip("*").strip()
    return last or None


def extract_answer(text: str, kind: str = "auto", choices: Sequence | None = None) -> str | None:
    """Extract the final answer from a model response; returns a string or None.

    kind:
      ``"boxed"``  cleaned content of the last ``\\boxed{}``;
      ``"choice"`` a letter (see ``extract_choice``; ``choices`` sets the valid letters and
                   enables matching option text);
      ``"number"`` the number in the answer segment (boxed content or the text after
                   "answer is"/"Answer:"; its first number unless the whole segment is one), else
                   the last number in the text, formatted canonically ("1,000" -> "1000",
                   "3/4" -> "0.75", "50%" -> "50%");
      ``"auto"``   with ``choices``: the letter if one is found. Otherwise the cleaned boxed
                   content or answer-phrase segment (reduced to its letter when it is "(B)" or
                   "B. text"); without choices then a letter the text commits to ("(B)",
                   "option B", a response that is just "B"); finally the last number.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    if text is None:
        return None
    text = str(text)
    if kind == "boxed":
        b = extract_boxed(text)
        return None if b is None else clean_answer(b)
    if kind == "choice":
        return extract_choice(text, choices)
    if kind == "number":
        seg = _answer_segment(text)
        if seg is not None:
            full = _parse_number_full(seg)
            if full is not None:
                return _fmt_number(*full)
            nums = _numbers_in(seg)
            if nums:
                return _fmt_number(*nums[0])
        nums = _numbers_in(text)
        return _fmt_number(*nums[-1]) if nums else None

    # auto
    if choices is not None:
        letter = extract_choice(text, choices)
        if letter:
            return letter
    seg = _answer_segment(text)
    if seg is not None:
        cleaned = clean_answer(seg)
        if cleaned:
            return _bare_letter(cleaned, LETTERS) or _leading_letter(cleaned, LETTERS) or cleaned
    if choices is None:
        letter = extract_choice(text, None)
        if letter:
            return letter
    nums = _numbers_in(text)
    if nums:
        return _fmt_number(*nums[-1])
    return None


# ----------------------------------------------------------------------------- matching


def _decimals(gold: str) -> int:
    m = re.fullmatch(r"[-+]?\d[\d,]*\.(\d+)%?", clean_answer(gold))
    return len(m.group(1)) if m else 0


def _rounds_to(x: float, target: float, k: int) -> bool:
    """``round(x, k) == target`` for a ``target`` written with ``k`` decimals (float-safe)."""
    return abs(round(x, k) - target) <= 0.5 * 10 ** (-k - 3)


# Rounding each benchmark's own rule applies (see the module docstring).
_ROUND_BOTH_2 = ("mmmu", "mathvision")  # MMMU normalize_str; MATH-V is_equal: round(., 2) both sides
_GOLD_PRECISION = (None, "generic", "mathvista")  # MathVista's precision: the gold's decimals
_EXACT = ("puzzlevqa", "algopuzzlevqa")


def _numbers_match(pred: tuple[float, bool], gold: tuple[float, bool], pred_str: str | None, gold_str: str,
                   rel_tol: float, abs_tol: float, benchmark: str | None) -> bool:
    pvals = [pred[0]] + ([pred[0] / 100.0] if pred[1] else [])
    gvals = [gold[0]] + ([gold[0] / 100.0] if gold[1] else [])
    kg = _decimals(gold_str) if not gold[1] else 0
    # generic only: a prediction with >= 2 decimals may be the rounded form of a fraction gold (24/7 ~ 3.43)
    kp = _decimals(pred_str) if (pred_str is not None and not pred[1] and not kg) else 0
    kp = kp if (kp >= 2 and benchmark in (None, "generic")) else 0
    for p in pvals:
        for g in gvals:
            if p == g:
                return True
            if (rel_tol or abs_tol) and math.isclose(p, g, rel_tol=rel_tol, abs_tol=abs_tol):
                return True
            if benchmark in _EXACT:
                continue
            if benchmark in _ROUND_BOTH_2:
                if round(p, 2) == round(g, 2):
                    return True
                continue
            if kg and g == gold[0] and _rounds_to(p, g, kg):
                return True
            if kp and p == pred[0] and _rounds_to(g, p, kp):
                return True
    return False


def _letter_of(ans: str, choices: Sequence, prefer_text: bool) -> str | None:
    valid = _valid_letters(choices, None)
    s = clean_answer(ans)
    if prefer_text:
        idx = _option_index(s, choices)
        if idx is not None:
            return LETTERS[idx]
    letter = _bare_letter(s, valid) or _leading_letter(s, valid)
    if letter:
        return letter
    if not prefer_text:
        idx = _option_index(s, choices)
        if idx is not None:
            return LETTERS[idx]
    if len(s.split()) > 1:
        return extract_choice(s, choices)
    return None


def is_correct(
    pred: Any,
    gold: Any,
    choices: Sequence | None = None,
    rel_tol: float = 0.0,
    abs_tol: float = 0.0,
    benchmark: str | None = None,
) -> bool:
    """Whether an extracted prediction matches the gold answer: the *lenient* matcher (not any
    benchmark's official rule; ``grade(..., mode="official")`` is that).

    - ``gold`` may be a list of acceptable answers (any match counts).
    - With ``choices``: gold and prediction may each be a letter or an option's text (gold text
      is matched to an option first, the prediction's letter first); letters are compared.
    - Without choices, a single uppercase-letter gold is compared to the prediction's letter.
    - Numbers: equal values, or, with ``rel_tol`` / ``abs_tol`` given, ``math.isclose``; rounding
      only where ``benchmark``'s rule rounds (module docstring): MMMU / MATH-V at 2 decimals,
      MathVista and generic (``None``) to the gold's written decimals (gold "0.33" accepts 1/3),
      generic also a >= 2-decimal prediction of a fraction gold ("3.43" for 24/7); PuzzleVQA exact.
      Percentages also match value/100. A prediction with text around one number ("12 cm") is
      compared through its first number.
    - Otherwise a case-, whitespace- and LaTeX-insensitive string comparison.
    """
    if pred is None or gold is None:
        return False
    if isinstance(gold, (list, tuple)):
        return any(is_correct(pred, g, choices, rel_tol, abs_tol, benchmark) for g in gold)
    pred_s, gold_s = str(pred), str(gold)
    np_, ng = normalize_text(pred_s), normalize_text(gold_s)
    if not np_:
        return False
    if np_ == ng:
        return True

    if choices:
        gl = _letter_of(gold_s, choices, prefer_text=True)
        pl = _letter_of(pred_s, choices, prefer_text=False)
        if gl is not None and pl is not None:
            return gl == pl
    elif re.fullmatch(r"\(?[A-Z]\)?", gold_s.strip()):
        pl = _bare_letter(clean_answer(pred_s), LETTERS) or _leading_letter(pred_s, LETTERS) or extract_choice(pred_s)
        return pl == gold_s.strip().strip("()")

    gnum = _parse_number_full(gold_s)
    if gnum is not None:
        pnum = _parse_number_full(pred_s)
        pnum_str: str | None = pred_s
        if pnum is None:
            nums = _numbers_in(pred_s)
            if not nums:
                return False
            pnum, pnum_str = nums[0], None
        return _numbers_match(pnum, gnum, pnum_str, gold_s, rel_tol, abs_tol, benchmark)
    return False


# The graders (official / vlprm / lenient) live in jaxprm.data.answer_rules, which builds on the
# helpers above; imported last so that ``from jaxprm.data.answers import grade`` works.
from jaxprm.data.answer_rules import BENCHMARKS, MATCH_MODES, Grader, Verdict, grade  # noqa: E402
from jaxprm.data.answer_rules.mmmu import MMMU_SEED  # noqa: E402
