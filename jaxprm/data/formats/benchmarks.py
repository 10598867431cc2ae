"""Benchmark question files (MMMU, MathVista, MathVision, PuzzleVQA, AlgoPuzzleVQA, generic jsonl),
read into one common dict per question for evaluation and label synthesis.

``load_benchmark_jsonl(path, format=...)`` maps a benchmark's jsonl rows to one common dict; the
field names assumed for each format are listed in ``FORMAT_FIELDS`` and in that function's
docstring. Malformed lines raise ``BenchmarkFormatError`` naming ``file:line``. Which option a gold
answer names (``answer_letter``) is decided by the answer matching rules of ``jaxprm.data.answers``.
"""
from __future__ import annotations

import ast
import base64
import json
import math
import os
from typing import Any, Iterable

from jaxprm.data.answers import LETTERS, _fmt_number, _letter_of
from jaxprm.data.formats._common import ImagePathError, resolve_image
from jaxprm.data.jsonl import BadLine, iter_jsonl

__all__ = ["BenchmarkFormatError", "FORMATS", "FORMAT_FIELDS", "load_benchmark_jsonl"]


class BenchmarkFormatError(ValueError):
    """A benchmark jsonl line is malformed; the message starts with ``file:line:``."""


FORMATS = ("mmmu", "mathvista", "mathvision", "puzzlevqa", "algopuzzlevqa", "generic")

# The fields each format is assumed to have (taken from the datasets' cards / loaders; see
# load_benchmark_jsonl's docstring).
FORMAT_FIELDS: dict[str, dict[str, Any]] = {
    "mmmu": {
        "required": ["question", "answer"],
        "id": ["id", "index"],
        "choices": "options (list or its Python-literal string) or columns A..I",
        "images": "image_1..image_7 (or image / image_path)",
    },
    "mathvista": {
        "required": ["question", "answer"],
        "id": ["pid", "id"],
        "choices": "choices (null for free_form)",
        "images": "image",
    },
    "mathvision": {
        "required": ["question", "answer"],
        "id": ["id"],
        "choices": "options (empty list for open questions)",
        "images": "image",
    },
    "puzzlevqa": {"required": ["question", "answer", "options"], "id": ["id"], "choices": "options", "images": "image"},
    "algopuzzlevqa": {"required": ["question", "answer", "options"], "id": ["id"], "choices": "options", "images": "image"},
    "generic": {
        "required": ["question", "answer"],
        "id": ["id", "pid", "index", "question_id", "uid"],
        "choices": "choices or options",
        "images": "images (list) or image",
    },
}

_QUESTION_KEYS = ("question", "query", "prompt", "problem")
_ANSWER_KEYS = ("answer", "gold", "label", "ground_truth", "solution_answer")


def _as_list_literal(v: Any) -> Any:
    """'["a", "b"]' / "['a', 'b']" strings (MMMU's options column) -> list."""
    if isinstance(v, str):
        t = v.strip()
        if t.startswith("[") and t.endswith("]"):
            try:
                out = ast.literal_eval(t)
            except (ValueError, SyntaxError):
                try:
                    out = json.loads(t)
                except ValueError:
                    return v
            if isinstance(out, (list, tuple)):
                return list(out)
    return v


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _resolve_image(v: Any, root: str | None, where: str, allow_outside_root: bool = False) -> str | bytes | None:
    if _is_missing(v):
        return None
    if isinstance(v, dict):  # HF datasets image export {"bytes": ..., "path": ...}
        b = v.get("bytes")
        if b:
            if isinstance(b, str):
                try:
                    return base64.b64decode(b, validate=True)
                except ValueError:
                    raise BenchmarkFormatError(f"{where}: image 'bytes' is not valid base64") from None
            return bytes(b)
        v = v.get("path")
        if _is_missing(v):
            return None
    if not isinstance(v, str):
        raise BenchmarkFormatError(f"{where}: image must be a path string or {{bytes, path}} dict, got {type(v).__name__}")
    if v.startswith("data:"):
        return v
    try:
        return resolve_image(v, root, allow_outside_root)
    except ImagePathError as e:
        raise BenchmarkFormatError(f"{where}: {e}") from None


def _first(row: dict, keys: Iterable[str]) -> Any:
    for k in keys:
        if k in row and not _is_missing(row[k]):
            return row[k]
    return None


def _norm_choices(v: Any, where: str) -> list[str] | None:
    v = _as_list_literal(v)
    if _is_missing(v):
        return None
    if not isinstance(v, (list, tuple)):
        raise BenchmarkFormatError(f"{where}: choices/options must be a list, got {type(v).__name__}: {str(v)[:80]!r}")
    out = [str(c) for c in v]
    return out or None


def _answer_letter(answer: Any, choices: list[str] | None) -> str | None:
    if not choices or isinstance(answer, list):
        return None
    return _letter_of(str(answer), choices, prefer_text=True)


