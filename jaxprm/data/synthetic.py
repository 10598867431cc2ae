"""The embedded task: generated visual puzzles with step-by-step solutions and ground-truth step labels.

Each puzzle is a small image of coloured shapes (circles, squares, triangles) placed in the cells of a
2x2 .. 3x3 grid, and a question about it: counting, arithmetic over counts, comparing counts, a
weighted score, or which colour/kind is the leftmost/rightmost/topmost/bottommost. ``solve`` writes a
correct solution in the style a policy is asked to use ("[Visual Elements]" then "[Reasoning]"):
*perception* steps that state what is seen, then *reasoning* steps that compute from those
observations; the last step ends with ``The answer is \\boxed{N}.``

``corrupt`` injects one controlled error and propagates it:

* a **perception** error changes what is seen (a shape missed, hallucinated, given the wrong colour,
  kind or position). The solution is re-derived from the wrong observation, so the first perception
  step whose text changes is the error step, and every later step follows from it.
* a **reasoning** error is a slip in one computation (an arithmetic result off by 1-2, a flipped
  comparison, the wrong shape picked as the extreme one); later steps carry the wrong value forward.

Only errors that change the final answer are injected, so a corrupted solution is always wrong.

Label convention (VisualPRM / VL-PRM "all steps supervised"): steps before the first error are
``1``, the first erroneous step is ``0`` and every later step is ``0`` too (they depend on the wrong
value). ``Record.meta["first_error_step"]`` holds the index of the first error (``None`` for a correct
solution), so a consumer that supervises only up to the first error can recover that view.

Everything is deterministic in the seed. ``generate_records`` produces balanced, validated
``Record``s with PNG bytes; ``build_synthetic_tokenizer`` a small offline Qwen-style BPE tokenizer for
this task; ``tiny_model_config`` a tiny Qwen2.5-VL-shaped config. CLI::

    python -m jaxprm.data.synthetic --out records.jsonl --n 100 --seed 0 [--preview DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .schema import NEGATIVE, PERCEPTION, POSITIVE, REASONING, Record, Step
from .solution import extract_boxed, format_solution

# --------------------------------------------------------------------------------------------------
# Vocabulary of the scenes
# --------------------------------------------------------------------------------------------------
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 190),
    "orange": (250, 130, 20),
}
COLOR_NAMES = tuple(COLORS)
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
BACKGROUND = (255, 255, 255)

QUESTION_TYPES = ("count", "sum", "difference", "compare", "score", "extreme")
ERROR_KINDS = (PERCEPTION, REASONING)
DIRECTIONS = ("leftmost", "rightmost", "topmost", "bottommost")
PERCEPTION_ERROR_TYPES = ("omission", "hallucination", "wrong_color", "wrong_kind", "wrong_position")
REASONING_ERROR_TYPES = ("arithmetic", "comparison", "selection")

PIXELS_PER_TOKEN = 28  # patch 14 x spatial merge 2: one LLM token per 28x28 pixels
DEFAULT_IMAGE_SIZE = (112, 112)  # (height, width): 3x3 grid, 16 LLM tokens

_ROW_NAMES = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COL_NAMES = {2: ("left", "right"), 3: ("left", "middle", "right")}
_DIRECTION_PHRASES = {
    "leftmost": "furthest to the left",
    "rightmost": "furthest to the right",
    "topmost": "closest to the top",
    "bottommost": "closest to the bottom",
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One shape in the scene. ``dx``/``dy`` in [-1, 1] jitter it inside its cell when drawn."""

    color: str
    kind: str
    row: int
    col: int
    size: str = "large"
    dx: float = 0.0
    dy: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Puzzle:
    """A scene, its rendered image and one question about it with its ground-truth answer."""

    shapes: list[Shape]
    grid: tuple[int, int]  # (rows, cols)
    image_size: tuple[int, int]  # (height, width)
    question_type: str
    params: dict[str, Any]
    question: str
    answer: str
    image: Image.Image | None = dataclasses.field(default=None, repr=False, compare=False)

    def cell_name(self, row: int, col: int) -> str:
        return cell_name(row, col, self.grid)


# --------------------------------------------------------------------------------------------------
# Phrasing helpers
# --------------------------------------------------------------------------------------------------
def cell_name(row: int, col: int, grid: tuple[int, int]) -> str:
    """``"top left"``, ``"center"``, ``"bottom middle"``, ... for a 2x2 .. 3x3 grid."""
    r = _ROW_NAMES[grid[0]][row]
    c = _COL_NAMES[grid[1]][col]
    return "center" if (r, c) == ("middle", "middle") else f"{r} {c}"


@dataclasses.dataclass(frozen=True)
class _Filter:
    color: str | None = None
    kind: str | None = None

    @classmethod
    def of(cls, d: dict[str, Any]) -> "_Filter":
        return cls(d.get("color"), d.get("kind"))

    def to_dict(self) -> dict[str, Any]:
        return {"color": self.color, "kind": self.kind}

    def matches(self, s: Shape) -> bool:
        return (self.color is None or s.color == self.color) and (self.kind is None or s.kind == self.kind)

    @property
    def singular(self) -> str:
        return " ".join(x for x in (self.color, self.kind or "shape") if x)

    @property
    def plural(self) -> str:
        return self.singular + "s"

    def noun(self, n: int) -> str:
        return self.singular if n == 1 else self.plural

    @property
    def answer(self) -> str:
        """The answer naming this group in a comparison: the colour, or the plural kind."""
        return self.color if self.kind is None else self.plural


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _describe(s: Shape, grid: tuple[int, int]) -> str:
    return f"{_article(s.color)} {s.color} {s.kind} at the {cell_name(s.row, s.col, grid)}"


