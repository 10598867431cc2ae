"""Policies: what proposes solutions (best-of-N), next steps (guided search) and continuations of
partial solutions (Monte-Carlo values in label synthesis). One interface for all of them.

A ``Policy`` has three methods::

    sample_solutions(image, question, n, **sampling) -> list[str]          # n full solutions
    sample_next_steps(image, question, prefix_steps, k, **sampling) -> list[str]
                                               # k candidate next steps after ``prefix_steps``
    sample_continuations(image, question, prefix, n, **sampling) -> list[str]
                                               # n texts that complete the partial answer ``prefix``

``prefix + continuation`` is a whole answer (the continuation starts where the prefix stops, so it
may begin with a newline). Label synthesis (``jaxprm.synth.policies``) sends its batched requests
to any ``Policy`` through ``PolicyRollouts``; its rollout prompt goes in as ``question`` (with
``instruction=None``).

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
  open, without its end-of-turn token, and the model continues it). ``continuation=
  "assistant_message"`` sends the assistant message without those fields (what the VL-PRM rollout
  script does with Azure OpenAI). Servers without either (OpenAI itself) can use
  ``continuation="user_prompt"``: the partial solution is quoted in the user turn with an
  instruction to write only the next step (``CONTINUE_INSTRUCTION``) or to finish the solution
  (``continue_instruction``) — weaker, since the model may restate or skip ahead. Note: the
  prefix ends with a blank line; a server that strips trailing whitespace of the final message
  would make the model start with ``"\\n\\n"`` and stop at once (vLLM and transformers'
  ``continue_final_message`` keep it).
* ``ScriptedPolicy(records)`` — offline and deterministic, for the embedded puzzle task
  (``jaxprm.data.synthetic``): it knows each puzzle's scene, so it writes the correct next step or,
  with probability ``step_error_rate``, a step with one injected perception/reasoning error
  (``inject_error``), continuing a wrong prefix consistently. Useful for tests and demos of search.
  (``jaxprm.synth.policies.ScriptedPuzzlePolicy`` is the noisier solver label synthesis uses, in
  the tagged step format; it implements this interface too.)
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jaxprm.data import synthetic as syn
from jaxprm.data.schema import PERCEPTION
from jaxprm.data.solution import REASON, STEP_SEPARATOR, VISUAL, clean_step, join_steps, split_steps
from jaxprm.data.synthetic import puzzle_from_record

__all__ = ["CONTINUE_INSTRUCTION", "CONTINUE_SOLUTION_INSTRUCTION", "DEFAULT_INSTRUCTION", "JaxPolicy",
           "OpenAIPolicy", "Policy", "PuzzleIndex", "ScriptedPolicy", "format_question", "puzzle_from_record"]

# The instruction of the embedded task (jaxprm.data.synthetic.PROMPT_TEXTS): perception, then reasoning, boxed answer.
DEFAULT_INSTRUCTION = ("Look at the image and answer the question. Describe the visual elements first, then reason "
                       "step by step, and put the final answer in \\boxed{}.")
CONTINUE_INSTRUCTION = ("Here is the beginning of a solution:\n\n{partial}\n\nContinue it: write only the next step "
                        "(one paragraph) and nothing else.")
CONTINUE_SOLUTION_INSTRUCTION = ("Here is the beginning of a solution:\n\n{partial}\n\nContinue it from exactly where "
                                 "it stops and finish the solution. Write only the continuation.")


def format_question(question: str, instruction: str | None = DEFAULT_INSTRUCTION) -> str:
    """The user text the policy sees: the question, a blank line, the instruction."""
    return f"{question}\n\n{instruction}" if instruction else question


@runtime_checkable
class Policy(Protocol):
    def sample_solutions(self, image, question: str, n: int, **sampling) -> list[str]: ...

    def sample_next_steps(self, image, question: str, prefix_steps: Sequence[str], k: int, **sampling) -> list[str]: ...

    def sample_continuations(self, image, question: str, prefix: str, n: int, **sampling) -> list[str]: ...


def _first_chunk(text: str) -> str:
    """The first blank-line separated chunk (a server may ignore the stop string)."""
    text = (text or "").lstrip("\n")
    i = text.find(STEP_SEPARATOR)
    return (text if i < 0 else text[:i]).rstrip()


class _ContinuingPolicy:
    """Shared logic: one primitive ``_complete(image, question, assistant_prefix, n, stop, **sampling)``."""

    step_stop: tuple[str, ...] = (STEP_SEPARATOR,)

    def _complete(self, image, question, assistant_prefix: str, n: int, stop, **sampling) -> list[str]:
        """``n`` completions of the answer ``assistant_prefix`` (``stop``: a list for one step, None
        for the rest of the answer)."""
        raise NotImplementedError

    def sample_continuations(self, image, question: str, prefix: str, n: int, **sampling) -> list[str]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be the text of a partial answer, got {type(prefix).__name__}")
        return list(self._complete(image, question, prefix, n, None, **sampling))

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
    solution is continued). ``continuation``: ``"continue_final_message"`` (vLLM / SGLang),
    ``"assistant_message"`` or ``"user_prompt"`` (any server). Keyword arguments other than the
    named ones are sampling defaults and extra request-body fields."""

    CONTINUATIONS = ("continue_final_message", "assistant_message", "user_prompt")

    def __init__(self, client, instruction: str | None = DEFAULT_INSTRUCTION, *, system_prompt: str | None = None,
                 continuation: str = "continue_final_message", step_max_tokens: int = 256,
                 continue_instruction: str = CONTINUE_SOLUTION_INSTRUCTION, **sampling):
        if continuation not in self.CONTINUATIONS:
            raise ValueError(f"continuation must be one of {self.CONTINUATIONS}, got {continuation!r}")
        self.client, self.instruction, self.system_prompt = client, instruction, system_prompt
        self.continuation = continuation
        self.step_max_tokens = int(step_max_tokens)
        self.continue_instruction = continue_instruction
        self.defaults = dict(sampling)  # sampling defaults and extra request-body fields

    def messages(self, image, question: str, assistant_prefix: str = "", *,
                 next_step: bool = True) -> tuple[list[dict], dict]:
        """(chat messages, extra request fields) for a prompt and an optional partial answer
        (``next_step``: the request is for one more step, not for the rest of the answer)."""
        from .openai_client import build_messages

        user = format_question(question, self.instruction)
        extra: dict[str, Any] = {}
        if assistant_prefix and self.continuation == "user_prompt":
            template = CONTINUE_INSTRUCTION if next_step else self.continue_instruction
            user = user + "\n\n" + template.format(partial=assistant_prefix.rstrip())
        messages = build_messages(image, user, self.system_prompt)
        if assistant_prefix and self.continuation != "user_prompt":
            messages.append({"role": "assistant", "content": assistant_prefix})
            if self.continuation == "continue_final_message":
                extra = {"continue_final_message": True, "add_generation_prompt": False}
        return messages, extra

    def _complete(self, image, question, assistant_prefix, n, stop, **sampling):
        from .openai_client import chat_n

        kw = dict(self.defaults)
        if stop is not None:
            kw.setdefault("max_tokens", self.step_max_tokens)
        if "max_new_tokens" in sampling:
            sampling["max_tokens"] = sampling.pop("max_new_tokens")
        kw.update({k: v for k, v in sampling.items() if v is not None})
        messages, extra = self.messages(image, question, assistant_prefix, next_step=stop is not None)
        return chat_n(self.client, messages, n, stop=stop, **{**kw, **extra})


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


