"""Rollout policies for label synthesis: the requests the pipeline makes, served by the one policy
interface of ``jaxprm.search.policy``.

The synthesiser asks for batches of samples::

    policy.generate(requests: Sequence[GenRequest]) -> list[list[str]]

where each ``GenRequest`` asks for ``n`` samples for one question, either a full solution
(``prefix is None``) or a continuation of a partial tagged solution (``prefix``: the text a
policy continues; ``flat_prefix``: the same steps as ``[(kind, text)]``). A continuation is the
text that follows the prefix; returning a full restated solution is tolerated
(``format.join_prefix``). Passing all the requests of one problem in one call lets a policy
share work between them (one image encoding / prefix cache, one batch).

``PolicyRollouts(policy)`` serves these requests with any ``jaxprm.search.policy.Policy``
(``JaxPolicy``, ``OpenAIPolicy``, ``ScriptedPolicy``, built with ``instruction=None``): a request
without prefix becomes ``policy.sample_solutions``, one with a prefix
``policy.sample_continuations``, and the question goes in as the tagged rollout prompt
(``format.build_rollout_prompt``) with the question's images. ``OpenAIRolloutPolicy`` is
``PolicyRollouts`` over ``OpenAIPolicy`` with the synthesis settings; ``ScriptedPuzzlePolicy``
(the noisy offline solver of the embedded task) implements ``Policy`` itself and serves requests
the same way.

``usage_snapshot()`` returns cumulative ``{"prompt_tokens", "completion_tokens", "requests",
"retries", "cost"}`` so the pipeline can attribute usage to questions.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence

import numpy as np

from jaxprm.data.schema import PERCEPTION
from jaxprm.data.solution import extract_boxed, join_steps, split_steps_with_kinds
from jaxprm.search.policy import OpenAIPolicy, PuzzleIndex
from jaxprm.synth import format as F
from jaxprm.synth.questions import Question, stable_hash


@dataclasses.dataclass
class GenRequest:
    question: Question
    n: int = 1
    prefix: str | None = None
    flat_prefix: list[tuple[str, str]] | None = None
    tag: str = ""  # a salt naming the purpose/attempt ("rollout/0", "mc"); seeds scripted sampling


class RolloutPolicy(Protocol):
    name: str

    def generate(self, requests: Sequence[GenRequest]) -> list[list[str]]: ...

    def usage_snapshot(self) -> dict: ...


_ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "retries": 0, "cost": 0.0}


def client_usage(client) -> dict:
    """Cumulative usage of an ``OpenAIChatClient`` as a plain dict (cost 0.0 when unpriced)."""
    u = client.usage
    return {
        "prompt_tokens": int(u.prompt_tokens),
        "completion_tokens": int(u.completion_tokens),
        "requests": int(u.requests),
        "retries": int(client.retries),
        "cost": float(client.cost or 0.0),
    }


def usage_delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in _ZERO_USAGE}


# ----------------------------------------------------------------------------- any Policy


class PolicyRollouts:
    """Synthesis requests served by a ``jaxprm.search.policy.Policy`` (see the module docstring).

    Each request's ``n`` is split into parts of at most ``n_per_request`` (servers that only
    allow n=1: set 1); parts run on ``max_workers`` threads (the policy must then be thread-safe;
    1 runs them in order). ``send_seed``: each part carries a seed derived from (question id, tag,
    prefix, part), so a rerun asks for the same samples.
    """

    name = "policy"

    def __init__(
        self,
        policy,
        name: str | None = None,
        *,
        max_steps: int = F.MAX_STEPS_PER_SECTION,
        prompt_template: str | None = None,
        n_per_request: int | None = None,
        max_workers: int = 1,
        send_seed: bool = False,
    ):
        self.policy = self if policy is None else policy
        if name is not None:
            self.name = name
        self.max_steps = int(max_steps)
        self.prompt_template = prompt_template or None
        self.n_per_request = int(n_per_request) if n_per_request else None
        self.max_workers = max(1, int(max_workers))
        self.send_seed = bool(send_seed)
        self.calls = 0
        self._lock = threading.Lock()

    def prompt(self, q: Question) -> str:
        """What the policy is asked (its ``question`` argument): the tagged-format rollout prompt."""
        return F.build_rollout_prompt(q.question, q.choices, self.max_steps, self.prompt_template)

    def request_seed(self, req: GenRequest, part: int) -> int | None:
        if not self.send_seed:
            return None
        return stable_hash("seed", req.question.id, req.tag, req.prefix or "", part) % (2**31)

    def usage_snapshot(self) -> dict:
        client = getattr(self.policy, "client", None)
        return client_usage(client) if client is not None else dict(_ZERO_USAGE, requests=self.calls)

    def _run(self, req: GenRequest, n: int, part: int) -> list[str]:
        q = req.question
        seed = self.request_seed(req, part)
        kw = {} if seed is None else {"seed": seed}
        if req.prefix is None:
            return list(self.policy.sample_solutions(q.images or None, self.prompt(q), n, **kw))
        return list(self.policy.sample_continuations(q.images or None, self.prompt(q), req.prefix, n, **kw))

    def generate(self, requests: Sequence[GenRequest]) -> list[list[str]]:
        with self._lock:
            self.calls += len(requests)
        jobs = []  # (request index, part, n)
        for i, r in enumerate(requests):
            per = self.n_per_request or r.n
            left, part = r.n, 0
            while left > 0:
                jobs.append((i, part, min(per, left)))
                left -= per
                part += 1
        results: dict[tuple[int, int], list[str]] = {}
        if self.max_workers == 1 or len(jobs) <= 1:
            for i, part, n in jobs:
                results[(i, part)] = self._run(requests[i], n, part)
        else:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(jobs))) as ex:
                futs = {(i, part): ex.submit(self._run, requests[i], n, part) for i, part, n in jobs}
                for key, fut in futs.items():
                    results[key] = fut.result()
        out: list[list[str]] = [[] for _ in requests]
        for i, part, _ in jobs:
            out[i].extend(results[(i, part)])
        return out


# ----------------------------------------------------------------------------- OpenAI-compatible


PREFIX_MODES = ("continue_final_message", "assistant_message", "user_instruction")
_CONTINUATION = {"continue_final_message": "continue_final_message", "assistant_message": "assistant_message",
                 "user_instruction": "user_prompt"}  # prefix_mode -> OpenAIPolicy's continuation


class OpenAIRolloutPolicy(PolicyRollouts):
    """``PolicyRollouts`` over ``OpenAIPolicy``: a policy behind an OpenAI-compatible chat server
    (vLLM, SGLang, OpenAI, Azure).

    Continuations: ``prefix_mode``
      * ``"continue_final_message"`` (vLLM/SGLang): the prefix is sent as a final assistant
        message with ``continue_final_message=True, add_generation_prompt=False`` so the model
        continues it token for token;
      * ``"assistant_message"``: the prefix as an assistant message, no extra fields (what the
        VL-PRM rollout script does with Azure OpenAI);
      * ``"user_instruction"``: the prefix is pasted into the user turn with an instruction to
        continue it (``format.ROLLOUT_CONTINUE_INSTRUCTION``).
    ``extra``: more request-body fields. Requests run on ``max_workers`` threads.
    """

    def __init__(
        self,
        client,
        name: str = "openai",
        max_steps: int = F.MAX_STEPS_PER_SECTION,
        prompt_template: str | None = None,
        system_prompt: str | None = None,
        temperature: float | None = 1.0,
        top_p: float | None = None,
        max_tokens: int | None = 4096,
        n_per_request: int | None = None,
        max_workers: int = 8,
        prefix_mode: str = "continue_final_message",
        send_seed: bool = False,
        extra: dict | None = None,
    ):
        if prefix_mode not in PREFIX_MODES:
            raise ValueError(f"prefix_mode must be one of {PREFIX_MODES}, got {prefix_mode!r}")
        policy = OpenAIPolicy(client, instruction=None, system_prompt=system_prompt or None,
                              continuation=_CONTINUATION[prefix_mode],
                              continue_instruction=F.ROLLOUT_CONTINUE_INSTRUCTION,
                              temperature=temperature, top_p=top_p, max_tokens=max_tokens, **dict(extra or {}))
        super().__init__(policy, name, max_steps=max_steps, prompt_template=prompt_template,
                         n_per_request=n_per_request, max_workers=max_workers, send_seed=send_seed)
        self.client = client
        self.prefix_mode = prefix_mode

    def messages(self, req: GenRequest) -> tuple[list[dict], dict]:
        """(chat messages, extra request fields) of a request."""
        q = req.question
        return self.policy.messages(q.images or None, self.prompt(q), req.prefix or "", next_step=False)


# ----------------------------------------------------------------------------- scripted puzzle solver


MALFORM_KINDS = ("no_reasoning_header", "no_answer", "too_many_steps", "bad_tags")


class ScriptedPuzzlePolicy(PolicyRollouts):
    """A noisy solver of the embedded puzzles (offline stand-in for a VLM policy), in the tagged
    step format.

    * Full solutions: correct with probability ``1 - error_rate``; otherwise one error is injected
      (``synthetic.inject_error``; a perception error with probability ``perception_share``) and
      propagated, so the answer is wrong. With probability ``malformed_rate`` the output is
      broken (missing [Reasoning] heading, no boxed answer, too many steps, mismatched tags).
    * Continuations are consistent with the prefix. From a correct prefix, each remaining step
      goes wrong with probability ``slip_rate`` (``hard_slip_rate`` on the ``hard_fraction`` of
      questions that are hard for this policy), the error propagating to a wrong answer. From a
      prefix with an error the error propagates (wrong answer), except that with probability
      ``recovery_rate`` the continuation recovers and reaches the right answer.
    So the MC value of a step prefix drops after an error, with the two classic kinds of MC noise:
    erroneous steps with MC > 0 (recoveries) and, on hard questions, correct steps with MC = 0.

    Requests (``generate``) carry their ``Question``; the ``Policy`` methods
    (``sample_solutions``, ``sample_continuations``, ``sample_next_steps``: (image, question text))
    find the puzzle among ``questions``. Deterministic: each request's samples depend only on
    ``(seed, question id, tag, prefix)``; a ``Policy`` call's on its ``seed`` (or, without one, on
    the calls before it).
    """

    name = "scripted"

    def __init__(
        self,
        error_rate: float = 0.5,
        perception_share: float = 0.5,
        malformed_rate: float = 0.1,
        slip_rate: float = 0.05,
        recovery_rate: float = 0.02,
        hard_fraction: float = 0.0,
        hard_slip_rate: float = 0.4,
        variants: int = 3,
        seed: int = 0,
        cache_size: int = 256,
        questions: Sequence[Question] = (),
    ):
        for k, v in dict(error_rate=error_rate, perception_share=perception_share, malformed_rate=malformed_rate,
                         slip_rate=slip_rate, recovery_rate=recovery_rate, hard_fraction=hard_fraction,
                         hard_slip_rate=hard_slip_rate).items():
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {v}")
        super().__init__(None)
        self.error_rate = float(error_rate)
        self.perception_share = float(perception_share)
        self.malformed_rate = float(malformed_rate)
        self.slip_rate = float(slip_rate)
        self.recovery_rate = float(recovery_rate)
        self.hard_fraction = float(hard_fraction)
        self.hard_slip_rate = float(hard_slip_rate)
        self.variants = int(variants)
        self.seed = int(seed)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = int(cache_size)
        self._index = PuzzleIndex(questions, owner="ScriptedPuzzlePolicy")
        self._rng = np.random.default_rng(self.seed)

    # -- requests ------------------------------------------------------------------------------------
    def request_seed(self, req: GenRequest, part: int) -> int:
        return stable_hash("policy", self.seed, req.question.id, req.tag, req.prefix or "")

    def _run(self, req: GenRequest, n: int, part: int) -> list[str]:
        rng = np.random.default_rng(self.request_seed(req, part))
        if req.prefix is None:
            return [self._solution(req.question, rng) for _ in range(n)]
        flat = req.flat_prefix if req.flat_prefix is not None else F.parse_prefix(req.prefix)
        return [self._continue(req.question, list(flat), rng) for _ in range(n)]

    # -- the Policy interface --------------------------------------------------------------------------
    def _question(self, image, question: str) -> Question:
        return self._index.find(image, question)[0]

    def _rng_for(self, seed) -> np.random.Generator:
        return self._rng if seed is None else np.random.default_rng(int(seed))

    def sample_solutions(self, image, question: str, n: int, seed: int | None = None, **_) -> list[str]:
        q, rng = self._question(image, question), self._rng_for(seed)
        return [self._solution(q, rng) for _ in range(n)]

    def sample_continuations(self, image, question: str, prefix: str, n: int, seed: int | None = None,
                             **_) -> list[str]:
        q, rng = self._question(image, question), self._rng_for(seed)
        flat = F.parse_prefix(prefix)
        return [self._continue(q, flat, rng) for _ in range(n)]

    def sample_next_steps(self, image, question: str, prefix_steps: Sequence[str], k: int, seed: int | None = None,
                          **_) -> list[str]:
        """Each candidate is the first step of a continuation, as this policy writes it: a
        ``<step_j>`` block, under a section header where a section starts; ``""`` at the end."""
        if isinstance(prefix_steps, str):
            raise TypeError("prefix_steps must be a list of step strings")
        q, rng = self._question(image, question), self._rng_for(seed)
        flat = [(kind or PERCEPTION, text) for text, kind in split_steps_with_kinds(join_steps(prefix_steps))]
        start = F.render_prefix(flat, len(flat)) if flat else ""
        out = []
        for _ in range(k):
            text = self._continue(q, flat, rng) if flat else self._solution(q, rng)
            full = [(kind or PERCEPTION, t) for t, kind in split_steps_with_kinds(F.join_prefix(start, text))]
            if len(full) <= len(flat):
                out.append("")
            elif flat:
                out.append(F.render_continuation(full[: len(flat) + 1], len(flat)).lstrip("\n"))
            else:
                out.append(F.render_prefix(full, 1))
        return out

    # -- the solver ----------------------------------------------------------------------------------
    def library(self, q: Question):
        from jaxprm.synth.puzzle import WrongSolutions

        with self._lock:
            lib = self._cache.get(q.id)
            if lib is not None:
                self._cache.move_to_end(q.id)
                return lib
        lib = WrongSolutions(q, seed=self.seed, variants=self.variants)
        with self._lock:
            self._cache[q.id] = lib
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return lib

    def is_hard(self, q: Question) -> bool:
        return (stable_hash("hard", self.seed, q.id) % 10**6) / 10**6 < self.hard_fraction

    @staticmethod
    def _answer(flat: Sequence[tuple[str, str]]) -> str | None:
        return extract_boxed(flat[-1][1]) if flat else None

    def _render(self, flat: Sequence[tuple[str, str]]) -> str:
        perc = [t for k, t in flat if k == PERCEPTION]
        reas = [t for k, t in flat if k != PERCEPTION]
        return F.render_solution(perc, reas, self._answer(flat))

    def _malform(self, flat, rng: np.random.Generator) -> str:
        kind = MALFORM_KINDS[int(rng.integers(len(MALFORM_KINDS)))]
        text = self._render(flat)
        if kind == "no_reasoning_header":
            return text.replace("[Reasoning]\n", "", 1)
        if kind == "no_answer":
            text = re.sub(r"\n*<correct_answer>.*?</correct_answer>", "", text, flags=re.DOTALL)
            return re.sub(r"\\boxed\{([^{}]*)\}", r"\1", text)
        if kind == "too_many_steps":
            perc = [t for k, t in flat if k == PERCEPTION]
            perc = perc + ["Looking at the image again to be sure."] * (F.MAX_STEPS_PER_SECTION + 1 - len(perc))
            return F.render_solution(perc, [t for k, t in flat if k != PERCEPTION], self._answer(flat))
        return text.replace("</step_1>", "</step_2>", 1)

    def _solution(self, q: Question, rng: np.random.Generator) -> str:
        lib = self.library(q)
        flat = lib.clean
        if rng.random() < self.error_rate and lib.by_step:
            perc = [j for j in lib.by_step if lib.clean[j][0] == PERCEPTION]
            reas = [j for j in lib.by_step if lib.clean[j][0] != PERCEPTION]
            pool = perc if (rng.random() < self.perception_share and perc) or not reas else reas
            j = pool[int(rng.integers(len(pool)))]
            options = lib.by_step[j]
            flat = options[int(rng.integers(len(options)))]
        if rng.random() < self.malformed_rate:
            return self._malform(flat, rng)
        return self._render(flat)

    def _continue(self, q: Question, prefix: list[tuple[str, str]], rng: np.random.Generator) -> str:
        from jaxprm.synth.puzzle import wrong_answer

        lib = self.library(q)
        k, n = len(prefix), len(lib.clean)
        base = lib.matching(prefix)
        if base is None:  # an erroneous prefix this policy did not write: the error still propagates
            if k < n and rng.random() < self.recovery_rate:
                return F.render_continuation(lib.clean, min(k, n), lib.answer)
            return F.render_continuation(lib.clean, min(k, n), wrong_answer(lib.answer))
        if base is lib.clean:
            slip = self.hard_slip_rate if self.is_hard(q) else self.slip_rate
            for j in range(k, n):
                if rng.random() < slip and j in lib.by_step:
                    options = lib.by_step[j]
                    sol = options[int(rng.integers(len(options)))]
                    return F.render_continuation(sol, k, self._answer(sol))
            return F.render_continuation(lib.clean, k, lib.answer)
        if k < n and rng.random() < self.recovery_rate:
            return F.render_continuation(lib.clean, k, lib.answer)
        return F.render_continuation(base, k, self._answer(base))



__all__ = [
    "GenRequest",
    "MALFORM_KINDS",
    "OpenAIRolloutPolicy",
    "PREFIX_MODES",
    "PolicyRollouts",
    "RolloutPolicy",
    "ScriptedPuzzlePolicy",
    "client_usage",
    "usage_delta",
]