def _reading_order(shapes: Sequence[Shape]) -> list[Shape]:
    return sorted(shapes, key=lambda s: (s.row, s.col))


def _boxed(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


# --------------------------------------------------------------------------------------------------
# Scenes, questions, rendering
# --------------------------------------------------------------------------------------------------
def grid_for_image(image_size: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) grid for an image of ``(height, width)``; at most 3x3, at least 2x2."""
    h, w = (int(x) for x in image_size)
    if h % PIXELS_PER_TOKEN or w % PIXELS_PER_TOKEN or h < 2 * PIXELS_PER_TOKEN or w < 2 * PIXELS_PER_TOKEN:
        raise ValueError(
            f"image_size (height, width) = {tuple(image_size)} must be multiples of {PIXELS_PER_TOKEN} "
            f"(patch 14 x merge 2) and at least {2 * PIXELS_PER_TOKEN} on each side"
        )
    return min(3, h // PIXELS_PER_TOKEN), min(3, w // PIXELS_PER_TOKEN)


def _sample_scene(rng: np.random.Generator, grid: tuple[int, int]) -> list[Shape]:
    rows, cols = grid
    n_cells = rows * cols
    lo, hi = (3, min(7, n_cells - 2)) if n_cells >= 6 else (2, n_cells - 1)
    n = int(rng.integers(lo, hi + 1))
    cells = rng.choice(n_cells, size=n, replace=False)
    palette = list(rng.choice(len(COLOR_NAMES), size=int(rng.integers(2, 5)), replace=False))
    shapes = []
    for cell in sorted(int(c) for c in cells):
        color = COLOR_NAMES[int(palette[int(rng.integers(len(palette)))])]
        kind = KINDS[int(rng.integers(len(KINDS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        dx, dy = (float(round(x, 3)) for x in rng.uniform(-1.0, 1.0, size=2))
        shapes.append(Shape(color, kind, cell // cols, cell % cols, size, dx, dy))
    return shapes


def _random_filter(rng: np.random.Generator, shapes: Sequence[Shape], what: str) -> _Filter:
    present_colors = sorted({s.color for s in shapes}, key=COLOR_NAMES.index)
    if what == "color":
        pool = present_colors if rng.random() < 0.9 else list(COLOR_NAMES)
        return _Filter(color=pool[int(rng.integers(len(pool)))])
    if what == "kind":
        return _Filter(kind=KINDS[int(rng.integers(len(KINDS)))])
    if what == "color_kind":
        if rng.random() < 0.8:
            s = shapes[int(rng.integers(len(shapes)))]
            return _Filter(s.color, s.kind)
        return _Filter(COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))], KINDS[int(rng.integers(len(KINDS)))])
    return _Filter()


def _count(shapes: Sequence[Shape], f: _Filter) -> int:
    return sum(f.matches(s) for s in shapes)


def _extreme_key(direction: str) -> Callable[[Shape], int]:
    return {
        "leftmost": lambda s: s.col,
        "rightmost": lambda s: -s.col,
        "topmost": lambda s: s.row,
        "bottommost": lambda s: -s.row,
    }[direction]


def _sample_question(rng: np.random.Generator, shapes: list[Shape], qtype: str) -> tuple[dict, str] | None:
    """(params, question) for ``qtype`` over the scene, or None if this scene does not suit it."""
    if qtype == "count":
        variant = ("color", "kind", "color_kind", "all")[int(rng.choice(4, p=[0.35, 0.25, 0.25, 0.15]))]
        f = _random_filter(rng, shapes, variant)
        return {"target": f.to_dict()}, f"How many {f.plural} are there in the image?"
    if qtype in ("sum", "difference", "compare"):
        if qtype == "compare":
            what = ("color", "kind")[int(rng.integers(2))]
            wa = wb = what
        else:
            wa, wb = (("color", "kind")[int(rng.integers(2))] for _ in range(2))
        a, b = _random_filter(rng, shapes, wa), _random_filter(rng, shapes, wb)
        if a == b:
            return None
        na, nb = _count(shapes, a), _count(shapes, b)
        if qtype == "difference" and na < nb:
            a, b = b, a
        if qtype == "compare" and na == nb:
            return None
        params = {"a": a.to_dict(), "b": b.to_dict()}
        if qtype == "sum":
            q = f"What is the number of {a.plural} plus the number of {b.plural}?"
        elif qtype == "difference":
            q = f"What is the number of {a.plural} minus the number of {b.plural}?"
        else:
            q = f"Are there more {a.plural} or more {b.plural} in the image?"
        return params, q
    if qtype == "score":
        weights = {k: int(w) for k, w in zip(KINDS, rng.integers(1, 6, size=len(KINDS)))}
        worth = _join([f"each {k} is worth {w} point{'s' if w != 1 else ''}" for k, w in weights.items()])
        q = f"{worth[0].upper()}{worth[1:]}. What is the total score of all the shapes in the image?"
        return {"weights": weights}, q
    if qtype == "extreme":
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        if rng.random() < 0.5:
            f, ask = _random_filter(rng, shapes, "kind"), "color"
        else:
            f, ask = _random_filter(rng, shapes, "color"), "kind"
        cand = [s for s in shapes if f.matches(s)]
        if len(cand) < 2:
            return None
        key = _extreme_key(direction)
        best = min(key(s) for s in cand)
        winners = [s for s in cand if key(s) == best]
        if len(winners) != 1 or all(getattr(s, ask) == getattr(winners[0], ask) for s in cand):
            return None  # ambiguous, or trivial (every candidate has the same answer)
        params = {"target": f.to_dict(), "direction": direction, "ask": ask}
        if ask == "color":
            q = f"What colour is the {direction} {f.singular}?"
        else:
            q = f"What kind of shape is the {direction} {f.singular}?"
        return params, q
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def render(shapes: Sequence[Shape], grid: tuple[int, int], image_size: tuple[int, int]) -> Image.Image:
    """Draw the scene on a plain background; deterministic in its arguments."""
    h, w = image_size
    rows, cols = grid
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    ch, cw = h / rows, w / cols
    for s in shapes:
        cell = min(ch, cw)
        side = cell * (0.78 if s.size == "large" else 0.5)
        free = (cell - side) / 2 * 0.8
        cx = (s.col + 0.5) * cw + s.dx * free
        cy = (s.row + 0.5) * ch + s.dy * free
        half = side / 2
        fill = COLORS[s.color]
        outline = tuple(int(c * 0.6) for c in fill)
        box = [cx - half, cy - half, cx + half, cy + half]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill, outline=outline)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill, outline=outline)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill, outline=outline)
    return img


def _sample_puzzle(rng: np.random.Generator, image_size: tuple[int, int], question_type: str | None) -> Puzzle:
    grid = grid_for_image(image_size)
    qtype = question_type or QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    for _ in range(1000):
        shapes = _sample_scene(rng, grid)
        q = _sample_question(rng, shapes, qtype)
        if q is None:
            continue
        params, question = q
        p = Puzzle(shapes, grid, tuple(int(x) for x in image_size), qtype, params, question, answer="")
        derived = _derive(p, shapes, _Trace([]))
        if derived is None:
            continue
        p.answer = derived[1]
        return p
    raise RuntimeError(f"could not sample a {qtype!r} puzzle for image_size={image_size}")


def generate_puzzle(
    rng: np.random.Generator,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    question_type: str | None = None,
) -> Puzzle:
    """Sample a scene and a question (of ``question_type``, or a random one) and render the image.

    ``image_size`` is ``(height, width)`` in pixels, multiples of 28. Deterministic in ``rng``'s state.
    """
    p = _sample_puzzle(rng, image_size, question_type)
    p.image = render(p.shapes, p.grid, p.image_size)
    return p


# --------------------------------------------------------------------------------------------------
# Solutions: one derivation per question type, run on a (possibly mis-perceived) scene
# --------------------------------------------------------------------------------------------------
class _Trace:
    """Records every computation of a derivation; ``slip=(point, alternative)`` makes one go wrong."""

    def __init__(self, out: list, slip: tuple[int, int] | None = None):
        self.out = out
        self.slip = slip
        self.points: list[tuple[int, str, Any, list]] = []  # (step index, error type, true, alternatives)

    def pick(self, true: Any, alternatives: Sequence[Any], error_type: str) -> Any:
        i = len(self.points)
        self.points.append((len(self.out), error_type, true, list(alternatives)))
        if self.slip is not None and self.slip[0] == i:
            return alternatives[self.slip[1]]
        return true

    def num(self, value: int, allow_negative: bool = False) -> int:
        alts = [value + d for d in (1, -1, 2, -2) if allow_negative or value + d >= 0]
        return self.pick(value, alts, "arithmetic")


def _list_step(shapes: Sequence[Shape], f: _Filter, grid) -> tuple[str, int]:
    found = _reading_order([s for s in shapes if f.matches(s)])
    n = len(found)
    if n == 0:
        return f"There are no {f.plural} in the image.", 0
    return f"There {_be(n)} {n} {f.noun(n)}: {_join([_describe(s, grid) for s in found])}.", n


def _derive(p: Puzzle, shapes: Sequence[Shape], tr: _Trace) -> tuple[list[tuple[str, str]], str] | None:
    """The solution of ``p`` as seen in ``shapes``: ([(kind, text)], boxed answer), or None if ambiguous."""
    out = tr.out
    grid, prm = p.grid, p.params
    qt = p.question_type
    if qt == "count":
        f = _Filter.of(prm["target"])
        counts = []
        for r in range(grid[0]):
            row = _reading_order([s for s in shapes if s.row == r and f.matches(s)])
            n = len(row)
            counts.append(n)
            where = f"In the {_ROW_NAMES[grid[0]][r]} row"
            if n == 0:
                out.append((PERCEPTION, f"{where} there are no {f.plural}."))
            else:
                desc = _join([_describe(s, grid) for s in row])
                out.append((PERCEPTION, f"{where} there {_be(n)} {n} {f.noun(n)}: {desc}."))
        total = tr.num(sum(counts))
        out.append((REASONING, f"Adding up the rows: {' + '.join(map(str, counts))} = {total}."))
        ans = str(total)
        out.append((REASONING, f"So there {_be(total)} {total} {f.noun(total)} in the image. {_boxed(ans)}"))
        return out, ans
    if qt in ("sum", "difference", "compare"):
        a, b = _Filter.of(prm["a"]), _Filter.of(prm["b"])
        text, na = _list_step(shapes, a, grid)
        out.append((PERCEPTION, text))
        text, nb = _list_step(shapes, b, grid)
        out.append((PERCEPTION, text))
        if qt == "sum":
            v = tr.num(na + nb)
            out.append((REASONING, f"Adding the two numbers: {na} + {nb} = {v}."))
            ans = str(v)
            out.append((REASONING, f"So the number of {a.plural} plus the number of {b.plural} is {v}. {_boxed(ans)}"))
        elif qt == "difference":
            v = tr.num(na - nb, allow_negative=True)
            out.append((REASONING, f"Subtracting the second number from the first: {na} - {nb} = {v}."))
            ans = str(v)
            out.append((REASONING, f"So the number of {a.plural} minus the number of {b.plural} is {v}. {_boxed(ans)}"))
        else:
            true = ">" if na > nb else "<" if na < nb else "="
            rel = tr.pick(true, [x for x in (">", "<") if x != true], "comparison")
            out.append((REASONING, f"Comparing the two numbers: {na} {rel} {nb}."))
            if rel == "=":
                ans = "equal"
                out.append((REASONING, f"So there are as many {a.plural} as {b.plural}. {_boxed(ans)}"))
            else:
                more, less = (a, b) if rel == ">" else (b, a)
                ans = more.answer
                out.append((REASONING, f"So there are more {more.plural} than {less.plural}. {_boxed(ans)}"))
        return out, ans
    if qt == "score":
        weights = prm["weights"]
        counts = {}
        for k in KINDS:
            text, counts[k] = _list_step(shapes, _Filter(kind=k), grid)
            out.append((PERCEPTION, text))
        points = []
        for k in KINDS:
            v = tr.num(counts[k] * weights[k])
            points.append(v)
            unit = "point" if v == 1 else "points"
            out.append((REASONING, f"The {k}s give {counts[k]} × {weights[k]} = {v} {unit}."))
        total = tr.num(sum(points))
        out.append((REASONING, f"Adding up the points: {' + '.join(map(str, points))} = {total}."))
        ans = str(total)
        out.append((REASONING, f"So the total score is {total}. {_boxed(ans)}"))
        return out, ans
    if qt == "extreme":
        f = _Filter.of(prm["target"])
        direction, ask = prm["direction"], prm["ask"]
        text, n = _list_step(shapes, f, grid)
        out.append((PERCEPTION, text))
        cand = _reading_order([s for s in shapes if f.matches(s)])
        if not cand:
            return None
        key = _extreme_key(direction)
        best = min(key(s) for s in cand)
        winners = [s for s in cand if key(s) == best]
        if len(winners) != 1:
            return None
        alts = [s for s in cand if s is not winners[0]]
        chosen = tr.pick(winners[0], alts, "selection")
        where = cell_name(chosen.row, chosen.col, grid)
        lead = "There is only one" if n == 1 else "Of these, the one"
        phrase = _DIRECTION_PHRASES[direction]
        out.append((REASONING, f"{lead} {phrase} is the {chosen.color} {chosen.kind} at the {where}."))
        ans = getattr(chosen, ask)
        if ask == "color":
            out.append((REASONING, f"So the {direction} {f.singular} is {ans}. {_boxed(ans)}"))
        else:
            out.append((REASONING, f"So the {direction} {f.singular} is a {ans}. {_boxed(ans)}"))
        return out, ans
    raise ValueError(f"unknown question type {qt!r}")


def _to_steps(derived: list[tuple[str, str]], labels: Sequence[int]) -> list[Step]:
    return [Step(text=t, kind=k, label=l) for (k, t), l in zip(derived, labels)]


def solve(puzzle: Puzzle) -> list[Step]:
    """The correct step-by-step solution: perception steps, then reasoning steps; all labelled 1."""
    derived = _derive(puzzle, puzzle.shapes, _Trace([]))
    if derived is None:  # cannot happen for puzzles from generate_puzzle
        raise ValueError("puzzle is ambiguous: its question has no unique answer for its scene")
    steps, _ = derived
    return _to_steps(steps, [POSITIVE] * len(steps))


# --------------------------------------------------------------------------------------------------
# Error injection
# --------------------------------------------------------------------------------------------------
class InjectionError(ValueError):
    """No error of the requested kind (at the requested step) changes this puzzle's answer."""


def _perception_candidates(p: Puzzle, rng: np.random.Generator):
    """Lazily yield (error type, detail, mis-perceived scene): the error types in a random order (so
    each is about equally likely whatever the number of candidates of each), candidates shuffled."""
    shapes = p.shapes
    rows, cols = p.grid
    occupied = {(s.row, s.col) for s in shapes}
    empty = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in occupied]
    specs: dict[str, list[tuple]] = {t: [] for t in PERCEPTION_ERROR_TYPES}
    for i, s in enumerate(shapes):
        specs["omission"].append((i, None))
        specs["wrong_color"] += [(i, c) for c in COLOR_NAMES if c != s.color]
        specs["wrong_kind"] += [(i, k) for k in KINDS if k != s.kind]
        specs["wrong_position"] += [(i, cell) for cell in empty]
    specs["hallucination"] += [(cell, (c, k)) for cell in empty for c in COLOR_NAMES for k in KINDS]
    order = [
        (t, specs[t][int(j)])
        for t in (PERCEPTION_ERROR_TYPES[int(i)] for i in rng.permutation(len(PERCEPTION_ERROR_TYPES)))
        for j in rng.permutation(len(specs[t]))
    ]
    for etype, (where, what) in order:
        new = list(shapes)
        if etype == "hallucination":
            (r, c), (color, kind) = where, what
            new.append(Shape(color, kind, r, c))
            detail = f"saw {_article(color)} {color} {kind} at the empty {cell_name(r, c, p.grid)}"
        else:
            s = shapes[where]
            seen = f"the {s.color} {s.kind} at the {cell_name(s.row, s.col, p.grid)}"
            if etype == "omission":
                del new[where]
                detail = f"missed {seen}"
            elif etype == "wrong_color":
                new[where] = dataclasses.replace(s, color=what)
                detail = f"saw {seen} as {what}"
            elif etype == "wrong_kind":
                new[where] = dataclasses.replace(s, kind=what)
                detail = f"saw {seen} as a {what}"
            else:
                new[where] = dataclasses.replace(s, row=what[0], col=what[1])
                detail = f"placed {seen} at the {cell_name(what[0], what[1], p.grid)}"
        yield etype, detail, new