class PuzzleIndex:
    """The embedded task's puzzles of some records or questions (anything with ``id``,
    ``question``, ``images``, ``answer`` and the scene in ``meta``), found by (question, image) or,
    when the image does not pick one, by the question alone. ``find`` returns ``(item, puzzle)``."""

    def __init__(self, items: Sequence = (), owner: str = "PuzzleIndex"):
        self.owner = owner
        self._by_key: dict[tuple[str, str | None], tuple[Any, Any]] = {}
        self._by_question: dict[str, list[tuple[Any, Any]]] = {}
        for item in items:
            self.add(item)

    def add(self, item) -> tuple[Any, Any]:
        key = (item.question, _image_key(item.images[0]) if item.images else None)
        entry = self._by_key.get(key)
        if entry is None:
            entry = self._by_key[key] = (item, puzzle_from_record(item))
            self._by_question.setdefault(item.question, []).append(entry)
        return entry

    def __iter__(self):
        """``(item, puzzle)`` of every puzzle, in the order they were added."""
        return iter(list(self._by_key.values()))

    def find(self, image, question: str) -> tuple[Any, Any]:
        entry = self._by_key.get((question, _image_key(image)))
        if entry is not None:
            return entry
        cands = self._by_question.get(question, [])
        if len(cands) == 1:
            return cands[0]
        what = "unknown question" if not cands else f"{len(cands)} puzzles share this question and the image does not pick one"
        raise KeyError(f"{self.owner}: {what}: {question[:80]!r}")


def _render_steps(steps: Sequence, start: int = 0) -> str:
    """``steps[start:]`` (``synthetic.Step``s) as ``format_solution`` writes them: a section header
    before the first step of each section."""
    parts = []
    for j in range(start, len(steps)):
        header = j == 0 or steps[j - 1].kind != steps[j].kind
        name = VISUAL if steps[j].kind == PERCEPTION else REASON
        parts.append(f"[{name}]\n{steps[j].text}" if header else steps[j].text)
    return STEP_SEPARATOR.join(parts)


