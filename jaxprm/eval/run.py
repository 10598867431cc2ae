"""``python -m jaxprm.eval``: best-of-N curves, VisualProcessBench F1, and step F1 on synthetic puzzles.

Commands::

    python -m jaxprm.eval bon --prm PATH --data bench.jsonl --format mathvista \\
        --candidates cands.jsonl --max-n 64 --aggregate mean,min,last,product,orm --out DIR
    python -m jaxprm.eval bon ... --policy openai --base-url http://127.0.0.1:8000/v1 --model NAME
    python -m jaxprm.eval bon ... --policy jax --policy-model HF_DIR
    python -m jaxprm.eval vpb --prm PATH --data VisualProcessBench.jsonl --out DIR
    python -m jaxprm.eval synthetic --prm PATH --n 200 [--out DIR]

``bon``: candidates file = one JSON object per line, ``{"id": <problem id>, "candidates": [...]}``
(``solutions`` / ``responses`` / ``samples`` are accepted too), each candidate a solution string,
a list of step strings or ``{"text": ...}``. With ``--policy``, problems without candidates are
sampled (``--n-samples``, default ``--max-n``) and appended to the candidates file (default
``DIR/candidates.jsonl``) as they finish, so an interrupted run resumes and later runs reuse them.
Each candidate is judged against the gold answer under ``--match`` (``answers.Grader``):
``official`` (default) reproduces the benchmark's own evaluator (MMMU, MathVista, MATH-V,
PuzzleVQA / AlgoPuzzleVQA; a ``generic`` file has none and is graded ``lenient``), ``vlprm``
VL-PRM's own check, ``lenient`` the format-robust matcher. ``--judge-base-url/--judge-model``
name an OpenAI-compatible model used as MathVista's answer extractor (official) or VL-PRM's
option judge (vlprm); a candidate ``{"text": ..., "extraction": ...}`` brings its own extracted
answer. The results name the mode (``match``) and count, per mode, the unparseable answers and
the evaluator's fallback guesses (``answers``). The PRM scores each candidate's steps once per problem (and the
whole solution as one step for ``orm``). Curves for N = 1..max-n: best-of-N for each aggregation
(exact expectation over N-subsets of all of a problem's candidates, ``bon_curve``), the pass@N
oracle and majority vote (``majority_curve``, estimated from ``--majority-samples`` random subsets
per problem and N). ``bon_results.json`` holds ``curves: {name: {ns, acc}}`` and per-problem
predictions, correctness and scores; also writes ``DIR/bon_curve.png`` and prints a table (at N =
1, 2, 4, ..., max-n).

``vpb``: scores every VisualProcessBench solution's steps and reports step macro-F1
(``step_f1``) overall and per ``data_source``; writes ``DIR/vpb_results.json`` and
``DIR/vpb_scores.jsonl``.

``synthetic``: generates ``--n`` fresh embedded puzzles (``jaxprm.data.synthetic``; the default
seed differs from the training data's) with known step labels and reports step macro-F1 overall,
per question type and per error kind, plus solution-level accuracy (a solution is judged correct
when every step scores >= threshold) and first-error localisation. ``evaluate_synthetic(prm, ...)``
is the same as a function (what the tiny training run reports).

Errors in input files are reported as ``file:line: message`` and exit with status 2. A ``bon``
problem or ``vpb`` row whose images cannot be scored (missing, wrongly typed, undecodable,
truncated or too large) is skipped with a ``skipped <where>: <reason>`` log line and listed under
``skipped: {count, rows}`` in the results file; ``--strict`` stops at it with exit status 2.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from jaxprm.atomic import atomic_write_json
from jaxprm.eval import answers as ans_lib
from jaxprm.eval import bon_curve as bon_lib
from jaxprm.eval import step_f1 as f1_lib
from jaxprm.data.formats._common import ImagePathError, resolve_image
from jaxprm.data.jsonl import BadLine, iter_jsonl
from jaxprm.reporting import format_table

DEFAULT_AGGREGATIONS = "mean,min,last,product,orm"
SYNTHETIC_EVAL_SEED = 20240917  # far from the training data's default seed 0
_CANDIDATE_KEYS = ("candidates", "solutions", "responses", "samples")


class InputError(ValueError):
    """A problem with the command's inputs; the message starts with ``file:line:`` when it can."""


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _tqdm(it, progress: bool, **kw):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


def load_prm(path: str):
    """``jaxprm.load_prm(path)`` (falls back to ``jaxprm.scoring.load_prm``); an http(s):// URL is a PRM
    server (``python -m jaxprm.serve``) scored through ``jaxprm.scoring.RemotePRM`` (key: env JAXPRM_API_KEY)."""
    if isinstance(path, str) and path.startswith(("http://", "https://")):
        from jaxprm.scoring.remote import RemotePRM

        return RemotePRM(path)
    try:
        from jaxprm import load_prm as _load
    except ImportError:
        try:
            from jaxprm.scoring import load_prm as _load
        except ImportError as e:
            raise InputError(f"cannot load a PRM: jaxprm.load_prm is not available ({e})") from None
    if not os.path.exists(path):
        raise InputError(f"--prm {path!r} does not exist")
    return _load(path)


