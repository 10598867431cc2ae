"""VL-PRM300K importers (Ong et al., arXiv 2509.23250; github.com/theogbrand/vlprm).

Two public layouts:

**Raw** (``ob11/VL-PRM300K``, ``train/VL_PRM300K_V2.parquet``) -- ``read_vlprm300k``. Columns, as
listed on the dataset card and its viewer: ``id`` (uuid), ``question``, ``image`` (relative path,
e.g. ``images/RAVEN/.../8135.png``), ``image_qwen_smart_resize`` (pre-resized copy),
``steps_with_score`` (list of ``{"step", "score", "num_mc_correct", "num_mc_total"}``, 16 MC
rollouts per step, all prompt tags removed; Visual-Elements steps first, then Reasoning steps),
``first_incorrect_step`` (the o4-mini judge's first error as ``[section, index]`` with section
``"Visual Elements"`` / ``"Reasoning"`` and the index zero-based *within the section*; stored as a
string such as ``"['Visual Elements', 2]"``), ``conversations`` (the training transcript, truncated
at the first error), ``rollout_ground_truth_answer``, ``consensus_filtering_algo_label``,
``verifier_identified_first_incorrect_step_solution``, ``source``, ``question_type``. The rollout
JSONL files the dataset was built from (``rollout_data_generation`` in the repo: ``uid``,
``question``, ``answer``, ``image``, ``response``, ``steps_with_score``) read the same way.

Step kinds: ``steps_with_score`` does not say where the Visual-Elements section ends, so the number
of perception steps is taken from, in order: (1) a ``response`` column, counting the
``<step_k>`` blocks under ``[Visual Elements]`` (or ``[Perception]``) when, with those under
``[Reasoning]``, they are all the steps (``jaxprm.data.solution.split_tagged_steps``); (2) the
``conversations`` user turns, where the conversion script (theogbrand/mmr_rollout_data,
``convert_mc_to_prm_signal.py``) writes ``[Visual Elements]`` on the first step and ``[Reasoning]``
on the first reasoning step; (3) the step texts themselves, where the first reasoning step still
opens with its ``[Reasoning]`` header (``meta["section_source"] == "step_text"``). If none pins
the boundary (the transcript stopped inside the Visual-Elements section), the steps known to be
perception are marked so and the rest get ``unknown_kind`` (default ``"reasoning"``);
``meta["section_source"]`` says which case applied and ``meta["num_perception_steps"]`` is None.
A ``["Reasoning", r]`` error needs the boundary and is reported as a bad row otherwise.

Judge: steps before the first incorrect step get ``judge=1``, that step ``judge=0``, later steps
``None``. ``first_incorrect_step`` empty/None/"None" is read as "the judge found no error" (all
``judge=1``). A row without a ``first_incorrect_step`` column (the rollout JSONL files: no judge
has seen them) gets ``judge=None`` on every step, never an invented verdict;
``meta["label_evidence"]`` (``{"mc": True, "judge": bool}``) says what a label rule had, so the
``hybrid`` and ``judge`` rules leave such rows unsupervised rather than acting on a judge.

Step text (``step_text``): ``"vlprm"`` (default) writes each step as the released VL-PRM training
turns hold it -- ``<step_k>`` tags and the ``[Visual Elements]`` / ``[Reasoning]`` header on the first
step of each section (``jaxprm.data.solution.mark_up_steps``), the text the released checkpoints saw;
``"published"`` keeps the ``steps_with_score`` strings as they are (tags removed by the authors, a
leading header sometimes left); ``"plain"`` strips every header and tag.

Labels: the default rule is ``"judge"`` (``after_error="ignore"``), which reproduces the released
VL-PRM300K training labels: "+" before the judge's first incorrect step, "-" on it, the later
steps unsupervised (the transcript stops there), all "+" when there is no error.
``consensus_filtering_algo_label`` is kept in ``meta``. Other rules (``hybrid``, ``mc``,
``vlprm_v2``) stay available by name.

**Training** (``ob11/VL-PRM300K-V1-train``) -- ``read_vlprm300k_train``. Columns ``image`` (an HF
``Image`` feature: a ``{"bytes", "path"}`` struct in Parquet; bytes are kept encoded, never
decoded) and ``messages`` in TRL chat format: ``{"role", "content": [{"type": "text", "text"}, ...]}``
with a system prompt, the first user turn ``<image>\\n### Question:\\n{question}\\n\\n### Solution
Process:\\n[Visual Elements]\\n<step_1>\\n...\\n</step_1>``, one step per later user turn (a
``[Reasoning]`` header where that section starts) and assistant turns ``"+"`` / ``"-"``. Labels are
taken from the assistant turns; kinds from the section headers (``unknown_kind`` before any
header); the step text is kept as published (``step_text="published"``, default: the first step is
the text after ``### Solution Process:\\n``, with its header and ``<step_k>`` tags) -- what the released
checkpoints were trained on -- or stripped of headers and tags with ``step_text="plain"``. Plain-string
``content``, a leading ``{"type": "image"}`` part (or none: the image is the ``image`` column),
a first text with or without the leading ``<image>`` token, and ShareGPT ``{"from", "value"}``
turns (``conversations``) are accepted too.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterator

from jaxprm.data.formats._common import (
    ImportStats,
    _QA_RE,
    as_count,
    chat_pairs,
    fail,
    images_from,
    mc_counts,
    optional_str,
    parse_listish,
    require_object,
    require_str,
    resolve_label_rule,
    row_id as _row_id,
    run_import,
    split_question,
    strip_image_tokens,
    turn_text,
)
from jaxprm.data.schema import PERCEPTION, REASONING, STEP_KINDS, Record, Step
from jaxprm.data.solution import clean_step, clean_step_with_kind, mark_up_steps, split_tagged_steps

SOURCE = "vlprm300k"
SOURCE_TRAIN = "vlprm300k_train"
VISUAL_SECTIONS = ("visual elements", "perception")
_LEADING_IMAGE_RE = re.compile(r"^\s*(?:<image>\s*)+")
JUDGE_FIELD = "first_incorrect_step"
STEP_TEXTS = ("vlprm", "published", "plain")  # see the module docstring


def _check_step_text(step_text: str, allowed=STEP_TEXTS) -> None:
    if step_text not in allowed:
        raise ValueError(f"step_text must be one of {allowed}, got {step_text!r}")


def _strip_leading_image(text: str) -> str:
    """The published train set's first user text starts with ``"<image>\\n### Question:..."``."""
    return _LEADING_IMAGE_RE.sub("", text, count=1)


