"""Policies: what proposes solutions (best-of-N) and next steps (guided search).

A ``Policy`` has two methods::

    sample_solutions(image, question, n, **sampling) -> list[str]          # n full solutions
    sample_next_steps(image, question, prefix_steps, k, **sampling) -> list[str]
                                               # k candidate next steps after ``prefix_steps``

Step-wise generation continues the assistant turn: the answer so far is the prefix steps joined
by blank lines plus a trailing blank line (``join_steps(prefix) + "\\n\\n"``), and generation stops
at the next blank line (``"\\n\\n"``), so one call yields one step. A returned step may start with a
section header (``"[Reasoning]\\n..."``) because that is how the policy writes it; pass it back
unchanged in ``prefix_steps`` (so the policy sees its own text) and give the PRM
``jaxprm.data.solution.clean_step(step)``. A chunk that is only a header (``"[Reasoning]"``
followed by a blank line) is completed with one more call, so a step always has content unless
the policy ended its answer (then the step is ``""``).

Implementations:

* ``JaxPolicy(sampler)`` — the Flax model through ``jaxprm.search.sampler.Sampler``; the answer
  so far is appended to the prompt after the assistant header, as text the model continues.
* ``OpenAIPolicy(client)`` — an OpenAI-compatible server (vLLM, SGLang) through
  ``OpenAIChatClient``. A partial answer is sent as a final **assistant message** with
  ``continue_final_message=True`` and ``add_generation_prompt=False`` in the request body (vLLM's
  and SGLang's chat-completions extensions; the chat template then renders the assistant turn
  open, without its end-of-turn token, and the model continues it). Servers without that extension
  (OpenAI itself) can use ``continuation="user_prompt"``: the partial solution is quoted in the
  user turn with an instruction to write only the next step — weaker, since the model may restate
  or skip ahead. Note: the prefix ends with a blank line; a server that strips trailing whitespace
  of the final message would make the model start with ``"\\n\\n"`` and stop at once (vLLM and
  transformers' ``continue_final_message`` keep it).
* ``ScriptedPolicy(records)`` — offline and deterministic, for the embedded puzzle task
  (``jaxprm.data.synthetic``): it knows each puzzle's scene, so it writes the correct next step or,
  with probability ``step_error_rate``, a step with one injected perception/reasoning error
  (``inject_error``), continuing a wrong prefix consistently. Useful for tests and demos of search.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jaxprm.data.solution import STEP_SEPARATOR, clean_step, join_steps

__all__ = ["DEFAULT_INSTRUCTION", "JaxPolicy", "OpenAIPolicy", "Policy", "ScriptedPolicy", "format_question"]

# The instruction of the embedded task (jaxprm.data.synthetic.PROMPT_TEXTS): perception, then reasoning, boxed answer.
DEFAULT_INSTRUCTION = ("Look at the image and answer the question. Describe the visual elements first, then reason "
                       "step by step, and put the final answer in \\boxed{}.")
CONTINUE_INSTRUCTION = ("Here is the beginning of a solution:\n\n{partial}\n\nContinue it: write only the next step "
                        "(one paragraph) and nothing else.")


def format_question(question: str, instruction: str | None = DEFAULT_INSTRUCTION) -> str:
    """The user text the policy sees: the question, a blank line, the instruction."""
    return f"{question}\n\n{instruction}" if instruction else question


@runtime_checkable
class Policy(Protocol):
    def sample_solutions(self, image, question: str, n: int, **sampling) -> list[str]: ...

    def sample_next_steps(self, image, question: str, prefix_steps: Sequence[str], k: int, **sampling) -> list[str]: ...


def _first_chunk(text: str) -> str:
    """The first blank-line separated chunk (a server may ignore the stop string)."""
    text = (text or "").lstrip("\n")
    i = text.find(STEP_SEPARATOR)
    return (text if i < 0 else text[:i]).rstrip()


class _ContinuingPolicy:
    """Shared logic: one primitive ``_complete(image, question, assistant_prefix, n, stop, **sampling)``."""

    step_stop: tuple[str, ...] = (STEP_SEPARATOR,)

    def _complete(self, image, question, assistant_prefix: str, n: int, stop, **sampling) -> list[str]:
        raise NotImplementedError

    def sample_solutions(self, image, question: str, n: int, **sampling) -> list[str]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return [t.strip() for t in self._complete(image, question, "", n, None, **sampling)]

    def sample_next_steps(self, image, question: str, prefix_steps: Sequence[str], k: int, **sampling) -> list[str]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(prefix_steps, str):
            raise TypeError("prefix_steps must be a list of step strings")
        prefix = join_steps(prefix_steps) + STEP_SEPARATOR if prefix_steps else ""
        steps = [_first_chunk(t) for t in self._complete(image, question, prefix, k, list(self.step_stop), **sampling)]
        for i, s in enumerate(steps):
            if s and not clean_step(s):  # only a section header: write the step under it
                more = self._complete(image, question, prefix + s + STEP_SEPARATOR, 1, list(self.step_stop), **sampling)
                rest = _first_chunk(more[0]) if more else ""
                steps[i] = f"{s}\n{rest}" if rest else s
        return steps


class JaxPolicy(_ContinuingPolicy):
    """A policy on the Flax Qwen2.5-VL (``Sampler``).

    ``sampling`` defaults (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``, ``seed``)
    can be set at construction and overridden per call (``max_tokens`` is accepted as an alias
    of ``max_new_tokens``). Without a ``seed``, calls draw from a deterministic sequence of seeds.
    ``max_batch`` caps the rows decoded together (larger ``n`` runs in several batches).
    """

    def __init__(self, sampler, instruction: str | None = DEFAULT_INSTRUCTION, *, max_batch: int = 16,
                 step_max_new_tokens: int = 256, seed: int = 0, **sampling):
        self.sampler, self.instruction = sampler, instruction
        self.max_batch = max(1, int(max_batch))
        self.step_max_new_tokens = int(step_max_new_tokens)
        self.defaults = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 1024, **sampling}
        self._seed = int(seed)
        self._calls = 0

    @classmethod
    def from_pretrained(cls, hf_dir: str, sampler_kwargs: dict | None = None, **kwargs) -> "JaxPolicy":
        from .sampler import Sampler

        return cls(Sampler.from_pretrained(hf_dir, **(sampler_kwargs or {})), **kwargs)

    def _complete(self, image, question, assistant_prefix, n, stop, **sampling):
        kw = dict(self.defaults)
        if stop is not None:
            kw["max_new_tokens"] = self.step_max_new_tokens
        if "max_tokens" in sampling:
            sampling["max_new_tokens"] = sampling.pop("max_tokens")
        kw.update({k: v for k, v in sampling.items() if v is not None})
        seed = kw.pop("seed", None)
        if seed is None:
            seed = self._seed * 1_000_003 + self._calls
        self._calls += 1
        out: list[str] = []
        b = 0
        while len(out) < n:
            m = min(self.max_batch, n - len(out))
            out += self.sampler.generate(image, format_question(question, self.instruction), n=m,
                                         assistant_prefix=assistant_prefix, stop=stop, seed=int(seed) + 7919 * b, **kw)
            b += 1
        return out


class OpenAIPolicy(_ContinuingPolicy):
    """A policy served by an OpenAI-compatible server (see the module docstring for how a partial
    solution is continued). ``continuation``: ``"continue_final_message"`` (vLLM / SGLang) or
    ``"user_prompt"`` (any server)."""

    CONTINUATIONS = ("continue_final_message", "user_prompt")

    def __init__(self, client, instruction: str | None = DEFAULT_INSTRUCTION, *, system_prompt: str | None = None,
                 continuation: str = "continue_final_message", step_max_tokens: int = 256, **sampling):
        if continuation not in self.CONTINUATIONS:
            raise ValueError(f"continuation must be one of {self.CONTINUATIONS}, got {continuation!r}")
        self.client, self.instruction, self.system_prompt = client, instruction, system_prompt
        self.continuation = continuation
        self.step_max_tokens = int(step_max_tokens)
        self.defaults = dict(sampling)

    def messages(self, image, question: str, assistant_prefix: str = "") -> tuple[list[dict], dict]:
        """(chat messages, extra request fields) for a prompt and an optional partial answer."""
        from .openai_client import build_messages

        user = format_question(question, self.instruction)
        extra: dict[str, Any] = {}
        if assistant_prefix and self.continuation == "user_prompt":
            user = user + "\n\n" + CONTINUE_INSTRUCTION.format(partial=assistant_prefix.rstrip())
        messages = build_messages(image, user, self.system_prompt)
        if assistant_prefix and self.continuation == "continue_final_message":
            messages.append({"role": "assistant", "content": assistant_prefix})
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        return messages, extra

    def _complete(self, image, question, assistant_prefix, n, stop, **sampling):
        kw = dict(self.defaults)
        if stop is not None:
            kw.setdefault("max_tokens", self.step_max_tokens)
        if "max_new_tokens" in sampling:
            sampling["max_tokens"] = sampling.pop("max_new_tokens")
        kw.update({k: v for k, v in sampling.items() if v is not None})
        messages, extra = self.messages(image, question, assistant_prefix)
        return self.client.chat_n(messages, n, stop=stop, **extra, **kw)


# ------------------------------------------------------------------------------------------------
# scripted policy for the embedded puzzle task
# ------------------------------------------------------------------------------------------------
def _image_key(image) -> str | None:
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha1(bytes(image)).hexdigest()
    if isinstance(image, str):
        return image
    return None


def puzzle_from_record(record):
    """Rebuild the ``synthetic.Puzzle`` of a synthetic ``Record`` (from its ``meta``)."""
    from jaxprm.data import synthetic as syn

    meta = record.meta
    try:
        shapes = [syn.Shape(**s) for s in meta["scene"]]
        return syn.Puzzle(shapes=shapes, grid=tuple(meta["grid"]), image_size=tuple(meta["image_size"]),
                          question_type=meta["question_type"], params=meta["params"], question=record.question,
                          answer=record.answer or "")
    except (KeyError, TypeError) as e:
        raise ValueError(f"record {record.id!r} is not a synthetic puzzle record (meta lacks {e})") from None


class ScriptedPolicy:
    """Deterministic offline policy for synthetic puzzles (see the module docstring).

    ``records``: synthetic ``Record``s (``generate_records``) whose puzzles the policy may be
    asked about; it finds a puzzle by (question, image bytes) or by question alone.
    ``solution_error_rate``: the share of ``sample_solutions`` outputs with one injected error
    (perception or reasoning, each half the time); ``step_error_rate``: the chance that a
    ``sample_next_steps`` candidate after a correct prefix carries a new error. Sampling keyword
    arguments other than ``seed`` are accepted and ignored.
    """

    def __init__(self, records: Sequence, solution_error_rate: float = 0.5, step_error_rate: float = 0.5,
                 seed: int = 0):
        from jaxprm.data import synthetic as syn

        self._syn = syn
        self.solution_error_rate, self.step_error_rate = float(solution_error_rate), float(step_error_rate)
        self._rng = np.random.default_rng(seed)
        self._puzzles: dict[tuple[str, str | None], Any] = {}
        self._by_question: dict[str, list] = {}
        self._known: dict[int, list[list[str]]] = {}  # id(puzzle) -> known solutions (step texts)
        self._correct: dict[int, list] = {}
        for r in records:
            p = puzzle_from_record(r)
            self._puzzles[(r.question, _image_key(r.images[0]) if r.images else None)] = p
            self._by_question.setdefault(r.question, []).append(p)
            self._correct[id(p)] = syn.solve(p)
            self._known[id(p)] = [[s.text for s in self._correct[id(p)]]]

    def _puzzle(self, image, question):
        p = self._puzzles.get((question, _image_key(image)))
        if p is not None:
            return p
        cands = self._by_question.get(question, [])
        if len(cands) == 1:
            return cands[0]
        what = "unknown question" if not cands else f"{len(cands)} puzzles share this question and the image does not pick one"
        raise KeyError(f"ScriptedPolicy: {what}: {question[:80]!r}")

    def _rng_for(self, seed):
        return self._rng if seed is None else np.random.default_rng(int(seed))

    def _corrupted(self, p, rng, kind=None, step=None):
        syn = self._syn
        kinds = [kind] if kind else list(rng.permutation(list(syn.ERROR_KINDS)))
        for k in kinds:
            try:
                return syn.corrupt(p, self._correct[id(p)], rng, kind=str(k), step=step)
            except (syn.InjectionError, ValueError):
                continue
        return None

    def sample_solutions(self, image, question: str, n: int, seed: int | None = None, **_) -> list[str]:
        p = self._puzzle(image, question)
        rng = self._rng_for(seed)
        out = []
        for _ in range(n):
            steps = self._correct[id(p)]
            if rng.random() < self.solution_error_rate:
                steps = self._corrupted(p, rng) or steps
            self._remember(p, [s.text for s in steps])
            out.append(self._syn.format_solution(steps))
        return out

    def _remember(self, p, texts: list[str]) -> None:
        if texts not in self._known[id(p)]:
            self._known[id(p)].append(texts)

    def sample_next_steps(self, image, question: str, prefix_steps: Sequence[str], k: int, seed: int | None = None,
                          **_) -> list[str]:
        p = self._puzzle(image, question)
        rng = self._rng_for(seed)
        prefix = [clean_step(s) for s in prefix_steps]
        i = len(prefix)
        correct = [s.text for s in self._correct[id(p)]]
        out = []
        for _ in range(k):
            if prefix == correct[:i]:
                if i >= len(correct):
                    out.append("")
                    continue
                if rng.random() < self.step_error_rate:
                    kind = self._correct[id(p)][i].kind
                    bad = self._corrupted(p, rng, kind=kind, step=i)
                    if bad is not None:
                        texts = [s.text for s in bad]
                        self._remember(p, texts)
                        out.append(texts[i])
                        continue
                out.append(correct[i])
                continue
            # a prefix with an error: continue a known solution that starts with it
            match = next((s for s in self._known[id(p)] if s[:i] == prefix), None)
            out.append(match[i] if match is not None and i < len(match) else "")
        return out