def _write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, indent=2, ensure_ascii=False, default=_json_default)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, bytes):
        return f"<{len(o)} bytes>"
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _image_arg(images: Sequence):
    """Benchmark images -> what PRM/policy take: None, one image, or a list. Data URLs are decoded."""
    out = []
    for im in images or []:
        if isinstance(im, str) and im.startswith("data:"):
            try:
                out.append(base64.b64decode(im.split(",", 1)[1]))
            except (IndexError, ValueError):
                raise InputError(f"invalid image data URL {im[:40]!r}...") from None
        else:
            out.append(im)
    if not out:
        return None
    return out[0] if len(out) == 1 else out


def _check_images(images: Sequence, where: str) -> None:
    for im in images or []:
        if isinstance(im, str) and not im.startswith("data:") and "://" not in im and not os.path.exists(im):
            raise InputError(f"{where}: image file not found: {im}")


def _image_problem(images: Sequence, where: str) -> str | None:
    """Why a row's images cannot be scored (missing, wrongly typed, undecodable, truncated or too
    large: decoded here as the PRM decodes them), else None."""
    from jaxprm.data.preprocess import to_rgb_array

    try:
        _check_images(images, where)
    except InputError as e:
        return str(e).removeprefix(f"{where}: ")
    for i, im in enumerate(images or []):
        if isinstance(im, str) and "://" in im and not im.startswith("data:"):
            continue  # a URL: left to the PRM
        try:
            to_rgb_array(_image_arg([im]))
        except (ValueError, TypeError, OSError) as e:  # InputError (bad data URL) is a ValueError
            return f"image {i}: {e}"
    return None


def _usable_rows(wheres: Sequence[str], images_of, strict: bool, data: str, what: str) -> tuple[list[int], list]:
    """(indices of the rows whose images can be scored, skipped rows). A row that cannot be scored
    (``_image_problem``; ``images_of(i)`` may raise ``InputError``) is, with ``strict``, an
    ``InputError`` (exit 2), else logged as ``file:line: reason`` and listed in the skipped rows
    (the results file's ``skipped``)."""
    keep, skipped = [], []
    for i, w in enumerate(wheres):
        try:
            reason = _image_problem(images_of(i), w)
        except InputError as e:
            reason = str(e).removeprefix(f"{w}: ")
        if reason is None:
            keep.append(i)
            continue
        if strict:
            raise InputError(f"{w}: {reason}")
        print(f"skipped {w}: {reason}", file=sys.stderr)
        skipped.append({"where": w, "reason": reason})
    if not keep:
        raise InputError(f"{data}: no usable {what} ({len(skipped)} skipped)")
    return keep, skipped


def _skipped_summary(skipped: list) -> dict:
    return {"count": len(skipped), "rows": skipped[:1000]}


def _problem_question(p: dict) -> str:
    """The question text the policy and the PRM see: MathVista's ``query`` when present (it already
    lists the choices), else the question followed by lettered choices."""
    q = (p.get("meta") or {}).get("query")
    if isinstance(q, str) and q.strip():
        return q
    text = p["question"]
    if p.get("choices"):
        text += "\nChoices:\n" + "\n".join(f"({ans_lib.LETTERS[i]}) {c}" for i, c in enumerate(p["choices"]))
    return text


def _vote_key(pred: str | None):
    if pred is None:
        return None
    v = ans_lib.parse_number(pred)
    if v is not None:
        return f"{v:.6g}"
    return ans_lib.normalize_text(pred) or None


# ------------------------------------------------------------------------------------------------
# candidates file
# ------------------------------------------------------------------------------------------------
def _candidate_text(c, where: str, j: int) -> str:
    from jaxprm.search.steps import join_steps

    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        for k in ("text", "response", "solution", "content"):
            if isinstance(c.get(k), str):
                return c[k]
        if isinstance(c.get("steps"), list):
            c = c["steps"]
    if isinstance(c, list) and all(isinstance(s, str) for s in c):
        return join_steps(c)
    raise InputError(f"{where}: candidate {j} must be a string, a list of step strings or {{'text': ...}}, "
                     f"got {type(c).__name__}")


def load_candidates(path: str) -> dict[str, list[str]]:
    """``{problem id: [solution text, ...]}`` from a candidates jsonl (later lines for the same id
    append). Errors name ``file:line``."""
    out: dict[str, list[str]] = {}
    for where, row in iter_jsonl(path):
        if isinstance(row, BadLine):
            raise InputError(row.message)
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        pid = next((row[k] for k in ("id", "pid", "problem_id") if row.get(k) is not None), None)
        if pid is None:
            raise InputError(f"{where}: missing 'id'")
        cands = next((row[k] for k in _CANDIDATE_KEYS if k in row), None)
        if not isinstance(cands, list):
            raise InputError(f"{where}: missing list field 'candidates' (or one of {list(_CANDIDATE_KEYS[1:])})")
        out.setdefault(str(pid), []).extend(_candidate_text(c, where, j) for j, c in enumerate(cands))
    return out


def load_candidate_extractions(path: str) -> dict[str, list]:
    """``{problem id: [extracted answer or None, ...]}`` aligned with ``load_candidates``: a
    candidate ``{"text": ..., "extraction": ...}`` brings an answer extracted beforehand (e.g.
    MathVista's ``extraction`` field); problems without any are left out."""
    out: dict[str, list] = {}
    for where, row in iter_jsonl(path):
        if isinstance(row, BadLine) or not isinstance(row, dict):
            continue  # load_candidates reports these
        pid = row.get("id")
        cands = next((row[k] for k in _CANDIDATE_KEYS if k in row), None)
        if pid is None or not isinstance(cands, list):
            continue
        out.setdefault(str(pid), []).extend(c.get("extraction") if isinstance(c, dict) else None for c in cands)
    return {k: v for k, v in out.items() if any(x is not None for x in v)}