def _check_kind(unknown_kind: str) -> None:
    if unknown_kind not in STEP_KINDS:
        raise ValueError(f"unknown_kind must be one of {STEP_KINDS}, got {unknown_kind!r}")


# -- raw -------------------------------------------------------------------------------------------
def _first_incorrect(value: Any, rid: str) -> tuple[str, int] | None:
    field = "first_incorrect_step"
    v = parse_listish(value, rid, field)
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return None
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise fail(rid, field, f"expected [section, index], got {value!r}")
    section, idx = v
    if not isinstance(section, str) or section.strip().lower() not in VISUAL_SECTIONS + ("reasoning",):
        raise fail(rid, field, f"section must be 'Visual Elements' or 'Reasoning', got {section!r}")
    idx = as_count(idx, rid, f"{field}[1]")
    if idx is None:
        raise fail(rid, f"{field}[1]", "missing step index")
    return ("Reasoning" if section.strip().lower() == "reasoning" else "Visual Elements"), idx


def _sections_from_response(row: dict, n: int) -> int | None:
    resp = row.get("response", row.get("rollout_response"))
    if not isinstance(resp, str):
        return None
    kinds = [kind for _, kind in split_tagged_steps(resp)]
    n_vis = kinds.count(PERCEPTION)
    return n_vis if n_vis + kinds.count(REASONING) == n else None


def _sections_from_conversations(row: dict) -> tuple[int | None, int]:
    """``(n_perception or None, lower bound)`` from the section headers of the user turns."""
    conv = row.get("conversations", row.get("messages"))
    if not isinstance(conv, list):
        return None, 0
    k = 0
    seen_visual = False
    for turn in conv:
        if not isinstance(turn, dict):
            return None, 0
        role = turn.get("role", turn.get("from"))
        if role not in ("user", "human"):
            continue
        text = turn_text(turn.get("content", turn.get("value"))) or ""
        if k == 0:
            m = _QA_RE.match(_strip_leading_image(text))
            text = m.group(2) if m else text
        kind = clean_step_with_kind(text)[1]
        if kind == REASONING:
            return k, k
        if kind is not None:
            seen_visual = True
        k += 1
    return None, (k if seen_visual else 0)


def _sections_from_step_text(texts: list[str]) -> int | None:
    """Index of the first step whose text opens with a ``[Reasoning]`` header, or None."""
    for i, t in enumerate(texts):
        if clean_step_with_kind(t)[1] == REASONING:
            return i
    return None