def _convert(row: dict, fmt: str, root: str | None, where: str, default_id: str,
             allow_outside_root: bool = False) -> dict:
    if not isinstance(row, dict):
        raise BenchmarkFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    spec = FORMAT_FIELDS[fmt]
    question = _first(row, _QUESTION_KEYS if fmt == "generic" else ("question",))
    if question is None:
        raise BenchmarkFormatError(f"{where}: missing field 'question' for format {fmt!r}")
    answer = _first(row, _ANSWER_KEYS if fmt == "generic" else ("answer",))
    if answer is None:
        raise BenchmarkFormatError(f"{where}: missing field 'answer' for format {fmt!r}")
    rid = _first(row, spec["id"])
    rid = default_id if rid is None else str(rid)
    meta: dict[str, Any] = {}
    images_raw: list[Any] = []
    choices: list[str] | None = None

    if fmt == "mmmu":
        choices = _norm_choices(row.get("options"), where) if "options" in row else None
        if choices is None:
            cols = [row[c] for c in LETTERS[:9] if c in row and not _is_missing(row[c])]
            choices = [str(c) for c in cols] or None
        images_raw = [row.get(f"image_{i}") for i in range(1, 8)]
        if not any(not _is_missing(x) for x in images_raw):
            images_raw = [_first(row, ("image", "image_path"))]
        qtype = row.get("question_type", "multiple-choice" if choices else "open")
        meta["question_type"] = qtype
        if qtype == "open":
            answer = _as_list_literal(answer)
            choices = None
        for k in ("subfield", "topic_difficulty", "img_type", "explanation"):
            if k in row:
                meta[k] = row[k]
    elif fmt == "mathvista":
        choices = _norm_choices(row.get("choices"), where)
        images_raw = [row.get("image")]
        for k in ("question_type", "answer_type", "precision", "unit", "query", "metadata"):
            if k in row:
                meta[k] = row[k]
        if row.get("question_type") == "free_form":
            choices = None
    elif fmt == "mathvision":
        choices = _norm_choices(row.get("options"), where)
        images_raw = [row.get("image")]
        for k in ("level", "subject", "solution"):
            if k in row:
                meta[k] = row[k]
    elif fmt in ("puzzlevqa", "algopuzzlevqa"):
        if _is_missing(row.get("options")):
            raise BenchmarkFormatError(f"{where}: missing field 'options' for format {fmt!r}")
        choices = _norm_choices(row.get("options"), where)
        images_raw = [row.get("image")]
        for k in ("caption", "explanation", "deduction"):
            if k in row:
                meta[k] = row[k]
    else:  # generic
        choices = _norm_choices(_first(row, ("choices", "options")), where)
        imgs = _first(row, ("images", "image"))
        images_raw = imgs if isinstance(imgs, list) else [imgs]

    images = [im for im in (_resolve_image(x, root, where, allow_outside_root) for x in images_raw) if im is not None]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = _fmt_number(float(answer))
    elif not isinstance(answer, list):
        answer = str(answer)
    letter = _answer_letter(answer, choices)
    if fmt in ("puzzlevqa", "algopuzzlevqa") and letter is None:
        raise BenchmarkFormatError(f"{where}: answer {answer!r} is not one of the options {choices}")
    return {
        "id": rid,
        "question": str(question),
        "answer": answer,
        "choices": choices,
        "answer_letter": letter,
        "images": images,
        "image": images[0] if images else None,
        "source": fmt,
        "meta": meta,
    }


def load_benchmark_jsonl(path: str, format: str = "generic", image_root: str | None = None,
                         allow_outside_root: bool = False) -> list[dict]:
    """Load a benchmark jsonl into dicts ``{id, question, answer, choices, answer_letter, images,
    image, source, meta}``.

    ``images`` holds paths (relative paths are resolved against ``image_root``, default the jsonl's
    directory; one that resolves outside that folder, e.g. ``../x.png`` or ``/etc/x.png``, is a
    ``BenchmarkFormatError`` naming ``file:line`` and the path unless ``allow_outside_root``), data
    URLs, or bytes (from ``{"bytes": ...}`` HF exports); ``image`` is the first or
    None. ``answer`` is kept as the dataset writes it (a letter or option text; a list for MMMU
    open questions with several accepted answers); ``answer_letter`` is its option letter when
    there are choices. Blank lines are skipped.

    Assumed fields per ``format`` (from the datasets' cards and common loaders):
      mmmu:          id, question, options (list or "['a', 'b']" string; or columns A..I as in
                     VLMEvalKit's TSV), answer (letter; text for ``question_type == "open"``),
                     image_1..image_7 (or image / image_path), question_type.
      mathvista:     pid, question, image, choices (null for free_form), answer (the choice
                     text), question_type (multi_choice|free_form), answer_type, precision, unit.
      mathvision:    id, question, options (empty for open questions; ["A".."E"] when the choices
                     are drawn in the image), image, answer (letter or value), level, subject.
      puzzlevqa / algopuzzlevqa:
                     question, image, options, answer (the option text), caption, explanation,
                     deduction; no id field, so ids are ``<file stem>-<line>``.
      generic:       id|pid|index|question_id|uid, question|query|prompt|problem,
                     answer|gold|label|ground_truth, choices|options, images|image.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown benchmark format {format!r}; choose one of {FORMATS}")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    out = []
    for where, row in iter_jsonl(path):
        if isinstance(row, BadLine):
            raise BenchmarkFormatError(row.message)
        out.append(_convert(row, format, root, where, f"{stem}-{where.rsplit(':', 1)[1]}", allow_outside_root))
    return out
