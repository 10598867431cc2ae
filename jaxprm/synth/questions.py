"""Input questions for label synthesis: (image(s), question, gold answer) with a stable id.

Sources:

* ``jsonl`` -- one JSON object per line, read with
  ``jaxprm.data.formats.benchmarks.load_benchmark_jsonl`` (``format="generic"`` by default:
  ``id``, ``question``, ``answer``, optional ``choices`` / ``options``, ``image`` / ``images`` as a
  path, a data URL, or ``{"bytes": base64}``; relative paths resolve against ``image_root`` or the
  file's directory). Any benchmark format known to that loader works (``mmmu``, ``mathvista``, ...).
* ``synthetic`` -- the embedded puzzle task (``jaxprm.data.synthetic``): question ``idx`` of the
  stream for ``seed`` (deterministic in ``(seed, idx)``), with the scene kept in ``meta`` so the
  scripted policy, the scripted judge and the report can derive ground truth.

Sharding (``select_shard``) is by a stable hash of the id (default; robust to reordering the
input) or by position modulo ``num_shards``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Sequence

from jaxprm.data import synthetic as S


@dataclasses.dataclass
class Question:
    id: str
    question: str
    answer: Any  # a string, or a list of accepted answers
    images: list = dataclasses.field(default_factory=list)  # bytes / paths / data URLs
    choices: list[str] | None = None
    source: str = ""
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def image(self):
        return self.images[0] if self.images else None

    @property
    def answer_str(self) -> str | None:
        if self.answer is None:
            return None
        if isinstance(self.answer, (list, tuple)):
            return json.dumps(list(self.answer), ensure_ascii=False)
        return str(self.answer)


def stable_hash(*parts: Any) -> int:
    """A 64-bit hash of ``parts`` that is the same in every process (unlike ``hash``)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\x1f")
    return int.from_bytes(h.digest()[:8], "little")


def load_jsonl_questions(path: str, format: str = "generic", image_root: str | None = None) -> list[Question]:
    from jaxprm.data.formats.benchmarks import load_benchmark_jsonl

    out = []
    for row in load_benchmark_jsonl(path, format=format, image_root=image_root or None):
        out.append(
            Question(
                id=str(row["id"]),
                question=row["question"],
                answer=row["answer"],
                images=list(row["images"]),
                choices=row.get("choices"),
                source=row.get("source", format),
                meta=dict(row.get("meta") or {}),
            )
        )
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{path}: question ids must be unique (resume is keyed by id); duplicates: {dup}")
    return out


PUZZLE_META_KEYS = ("question_type", "params", "grid", "image_size", "scene")


def synthetic_question(
    idx: int,
    seed: int = 0,
    image_size: Sequence[int] = S.DEFAULT_IMAGE_SIZE,
    question_type: str | None = None,
) -> Question:
    """Question ``idx`` of the embedded puzzle stream for ``seed``."""
    rec = S.generate_example(int(idx), int(seed), None, image_size=tuple(image_size), question_type=question_type)
    return Question(
        id=rec.id,
        question=rec.question,
        answer=rec.answer,
        images=list(rec.images),
        choices=None,
        source="synthetic",
        meta={k: rec.meta[k] for k in PUZZLE_META_KEYS},
    )


def synthetic_questions(
    n: int,
    seed: int = 0,
    image_size: Sequence[int] = S.DEFAULT_IMAGE_SIZE,
    question_types: Sequence[str] | None = None,
    indices: Iterable[int] | None = None,
) -> list[Question]:
    """``n`` puzzle questions (question types cycle through ``question_types``, default all)."""
    qtypes = tuple(question_types or S.QUESTION_TYPES)
    idx = range(int(n)) if indices is None else indices
    return [synthetic_question(i, seed, image_size, qtypes[i % len(qtypes)]) for i in idx]


def shard_of(qid: str, position: int, num_shards: int, by: str = "hash") -> int:
    if by == "hash":
        return stable_hash("shard", qid) % num_shards
    if by == "index":
        return position % num_shards
    raise ValueError(f"shard_by must be 'hash' or 'index', got {by!r}")


def select_shard(questions: Sequence[Question], shard: int, num_shards: int, by: str = "hash") -> list[Question]:
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    return [q for i, q in enumerate(questions) if shard_of(q.id, i, num_shards, by) == shard]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        a, b = str(text).split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need n >= 1 and 0 <= i < n")
    return i, n


__all__ = [
    "PUZZLE_META_KEYS",
    "Question",
    "load_jsonl_questions",
    "parse_shard",
    "select_shard",
    "shard_of",
    "stable_hash",
    "synthetic_question",
    "synthetic_questions",
]
