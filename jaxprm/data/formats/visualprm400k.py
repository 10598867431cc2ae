"""VisualPRM400K importer (Wang et al., "VisualPRM", arXiv 2503.10291; OpenGVLab/InternVL).

Both public layouts are JSON Lines (one file per source dataset inside ``annotations.zip``), and a
file may mix them; each row is recognised by its keys:

**Conversations** (``OpenGVLab/VisualPRM400K``, written by
``internvl_chat/tools/reasoning_data_pipeline/visualprm_data_pipeline_postprocess.py``)::

    {"id": ..., "image": "path" | [paths],
     "conversations": [{"from": "system", "value": PRM_SYSTEM_PROMPT},
                       {"from": "human", "value": "### Question:\\n{question}\\n\\n### Solution Process:\\n{step 1}"},
                       {"from": "gpt", "value": "+"},
                       {"from": "human", "value": "{step 2}"}, {"from": "gpt", "value": "-"}, ...]}

The ``+``/``-`` turns are the stored labels (``mc > threshold`` already applied, threshold 0 by
default in that script). The pipeline writes ``"id": -1``; such ids (and missing ones) are replaced
by ``"<file name>:<line>"``.

**Raw MC scores** (``OpenGVLab/VisualPRM400K-Raw`` / ``-v1.1-Raw``; fields from the dataset card and
``visualprm_data_pieline.py``)::

    {"image": ..., "question": ..., "answer": ..., "response": ...,
     "steps_with_score": [{"step", "score", "num_mc_correct", "num_mc_total"}, ...],
     "num_mc_sequences": 16}

Steps are the response split on blank lines; a response with ``"\n\n\n\n"`` yields empty steps,
which are dropped together with their scores (their indices into ``steps_with_score`` are kept in
``meta["empty_steps_dropped"]``; ``python -m jaxprm.data.audit`` totals them). After a step scores 0 the pipeline stops rolling out
and writes ``score 0.0, 0/0`` for the remaining steps; those counts are kept, so their
``mc_value`` is None. Rows with only a fraction ``score`` use ``num_mc_sequences`` (else
``mc_total``) as the number of rollouts.

Questions carry InternVL's ``<image>`` placeholder; it is removed (the prompt builder adds image
tokens). VisualPRM does not split perception from reasoning, so every step is ``"reasoning"``.

Labels with ``label_rule=None`` (default) are VisualPRM's own: the stored ``+``/``-`` turns, and
for raw rows ``mc_threshold(threshold=0.0, neutral="negative")`` -- ``+`` iff ``score > 0``, which
also makes the never-rolled-out ``0/0`` steps ``-`` exactly as the postprocess script does. A
``label_rule`` given explicitly is applied to every row.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

from jaxprm.data import labels as _labels
from jaxprm.data.formats._common import (
    ImportStats,
    as_count,
    chat_pairs,
    fail,
    images_from,
    mc_counts,
    question_record,
    require_object,
    resolve_label_rule,
    row_id as _row_id,
    run_import,
    split_question,
    strip_image_tokens,
)
from jaxprm.data.schema import REASONING, Record, Step

SOURCE = "visualprm400k"


def _conv_to_record(row: dict, where: str, rid: str) -> Record:
    conv = row["conversations"]
    if not isinstance(conv, list) or not conv:
        raise fail(rid, "conversations", f"must be a non-empty list of turns, got {type(conv).__name__}")
    turns = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict):
            raise fail(rid, f"conversations[{i}]", f"must be an object, got {type(t).__name__}")
        turns.append((t.get("from", t.get("role")), t.get("value", t.get("content"))))
    pairs = chat_pairs(turns, rid, "conversations")
    question, first = split_question(pairs[0][0], rid, f"conversations[{pairs[0][2]}].value")
    steps = [Step(text=(first if k == 0 else text).strip(), kind=REASONING, label=label)
             for k, (text, label, _) in enumerate(pairs)]
    return Record(
        id=rid,
        question=strip_image_tokens(question),
        steps=steps,
        images=images_from(row.get("image"), rid, "image"),
        source=SOURCE,
        meta={"label_rule": {"name": "given", "from": "conversations"}},
    )


def _raw_to_record(row: dict, where: str, rid: str, mc_total: int | None) -> Record:
    sws = row["steps_with_score"]
    if not isinstance(sws, list) or not sws:
        raise fail(rid, "steps_with_score", f"must be a non-empty list of {{'step', 'score', ...}}, got {sws!r}")
    k = as_count(row.get("num_mc_sequences"), rid, "num_mc_sequences") or mc_total
    steps = []
    dropped = []  # indices of empty steps ("\n\n\n\n" in the response splits into "")
    for i, e in enumerate(sws):
        f = f"steps_with_score[{i}]"
        if not isinstance(e, dict):
            raise fail(rid, f, f"must be an object with 'step' and 'score', got {type(e).__name__}")
        t = e.get("step")
        if not isinstance(t, str):
            raise fail(rid, f"{f}.step", f"must be a string, got {t!r}")
        if not t.strip():  # dropped with its score, so the other steps keep their own MC values
            dropped.append(i)
            continue
        c, tot = mc_counts(e, k, rid, f)
        steps.append(Step(text=t.strip(), kind=REASONING, num_mc_correct=c, num_mc_total=tot))
    if not steps:
        raise fail(rid, "steps_with_score", f"all {len(sws)} steps are empty")
    meta: dict[str, Any] = {}
    if dropped:
        meta["empty_steps_dropped"] = dropped
    if row.get("num_mc_sequences") is not None:
        meta["num_mc_sequences"] = as_count(row["num_mc_sequences"], rid, "num_mc_sequences")
    return question_record(row, rid, steps, source=SOURCE, meta=meta)


def _to_record(row: Any, where: str, *, mc_total, label_fn) -> Record:
    require_object(row)
    rid = _row_id(row, where, keys=("id",))
    if "conversations" in row:
        rec = _conv_to_record(row, where, rid)
    elif "steps_with_score" in row:
        rec = _raw_to_record(row, where, rid, mc_total)
        if label_fn is None:  # VisualPRM's own rule
            rec = _labels.mc_threshold(rec, 0.0, neutral="negative")
    else:
        raise fail(rid, "conversations", "row has neither 'conversations' nor 'steps_with_score'")
    return label_fn(rec) if label_fn else rec


def read_visualprm400k(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    label_rule: str | Callable | None = None,
    label_kw: dict | None = None,
    *,
    mc_total: int | None = 16,
    on_error: str = "raise",
    stats: ImportStats | None = None,
    check_images: bool | None = None,
    allow_outside_root: bool = False,
) -> Iterator[Record]:
    """Read VisualPRM400K conversation and/or raw-MC rows (a JSONL/Parquet file or a directory).

    ``label_rule=None`` keeps VisualPRM's labels (see module docstring); ``"mc"``/``"judge"``/
    ``"hybrid"``/a callable with ``label_kw`` relabels every row. Other arguments as for
    ``read_vlprm300k``."""
    label_fn = resolve_label_rule(label_rule, label_kw)

    def convert(row, where):
        return _to_record(row, where, mc_total=mc_total, label_fn=label_fn)

    return run_import(path, convert, on_error=on_error, stats=stats, image_root=image_root,
                      check_images=check_images, allow_outside_root=allow_outside_root)


__all__ = ["read_visualprm400k"]