def _first_diff(a: Sequence[tuple[str, str]], b: Sequence[tuple[str, str]]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def inject_error(
    puzzle: Puzzle,
    steps: Sequence[Step],
    rng: np.random.Generator,
    kind: str = PERCEPTION,
    step: int | None = None,
) -> tuple[list[Step], dict[str, Any]]:
    """Like ``corrupt`` but also returns a description of the error:
    ``{"kind", "type", "step", "detail", "predicted_answer"}``."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"kind must be one of {ERROR_KINDS}, got {kind!r}")
    clean_tr = _Trace([])
    derived = _derive(puzzle, puzzle.shapes, clean_tr)
    if derived is None:
        raise ValueError("puzzle is ambiguous: its question has no unique answer for its scene")
    clean, answer = derived
    if [(s.kind, s.text) for s in steps] != clean:
        raise ValueError("steps must be the correct solution of the puzzle, as returned by solve(puzzle)")
    eligible = [i for i, (k, _) in enumerate(clean) if k == kind]
    if kind == REASONING:  # only steps that compute something can slip
        eligible = [i for i in eligible if any(pt[0] == i for pt in clean_tr.points)]
    if step is not None:
        if not 0 <= step < len(clean) or clean[step][0] != kind:
            raise ValueError(f"step {step} is not a {kind} step of this solution ({[k for k, _ in clean]})")
        if step not in eligible:
            raise InjectionError(f"step {step} has no computation to corrupt")
        targets = [step]
    else:
        targets = [eligible[int(i)] for i in rng.permutation(len(eligible))]

    def accept(new):
        if new is None:
            return False
        new_steps, new_answer = new
        return new_answer != answer and _first_diff(clean, new_steps) == target

    for target in targets:
        if kind == PERCEPTION:
            for etype, detail, seen in _perception_candidates(puzzle, rng):
                new = _derive(puzzle, seen, _Trace([]))
                if accept(new):
                    break
            else:
                continue
        else:
            pts = [(pi, ai) for pi, pt in enumerate(clean_tr.points) if pt[0] == target for ai in range(len(pt[3]))]
            for j in rng.permutation(len(pts)):
                pi, ai = pts[int(j)]
                new = _derive(puzzle, puzzle.shapes, _Trace([], slip=(pi, ai)))
                if accept(new):
                    _, etype, true, alts = clean_tr.points[pi]
                    wrong = alts[ai]
                    if isinstance(true, Shape):
                        g = puzzle.grid
                        detail = (
                            f"picked the {wrong.color} {wrong.kind} at the {cell_name(wrong.row, wrong.col, g)} "
                            f"instead of the {true.color} {true.kind} at the {cell_name(true.row, true.col, g)}"
                        )
                    else:
                        detail = f"wrote {wrong} instead of {true}"
                    break
            else:
                continue
        new_steps, new_answer = new
        labels = [POSITIVE] * target + [NEGATIVE] * (len(new_steps) - target)
        info = {"kind": kind, "type": etype, "step": target, "detail": detail, "predicted_answer": new_answer}
        return _to_steps(new_steps, labels), info
    where = f"step {step}" if step is not None else "any step"
    raise InjectionError(f"no {kind} error at {where} changes the answer of this {puzzle.question_type!r} puzzle")


def corrupt(
    puzzle: Puzzle,
    steps: Sequence[Step],
    rng: np.random.Generator,
    kind: str = PERCEPTION,
    step: int | None = None,
) -> list[Step]:
    """Inject one ``kind`` error ("perception" or "reasoning") into the correct solution ``steps``.

    The error goes at ``step`` (which must be a step of that kind) or at a random step of that kind,
    and is propagated: later steps are re-derived from the wrong observation/value, and the final
    answer is wrong. Labels: 1 before the error step, 0 at it and after it. Raises
    ``InjectionError`` when no such error changes the answer.
    """
    return inject_error(puzzle, steps, rng, kind=kind, step=step)[0]


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_record(
    puzzle: Puzzle,
    steps: Sequence[Step],
    idx: int,
    error: dict[str, Any] | None = None,
    id_prefix: str = "synthetic",
) -> Record:
    """A validated ``Record`` for ``puzzle`` and a (correct or corrupted) solution.

    ``meta``: ``question_type``, ``params``, ``error_kind`` (None, "perception" or "reasoning"),
    ``first_error_step`` (None when every step is correct), ``error_type``/``error_detail`` (when
    ``error`` from ``inject_error`` is given), ``predicted_answer`` (the solution's boxed answer),
    ``answer_correct``, ``grid`` and ``scene`` (the shapes).
    """
    image = puzzle.image if puzzle.image is not None else render(puzzle.shapes, puzzle.grid, puzzle.image_size)
    steps = [dataclasses.replace(s) for s in steps]
    first = next((i for i, s in enumerate(steps) if s.label == NEGATIVE), None)
    predicted = extract_boxed(steps[-1].text) if steps else None
    meta = {
        "question_type": puzzle.question_type,
        "params": puzzle.params,
        "error_kind": None if first is None else steps[first].kind,
        "first_error_step": first,
        "error_type": (error or {}).get("type"),
        "error_detail": (error or {}).get("detail"),
        "predicted_answer": predicted,
        "answer_correct": predicted == puzzle.answer,
        "grid": list(puzzle.grid),
        "image_size": list(puzzle.image_size),
        "scene": [s.to_dict() for s in puzzle.shapes],
    }
    rec = Record(
        id=f"{id_prefix}-{idx:07d}",
        question=puzzle.question,
        steps=steps,
        images=[encode_png(image)],
        answer=puzzle.answer,
        source="synthetic",
        meta=meta,
    )
    return rec.validate()


def puzzle_from_meta(meta: dict, question: str, answer: Any) -> Puzzle:
    """The ``Puzzle`` whose scene ``make_record`` stored in ``meta`` (``scene``, ``grid``,
    ``image_size``, ``question_type``, ``params``), with its question and answer."""
    return Puzzle(
        shapes=[Shape(**d) for d in meta["scene"]],
        grid=tuple(int(x) for x in meta["grid"]),
        image_size=tuple(int(x) for x in meta["image_size"]),
        question_type=meta["question_type"],
        params=meta["params"],
        question=question,
        answer="" if answer is None else str(answer),
    )


def puzzle_from_record(record) -> Puzzle:
    """The ``Puzzle`` of a synthetic ``Record``, or of anything with the same ``id``, ``question``,
    ``answer`` and ``meta`` (a label-synthesis ``Question`` of the embedded task). Raises
    ``ValueError`` naming the record when its meta holds no scene."""
    try:
        return puzzle_from_meta(record.meta, record.question, record.answer)
    except (KeyError, TypeError) as e:
        raise ValueError(f"record {getattr(record, 'id', '?')!r} is not a synthetic puzzle record "
                         f"(meta lacks {e})") from None


def _plan(n: int, seed: int, error_rate: float, perception_error_share: float) -> list[str | None]:
    """Exactly round(n*error_rate) errors, round(n_err*share) of them perception; shuffled."""
    if not 0.0 <= error_rate <= 1.0 or not 0.0 <= perception_error_share <= 1.0:
        raise ValueError("error_rate and perception_error_share must be in [0, 1]")
    n_err = int(round(n * error_rate))
    n_perc = int(round(n_err * perception_error_share))
    plan = [PERCEPTION] * n_perc + [REASONING] * (n_err - n_perc) + [None] * (n - n_err)
    order = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    return [plan[int(i)] for i in order]


def generate_example(
    idx: int,
    seed: int = 0,
    error_kind: str | None = None,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    question_type: str | None = None,
    id_prefix: str | None = None,
) -> Record:
    """Record ``idx`` of the stream for ``seed``: depends only on its arguments (not on n)."""
    rng = np.random.default_rng([int(seed), int(idx)])
    qtype = question_type or QUESTION_TYPES[int(idx) % len(QUESTION_TYPES)]
    prefix = id_prefix if id_prefix is not None else f"synthetic-s{seed}"
    for _ in range(100):
        p = generate_puzzle(rng, image_size=image_size, question_type=qtype)
        steps = solve(p)
        if error_kind is None:
            return make_record(p, steps, idx, id_prefix=prefix)
        try:
            bad, info = inject_error(p, steps, rng, kind=error_kind)
        except InjectionError:
            continue
        return make_record(p, bad, idx, error=info, id_prefix=prefix)
    raise RuntimeError(f"could not inject a {error_kind} error into a {qtype!r} puzzle")


def task_settings(
    image_size: Sequence[int] = DEFAULT_IMAGE_SIZE,
    error_rate: float = 0.5,
    perception_error_share: float = 0.5,
    question_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The embedded task's settings as a JSON-able dict of ``generate_records`` keywords (validated).

    Training writes it into the PRM's spec (``prm.json``, ``task``); ``python -m jaxprm.eval synthetic``
    reads it back, so a PRM is measured on puzzles like those it was trained on."""
    size = [int(x) for x in image_size]
    if len(size) != 2:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}")
    grid_for_image(size)
    if not 0.0 <= float(error_rate) <= 1.0 or not 0.0 <= float(perception_error_share) <= 1.0:
        raise ValueError("error_rate and perception_error_share must be in [0, 1]")
    qtypes = list(question_types or QUESTION_TYPES)
    bad = [q for q in qtypes if q not in QUESTION_TYPES]
    if bad:
        raise ValueError(f"unknown question type(s) {bad}; expected some of {QUESTION_TYPES}")
    return {"image_size": size, "error_rate": float(error_rate),
            "perception_error_share": float(perception_error_share), "question_types": qtypes}


def generate_records(
    n: int,
    seed: int = 0,
    error_rate: float = 0.5,
    perception_error_share: float = 0.5,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    question_types: Sequence[str] | None = None,
    progress: bool = False,
) -> list[Record]:
    """``n`` validated records, deterministic in ``seed``.

    Question types cycle through ``question_types`` (default: all of ``QUESTION_TYPES``); exactly
    ``round(n * error_rate)`` solutions carry one error, ``round(n_err * perception_error_share)`` of
    them a perception error and the rest a reasoning error, assigned to random records.
    """
    task = task_settings(image_size, error_rate, perception_error_share, question_types)
    qtypes, image_size = task["question_types"], tuple(task["image_size"])
    plan = _plan(n, seed, error_rate, perception_error_share)
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="synthetic records", unit="rec")
    return [
        generate_example(i, seed, plan[i], image_size=image_size, question_type=qtypes[i % len(qtypes)])
        for i in it
    ]


