"""The label-synthesis pipeline: questions -> rollouts -> MC values + judge -> fused step labels.

``run(cfg, out_dir, shard=(i, n))`` processes the questions of shard ``i`` of ``n`` one at a time
and, as each question completes, appends its records (``Record.to_dict`` lines, one per
accepted rollout) to ``records-shard-IIIII-of-NNNNN.jsonl`` and then one line to
``done-shard-...jsonl``, each write flushed and fsync'd. A question counts as done only once its
``done`` line is complete, so a kill at any moment loses at most the question in flight:

* on restart a partial last line of either file is dropped (truncated);
* record lines of questions without a done line are dropped (the file is rewritten atomically);
* done questions are skipped; the rest are processed in the same order, and because every
  random choice of the scripted policy/judge is seeded by the question id, a resumed run writes
  exactly what an uninterrupted run would.

At the end ``stats-shard-...json`` sums the per-question counters from the done log (so it covers
work done by earlier, interrupted runs too): rollouts requested/accepted, malformed outputs by
reason, MC requests and continuations, judge calls/parse failures/failures, tokens and cost of
the policy and the judge, label counts per rule, and -- when ground truth is known (the puzzle
task) -- the label-accuracy report of ``jaxprm.synth.report``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from ml_collections import ConfigDict

from jaxprm.atomic import atomic_write_text
from jaxprm.data.answers import is_correct
from jaxprm.data.schema import Record
from jaxprm.synth import fuse as FU
from jaxprm.synth import puzzle as PZ
from jaxprm.synth.config import validate_synth_config
from jaxprm.synth.judge import ScriptedJudge, VLMJudge
from jaxprm.synth.policies import OpenAIRolloutPolicy, ScriptedPuzzlePolicy, usage_delta
from jaxprm.synth.questions import (
    PUZZLE_META_KEYS,
    Question,
    load_jsonl_questions,
    select_shard,
    synthetic_questions,
)
from jaxprm.synth.rollout import mc_counts, sample_rollouts

# ----------------------------------------------------------------------------- building blocks


# the choices of the config fields this module acts on (checked by jaxprm.synth.config)
QUESTION_SOURCES = ("synthetic", "jsonl")  # source
POLICY_KINDS = ("scripted", "openai")  # policy.kind
JUDGE_KINDS = ("scripted", "openai", "none")  # judge.kind
GROUND_TRUTH = ("auto", "canonical", "none")  # ground_truth
ON_QUESTION_ERROR = ("raise", "skip")  # on_question_error


def parse_extra_json(text: str) -> dict:
    """``policy.extra_json`` / ``judge.extra_json``: extra request fields, a JSON object ("" = none)."""
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ValueError(f"extra_json is not valid JSON ({e}): {text!r}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"extra_json must be a JSON object, got {text!r}")
    return obj


def _is_loopback(url: str) -> bool:
    import urllib.parse

    return (urllib.parse.urlsplit(url).hostname or "").lower() in ("127.0.0.1", "localhost", "::1")


def make_client(c: ConfigDict, default_key_env: str):
    from jaxprm.search.openai_client import OpenAIChatClient

    key_env = c.get("api_key_env") or default_key_env
    # "" rather than None: OpenAIChatClient would otherwise fall back to $OPENAI_API_KEY and send
    # that key to whatever base_url this client talks to (e.g. a judge on another provider)
    api_key = os.environ.get(key_env, "")
    if not api_key and not _is_loopback(c.base_url):
        print(f"warning: ${key_env} is not set; requests to {c.base_url} carry no API key", file=sys.stderr)
    price = None
    if c.get("price_per_1k_prompt") or c.get("price_per_1k_completion"):
        price = (float(c.price_per_1k_prompt or 0.0), float(c.price_per_1k_completion or 0.0))
    rps = float(c.get("max_requests_per_second") or 0.0)
    return OpenAIChatClient(
        c.base_url, c.model, api_key=api_key, timeout=float(c.timeout), max_retries=int(c.max_retries),
        deadline=float(c.deadline), max_requests_per_second=rps if rps > 0 else None, price_per_1k=price,
    )


def build_policy(cfg: ConfigDict):
    p = cfg.policy
    if p.kind == "scripted":
        return ScriptedPuzzlePolicy(
            error_rate=p.error_rate, perception_share=p.perception_share, malformed_rate=p.malformed_rate,
            slip_rate=p.slip_rate, recovery_rate=p.recovery_rate, hard_fraction=p.hard_fraction,
            hard_slip_rate=p.hard_slip_rate, variants=p.variants, seed=p.seed,
        )
    if p.kind == "openai":
        return OpenAIRolloutPolicy(
            make_client(p, "OPENAI_API_KEY"), name=f"openai:{p.model}", max_steps=cfg.max_steps_per_section,
            temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens or None,
            n_per_request=p.n_per_request or None, max_workers=p.max_workers, prefix_mode=p.prefix_mode,
            send_seed=p.send_seed, extra=parse_extra_json(p.extra_json),
        )
    raise ValueError(f"policy.kind must be one of {POLICY_KINDS}, got {p.kind!r}")


def build_judge(cfg: ConfigDict):
    j = cfg.judge
    if j.kind == "none":
        return None
    if j.kind == "scripted":
        return ScriptedJudge(noise=j.noise, miss_share=j.miss_share, seed=j.seed,
                             perception_noise=j.get("perception_noise", -1.0))
    if j.kind == "openai":
        temp = j.temperature if j.temperature is not None and j.temperature >= 0 else None
        return VLMJudge(
            make_client(j, "JUDGE_API_KEY"), name=f"openai:{j.model}", max_attempts=j.max_attempts,
            temperature=temp, max_tokens=j.max_tokens or None, include_answer=j.include_answer,
            extra=parse_extra_json(j.extra_json), keep_raw_chars=j.keep_raw_chars,
        )
    raise ValueError(f"judge.kind must be one of {JUDGE_KINDS}, got {j.kind!r}")


def load_questions(cfg: ConfigDict) -> list[Question]:
    if cfg.source == "synthetic":
        qt = [t.strip() for t in str(cfg.synthetic.question_types or "").split(",") if t.strip()]
        return synthetic_questions(cfg.num_questions, cfg.seed, tuple(cfg.synthetic.image_size), qt or None)
    if cfg.source == "jsonl":
        if not cfg.input.path:
            raise ValueError("source='jsonl' needs config.input.path")
        qs = load_jsonl_questions(cfg.input.path, cfg.input.format, cfg.input.image_root or None)
        return qs[: cfg.num_questions] if cfg.num_questions else qs
    raise ValueError(f"source must be one of {QUESTION_SOURCES}, got {cfg.source!r}")


# ----------------------------------------------------------------------------- one question


def _zero_usage() -> dict:
    return {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "retries": 0, "cost": 0.0}


class Synthesizer:
    """Turns one question into labelled records (no I/O)."""

    def __init__(self, cfg: ConfigDict, policy, judge):
        self.cfg = cfg
        self.policy = policy
        self.judge = judge
        self.rule_kw = FU.merged_rule_kw({r: v for r, v in (cfg.labels.to_dict()).items() if r in FU.RULES})
        self.primary = cfg.labels.primary
        if judge is None and self.primary != "mc":
            print(f"warning: no judge (judge.kind='none') but labels.primary={self.primary!r}: Step.label will be "
                  f"None everywhere; use --config.labels.primary=mc", file=sys.stderr)
        gt = cfg.ground_truth
        if gt not in GROUND_TRUTH:
            raise ValueError(f"ground_truth must be one of {GROUND_TRUTH}, got {gt!r}")
        self.ground_truth = gt == "canonical" or (gt == "auto" and isinstance(policy, ScriptedPuzzlePolicy))

    def _usage(self) -> dict:
        return {
            "policy": self.policy.usage_snapshot() if hasattr(self.policy, "usage_snapshot") else _zero_usage(),
            "judge": self.judge.usage_snapshot() if self.judge is not None else _zero_usage(),
        }

    def _judge_all(self, q: Question, sols) -> list:
        if self.judge is None:
            return [None] * len(sols)
        workers = max(1, int(self.cfg.judge.get("max_workers", 1)))
        if workers == 1 or len(sols) <= 1:
            return [self.judge.judge(q, s.steps()) for s in sols]
        with ThreadPoolExecutor(max_workers=min(workers, len(sols))) as ex:
            return list(ex.map(lambda s: self.judge.judge(q, s.steps()), sols))

    def process(self, q: Question) -> tuple[list[Record], dict[str, Any]]:
        cfg = self.cfg
        t0 = time.time()
        u0 = self._usage()
        sols, rstats = sample_rollouts(
            self.policy, q, cfg.rollouts_per_question, cfg.max_rollout_attempts, cfg.max_steps_per_section
        )
        K = int(cfg.mc.num_continuations)
        if K > 0:
            counts, mstats = mc_counts(self.policy, q, sols, K, cfg.mc.early_stop, cfg.mc.chunk)
        else:
            counts, mstats = [None] * len(sols), {"calls": 0, "requests": 0, "continuations": 0, "correct": 0,
                                                  "early_stopped": 0}
        verdicts = self._judge_all(q, sols)
        u1 = self._usage()
        records = []
        label_counts: dict[str, dict[str, int]] = {r: {"pos": 0, "neg": 0, "none": 0} for r in FU.RULES}
        consensus: dict[str, int] = {}
        jstats = {"calls": 0, "attempts": 0, "parse_failures": 0, "failed": 0}
        puzzle = PZ.is_puzzle(q.meta)
        for r, sol in enumerate(sols):
            steps = sol.steps()
            v = verdicts[r]
            steps = FU.fill_steps(steps, counts[r], v.step_values(len(steps)) if v is not None else None)
            if v is not None:
                jstats["calls"] += 1
                jstats["attempts"] += v.attempts
                jstats["parse_failures"] += v.parse_failures
                jstats["failed"] += int(not v.ok)
            correct = bool(sol.answer is not None and is_correct(sol.answer, q.answer, q.choices or None))
            meta: dict[str, Any] = {
                "synth": {
                    "question_id": q.id,
                    "rollout": r,
                    "n_perception": len(sol.perception),
                    "n_reasoning": len(sol.reasoning),
                    "policy": getattr(self.policy, "name", type(self.policy).__name__),
                    "judge": getattr(self.judge, "name", None) if self.judge is not None else None,
                    "mc_continuations": K,
                    "mc_early_stop": bool(cfg.mc.early_stop),
                },
                "predicted_answer": sol.answer,
                "answer_correct": correct,
                "judge": v.to_meta(int(cfg.judge.get("keep_raw_chars", 0))) if v is not None else None,
            }
            if q.choices:
                meta["choices"] = list(q.choices)
            if puzzle:
                meta.update({k: q.meta[k] for k in PUZZLE_META_KEYS})
                if self.ground_truth:
                    fe = PZ.ground_truth_first_error(q, sol.flat())
                    meta["first_error_step"] = fe
                    meta["ground_truth"] = {
                        "first_error_step": fe,
                        "labels": PZ.ground_truth_labels(fe, len(steps)),
                        "method": "canonical_diff",
                    }
            elif q.meta:
                meta["question_meta"] = q.meta
            rec = Record(
                id=f"{q.id}-r{r}",
                question=q.question,
                steps=steps,
                images=list(q.images),
                answer=q.answer_str,
                source=cfg.source_name or f"synth/{q.source or cfg.source}",
                meta=meta,
            )
            rec = FU.fuse_record(rec, self.primary, self.rule_kw).validate()
            for rule, labs in rec.meta["labels_by_rule"].items():
                for lab in labs:
                    label_counts[rule]["pos" if lab == 1 else "neg" if lab == 0 else "none"] += 1
            consensus[rec.meta["consensus"]] = consensus.get(rec.meta["consensus"], 0) + 1
            records.append(rec)
        entry = {
            "id": q.id,
            "n_records": len(records),
            "n_steps": sum(len(x.steps) for x in records),
            "rollouts": rstats,
            "mc": mstats,
            "judge": jstats,
            "labels": label_counts,
            "consensus": consensus,
            "usage": {k: usage_delta(u1[k], u0[k]) for k in ("policy", "judge")},
            "seconds": round(time.time() - t0, 4),
        }
        return records, entry


# ----------------------------------------------------------------------------- durable output


def _complete_lines(path: str) -> tuple[list[str], bool]:
    """The complete (newline-terminated) lines of ``path`` and whether a partial tail was found;
    the partial tail is truncated away."""
    if not os.path.exists(path):
        return [], False
    with open(path, "rb") as f:
        data = f.read()
    cut = data.rfind(b"\n") + 1
    partial = cut < len(data)
    if partial:
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
    text = data[:cut].decode("utf-8")
    return [ln for ln in text.split("\n") if ln.strip()], partial


def shard_name(kind: str, shard: int, num_shards: int, ext: str = "jsonl") -> str:
    return f"{kind}-shard-{shard:05d}-of-{num_shards:05d}.{ext}"


class ShardStore:
    """Append-only records + done log of one shard, with crash recovery (see module docstring)."""

    def __init__(self, out_dir: str, shard: int = 0, num_shards: int = 1):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.records_path = os.path.join(out_dir, shard_name("records", shard, num_shards))
        self.done_path = os.path.join(out_dir, shard_name("done", shard, num_shards))
        self.stats_path = os.path.join(out_dir, shard_name("stats", shard, num_shards, "json"))
        self.config_path = os.path.join(out_dir, shard_name("config", shard, num_shards, "json"))
        self.recovery: dict[str, int] = {}

    def recover(self) -> dict[str, dict]:
        """Repair the files after a crash; return the done entries by question id."""
        done_lines, done_partial = _complete_lines(self.done_path)
        done: dict[str, dict] = {}
        for ln in done_lines:
            e = json.loads(ln)
            done[e["id"]] = e
        rec_lines, rec_partial = _complete_lines(self.records_path)
        keep, dropped, seen = [], 0, {}
        for ln in rec_lines:
            try:
                qid = json.loads(ln)["meta"]["synth"]["question_id"]
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if qid in done:
                keep.append(ln)
                seen[qid] = seen.get(qid, 0) + 1
            else:
                dropped += 1
        bad = [q for q, e in done.items() if seen.get(q, 0) != e["n_records"]]
        if bad:
            raise RuntimeError(
                f"{self.records_path}: records of {len(bad)} done questions are missing or duplicated "
                f"(e.g. {bad[:3]}); the output directory is inconsistent"
            )
        if dropped:
            atomic_write_text(self.records_path, "".join(ln + "\n" for ln in keep))
        self.recovery = {
            "done_partial_line": int(done_partial),
            "records_partial_line": int(rec_partial),
            "records_dropped": dropped,
        }
        return done

    @staticmethod
    def _append(path: str, text: str) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def write_question(self, records: Sequence[Record], entry: dict, hook: Callable | None = None) -> None:
        if records:
            self._append(self.records_path, "".join(
                json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records))
        if hook is not None:
            hook(entry)
        self._append(self.done_path, json.dumps(entry, ensure_ascii=False) + "\n")

    def read_records(self) -> list[Record]:
        lines, _ = _complete_lines(self.records_path)
        return [Record.from_dict(json.loads(ln), where=f"{self.records_path}:{i + 1}") for i, ln in enumerate(lines)]


# ----------------------------------------------------------------------------- stats


def _add(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            _add(dst.setdefault(k, {}), v)
        elif isinstance(v, bool):
            dst[k] = dst.get(k, 0) + int(v)
        elif isinstance(v, (int, float)):
            dst[k] = dst.get(k, 0) + v
    return None


def aggregate(entries: Sequence[dict]) -> dict:
    tot: dict = {}
    for e in entries:
        _add(tot, {k: v for k, v in e.items() if k != "id"})
    tot["questions_done"] = len(entries)
    return tot


# ----------------------------------------------------------------------------- run


def run(
    cfg: ConfigDict,
    out_dir: str,
    shard: tuple[int, int] = (0, 1),
    hooks: dict[str, Callable] | None = None,
    policy=None,
    judge=None,
    progress: bool | None = None,
) -> dict:
    """Process shard ``shard = (i, n)`` of the configured questions into ``out_dir``; returns the
    stats (also written to ``stats-shard-...json``). An invalid ``cfg`` raises ``jaxprm.config.ConfigError``
    listing every field to change. ``hooks`` (for tests): ``"after_question"``
    ``(index, question)`` runs after a question is durably written; ``"before_done"`` ``(entry)``
    between a question's records and its done line. ``policy``/``judge`` override the configured
    ones."""
    validate_synth_config(cfg)
    hooks = hooks or {}
    i, n = shard
    t_start = time.time()
    policy = policy if policy is not None else build_policy(cfg)
    judge = judge if judge is not None else build_judge(cfg)
    synth = Synthesizer(cfg, policy, judge)
    questions = select_shard(load_questions(cfg), i, n, cfg.shard_by)
    store = ShardStore(out_dir, i, n)
    done = store.recover()
    cfg_json = cfg.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(store.config_path):
        with open(store.config_path, encoding="utf-8") as f:
            old = f.read()
        if old != cfg_json and done:
            print(f"warning: {store.config_path} differs from the current config; resuming with the current one",
                  file=sys.stderr)
    atomic_write_text(store.config_path, cfg_json)
    shard_ids = {q.id for q in questions}
    todo = [q for q in questions if q.id not in done]
    failures: list[dict] = []
    consecutive = 0
    processed = 0
    show = cfg.progress if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=f"synth shard {i}/{n}",
                   unit="q", file=sys.stderr)
    complete = False
    try:
        for k, q in enumerate(todo):
            try:
                records, entry = synth.process(q)
            except Exception as e:  # noqa: BLE001 - per-question failures are policy-dependent
                if cfg.on_question_error != "skip":
                    raise
                consecutive += 1
                failures.append({"id": q.id, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"warning: question {q.id!r} failed ({type(e).__name__}: {e}); it will be retried "
                      f"by the next run", file=sys.stderr)
                if consecutive >= int(cfg.max_consecutive_failures):
                    raise RuntimeError(f"{consecutive} consecutive questions failed; last: {q.id!r}") from e
                continue
            consecutive = 0
            store.write_question(records, entry, hooks.get("before_done"))
            done[q.id] = entry
            processed += 1
            if bar is not None:
                bar.update(1)
            if "after_question" in hooks:
                hooks["after_question"](k, q)
        complete = not failures
    finally:
        if bar is not None:
            bar.close()
        entries = [done[q.id] for q in questions if q.id in done]
        stats = aggregate(entries)
        stats.update({
            "shard": [i, n],
            "questions_in_shard": len(questions),
            "complete": complete and len(entries) == len(questions),
            "processed_this_run": processed,
            "skipped_done": len(questions) - len(todo),
            "failed_this_run": failures,
            "orphan_done_entries": sorted(set(done) - shard_ids)[:10],
            "recovery": store.recovery,
            "elapsed_seconds_this_run": round(time.time() - t_start, 3),
            "policy_name": getattr(policy, "name", type(policy).__name__),
            "judge_name": getattr(judge, "name", None) if judge is not None else None,
        })
        if synth.ground_truth and entries:
            from jaxprm.synth.report import evaluate

            try:
                stats["report"] = evaluate(store.read_records())
            except Exception as e:  # noqa: BLE001 - the report must not mask the run's outcome
                stats["report_error"] = f"{type(e).__name__}: {e}"
        atomic_write_text(store.stats_path, json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


__all__ = ["ShardStore", "Synthesizer", "aggregate", "build_judge", "build_policy", "load_questions", "run",
           "shard_name"]