def make_policy(args):
    """The sampling policy named by ``--policy`` (None without one)."""
    from jaxprm.search import policy as pol

    if not args.policy:
        return None
    instruction = args.instruction if args.instruction is not None else pol.DEFAULT_INSTRUCTION
    if args.policy == "openai":
        if not args.base_url or not args.model:
            raise InputError("--policy openai needs --base-url and --model")
        from jaxprm.search.openai_client import OpenAIChatClient

        client = OpenAIChatClient(args.base_url, args.model, api_key=args.api_key, max_retries=args.max_retries)
        return pol.OpenAIPolicy(client, instruction)
    if args.policy == "jax":
        if not args.policy_model:
            raise InputError("--policy jax needs --policy-model HF_DIR")
        if not os.path.isdir(args.policy_model):
            raise InputError(f"--policy-model {args.policy_model!r} is not a directory")
        return pol.JaxPolicy.from_pretrained(args.policy_model, instruction=instruction)
    raise InputError(f"unknown --policy {args.policy!r}")


def _repair_last_line(path: str) -> None:
    """Before appending to a candidates file: a partial last line (a write cut by a kill) is
    truncated, said once in the log (its problem is sampled again); a complete last line without
    its newline gets one."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:].decode("utf-8"))
            f.write(b"\n")
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            lineno = data[:start].count(10) + 1
            print(f"{path}:{lineno}: partial last line ({len(data) - start} bytes, an interrupted write) removed; "
                  "its problem is sampled again", file=sys.stderr)
            f.truncate(start)


def sample_candidates(policy, problems: list[dict], path: str, n: int, sampling: dict, seed: int,
                      progress: bool = True) -> dict[str, list[str]]:
    """Sample ``n`` solutions for every problem that has none in ``path`` yet, appending them
    there one line per problem; returns all candidates."""
    if os.path.exists(path):
        _repair_last_line(path)
    have = load_candidates(path) if os.path.exists(path) else {}
    todo = [(i, p) for i, p in enumerate(problems) if len(have.get(p["id"], [])) < n]
    if todo:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for i, p in _tqdm(todo, progress, desc="sampling candidates", unit="problem"):
                k = n - len(have.get(p["id"], []))
                texts = policy.sample_solutions(_image_arg(p["images"]), _problem_question(p), k,
                                                seed=seed + i, **sampling)
                have.setdefault(p["id"], []).extend(texts)
                f.write(json.dumps({"id": p["id"], "candidates": list(texts)}, ensure_ascii=False) + "\n")
                f.flush()
    return have


# ------------------------------------------------------------------------------------------------
# bon
# ------------------------------------------------------------------------------------------------
def _table_ns(max_n: int) -> list[int]:
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= max_n]
    if max_n not in ns:
        ns.append(max_n)
    return ns


def _other_mode_counts(problems: list[dict], candidates: dict[str, list[str]], extractions: dict | None,
                       mode: str, benchmark: str | None, answer_kind: str, seed: int) -> dict:
    """Counts of the rule-only graders of the modes other than ``mode`` (no extractor / judge), so
    the report shows how the modes differ on these candidates."""
    out = {}
    for other in ans_lib.MATCH_MODES:
        if other == mode:
            continue
        g = ans_lib.Grader(other, benchmark, seed=seed, answer_kind=answer_kind)
        for p in problems:
            ex = (extractions or {}).get(p["id"]) or []
            for j, c in enumerate(candidates[p["id"]]):
                g(c, p, ex[j] if j < len(ex) else None)
        rep = g.report()
        rep["accuracy_at_1"] = rep["correct"] / rep["n"] if rep["n"] else 0.0
        rep["rules_only"] = True
        out[other] = rep
    return out


def evaluate_bon(prm, problems: list[dict], candidates: dict[str, list[str]], *, max_n: int = 64,
                 aggregations: Sequence[str] = ("mean", "min", "last", "product", "orm"), answer_kind: str = "auto",
                 num_samples: int = 200, seed: int = 0, progress: bool = True, where: str = "candidates",
                 match: str = "official", grader=None, extractions: dict | None = None,
                 compare_modes: bool = False) -> dict:
    """Best-of-N results (see the module docstring) as a JSON-able dict.

    Answers are judged by ``grader`` (an ``answers.Grader``), by default ``Grader(match)`` on each
    problem's ``source`` benchmark (``official`` on problems without one is ``lenient``).
    ``extractions``: ``{problem id: [extracted answer or None per candidate]}``. With
    ``compare_modes`` the rule-only counts of the other two modes are added under ``answers``."""
    from jaxprm.search.search import aggregate_scores, score_candidates, score_orm

    missing = [p["id"] for p in problems if not candidates.get(p["id"])]
    if missing:
        raise InputError(f"{where}: no candidates for {len(missing)} problem(s), e.g. {missing[:5]}")
    n_min = min(len(candidates[p["id"]]) for p in problems)
    if n_min < max_n:
        print(f"note: the smallest number of candidates per problem is {n_min}; curves go up to N={n_min}",
              file=sys.stderr)
        max_n = n_min
    ns = list(range(1, max_n + 1))
    grader = grader if grader is not None else ans_lib.Grader(match, seed=ans_lib.MMMU_SEED, answer_kind=answer_kind)
    per_problem, correct_all, votes_all = [], [], []
    scores_all: dict[str, list[np.ndarray]] = {a: [] for a in aggregations}
    for p in _tqdm(problems, progress, desc="scoring candidates", unit="problem"):
        cands = candidates[p["id"]]
        image, question = _image_arg(p["images"]), _problem_question(p)
        ex = (extractions or {}).get(p["id"]) or []
        verdicts = [grader(c, p, ex[j] if j < len(ex) else None) for j, c in enumerate(cands)]
        preds = [v.pred for v in verdicts]
        gold = p["answer"]
        correct = np.asarray([v.correct for v in verdicts], bool)
        step_lists, step_scores = score_candidates(prm, image, question, cands)
        entry = {"id": p["id"], "answer": gold, "n": len(cands), "predictions": preds,
                 "answer_status": [v.status for v in verdicts],
                 "correct": correct.tolist(), "num_steps": [len(s) for s in step_lists],
                 "step_scores": [s.tolist() for s in step_scores], "scores": {}}
        for how in aggregations:
            s = score_orm(prm, image, question, cands) if how == "orm" else aggregate_scores(step_scores, how)
            scores_all[how].append(s)
            entry["scores"][how] = s.tolist()
        per_problem.append(entry)
        correct_all.append(correct)
        votes_all.append([_vote_key(v.vote_key) for v in verdicts])
    curves: dict[str, dict] = {}
    for how in aggregations:
        curves[f"bon_{how}"] = {"ns": ns, "acc": bon_lib.bon_curve(scores_all[how], correct_all, ns)[1].tolist()}
    # majority vote: estimated from sampled subsets (vectorised), at every N like the other curves
    curves["majority"] = {"ns": ns, "acc": bon_lib.majority_curve(votes_all, correct_all, ns, num_samples=num_samples,
                                                                  seed=seed)[1].tolist()}
    curves["pass@n"] = {"ns": ns, "acc": bon_lib.pass_at_n_curve(correct_all, ns)[1].tolist()}
    report = grader.report()
    report["accuracy_at_1"] = report["correct"] / report["n"] if report["n"] else 0.0
    answers = {grader.mode: report}
    if compare_modes:
        answers.update(_other_mode_counts(problems, candidates, extractions, grader.mode, grader.benchmark,
                                          answer_kind, grader.seed))
    return {"n_problems": len(problems), "max_n": max_n, "ns": ns, "aggregations": list(aggregations),
            "match": grader.mode, "match_effective": sorted({grader.effective_mode(p.get("source")) for p in problems}),
            "answers": answers,
            "curves": curves, "accuracy_at_1": float(np.mean([c.mean() for c in correct_all])),
            "per_problem": per_problem}


def _answers_report(res: dict) -> str:
    """One line per mode: how many answers were unparseable and how many were the evaluator's
    fallback guesses."""
    lines = []
    for mode, r in res.get("answers", {}).items():
        tag = " (rules only)" if r.get("rules_only") else ""
        eff = r.get("effective_mode")
        eff = f" -> {eff}" if eff and eff != mode else ""
        lines.append(f"answers [{mode}{eff}{tag}]: {r['n']} judged, accuracy@1 {r['accuracy_at_1']:.4f}, "
                     f"{r['unparseable']} unparseable, {r['guesses']} fallback guesses")
    return "\n".join(lines)


def _bon_table(res: dict) -> str:
    cols = _table_ns(res["max_n"])
    rows = []
    for name, c in res["curves"].items():
        at = dict(zip(c["ns"], c["acc"]))
        rows.append([name] + [at.get(n, float("nan")) for n in cols])
    return format_table(["method"] + [f"N={n}" for n in cols], rows)


def _match_label(res: dict) -> str:
    eff = res.get("match_effective") or [res["match"]]
    return res["match"] if eff == [res["match"]] else f"{res['match']} -> {'/'.join(eff)}"


def cmd_bon(args, prm=None, policy=None) -> dict:
    if args.max_n < 1 or (args.n_samples is not None and args.n_samples < 1):
        raise InputError("--max-n and --n-samples must be >= 1")
    problems = ans_lib.load_benchmark_jsonl(args.data, args.format, args.image_root,
                                            allow_outside_root=args.allow_images_outside_root)
    if args.limit:
        problems = problems[: args.limit]
    if not problems:
        raise InputError(f"{args.data}: no problems")
    seen = {}
    for i, p in enumerate(problems):
        if p["id"] in seen:
            raise InputError(f"{args.data}: problem id {p['id']!r} appears twice (records {seen[p['id']]} and {i})")
        seen[p["id"]] = i
    keep, skipped = _usable_rows([f"{args.data}: problem {p['id']!r}" for p in problems],
                                 lambda i: problems[i]["images"], args.strict, args.data, "problems")
    problems = [problems[i] for i in keep]
    aggs = [a.strip() for a in args.aggregate.split(",") if a.strip()]
    from jaxprm.search.search import AGGREGATE_CHOICES

    bad = [a for a in aggs if a not in AGGREGATE_CHOICES]
    if bad or not aggs:
        raise InputError(f"--aggregate: unknown aggregation(s) {bad}; choose from {list(AGGREGATE_CHOICES)}")
    cand_path = args.candidates or os.path.join(args.out, "candidates.jsonl")
    policy = policy if policy is not None else make_policy(args)
    if policy is not None:
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
        candidates = sample_candidates(policy, problems, cand_path, args.n_samples or args.max_n, sampling,
                                       args.seed, progress=not args.no_progress)
    else:
        if not os.path.exists(cand_path):
            raise InputError(f"candidates file {cand_path!r} not found (give --candidates, or --policy to sample them)")
        candidates = load_candidates(cand_path)
    extractions = load_candidate_extractions(cand_path) if os.path.exists(cand_path) else {}
    text_fn = None
    if args.judge_model or args.judge_base_url:
        if not (args.judge_model and args.judge_base_url):
            raise InputError("--judge-base-url and --judge-model go together")
        text_fn = ans_lib.openai_text_fn(args.judge_base_url, args.judge_model, api_key=args.judge_api_key,
                                         max_retries=args.max_retries)
    grader = ans_lib.Grader(args.match, args.format, seed=args.mmmu_seed, answer_kind=args.answer_kind,
                            extractor=text_fn if args.match == "official" else None,
                            judge=text_fn if args.match == "vlprm" else None)
    prm = prm if prm is not None else load_prm(args.prm)
    res = evaluate_bon(prm, problems, candidates, max_n=args.max_n, aggregations=aggs, answer_kind=args.answer_kind,
                       num_samples=args.majority_samples, seed=args.seed, progress=not args.no_progress,
                       where=cand_path, grader=grader, extractions=extractions, compare_modes=True)
    res.update({"data": args.data, "format": args.format, "candidates": cand_path, "prm": args.prm,
                "judge_model": args.judge_model, "skipped": _skipped_summary(skipped)})
    if skipped:
        print(f"skipped {len(skipped)} problem(s) whose images cannot be scored (see 'skipped' in bon_results.json)",
              file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    _write_json(os.path.join(args.out, "bon_results.json"), res)
    curves = {name: (c["ns"], c["acc"]) for name, c in res["curves"].items()}
    bon_lib.plot_bon_curve(curves, os.path.join(args.out, "bon_curve.png"),
                           title=f"best-of-N on {os.path.basename(args.data)} ({res['n_problems']} problems, "
                                 f"match: {_match_label(res)})")
    print(_bon_table(res))
    print(_answers_report(res))
    print(f"wrote {os.path.join(args.out, 'bon_results.json')} and {os.path.join(args.out, 'bon_curve.png')}")
    return res


# ------------------------------------------------------------------------------------------------
# VisualProcessBench
# ------------------------------------------------------------------------------------------------
def _score_items(prm, items: list, batch_size: int, progress: bool, desc: str) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    starts = range(0, len(items), max(1, batch_size))
    for s in _tqdm(starts, progress, desc=desc, unit="batch", total=len(starts)):
        got = prm.score_batch(items[s: s + batch_size])
        out.extend(np.asarray(g, np.float64).reshape(-1) for g in got)
    for i, (it, sc) in enumerate(zip(items, out)):
        if sc.shape[0] != len(it[2]):
            raise RuntimeError(f"the PRM returned {sc.shape[0]} scores for item {i} with {len(it[2])} steps")
    return out


def _f1_row(name: str, m: dict) -> list:
    return [name, m["n_steps"], m["accuracy"], m["f1_correct"], m["f1_incorrect"], m["macro_f1"]]


def _f1_rows(res: dict) -> list[list]:
    rows = [_f1_row(src, m) for src, m in res["per_source"].items()]
    rows.append(_f1_row("overall", res["overall"]))
    return rows


F1_HEADERS = ["source", "steps", "acc", "F1(correct)", "F1(incorrect)", "macro-F1"]


def _vpb_lines(path: str) -> list[int]:
    with open(path, "rb") as f:  # line numbers as iter_jsonl counts them (bytes: no decoding here)
        return [i for i, line in enumerate(f, 1) if line.strip()]


def _vpb_images(row: dict, image_root: str, where: str, allow_outside_root: bool = False) -> list:
    imgs = row.get("image", row.get("images")) or []
    if isinstance(imgs, str):
        imgs = [imgs]
    if not isinstance(imgs, list):
        raise InputError(f"{where}: 'image' must be a path or a list of paths, got {type(imgs).__name__}")
    try:  # one rule for image paths (formats.resolve_image): outside image_root is refused unless allowed
        return [im if (not isinstance(im, str) or im.startswith("data:")) else
                resolve_image(im, image_root, allow_outside_root) for im in imgs]
    except ImagePathError as e:
        raise InputError(f"{where}: {e}") from None


def evaluate_vpb(prm, rows: list[dict], *, image_root: str, threshold: float = 0.5, batch_size: int = 8,
                 progress: bool = True, where: Sequence[str] | None = None, allow_outside_root: bool = False) -> tuple[dict, list[np.ndarray]]:
    """(``step_f1`` result, per-row step scores) for VisualProcessBench rows."""
    items = []
    for i, row in enumerate(rows):
        w = where[i] if where else f"row {i}"
        imgs = _vpb_images(row, image_root, w, allow_outside_root)
        _check_images(imgs, w)
        steps = row["response"]["steps"]
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise InputError(f"{w}: response.steps must be a non-empty list of strings")
        q = row.get("question")
        if not isinstance(q, str):
            raise InputError(f"{w}: missing 'question'")
        items.append((_image_arg(imgs), q, steps))
    scores = _score_items(prm, items, batch_size, progress, "scoring VisualProcessBench")
    return f1_lib.step_f1(rows, scores=scores, threshold=threshold), scores


def cmd_vpb(args, prm=None) -> dict:
    try:
        rows = f1_lib.load_visualprocessbench(args.data)
    except ValueError as e:
        raise InputError(str(e)) from None
    lines = _vpb_lines(args.data)
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        raise InputError(f"{args.data}: no rows")
    root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    where = [f"{args.data}:{ln}" for ln in lines[: len(rows)]]
    keep, skipped = _usable_rows(where, lambda i: _vpb_images(rows[i], root, where[i], args.allow_images_outside_root),
                                 args.strict, args.data, "rows")
    rows, where = [rows[i] for i in keep], [where[i] for i in keep]
    prm = prm if prm is not None else load_prm(args.prm)
    res, scores = evaluate_vpb(prm, rows, image_root=root, threshold=args.threshold, batch_size=args.batch_size,
                               progress=not args.no_progress, where=where,
                               allow_outside_root=args.allow_images_outside_root)
    res.update({"data": args.data, "prm": args.prm, "skipped": _skipped_summary(skipped)})
    if skipped:
        print(f"skipped {len(skipped)} row(s) whose images cannot be scored (see 'skipped' in vpb_results.json)",
              file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    _write_json(os.path.join(args.out, "vpb_results.json"), res)
    with open(os.path.join(args.out, "vpb_scores.jsonl"), "w", encoding="utf-8") as f:
        for row, sc, w in zip(rows, scores, where):
            f.write(json.dumps({"where": w, "id": row.get("id", row.get("index")),
                                "data_source": row.get("data_source"), "pred_scores": sc.tolist()}) + "\n")
    print(format_table(F1_HEADERS, _f1_rows(res)))
    print(f"macro-F1 mean over sources: {res['macro_f1_source_mean']:.4f}  "
          f"(step-weighted: {res['macro_f1_source_weighted']:.4f})")
    plot = f1_lib.plot_step_f1({**res["per_source"], "overall": res["overall"]}, scores,
                               [row["response"]["process_correctness"] for row in rows],
                               os.path.join(args.out, "vpb_f1.png"), title=f"{args.prm}: VisualProcessBench",
                               threshold=args.threshold)
    print(f"wrote {os.path.join(args.out, 'vpb_results.json')}, {os.path.join(args.out, 'vpb_scores.jsonl')}, {plot}")
    return res


# ------------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------------
def synthetic_task_of(prm, **overrides) -> dict:
    """The embedded task's settings for ``prm``: those saved in its spec by training (``PRMSpec.task``),
    else the task's defaults; ``overrides`` that are not None win."""
    from jaxprm.data import synthetic as syn

    spec = getattr(prm, "spec", None)
    task = dict(getattr(spec, "task", None) or {})
    task.update({k: v for k, v in overrides.items() if v is not None})
    return syn.task_settings(**task)


