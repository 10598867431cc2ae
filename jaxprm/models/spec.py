"""What turns a backbone into a PRM (``PRMSpec``, saved as ``prm.json``), without importing JAX.

The data pipeline, the prompt and the importers read these names; ``jaxprm.models.prm`` re-exports
them beside the model.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os

from jaxprm.atomic import atomic_write_json

HEADS = ("lm_rows", "linear")
# What the assistant turns hold in the training prompt (the prompt style's history; see
# jaxprm.data.prompt.encode_mode): "placeholder" = "+" in every turn, the scoring prompt itself;
# "labels" = the true labels (teacher forcing), which scoring cannot reproduce.
HISTORIES = ("placeholder", "labels")
# prompt styles are defined in jaxprm.data.prompt (PROMPT_STYLES, checked where a PRM is built for
# scoring); the spec stores the name. A prm.json written before styles existed used the "chat" layout.
DEFAULT_PROMPT_STYLE = "vlprm"
LEGACY_PROMPT_STYLE = "chat"


@dataclasses.dataclass(frozen=True)
class PRMSpec:
    """What turns a backbone into a PRM; saved as ``prm.json`` next to weights."""

    plus_id: int
    minus_id: int
    head: str = "lm_rows"
    system_prompt: str | None = None  # None: the prompt style's system prompt
    # the prompt layout the PRM was trained with and is scored with: a name in
    # jaxprm.data.prompt.PROMPT_STYLES ("vlprm", "visualprm", "chat"); a prm.json without it means "chat"
    prompt_style: str = DEFAULT_PROMPT_STYLE
    history: str = "placeholder"  # one of HISTORIES; scoring always fills every turn with the placeholder
    # the embedded task's settings when the PRM was trained on it (image size, error rates, ...), so
    # ``python -m jaxprm.eval synthetic`` measures it on its own task; None for other data
    task: dict | None = dataclasses.field(default=None, hash=False, compare=False)

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"PRM head must be one of {HEADS}, got {self.head!r}")
        if self.history not in HISTORIES:
            raise ValueError(f"PRM history must be one of {HISTORIES}, got {self.history!r}")
        if not isinstance(self.prompt_style, str) or not self.prompt_style:
            raise ValueError(f"PRM prompt_style must be a style name, got {self.prompt_style!r}")
        for name in ("plus_id", "minus_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"PRM {name} must be an int token id, got {v!r}")
            object.__setattr__(self, name, v := int(v))  # numpy ints -> int (prm.json, hashing)
            if v < 0:
                raise ValueError(f"PRM {name} must be a token id >= 0, got {v}")
        if self.plus_id == self.minus_id:
            raise ValueError("plus_id and minus_id must differ")

    def check_ids(self, vocab_size: int | None = None, label_ids: tuple[int, int] | None = None,
                  where: str = "PRM spec") -> None:
        """Raise ``ValueError`` unless ``plus_id``/``minus_id`` are rows of a ``vocab_size`` embedding and
        equal ``label_ids``, the tokenizer's ("+", "-") ids (``jaxprm.data.prompt.label_token_ids``),
        which the scoring prompt uses."""
        if vocab_size is not None:
            for name in ("plus_id", "minus_id"):
                v = getattr(self, name)
                if not 0 <= v < int(vocab_size):
                    raise ValueError(f"{where}: {name}={v} is outside the vocabulary (embedding size "
                                     f"{int(vocab_size)}; ids 0..{int(vocab_size) - 1})")
        if label_ids is not None:
            plus, minus = (int(i) for i in label_ids)
            if (self.plus_id, self.minus_id) != (plus, minus):
                raise ValueError(f"{where}: plus_id={self.plus_id}, minus_id={self.minus_id} but the tokenizer's "
                                 f'"+" and "-" tokens are {plus} and {minus}; the scores would read the wrong rows')

    def save(self, directory: str) -> None:
        atomic_write_json(os.path.join(directory, "prm.json"), dataclasses.asdict(self), indent=2)

    @classmethod
    def load(cls, directory: str) -> "PRMSpec | None":
        p = os.path.join(directory, "prm.json")
        if not os.path.exists(p):
            return None
        try:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a JSON object, got {type(d).__name__}")
        missing = sorted({"plus_id", "minus_id"} - set(d))
        if missing:
            raise ValueError(f"{p}: missing field(s) {missing}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{p}: unknown field(s) {unknown}; written by a newer jaxprm?")
        if "prompt_style" not in d:  # written before prompt styles: the only layout then was "chat"
            d["prompt_style"] = LEGACY_PROMPT_STYLE
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: {e}") from None