def _raw_to_record(row: Any, where: str, *, mc_total, image_column, unknown_kind, label_fn,
                   step_text: str = "vlprm") -> Record:
    require_object(row)
    rid = _row_id(row, where)
    qkey = "question" if "question" in row else "rollout_question"
    # the raw question is the full policy prompt; only "<image>" placeholders are removed
    question = strip_image_tokens(require_str(row, qkey, rid))
    skey = "steps_with_score" if "steps_with_score" in row else "rollout_steps_with_score"
    sws = row.get(skey)
    if not isinstance(sws, list) or not sws:
        raise fail(rid, skey, f"must be a non-empty list of {{'step', 'score', ...}}, got {sws!r}")
    n = len(sws)
    texts, counts = [], []
    for i, e in enumerate(sws):
        f = f"{skey}[{i}]"
        if not isinstance(e, dict):
            raise fail(rid, f, f"must be an object with 'step' and 'score', got {type(e).__name__}")
        t = e.get("step")
        if not isinstance(t, str) or not t.strip():
            raise fail(rid, f"{f}.step", f"must be a non-empty string, got {t!r}")
        texts.append(t.strip())
        counts.append(mc_counts(e, mc_total, rid, f))

    # where the Visual Elements section ends
    has_judge = JUDGE_FIELD in row
    fis = _first_incorrect(row.get(JUDGE_FIELD), rid) if has_judge else None
    n_vis, source = _sections_from_response(row, n), "response"
    lower = 0
    if n_vis is None:
        n_vis, lower = _sections_from_conversations(row)
        source = "conversations"
    if n_vis is None:
        n_vis = _sections_from_step_text(texts)
        if n_vis is not None:
            source = "step_text"
    if n_vis is not None and n_vis > n:
        raise fail(rid, "conversations", f"has {n_vis} Visual Elements steps but {skey} has only {n} steps")
    if n_vis is None and fis is not None and fis[0] == "Visual Elements":
        lower = max(lower, fis[1] + 1)
    lower = min(lower, n)
    if n_vis is None and lower == n:  # every step is known to be a Visual Elements step
        n_vis = n
    if n_vis is None:
        source = "partial" if lower else "unknown"
        kinds = [PERCEPTION] * lower + [unknown_kind] * (n - lower)
    else:
        kinds = [PERCEPTION] * n_vis + [REASONING] * (n - n_vis)

    # the judge's verdicts; a row without the judge's column (the rollout files) has none
    if not has_judge:
        judges: list[int | None] = [None] * n
    elif fis is None:
        judges = [1] * n
    else:
        section, idx = fis
        if section == "Visual Elements":
            if n_vis is not None and idx >= n_vis:
                raise fail(rid, "first_incorrect_step", f"Visual Elements index {idx} but that section has {n_vis} steps")
            g = idx
        else:
            if n_vis is None:
                raise fail(rid, "first_incorrect_step",
                           f"cannot place ['Reasoning', {idx}]: the number of Visual Elements steps is unknown "
                           "(no 'response' column and no '[Reasoning]' header in 'conversations')")
            g = n_vis + idx
        if g >= n:
            raise fail(rid, "first_incorrect_step", f"[{section!r}, {idx}] is step {g} but there are only {n} steps")
        judges = [1] * g + [0] + [None] * (n - g - 1)

    if step_text == "vlprm":
        texts = mark_up_steps(texts, kinds)
    elif step_text == "plain":
        texts = [clean_step(t) for t in texts]
    steps = [
        Step(text=t, kind=k, num_mc_correct=c, num_mc_total=tot, judge=j)
        for t, k, (c, tot), j in zip(texts, kinds, counts, judges)
    ]
    img_key = image_column if image_column in row else next(
        (k for k in ("image", "image_url", "rollout_image_path") if k in row), image_column)
    meta: dict[str, Any] = {
        "first_incorrect_step": list(fis) if fis else None,
        "num_perception_steps": n_vis,
        "section_source": source,
        # which evidence a label rule had: MC counts; the judge's verdicts only with its column
        "label_evidence": {"mc": any(c is not None and tot for c, tot in counts), "judge": has_judge},
    }
    for k_src, k_meta in (("source", "source_dataset"), ("question_type", "question_type"),
                          ("consensus_filtering_algo_label", "consensus_filtering_algo_label")):
        v = optional_str(row.get(k_src))
        if v is not None:
            meta[k_meta] = v
    rec = Record(
        id=rid,
        question=question,
        steps=steps,
        images=images_from(row.get(img_key), rid, img_key),
        answer=optional_str(row.get("rollout_ground_truth_answer", row.get("answer"))),
        source=SOURCE,
        meta=meta,
    )
    return label_fn(rec) if label_fn else rec