# --------------------------------------------------------------------------------------------------
# Tokenizer and tiny model config
# --------------------------------------------------------------------------------------------------
PROMPT_TEXTS = (
    "You are a helpful assistant.",
    "You are an advanced AI assistant, designed to serve as a process supervision model. In this task, "
    "I will provide a problem statement followed by the first step of the solution process. For each "
    "subsequent turn, I will give you a new step in the solution. Your job is to analyze each step and "
    "determine its correctness. If the step is correct, respond with \"+\"; if it is incorrect, respond "
    "with \"-\". Do not provide any explanations.",
    "Look at the image and answer the question. Describe the visual elements first, then reason step "
    "by step, and put the final answer in \\boxed{}.",
    "### Question:",
    "### Solution Process:",
    "[Visual Elements]",
    "[Reasoning]",
    "+",
    "-",
    "Step 1: Step 2: Step 3: Step 4: Step 5: Step 6: Step 7: Step 8:",
    "The image shows coloured shapes on a white background.",
    "Yes. No. Correct. Incorrect. The answer is",
)


def tokenizer_corpus(seed: int = 0, n: int = 200) -> list[str]:
    """Text covering the task's vocabulary: prompt strings, questions, correct and corrupted steps."""
    rng = np.random.default_rng([int(seed), 0x70C])
    lines = list(PROMPT_TEXTS)
    lines += [" ".join(str(i) for i in range(0, 100)), " ".join(COLOR_NAMES), " ".join(KINDS)]
    for i in range(n):
        for size in ((112, 112), (56, 84)):
            p = _sample_puzzle(rng, size, QUESTION_TYPES[i % len(QUESTION_TYPES)])
            steps = solve(p)
            lines.append(p.question)
            lines += [s.text for s in steps]
            try:
                bad = corrupt(p, steps, rng, kind=ERROR_KINDS[i % 2])
                lines.append(format_solution(bad))
            except InjectionError:
                pass
    return lines