def evaluate_synthetic(prm, n: int = 200, seed: int = SYNTHETIC_EVAL_SEED, *, error_rate: float | None = None,
                       image_size: tuple[int, int] | None = None, threshold: float = 0.5, batch_size: int = 8,
                       progress: bool = False, records=None) -> dict:
    """Step F1 of ``prm`` on ``n`` freshly generated synthetic puzzles (or the given ``records``).

    The puzzles follow the task settings the PRM was trained on (``synthetic_task_of``: image size,
    error rates, question types); ``error_rate`` / ``image_size`` override them.

    Returns ``{"overall", "by_question_type", "by_error_kind", "solution_accuracy",
    "first_error_accuracy", "n_records", ...}`` where the F1 entries are ``step_f1`` results and
    ``first_error_accuracy`` is, over solutions with an error, the share whose first step scored
    below ``threshold`` is the true first error step."""
    from jaxprm.data import synthetic as syn

    task = synthetic_task_of(prm, error_rate=error_rate, image_size=image_size)
    if records is None:
        records = syn.generate_records(n, seed=seed, progress=progress, **task)
    items = [(r.images[0], r.question, [s.text for s in r.steps]) for r in records]
    scores = _score_items(prm, items, batch_size, progress, "scoring synthetic puzzles")

    def rows(key):
        return [{"data_source": key(r), "process_correctness": [1 if s.label == 1 else -1 for s in r.steps]}
                for r in records]

    overall = f1_lib.step_f1(records, scores=scores, threshold=threshold)
    by_q = f1_lib.step_f1(rows(lambda r: r.meta["question_type"]), scores=scores, threshold=threshold)
    by_e = f1_lib.step_f1(rows(lambda r: r.meta["error_kind"] or "none"), scores=scores, threshold=threshold)
    kinds = sorted({s.kind or "unknown" for r in records for s in r.steps})
    by_kind = {k: f1_lib.visualprocessbench_f1(
        np.concatenate([sc[[(s.kind or "unknown") == k for s in r.steps]] for r, sc in zip(records, scores)]),
        np.asarray([1 if s.label == 1 else -1 for r in records for s in r.steps if (s.kind or "unknown") == k]),
        threshold) for k in kinds}
    sol_ok, first_ok, n_err = [], 0, 0
    for r, sc in zip(records, scores):
        pred_correct = bool(np.all(sc >= threshold))
        sol_ok.append(pred_correct == bool(r.meta["answer_correct"]))
        fe = r.meta["first_error_step"]
        if fe is not None:
            n_err += 1
            below = np.flatnonzero(sc < threshold)
            first_ok += int(below.size > 0 and int(below[0]) == int(fe))
    return {
        "n_records": len(records), "seed": seed, "threshold": threshold, "task": task,
        "macro_f1": overall["overall"]["macro_f1"],
        "overall": overall["overall"],
        "by_question_type": by_q["per_source"],
        "by_error_kind": by_e["per_source"],
        "by_step_kind": by_kind,
        "solution_accuracy": float(np.mean(sol_ok)) if sol_ok else 0.0,
        "first_error_accuracy": first_ok / n_err if n_err else 0.0,
        "n_with_error": n_err,
        "scores": [s.tolist() for s in scores],
    }