class ScriptedPolicy:
    """Deterministic offline policy for synthetic puzzles (see the module docstring).

    ``records``: synthetic ``Record``s (``generate_records``) whose puzzles the policy may be
    asked about; it finds a puzzle by (question, image bytes) or by question alone.
    ``solution_error_rate``: the share of ``sample_solutions`` outputs with one injected error
    (perception or reasoning, each half the time); ``step_error_rate``: the chance that a
    ``sample_next_steps`` candidate after a correct prefix carries a new error (a continuation is
    written step by step, so each of its steps has that chance until one goes wrong). Sampling
    keyword arguments other than ``seed`` are accepted and ignored.
    ``perception_error_share`` (None: the half-and-half above): the share of whole-solution errors
    that are perception errors, as in ``synthetic.generate_records``; 0 (1) also keeps perception
    (reasoning) steps of ``sample_next_steps`` free of errors -- a policy that makes the errors of
    the task a PRM was trained on (``PRMSpec.task``).
    """

    def __init__(self, records: Sequence, solution_error_rate: float = 0.5, step_error_rate: float = 0.5,
                 seed: int = 0, perception_error_share: float | None = None):
        self.solution_error_rate, self.step_error_rate = float(solution_error_rate), float(step_error_rate)
        if perception_error_share is not None and not 0.0 <= perception_error_share <= 1.0:
            raise ValueError(f"perception_error_share must be in [0, 1], got {perception_error_share}")
        self.perception_error_share = perception_error_share
        self._rng = np.random.default_rng(seed)
        self._index = PuzzleIndex(records, owner="ScriptedPolicy")
        self._known: dict[int, list[list]] = {}  # id(puzzle) -> known solutions (lists of Steps)
        self._correct: dict[int, list] = {}
        for _, p in self._index:
            self._correct[id(p)] = syn.solve(p)
            self._known[id(p)] = [self._correct[id(p)]]

    def _puzzle(self, image, question):
        return self._index.find(image, question)[1]

    def _rng_for(self, seed):
        return self._rng if seed is None else np.random.default_rng(int(seed))

    def _corrupted(self, p, rng, kind=None, step=None):
        kinds = [kind] if kind else list(rng.permutation(list(syn.ERROR_KINDS)))
        for k in kinds:
            try:
                return syn.corrupt(p, self._correct[id(p)], rng, kind=str(k), step=step)
            except (syn.InjectionError, ValueError):
                continue
        return None

    def _remember(self, p, steps: list) -> None:
        texts = [s.text for s in steps]
        if all([s.text for s in known] != texts for known in self._known[id(p)]):
            self._known[id(p)].append(steps)

    def sample_solutions(self, image, question: str, n: int, seed: int | None = None, **_) -> list[str]:
        p = self._puzzle(image, question)
        rng = self._rng_for(seed)
        out = []
        for _ in range(n):
            steps = self._correct[id(p)]
            if rng.random() < self.solution_error_rate:
                steps = self._corrupted(p, rng, kind=self._error_kind(rng)) or steps
            self._remember(p, steps)
            out.append(syn.format_solution(steps))
        return out

    def _error_kind(self, rng) -> str | None:
        """The kind of a whole-solution error (None: either, tried in random order)."""
        share = self.perception_error_share
        if share is None:
            return None
        return syn.PERCEPTION if rng.random() < share else syn.REASONING

    def _may_err(self, kind: str) -> bool:
        share = self.perception_error_share
        return share is None or (share > 0 if kind == syn.PERCEPTION else share < 1)

    def _next_step(self, p, prefix: list[str], rng):
        """The next step (a ``synthetic.Step``) after the step texts ``prefix``, or None at the end
        (or after a prefix that no known solution starts with)."""
        i = len(prefix)
        correct = self._correct[id(p)]
        if prefix == [s.text for s in correct[:i]]:
            if i >= len(correct):
                return None
            if self._may_err(correct[i].kind) and rng.random() < self.step_error_rate:
                bad = self._corrupted(p, rng, kind=correct[i].kind, step=i)
                if bad is not None:
                    self._remember(p, bad)
                    return bad[i]
            return correct[i]
        # a prefix with an error: continue a known solution that starts with it
        match = next((s for s in self._known[id(p)] if [x.text for x in s[:i]] == prefix), None)
        return match[i] if match is not None and i < len(match) else None

    def sample_next_steps(self, image, question: str, prefix_steps: Sequence[str], k: int, seed: int | None = None,
                          **_) -> list[str]:
        p = self._puzzle(image, question)
        rng = self._rng_for(seed)
        prefix = [clean_step(s) for s in prefix_steps]
        steps = [self._next_step(p, prefix, rng) for _ in range(k)]
        return [s.text if s is not None else "" for s in steps]

    def sample_continuations(self, image, question: str, prefix: str, n: int, seed: int | None = None,
                             **_) -> list[str]:
        """The rest of a solution after ``prefix`` (text in the task's format), written step by step
        as ``sample_next_steps`` does, with section headers where a section starts."""
        p = self._puzzle(image, question)
        rng = self._rng_for(seed)
        start = [clean_step(s) for s in split_steps(prefix)]
        out = []
        for _ in range(n):
            texts, steps = list(start), []
            while (s := self._next_step(p, texts, rng)) is not None:
                texts.append(s.text)
                steps.append(s)
            if not steps:
                out.append("")
                continue
            # the known solution these steps spell out (for the kinds of the steps before them)
            full = next(s for s in self._known[id(p)] if [x.text for x in s] == texts)
            sep = "" if not prefix.strip() or prefix.endswith(STEP_SEPARATOR) else STEP_SEPARATOR
            out.append(sep + _render_steps(full, len(start)))
        return out