@functools.lru_cache(maxsize=8)
def build_synthetic_tokenizer(vocab_size: int = 1024, seed: int = 0, n: int = 200):
    """The task's offline Qwen-style tokenizer (cached per arguments; treat it as read-only).

    ``vocab_size`` is an upper bound: the BPE stops early once the small corpus has no pair left to
    merge (about 840 tokens with the defaults), so use ``len(tokenizer)``, not ``vocab_size``."""
    from .tokenizer import build_tokenizer

    return build_tokenizer(tokenizer_corpus(seed, n), vocab_size)


@functools.lru_cache(maxsize=8)
def build_synthetic_internvl_tokenizer(vocab_size: int = 1024, seed: int = 0, n: int = 200):
    """``build_synthetic_tokenizer`` with InternVL's added tokens (``<img>``, ``</img>``,
    ``<IMG_CONTEXT>``, ...) after Qwen's, as InternVL3's tokenizer has them: the tokenizer of the tiny
    InternVL preset (cached per arguments; treat it as read-only)."""
    from .tokenizer import build_internvl_tokenizer

    return build_internvl_tokenizer(tokenizer_corpus(seed, n), vocab_size)


def tiny_internvl_config(tokenizer=None):
    """A tiny InternVL3-shaped config (InternViT + pixel shuffle + MLP projector + Qwen2 language model;
    56 px tiles of 4x4 patches -> 4 ``<IMG_CONTEXT>`` tokens per tile) whose vocabulary and
    ``<IMG_CONTEXT>`` id match ``tokenizer`` (default: ``build_synthetic_internvl_tokenizer()``)."""
    from ..models.internvl.config import IMG_CONTEXT, InternVLConfig, VisionConfig, _text_config

    tok = tokenizer if tokenizer is not None else build_synthetic_internvl_tokenizer()
    image_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
    if image_token_id is None or image_token_id == tok.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMG_CONTEXT} token: build it with build_synthetic_internvl_tokenizer")
    vocab = -(-max(len(tok), int(image_token_id) + 1) // 64) * 64
    vision = VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=56, patch_size=14)
    text = _text_config(dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                             max_position_embeddings=4096), attention_bias=True)
    return InternVLConfig(vision=vision, text=text, llm_arch="qwen2", image_token_id=int(image_token_id),
                          tie_word_embeddings=False)


