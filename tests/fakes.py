"""Stand-ins shared by tests."""
import re

import numpy as np


class TagPRM:
    """Stand-in PRM: a step's score is the number in its ``[p=...]`` tag (0.5 without one); a whole
    solution given as one step (PRM as ORM) scores its ``[orm=...]`` tag. ``calls`` records what
    was asked; ``items`` counts the items given to ``score_batch``. With ``require_image`` it checks
    that callers pass the problem's image (the eval CLI must)."""

    def __init__(self, require_image: bool = False):
        self.calls = []
        self.require_image = require_image

    @property
    def items(self) -> int:
        return sum(n for kind, n in self.calls if kind == "score_batch")

    @staticmethod
    def _one(step):
        m = re.search(r"\[orm=([0-9.]+)\]", step) if "\n\n" in step else None
        m = m or re.search(r"\[p=([0-9.]+)\]", step)
        return float(m.group(1)) if m else 0.5

    def score(self, image, question, steps):
        return np.asarray([self._one(s) for s in steps], np.float32)

    def score_batch(self, items):
        self.calls.append(("score_batch", len(items)))
        return [self.score(*it) for it in items]

    def score_candidates(self, image, question, candidates):
        assert question and (image is not None or not self.require_image)
        self.calls.append(("score_candidates", [list(c) for c in candidates]))
        return [self.score(image, question, c) for c in candidates]


class TruthPRM:
    """Stand-in PRM for embedded puzzles that knows the truth: a step scores 0.9 when the solution so
    far is the puzzle's correct solution so far, else 0.1. ``spec`` (optional) plays ``PRM.spec``;
    ``images`` collects the images it was given (to check what callers pass)."""

    def __init__(self, records, spec=None):
        from jaxprm.data import synthetic as syn
        from jaxprm.search.policy import puzzle_from_record

        self.spec = spec
        self.images = []
        self.correct = {(r.question, bytes(r.images[0])): [s.text for s in syn.solve(puzzle_from_record(r))]
                        for r in records}

    def score(self, image, question, steps):
        self.images.append(image)
        good = self.correct[(question, bytes(image))]
        return np.asarray([0.9 if list(steps[: i + 1]) == good[: i + 1] else 0.1 for i in range(len(steps))],
                          np.float32)

    def score_batch(self, items):
        return [self.score(*it) for it in items]

    def score_candidates(self, image, question, candidates):
        return [self.score(image, question, c) for c in candidates]
