"""Benchmark accuracy under three named modes: ``official``, ``vlprm`` and ``lenient``.

``Grader(mode, benchmark)`` judges one response at a time against a problem (a dict as
``jaxprm.data.formats.benchmarks.load_benchmark_jsonl`` returns: ``answer``, ``choices``,
``answer_letter``, ``question``, ``meta``, ``source``) and counts what happened:

- ``official``: the benchmark's own evaluator, quirks included, so the accuracy compares with
  published numbers: MMMU (``mmmu``: multiple-choice parse with its seeded random fallback guess,
  open-answer parse, 2-decimal rounding, substring match for text golds), MathVista
  (``mathvista``: rule-based quick extraction, else an LLM extractor when one is configured, else a
  rule-based stand-in for it, or an answer extracted beforehand; then its normalisation: integer
  truncation, float precision, nearest-choice mapping), MATH-V (``mathvision``: its string and
  sympy-based comparison) and PuzzleVQA / AlgoPuzzleVQA (``puzzlevqa``: the last "(X)", else the
  last capital A-D). A ``generic`` benchmark has no official evaluator and is graded ``lenient``.
- ``vlprm``: VL-PRM's own check (``\\boxed{}`` first; a judge model for long free-text answers when
  configured), which its published test-time-scaling numbers used.
- ``lenient``: ``jaxprm.data.answers.extract_answer`` + ``is_correct``, robust to answer formats.

Each verdict carries the prediction the evaluator compared, a ``status`` ("ok", "unparseable":
nothing could be read from the response, "guess": the evaluator's own fallback picked an option,
e.g. MMMU's random letter) and the ``route`` the prediction came by (how it was extracted).
``Grader.report()`` gives the counts (``n``, ``correct``, ``unparseable``, ``guesses``, ``routes``).

An ``extractor`` (MathVista's LLM extraction) and a ``judge`` (VL-PRM's option judge) are plain
callables ``prompt -> text``; ``jaxprm.eval.answers.openai_text_fn`` builds one on an
OpenAI-compatible server.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Sequence

from jaxprm.data.answer_rules import mathvision as _mathvision
from jaxprm.data.answer_rules import mathvista as _mathvista
from jaxprm.data.answer_rules import mmmu as _mmmu
from jaxprm.data.answer_rules import puzzlevqa as _puzzle
from jaxprm.data.answer_rules import vlprm as _vlprm

__all__ = ["BENCHMARKS", "MATCH_MODES", "Grader", "Verdict", "grade"]

MATCH_MODES = ("official", "vlprm", "lenient")
BENCHMARKS = ("mmmu", "mathvista", "mathvision", "puzzlevqa", "algopuzzlevqa", "generic")
STATUSES = ("ok", "unparseable", "guess")

TextFn = Callable[[str], str]


@dataclasses.dataclass
class Verdict:
    """One judged response: ``correct``; ``pred`` the prediction the evaluator compared (a letter,
    an option text, a normalised string, or MMMU's list of open-answer candidates; None when there
    is none); ``status`` "ok" | "unparseable" | "guess"; ``route`` how ``pred`` was obtained."""

    correct: bool
    pred: Any
    status: str = "ok"
    route: str = ""

    @property
    def vote_key(self) -> str | None:
        """A hashable form of ``pred`` for majority voting (None: no vote)."""
        if self.pred is None or self.status == "unparseable":
            return None
        if isinstance(self.pred, (list, tuple)):
            return "|".join(sorted(str(p) for p in self.pred)) or None
        return str(self.pred)


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


class Grader:
    """Judges responses under one ``mode`` (``MATCH_MODES``) for one ``benchmark`` (``BENCHMARKS``;
    None: each problem's ``source``). Keeps counts over its calls (``report()``).

    Args:
      seed: MMMU's random fallback seed (``eval_utils.py`` seeds 42). One ``random.Random(seed)``
        serves the grader's calls in order, as the official script's module-level seed does.
      extractor: MathVista's LLM extraction step (``prompt -> text``); None: the rule-based
        stand-in (``jaxprm.data.answers.extract_answer``) where the quick rules do not apply.
      judge: VL-PRM's judge (``prompt -> text``, expected to answer one letter or "Z"); None: a
        long free-text prediction that needs it is wrong and counted as unparseable.
      answer_kind: ``extract_answer``'s ``kind`` in lenient mode.
      quick_extract: MathVista's ``--quick_extract`` rules before the extractor (default on).
    """

    def __init__(self, mode: str = "official", benchmark: str | None = None, *, seed: int = _mmmu.MMMU_SEED,
                 extractor: TextFn | None = None, judge: TextFn | None = None, answer_kind: str = "auto",
                 quick_extract: bool = True):
        if mode not in MATCH_MODES:
            raise ValueError(f"unknown match mode {mode!r}; choose one of {MATCH_MODES}")
        if benchmark is not None and benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {BENCHMARKS}")
        self.mode, self.benchmark = mode, benchmark
        self.seed = seed
        self.rng = random.Random(seed)
        self.extractor, self.judge = extractor, judge
        self.answer_kind, self.quick_extract = answer_kind, quick_extract
        self.counts: dict[str, Any] = {"n": 0, "correct": 0, "unparseable": 0, "guesses": 0, "routes": {}}

    # ------------------------------------------------------------------ public

    def effective_mode(self, benchmark: str | None = None) -> str:
        """The mode actually applied: ``official`` on a benchmark without an official evaluator
        (``generic`` or unknown) is ``lenient``."""
        b = benchmark or self.benchmark or "generic"
        if self.mode == "official" and b not in ("mmmu", "mathvista", "mathvision", "puzzlevqa", "algopuzzlevqa"):
            return "lenient"
        return self.mode

    def __call__(self, response: Any, problem: dict, extraction: Any = None) -> Verdict:
        """Judge ``response`` (a string; None counts as empty) against ``problem``. ``extraction``:
        an answer extracted beforehand (MathVista's ``extraction`` field; in the other modes it
        replaces the rule-based extraction too)."""
        bench = self.benchmark or problem.get("source") or "generic"
        if bench not in BENCHMARKS:
            bench = "generic"
        text = "" if response is None else str(response)
        mode = self.effective_mode(bench)
        if mode == "official":
            v = getattr(self, f"_official_{'puzzlevqa' if bench == 'algopuzzlevqa' else bench}")(text, problem, extraction)
        elif mode == "vlprm":
            v = self._vlprm(text, problem, bench, extraction)
        else:
            v = self._lenient(text, problem, bench, extraction)
        c = self.counts
        c["n"] += 1
        c["correct"] += int(v.correct)
        c["unparseable"] += int(v.status == "unparseable")
        c["guesses"] += int(v.status == "guess")
        c["routes"][v.route] = c["routes"].get(v.route, 0) + 1
        return v

    def report(self) -> dict:
        """``{"mode", "benchmark", "n", "correct", "unparseable", "guesses", "routes"}``."""
        return {"mode": self.mode, "effective_mode": self.effective_mode(), "benchmark": self.benchmark,
                **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counts.items()}}

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _meta(problem: dict) -> dict:
        return problem.get("meta") or {}

    @staticmethod
    def _choices(problem: dict) -> list[str] | None:
        ch = problem.get("choices")
        return [str(c) for c in ch] if ch else None

    def _gold_letter(self, problem: dict, bench: str) -> str | None:
        """The gold option letter: MMMU and MATH-V write the answer as a letter (kept as written);
        MathVista and the puzzles write the option text (its letter, ``answer_letter``)."""
        choices = self._choices(problem)
        if not choices:
            return None
        ans = problem.get("answer")
        if bench in ("mmmu", "mathvision", "generic") and isinstance(ans, str) and ans.strip() in _letters(len(choices)):
            return ans.strip()
        if problem.get("answer_letter"):
            return problem["answer_letter"]
        from jaxprm.data.answers import _letter_of

        return _letter_of(str(ans), choices, prefer_text=True)

    # ------------------------------------------------------------------ official

    def _official_mmmu(self, text: str, problem: dict, extraction: Any) -> Verdict:
        """MMMU ``main_parse_and_eval.py``: ``parse_multi_choice_response`` + ``eval_multi_choice``
        for multiple-choice questions, ``parse_open_response`` + ``eval_open`` for open ones."""
        choices = self._choices(problem)
        qtype = self._meta(problem).get("question_type")
        if choices and qtype != "open":
            letters = _mmmu.letters_for(choices)
            gold = self._gold_letter(problem, "mmmu")
            if extraction is not None:  # main_eval_only.py: the parsed letter as given
                pred = str(extraction)
                return Verdict(_mmmu.eval_multi_choice(gold, pred), pred, "ok", "pre")
            pred, guessed = _mmmu.parse_multi_choice(text, letters, dict(zip(letters, choices)), self.rng)
            return Verdict(_mmmu.eval_multi_choice(gold, pred), pred, "guess" if guessed else "ok",
                           "random" if guessed else "parsed")
        preds = _mmmu.parse_open_response(str(extraction) if extraction is not None else text)
        return Verdict(_mmmu.eval_open(problem.get("answer"), preds), preds, "ok",
                       "pre" if extraction is not None else "parsed")

    def _mathvista_types(self, problem: dict) -> tuple[str, str, Any]:
        meta = self._meta(problem)
        choices = self._choices(problem)
        qtype = meta.get("question_type") or ("multi_choice" if choices else "free_form")
        atype = meta.get("answer_type")
        precision = meta.get("precision")
        if not atype:
            if qtype == "multi_choice":
                atype = "text"
            else:
                gold = str(problem.get("answer", "")).strip()
                if gold.startswith("["):
                    atype = "list"
                elif "." in gold:
                    atype = "float"
                else:
                    atype = "integer"
        if atype == "float" and precision is None:
            gold = str(problem.get("answer", ""))
            precision = len(gold.split(".", 1)[1]) if "." in gold else 0
        return qtype, atype, precision

    def _official_mathvista(self, text: str, problem: dict, extraction: Any) -> Verdict:
        """MathVista: ``extract_answer`` (quick rules / LLM / stand-in / given) then
        ``normalize_extracted_answer`` and ``safe_equal`` with the gold answer string."""
        choices = self._choices(problem)
        qtype, atype, precision = self._mathvista_types(problem)
        if extraction is not None:
            ext, route = str(extraction), "pre"
        else:
            ext = _mathvista.quick_extract(text, qtype, atype, choices) if self.quick_extract else None
            route = "quick"
            if ext is None and self.extractor is not None:
                query = self._meta(problem).get("query") or problem.get("question", "")
                try:
                    ext, route = self.extractor(_mathvista.extraction_prompt(query, text)), "llm"
                except Exception:  # noqa: BLE001 - the official code logs the error and extracts ""
                    ext, route = "", "llm_error"
            elif ext is None:
                from jaxprm.data.answers import extract_answer

                ext, route = extract_answer(text, "auto", choices) or "", "rules"
        pred = _mathvista.normalize_extracted_answer(ext, choices, qtype, atype, precision)
        status = "ok"
        if pred is None:
            status = "unparseable"
        elif qtype == "multi_choice" and not str(ext).strip():
            status = "guess"  # an empty extraction maps to the nearest (shortest) choice
        gold = problem.get("answer")
        return Verdict(pred is not None and pred == str(gold), pred, status, route)

    def _official_mathvision(self, text: str, problem: dict, extraction: Any) -> Verdict:
        """MATH-V ``evaluate()``: the extracted model answer is ``is_equal`` to the gold answer or
        to the gold option's text."""
        gold = str(problem.get("answer"))
        choices = self._choices(problem)
        value = ""
        if choices and len(gold) == 1 and 0 <= ord(gold) - ord("A") < len(choices):
            value = choices[ord(gold) - ord("A")]
        ans = str(extraction) if extraction is not None else _mathvision.model_answer(text)
        correct = _mathvision.is_equal(gold, ans) or _mathvision.is_equal(value, ans)
        status = "unparseable" if not ans.replace(" ", "") else "ok"
        return Verdict(correct, ans, status, "pre" if extraction is not None else "parsed")

    def _official_puzzlevqa(self, text: str, problem: dict, extraction: Any) -> Verdict:
        """PuzzleVQA / AlgoPuzzleVQA: ``get_answer`` then ``pred == answer``."""
        choices = self._choices(problem) or []
        pred, _ = _puzzle.get_answer(str(extraction) if extraction is not None else text, choices)
        if pred is None:
            return Verdict(False, None, "unparseable", "none")
        return Verdict(pred == str(problem.get("answer")), pred, "ok", "pre" if extraction is not None else "parsed")

    def _official_generic(self, text: str, problem: dict, extraction: Any) -> Verdict:  # pragma: no cover
        return self._lenient(text, problem, "generic", extraction)

    # ------------------------------------------------------------------ vlprm

    def _ask_judge(self, problem: dict, text: str, gold: str) -> Verdict:
        choices = self._choices(problem) or []
        prompt = _vlprm.judge_prompt(problem.get("question", ""), choices, text.strip())
        try:
            out = (self.judge(prompt) or "").strip()
        except Exception:  # noqa: BLE001 - VL-PRM's judge returns an error string, never a hit
            return Verdict(False, None, "unparseable", "judge_error")
        valid = _letters(len(choices)) + ["Z"]
        return Verdict(out == gold, out, "ok" if out in valid else "unparseable", "judge")

    def _vlprm(self, text: str, problem: dict, bench: str, extraction: Any) -> Verdict:
        """VL-PRM (``jaxprm.data.answer_rules.vlprm``): last ``\\boxed{}`` (else the whole text),
        then the benchmark branch of its scoring scripts; the judge for long answers when set."""
        if extraction is not None:
            pred, route = str(extraction), "pre"
        else:
            pred = _vlprm.extract_boxed_vlprm(text)
            route = "boxed"
            if pred is None:
                pred, route = text, "full_text"
        choices = self._choices(problem)
        gold_letter = self._gold_letter(problem, bench)
        gold = problem.get("answer")
        if bench == "mathvision":
            g = str(gold)
            value = choices[ord(g) - ord("A")] if choices and len(g) == 1 and 0 <= ord(g) - ord("A") < len(choices) else ""
            ok = bool(pred) and (_mathvision.is_equal(g, pred) or _mathvision.is_equal(value, pred))
            return Verdict(ok, pred, "ok" if route != "full_text" else "unparseable", route)
        if bench in ("puzzlevqa", "algopuzzlevqa"):
            g = (gold_letter or str(gold)).strip()
            if len(pred.strip()) == 1:
                return Verdict(pred.strip().lower() == g.lower(), pred.strip(), "ok", route)
            if self.judge is not None:
                return self._ask_judge(problem, pred, g)
            return Verdict(False, pred, "unparseable", "unjudged")
        golds = gold if isinstance(gold, (list, tuple)) else [gold_letter or gold]
        ok = False
        for g in golds:
            g = str(g)
            ok = _vlprm.numeric_equal(g, pred) if g.isnumeric() else g.lower() == pred.lower()
            if ok:
                break
        if not ok and choices and gold_letter and len(pred.strip()) > 1:
            if self.judge is not None:
                return self._ask_judge(problem, pred, gold_letter)
            return Verdict(False, pred, "unparseable", "unjudged")
        return Verdict(ok, pred, "ok" if (ok or route != "full_text") else "unparseable", route)

    # ------------------------------------------------------------------ lenient

    def _lenient(self, text: str, problem: dict, bench: str, extraction: Any) -> Verdict:
        """``extract_answer`` (or the given extraction) + ``is_correct`` with the benchmark's
        rounding rule."""
        from jaxprm.data.answers import extract_answer, is_correct

        choices = self._choices(problem)
        if extraction is not None:
            pred, route = str(extraction), "pre"
        else:
            pred, route = extract_answer(text, self.answer_kind, choices), "rules"
        if pred is None:
            return Verdict(False, None, "unparseable", route)
        ok = is_correct(pred, problem.get("answer"), choices, benchmark=None if bench == "generic" else bench)
        return Verdict(ok, pred, "ok", route)


def grade(response: Any, problem: dict, mode: str = "official", benchmark: str | None = None,
          **kwargs: Any) -> Verdict:
    """One response under ``mode`` (a fresh ``Grader``; for MMMU's seeded fallback across many
    responses, keep one ``Grader`` so its random stream advances as the official script's)."""
    return Grader(mode, benchmark, **kwargs)(response, problem)