def evaluate_synthetic_search(prm, records, *, n_candidates: int = 16, policy_error_rate: float = 0.7,
                              step_error_rate: float = 0.2, perception_error_share: float | None = None,
                              guided_k: int = 8, seed: int = 0,
                              aggregations: Sequence[str] = ("mean", "min", "last"), progress: bool = False) -> dict:
    """Test-time scaling on embedded puzzles with a noisy scripted policy (``ScriptedPolicy``): answer
    accuracy vs N for best-of-N under each aggregation, majority vote, the pass@N oracle, and guided
    greedy step search with ``guided_k`` candidate next steps per iteration. ``policy_error_rate`` is
    the share of sampled whole solutions with an error; ``step_error_rate`` the chance that one
    candidate next step brings an error; ``perception_error_share`` which kinds of error the policy
    makes (``ScriptedPolicy``; the CLI passes the PRM's task setting)."""
    from jaxprm.search import ScriptedPolicy, guided_greedy_search

    policy = ScriptedPolicy(records, solution_error_rate=policy_error_rate, step_error_rate=step_error_rate,
                            perception_error_share=perception_error_share, seed=seed)
    problems = [{"id": r.id, "images": list(r.images), "question": r.question, "answer": r.answer}
                for r in records]
    cands = {p["id"]: policy.sample_solutions(p["images"][0], p["question"], n_candidates, seed=seed + i)
             for i, p in enumerate(problems)}
    res = evaluate_bon(prm, problems, cands, max_n=n_candidates, aggregations=aggregations, seed=seed,
                       progress=progress)
    hits = []
    for p in _tqdm(problems, progress, desc="guided search", unit="problem"):
        out = guided_greedy_search(prm, policy, p["images"][0], p["question"], k=guided_k)
        hits.append(bool(out.answer is not None and ans_lib.is_correct(out.answer, p["answer"])))
    res["guided"] = {"k": guided_k, "accuracy": float(np.mean(hits)) if hits else 0.0}
    res["policy_error_rate"], res["step_error_rate"] = policy_error_rate, step_error_rate
    return res


