"""The step-labelled record every importer, the synthesiser and the pipeline agree on.

One ``Record`` is one (image(s), question, solution) triple whose solution is split into steps.
Each ``Step`` carries what label synthesis produced for it (Monte-Carlo counts, the judge's
verdict) and the final training label. Records serialise to plain JSON-able dicts
(``to_dict`` / ``from_dict``); images are either encoded bytes (PNG/JPEG/...) or a file path.
"""
from __future__ import annotations

import base64
import dataclasses
from typing import Any

PERCEPTION = "perception"
REASONING = "reasoning"
STEP_KINDS = (PERCEPTION, REASONING)

# Step labels: 1 = correct ("+"), 0 = incorrect ("-"), None = not supervised (neutral/unknown).
POSITIVE, NEGATIVE = 1, 0


class RecordError(ValueError):
    """A record failed validation. The message names the record id and the field."""


@dataclasses.dataclass
class Step:
    text: str
    kind: str = REASONING
    num_mc_correct: int | None = None
    num_mc_total: int | None = None
    judge: int | None = None  # 1: judge says correct, 0: judge's first incorrect step, None: not judged / after it
    label: int | None = None  # final label used for training/eval

    @property
    def mc_value(self) -> float | None:
        if self.num_mc_total is None or self.num_mc_correct is None or self.num_mc_total == 0:
            return None
        return self.num_mc_correct / self.num_mc_total


@dataclasses.dataclass
class Record:
    id: str
    question: str
    steps: list[Step]
    images: list[bytes | str] = dataclasses.field(default_factory=list)
    answer: str | None = None
    source: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def labels(self) -> list[int | None]:
        return [s.label for s in self.steps]

    def validate(self) -> "Record":
        """Raise ``RecordError`` naming the record and field on the first problem; return self.
        Step ``label`` / ``judge`` given as the floats ``1.0`` / ``0.0`` are replaced by the ints
        ``1`` / ``0`` here (every other float, e.g. ``0.5``, is an error), so what passes this check
        is what the pipeline trains on."""
        rid = self.id if isinstance(self.id, str) and self.id else "<no id>"

        def fail(field: str, msg: str):
            raise RecordError(f"record {rid!r}: field {field!r}: {msg}")

        if not isinstance(self.id, str) or not self.id:
            fail("id", "must be a non-empty string")
        if not isinstance(self.question, str) or not self.question.strip():
            fail("question", "must be a non-empty string")
        if self.answer is not None and not isinstance(self.answer, str):
            fail("answer", f"must be a string or None, got {type(self.answer).__name__}")
        if not isinstance(self.images, list):
            fail("images", "must be a list of encoded image bytes or file paths")
        for i, im in enumerate(self.images):
            if not isinstance(im, (bytes, str)) or len(im) == 0:
                fail(f"images[{i}]", "must be non-empty encoded bytes or a file path")
        if not isinstance(self.steps, list) or not self.steps:
            fail("steps", "must be a non-empty list")
        for i, s in enumerate(self.steps):
            where = f"steps[{i}]"
            if not isinstance(s, Step):
                fail(where, f"must be a Step, got {type(s).__name__}")
            if not isinstance(s.text, str) or not s.text.strip():
                fail(f"{where}.text", "must be a non-empty string")
            if s.kind not in STEP_KINDS:
                fail(f"{where}.kind", f"must be one of {STEP_KINDS}, got {s.kind!r}")
            for name in ("num_mc_correct", "num_mc_total"):
                v = getattr(s, name)
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                    fail(f"{where}.{name}", f"must be a non-negative int or None, got {v!r}")
            if (s.num_mc_correct is None) != (s.num_mc_total is None):
                fail(f"{where}.num_mc_correct", "num_mc_correct and num_mc_total must be given together")
            if s.num_mc_total is not None and s.num_mc_correct > s.num_mc_total:
                fail(f"{where}.num_mc_correct", f"{s.num_mc_correct} > num_mc_total {s.num_mc_total}")
            for name in ("judge", "label"):
                v = getattr(s, name)
                if isinstance(v, float) and v in (0.0, 1.0):  # the one rule: 1.0 / 0.0 are the ints 1 / 0
                    setattr(s, name, int(v))
                elif v not in (None, 0, 1) or not isinstance(v, (int, type(None))) or isinstance(v, bool):
                    fail(f"{where}.{name}", f"must be 1, 0 (1.0 / 0.0 are read as 1 / 0) or None, got {v!r}")
        if not isinstance(self.meta, dict):
            fail("meta", "must be a dict")
        return self

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "source": self.source,
            "images": [
                {"bytes": base64.b64encode(im).decode("ascii")} if isinstance(im, bytes) else {"path": im}
                for im in self.images
            ],
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> "Record":
        """Inverse of ``to_dict``; ``where`` (e.g. ``"data.jsonl:17"``) prefixes error messages."""
        prefix = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise RecordError(f"{prefix}a record must be a JSON object, got {type(d).__name__}")
        rid = d.get("id", "<no id>")
        try:
            images = []
            for i, im in enumerate(d.get("images") or []):
                if isinstance(im, dict) and "bytes" in im:
                    images.append(base64.b64decode(im["bytes"]))
                elif isinstance(im, dict) and "path" in im:
                    images.append(im["path"])
                elif isinstance(im, str):
                    images.append(im)
                else:
                    raise RecordError(f"record {rid!r}: field 'images[{i}]': expected {{'bytes': b64}} or {{'path': str}}")
            steps_in = d.get("steps")
            if not isinstance(steps_in, list):
                raise RecordError(f"record {rid!r}: field 'steps': must be a list")
            fields = {f.name for f in dataclasses.fields(Step)}
            steps = []
            for i, s in enumerate(steps_in):
                if not isinstance(s, dict):
                    raise RecordError(f"record {rid!r}: field 'steps[{i}]': must be an object")
                unknown = set(s) - fields
                if unknown:
                    raise RecordError(f"record {rid!r}: field 'steps[{i}]': unknown keys {sorted(unknown)}")
                steps.append(Step(**s))
            rec = cls(
                id=d.get("id"),
                question=d.get("question"),
                steps=steps,
                images=images,
                answer=d.get("answer"),
                source=d.get("source", ""),
                meta=d.get("meta") or {},
            )
            return rec.validate()
        except RecordError as e:
            raise RecordError(f"{prefix}{e}") from None