def read_vlprm300k(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    label_rule: str | Callable | None = "judge",
    label_kw: dict | None = None,
    *,
    mc_total: int | None = 16,
    image_column: str = "image",
    unknown_kind: str = REASONING,
    step_text: str = "vlprm",
    on_error: str = "raise",
    stats: ImportStats | None = None,
    check_images: bool | None = None,
    allow_outside_root: bool = False,
) -> Iterator[Record]:
    """Read raw VL-PRM300K rows (Parquet, JSONL or JSON; a file or a directory of them).

    ``label_rule``: ``"judge"`` (default: the authors' released labels -- "+" before
    ``first_incorrect_step``, "-" on it, later steps unsupervised, all "+" when it is None),
    ``"hybrid"``, ``"mc"``, ``"vlprm_v2"``, a callable, or None (labels left unset), with keyword
    arguments ``label_kw`` (see ``jaxprm.data.labels``). ``mc_total``: rollouts per step when a row stores only the fraction ``score``. ``image_column``: ``"image"`` or
    ``"image_qwen_smart_resize"``. ``step_text``: ``"vlprm"`` (default: the released training turns'
    markup), ``"published"`` or ``"plain"`` (module docstring). ``check_images`` (default: when
    ``image_root`` is given) reports a missing image file as a bad row. ``on_error="skip"`` logs and
    counts bad rows in ``stats``.
    """
    _check_kind(unknown_kind)
    _check_step_text(step_text)
    label_fn = resolve_label_rule(label_rule, label_kw)

    def convert(row, where):
        return _raw_to_record(row, where, mc_total=mc_total, image_column=image_column,
                              unknown_kind=unknown_kind, label_fn=label_fn, step_text=step_text)

    return run_import(path, convert, on_error=on_error, stats=stats, image_root=image_root,
                      check_images=check_images, allow_outside_root=allow_outside_root)


# -- training (chat messages) ----------------------------------------------------------------------------
def _train_to_record(row: Any, where: str, *, unknown_kind, label_fn, step_text: str = "published") -> Record:
    require_object(row)
    rid = _row_id(row, where)
    key = "messages" if "messages" in row else "conversations"
    msgs = row.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise fail(rid, key, f"must be a non-empty list of chat turns, got {type(msgs).__name__}")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise fail(rid, f"{key}[{i}]", f"must be an object, got {type(m).__name__}")
        turns.append((m.get("role", m.get("from")), m.get("content", m.get("value"))))
    pairs = chat_pairs(turns, rid, key)
    question, first = split_question(_strip_leading_image(pairs[0][0]), rid, f"{key}[{pairs[0][2]}]")
    steps, kind = [], None
    for k, (text, label, _) in enumerate(pairs):
        raw = first if k == 0 else text
        t, hdr = clean_step_with_kind(raw)
        kind = hdr or kind
        steps.append(Step(text=t if step_text == "plain" else raw.strip(), kind=kind or unknown_kind, label=label))
    images = images_from(row.get("image"), rid, "image") + images_from(row.get("images"), rid, "images")
    rec = Record(
        id=rid,
        question=strip_image_tokens(question),
        steps=steps,
        images=images,
        source=SOURCE_TRAIN,
        meta={"label_rule": {"name": "given", "from": key}},
    )
    return label_fn(rec) if label_fn else rec


def read_vlprm300k_train(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    label_rule: str | Callable | None = None,
    label_kw: dict | None = None,
    *,
    unknown_kind: str = REASONING,
    step_text: str = "published",
    on_error: str = "raise",
    stats: ImportStats | None = None,
    check_images: bool | None = None,
    allow_outside_root: bool = False,
) -> Iterator[Record]:
    """Read VL-PRM300K-train rows (``image`` + chat ``messages``). Labels come from the ``+``/``-``
    assistant turns unless ``label_rule`` is given (the rows carry no MC counts or judge fields, so
    the rules can only produce neutral labels here). ``step_text``: ``"published"`` (default: the turn
    text as published, headers and ``<step_k>`` tags kept) or ``"plain"`` (stripped)."""
    _check_kind(unknown_kind)
    _check_step_text(step_text, ("published", "plain"))
    label_fn = resolve_label_rule(label_rule, label_kw)

    def convert(row, where):
        return _train_to_record(row, where, unknown_kind=unknown_kind, label_fn=label_fn, step_text=step_text)

    return run_import(path, convert, on_error=on_error, stats=stats, image_root=image_root,
                      check_images=check_images, allow_outside_root=allow_outside_root)


__all__ = ["read_vlprm300k", "read_vlprm300k_train"]
