"""Rollouts with re-asks, and Monte-Carlo values of every step prefix.

``sample_rollouts`` asks the policy for ``n`` tagged solutions, parses them
(``format.parse_solution``), counts malformed outputs by reason and re-asks for the missing ones,
at most ``max_attempts`` rounds.

``mc_counts`` estimates, for every step ``i`` of every rollout of one problem, how many of ``K``
continuations of the prefix ``steps[:i+1]`` reach the gold answer (``jaxprm.data.answers``:
last ``\\boxed{}`` of prefix + continuation, ``is_correct`` against the gold answer, a missing
answer counts as wrong). Value = correct / K. All prefixes of all rollouts of the problem go to
the policy in one ``generate`` call (one request of ``n=K`` per prefix), so a batched policy
shares the image and question between them. With ``early_stop`` (VisualPRM: stop rolling out a
solution after the first prefix whose value is 0) prefixes are requested ``chunk`` positions at a
time and a rollout stops after the chunk containing its first zero; steps never rolled out get
``(0, 0)`` (``Step.mc_value`` None). Values already computed inside that chunk are kept.
"""
from __future__ import annotations

import collections
from typing import Any, Sequence

from jaxprm.data.answers import extract_answer, is_correct
from jaxprm.synth import format as F
from jaxprm.synth.policies import GenRequest
from jaxprm.synth.questions import Question


def sample_rollouts(
    policy,
    q: Question,
    n: int,
    max_attempts: int = 3,
    max_steps: int = F.MAX_STEPS_PER_SECTION,
) -> tuple[list[F.ParsedSolution], dict[str, Any]]:
    """Up to ``n`` well-formed solutions and counters ``{requested, accepted, outputs, rounds,
    malformed: {reason: count}, gave_up}``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    accepted: list[F.ParsedSolution] = []
    malformed: collections.Counter = collections.Counter()
    outputs = rounds = 0
    for attempt in range(max_attempts):
        need = n - len(accepted)
        if need <= 0:
            break
        rounds += 1
        texts = policy.generate([GenRequest(q, need, tag=f"rollout/{attempt}")])[0]
        for text in texts:
            outputs += 1
            p = F.parse_solution(text, max_steps_per_section=max_steps)
            if p.ok:
                if len(accepted) < n:
                    accepted.append(p)
            else:
                malformed[p.error] += 1
    stats = {
        "requested": n,
        "accepted": len(accepted),
        "outputs": outputs,
        "rounds": rounds,
        "malformed": dict(malformed),
        "gave_up": n - len(accepted),
    }
    return accepted, stats


def continuation_correct(prefix: str, continuation: str, q: Question) -> bool:
    text = F.join_prefix(prefix, continuation)
    pred = extract_answer(text, kind="boxed")
    return bool(pred is not None and is_correct(pred, q.answer, q.choices or None))


def mc_counts(
    policy,
    q: Question,
    solutions: Sequence[F.ParsedSolution],
    num_continuations: int = 16,
    early_stop: bool = False,
    chunk: int = 1,
) -> tuple[list[list[tuple[int, int]]], dict[str, Any]]:
    """``counts[r][i] = (num_correct, num_total)`` for prefix ``i`` of rollout ``r``; stats
    ``{calls, requests, continuations, correct, early_stopped}``."""
    K = int(num_continuations)
    if K < 1:
        raise ValueError(f"num_continuations must be >= 1, got {K}")
    flats = [s.flat() for s in solutions]
    counts: list[list[tuple[int, int]]] = [[(0, 0)] * len(f) for f in flats]
    stats = {"calls": 0, "requests": 0, "continuations": 0, "correct": 0, "early_stopped": 0}
    if not flats:
        return counts, stats
    longest = max(len(f) for f in flats)
    step = longest if not early_stop else max(1, int(chunk))
    active = [True] * len(flats)
    for start in range(0, longest, step):
        jobs = []  # (rollout, position, prefix text)
        for r, f in enumerate(flats):
            if not active[r]:
                continue
            for i in range(start, min(start + step, len(f))):
                jobs.append((r, i, F.render_prefix(f, i + 1)))
        if not jobs:
            break
        reqs = [GenRequest(q, K, prefix=p, flat_prefix=flats[r][: i + 1], tag="mc") for r, i, p in jobs]
        outs = policy.generate(reqs)
        stats["calls"] += 1
        stats["requests"] += len(reqs)
        if len(outs) != len(reqs):
            raise RuntimeError(f"policy returned {len(outs)} results for {len(reqs)} requests")
        for (r, i, p), conts in zip(jobs, outs):
            conts = list(conts)[:K]
            if len(conts) < K:
                raise RuntimeError(f"policy returned {len(conts)} continuations, expected {K}")
            c = sum(continuation_correct(p, t, q) for t in conts)
            counts[r][i] = (int(c), K)
            stats["continuations"] += K
            stats["correct"] += int(c)
        if early_stop:
            for r in range(len(flats)):
                if active[r] and any(t > 0 and c == 0 for c, t in counts[r][start : start + step]):
                    active[r] = False
                    if start + step < len(flats[r]):
                        stats["early_stopped"] += 1
    return counts, stats


__all__ = ["continuation_correct", "mc_counts", "sample_rollouts"]