def tiny_model_config(tokenizer=None):
    """A tiny Qwen2.5-VL-shaped config whose vocabulary and special-token ids match ``tokenizer``
    (default: ``build_synthetic_tokenizer()``)."""
    from ..models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig
    from .tokenizer import special_token_ids

    tok = tokenizer if tokenizer is not None else build_synthetic_tokenizer()
    ids = special_token_ids(tok)
    vocab = -(-max(len(tok), max(ids.values()) + 1) // 64) * 64
    vision = VisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        out_hidden_size=64,
        fullatt_block_indexes=(1,),
    )
    text = TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 3, 3),
        rope_theta=10000.0,
        max_position_embeddings=4096,
    )
    return Qwen25VLConfig(
        vision=vision,
        text=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 112x112) or a single size, got {text!r}")
    h = int(m.group(1))
    w = int(m.group(2) or h)
    try:
        grid_for_image((h, w))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return h, w


def write_jsonl(records: Sequence[Record], path: str) -> int:
    """``jaxprm.data.formats.write_jsonl``: validated ``Record.to_dict()`` lines, written atomically."""
    from jaxprm.data.formats import write_jsonl as _write_jsonl

    return _write_jsonl(records, path)


def _save_preview(records: Sequence[Record], out_dir: str, k: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for r in records[:k]:
        with open(os.path.join(out_dir, f"{r.id}.png"), "wb") as fh:
            fh.write(r.images[0])
        lines = [f"Q: {r.question}", f"A: {r.answer}", f"error: {r.meta['error_kind']} {r.meta['error_detail'] or ''}"]
        lines += [f"[{'+' if s.label == POSITIVE else '-'}] ({s.kind}) {s.text}" for s in r.steps]
        with open(os.path.join(out_dir, f"{r.id}.txt"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jaxprm.data.synthetic",
        description="Generate synthetic visual puzzles with step-labelled solutions as a records jsonl.",
    )
    ap.add_argument("--out", required=True, help="output .jsonl (one Record.to_dict() per line)")
    ap.add_argument("--n", type=int, default=100, help="number of records (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--error-rate", type=float, default=0.5, help="fraction of solutions with one error")
    ap.add_argument("--perception-error-share", type=float, default=0.5, help="fraction of errors in perception")
    ap.add_argument("--image-size", type=_parse_size, default=DEFAULT_IMAGE_SIZE, help="HxW, multiples of 28")
    ap.add_argument("--question-types", default=None, help=f"comma-separated subset of {','.join(QUESTION_TYPES)}")
    ap.add_argument("--preview", default=None, metavar="DIR", help="also save the first few images (+ solutions)")
    ap.add_argument("--preview-n", type=int, default=8)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.n < 0:
        ap.error("--n must be >= 0")
    qtypes = None
    if args.question_types:
        qtypes = [q.strip() for q in args.question_types.split(",") if q.strip()]
        bad = [q for q in qtypes if q not in QUESTION_TYPES]
        if bad:
            ap.error(f"unknown question types {bad}; expected some of {QUESTION_TYPES}")
    try:
        records = generate_records(
            args.n,
            seed=args.seed,
            error_rate=args.error_rate,
            perception_error_share=args.perception_error_share,
            image_size=args.image_size,
            question_types=qtypes,
            progress=not args.no_progress,
        )
    except ValueError as e:
        ap.error(str(e))
    write_jsonl(records, args.out)
    if args.preview:
        _save_preview(records, args.preview, args.preview_n)
    n_err = sum(r.meta["first_error_step"] is not None for r in records)
    print(f"wrote {len(records)} records ({n_err} with an error) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