def _parse_size(text: str) -> tuple[int, int]:
    from jaxprm.data.synthetic import _parse_size as parse

    return parse(text)


def cmd_synthetic(args, prm=None) -> dict:
    if args.n < 1:
        raise InputError("--n must be >= 1")
    prm = prm if prm is not None else load_prm(args.prm)
    from jaxprm.data import synthetic as syn

    task = synthetic_task_of(prm, error_rate=args.error_rate, image_size=args.image_size,
                             perception_error_share=args.perception_share)
    records = syn.generate_records(args.n, seed=args.seed, progress=not args.no_progress, **task)
    res = evaluate_synthetic(prm, seed=args.seed, threshold=args.threshold, batch_size=args.batch_size,
                             progress=not args.no_progress, records=records)
    res["prm"] = args.prm
    rows = [_f1_row(f"type:{k}", m) for k, m in res["by_question_type"].items()]
    rows += [_f1_row(f"error:{k}", m) for k, m in res["by_error_kind"].items()]
    rows += [_f1_row(f"step:{k}", m) for k, m in res["by_step_kind"].items()]
    rows.append(_f1_row("overall", res["overall"]))
    print(format_table(["slice"] + F1_HEADERS[1:], rows))
    print(f"solution accuracy: {res['solution_accuracy']:.4f}  first-error localisation: "
          f"{res['first_error_accuracy']:.4f} ({res['n_with_error']} solutions with an error)")
    if args.search:
        recs = syn.generate_records(args.search_problems, seed=args.seed + 1, **res["task"])
        res["search"] = evaluate_synthetic_search(prm, recs, n_candidates=args.search,
                                                  policy_error_rate=args.policy_error_rate,
                                                  step_error_rate=args.step_error_rate, guided_k=args.guided_k,
                                                  perception_error_share=res["task"]["perception_error_share"],
                                                  seed=args.seed, progress=not args.no_progress)
        print(f"test-time scaling on {len(recs)} fresh puzzles, policy error rate {args.policy_error_rate}:")
        print(_bon_table(res["search"]))
        print(f"guided greedy search (k={args.guided_k} candidate steps): {res['search']['guided']['accuracy']:.4f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out = os.path.join(args.out, "synthetic_results.json")
        _write_json(out, res)
        wrote = [out, f1_lib.plot_step_f1(
            {**{f"step: {k}": m for k, m in res["by_step_kind"].items()}, "all steps": res["overall"]},
            res["scores"], [[1 if s.label == 1 else -1 for s in r.steps] for r in records],
            os.path.join(args.out, "synthetic_f1.png"), title=f"{args.prm}: embedded puzzles",
            threshold=args.threshold)]
        if "search" in res:
            wrote.append(bon_lib.plot_bon_curve(
                {**{k: (c["ns"], c["acc"]) for k, c in res["search"]["curves"].items()}},
                os.path.join(args.out, "synthetic_bon_curve.png"),
                title=f"best-of-N on embedded puzzles (guided k={args.guided_k}: "
                      f"{100 * res['search']['guided']['accuracy']:.1f}%)"))
        print("wrote " + ", ".join(wrote))
    return res


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxprm.eval", description="Evaluate a jaxprm PRM.")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, prm_required=True):
        p.add_argument("--prm", required=prm_required, help="PRM dir (training workdir, exported or HF dir)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def image_root(p, default_help):
        p.add_argument("--image-root", default=None, help=default_help)
        p.add_argument("--allow-images-outside-root", action="store_true",
                       help="follow image paths that resolve outside the image root (../, absolute paths); "
                            "by default such a path is refused, naming file:line and the path")

    def strict(p):
        p.add_argument("--strict", action="store_true",
                       help="stop (exit 2) at the first row whose images cannot be scored, instead of skipping it "
                            "(skips are logged as file:line: reason and counted in the results' 'skipped')")

    b = sub.add_parser("bon", help="best-of-N accuracy vs N with PRM aggregations, majority and pass@N")
    common(b)
    b.add_argument("--data", required=True, help="benchmark jsonl")
    b.add_argument("--format", default="generic", choices=ans_lib.FORMATS)
    image_root(b, "resolve relative image paths here (default: the jsonl's dir)")
    b.add_argument("--candidates", default=None, help="candidates jsonl (default DIR/candidates.jsonl)")
    b.add_argument("--max-n", type=int, default=64)
    b.add_argument("--aggregate", default=DEFAULT_AGGREGATIONS,
                   help=f"comma-separated aggregations (default {DEFAULT_AGGREGATIONS}; also length_normalized)")
    b.add_argument("--match", default="official", choices=ans_lib.MATCH_MODES,
                   help="how answers are judged: official (the benchmark's own evaluator, quirks included; "
                        "generic files: lenient), vlprm (VL-PRM's \\boxed{} check), lenient (format-robust)")
    b.add_argument("--answer-kind", default="auto", choices=ans_lib.KINDS, help="extraction kind for --match lenient")
    b.add_argument("--mmmu-seed", type=int, default=ans_lib.MMMU_SEED,
                   help="seed of MMMU's random fallback guess (official: 42)")
    b.add_argument("--judge-base-url", default=None,
                   help="OpenAI-compatible server of the answer model: MathVista's extractor (--match official) "
                        "or VL-PRM's option judge (--match vlprm)")
    b.add_argument("--judge-model", default=None, help="model name of the answer model on that server")
    b.add_argument("--judge-api-key", default=None)
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--limit", type=int, default=None, help="only the first N problems")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--majority-samples", type=int, default=200, help="subsets per (problem, N) for majority vote")
    strict(b)
    g = b.add_argument_group("sampling candidates (when the candidates file lacks some problems)")
    g.add_argument("--policy", choices=("openai", "jax"), default=None)
    g.add_argument("--base-url", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", default=None, help="model name on the server")
    g.add_argument("--api-key", default=None)
    g.add_argument("--max-retries", type=int, default=5)
    g.add_argument("--policy-model", default=None, help="HF Qwen2.5-VL dir for --policy jax")
    g.add_argument("--n-samples", type=int, default=None, help="solutions per problem (default --max-n)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=1024)
    g.add_argument("--instruction", default=None, help="instruction appended to each question for the policy")

    v = sub.add_parser("vpb", help="VisualProcessBench step macro-F1")
    common(v)
    v.add_argument("--data", required=True, help="VisualProcessBench test.jsonl")
    image_root(v, "default: the jsonl's directory")
    v.add_argument("--out", required=True)
    v.add_argument("--threshold", type=float, default=0.5)
    v.add_argument("--batch-size", type=int, default=8)
    v.add_argument("--limit", type=int, default=None)
    strict(v)

    s = sub.add_parser("synthetic", help="step F1 on freshly generated synthetic puzzles")
    common(s)
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--seed", type=int, default=SYNTHETIC_EVAL_SEED)
    s.add_argument("--error-rate", type=float, default=None,
                   help="share of solutions with an error (default: the PRM's training task, else 0.5)")
    s.add_argument("--image-size", type=_parse_size, default=None,
                   help="HxW, multiples of 28 (default: the PRM's training task, else 112x112)")
    s.add_argument("--perception-share", type=float, default=None,
                   help="share of the errors that are perception errors (default: the PRM's training task, else 0.5)")
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--out", default=None, help="write synthetic_results.json and plots here")
    s.add_argument("--search", type=int, default=0, metavar="N",
                   help="also run test-time scaling with N candidates per puzzle (best-of-N, majority vote, "
                        "guided search) with a noisy scripted policy")
    s.add_argument("--search-problems", type=int, default=100, help="puzzles for --search")
    s.add_argument("--policy-error-rate", type=float, default=0.7, help="share of the policy's solutions with an error")
    s.add_argument("--step-error-rate", type=float, default=0.2,
                   help="chance that a candidate next step (guided search) brings an error")
    s.add_argument("--guided-k", type=int, default=8, help="candidate next steps per guided-search iteration")
    return ap


def main(argv: Sequence[str] | None = None, *, prm=None, policy=None) -> int:
    """CLI entry point. ``prm`` / ``policy`` objects may be injected (tests, notebooks); then
    ``--prm`` is still required by the parser but not loaded."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bon":
            cmd_bon(args, prm, policy)
        elif args.command == "vpb":
            cmd_vpb(args, prm)
        else:
            cmd_synthetic(args, prm)
    except (InputError, ans_lib.BenchmarkFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
