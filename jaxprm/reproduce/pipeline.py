"""The stages of ``python -m jaxprm.reproduce`` (see the package docstring), each cached under ``out``."""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
import time
from typing import Any, Callable

from jaxprm.atomic import atomic_write_json

RULE_RUNS = ("mc", "judge", "hybrid", "vlprm_v2")
ABLATIONS = ("hybrid_no_perception", "hybrid_all_steps")
RUN_KINDS = RULE_RUNS + ABLATIONS


def _say(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cached(out: str, key: str, fn: Callable[[], Any], what: str) -> Any:
    """``fn()``'s result, computed once: kept in ``out/stages/{key}.json``."""
    path = os.path.join(out, "stages", f"{key}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            _say(f"{what}: done before (stages/{key}.json)")
            return json.load(f)
    t = time.time()
    _say(f"{what} ...")
    res = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_json(path, res, indent=1)
    _say(f"{what}: {time.time() - t:.0f} s")
    return res


def check_config(cfg) -> None:
    bad = [r for r in cfg.runs if r not in RUN_KINDS]
    if bad:
        raise ValueError(f"config.runs: unknown run(s) {bad}; choose from {RUN_KINDS}")
    if cfg.search_run and cfg.search_run not in cfg.runs:
        raise ValueError(f"config.search_run={cfg.search_run!r} is not in config.runs={tuple(cfg.runs)}")
    if not cfg.seeds:
        raise ValueError("config.seeds must not be empty")


# ------------------------------------------------------------------------------------------------ 1. synthesis
def synth_config(cfg):
    from jaxprm.synth.config import base_config

    s, t = cfg.synth, cfg.task
    c = base_config()
    c.name = "reproduce"
    c.source = "synthetic"
    c.num_questions = int(s.num_questions)
    c.seed = int(s.seed)
    c.synthetic.image_size = tuple(t.image_size)
    c.synthetic.question_types = ",".join(t.question_types)
    c.rollouts_per_question = int(s.rollouts_per_question)
    c.mc.num_continuations = int(s.mc_continuations)
    c.policy.kind = "scripted"
    c.policy.error_rate = float(s.policy_error_rate)
    c.policy.perception_share = float(t.perception_error_share)
    c.policy.malformed_rate = float(s.malformed_rate)
    c.policy.slip_rate = float(s.slip_rate)
    c.policy.hard_fraction = float(s.hard_fraction)
    c.judge.kind = "scripted"
    c.judge.noise = float(s.judge_noise)
    c.judge.perception_noise = float(s.judge_perception_noise)
    c.judge.miss_share = float(s.judge_miss_share)
    c.progress = False
    return c


def read_synth_records(synth_dir: str) -> list:
    from jaxprm.data.schema import Record

    recs = []
    for p in sorted(glob.glob(os.path.join(synth_dir, "records-shard-*.jsonl"))):
        with open(p, encoding="utf-8") as f:
            recs += [Record.from_dict(json.loads(line)) for line in f if line.strip()]
    return recs


def run_labels(rec, run: str) -> list:
    """The step labels of ``rec`` for training run ``run`` (see the package docstring)."""
    by_rule = rec.meta["labels_by_rule"]
    if run in RULE_RUNS:
        return list(by_rule[run])
    labels = list(by_rule["hybrid"])
    if run == "hybrid_no_perception":
        return [None if s.kind == "perception" else lab for s, lab in zip(rec.steps, labels)]
    if run == "hybrid_all_steps":
        if 0 in labels:
            first = labels.index(0)
            labels = labels[:first] + [0] * (len(labels) - first)
        return labels
    raise ValueError(f"unknown run {run!r}; choose from {RUN_KINDS}")


def stage_synth(cfg, out: str) -> dict:
    from jaxprm.data.formats import write_jsonl
    from jaxprm.synth import report as synth_report
    from jaxprm.synth import run as synth_run

    synth_dir = os.path.join(out, "synth")
    stats = synth_run.run(synth_config(cfg), synth_dir, progress=False)
    recs = read_synth_records(synth_dir)
    if not recs:
        raise RuntimeError(f"synthesis wrote no records under {synth_dir}; see its stats file")
    data = {}
    for run in cfg.runs:
        labelled = [dataclasses.replace(r, steps=[dataclasses.replace(s, label=lab)
                                                  for s, lab in zip(r.steps, run_labels(r, run))]) for r in recs]
        path = os.path.join(out, "data", f"{run}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_jsonl(labelled, path)
        labs = [s.label for r in labelled for s in r.steps]
        data[run] = {"path": path, "records": len(labelled), "steps": len(labs),
                     "pos": labs.count(1), "neg": labs.count(0), "unsupervised": labs.count(None)}
    label_quality = synth_report.evaluate(recs)
    return {"records": len(recs), "data": data, "label_quality": label_quality,
            "synth_stats": {k: stats.get(k) for k in ("questions", "rollouts_accepted", "malformed") if k in stats}}


# ------------------------------------------------------------------------------------------------ 2. training
def train_config(cfg, run: str, seed: int, data: dict, out: str):
    from configs import tiny

    t = cfg.train
    c = tiny.get_config()
    c.workdir = os.path.join(out, "train", f"{run}-s{seed}")
    c.model.seed = int(seed)
    c.data.source = "records"
    c.data.format = "jsonl"
    c.data.records = data["path"]
    c.data.label_rule = ""
    c.data.val_fraction = 0.0  # evaluated on fresh puzzles with ground truth instead
    c.train.batch_size = int(t.batch_size)
    c.optim.lr = float(t.lr)
    c.train.lm_loss_weight = float(t.lm_loss_weight)
    c.train.epochs = max(1, math.ceil(int(t.steps) * int(t.batch_size) / max(1, int(data["records"]))))
    c.train.max_steps = int(t.steps)
    c.train.save_every = max(1, int(t.steps) // 2)
    c.train.eval_every = 10**9
    c.train.log_every = max(1, int(t.steps) // 4)
    c.train.progress = False
    return c


def stage_train(cfg, out: str, run: str, seed: int, data: dict) -> dict:
    from jaxprm.train import train

    c = train_config(cfg, run, seed, data, out)
    metrics = train(c)
    return {"workdir": c.workdir, "export": os.path.join(c.workdir, "export"),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}}


# ------------------------------------------------------------------------------------------------ 3. evaluation
def task_settings(cfg) -> dict:
    from jaxprm.data import synthetic as syn

    t = cfg.task
    return syn.task_settings(image_size=tuple(t.image_size), error_rate=t.error_rate,
                             perception_error_share=t.perception_error_share, question_types=tuple(t.question_types))


def stage_eval(cfg, out: str, export: str) -> dict:
    from jaxprm.data import synthetic as syn
    from jaxprm.eval.run import evaluate_synthetic
    from jaxprm.scoring import load_prm

    recs = syn.generate_records(int(cfg.eval.num_puzzles), seed=int(cfg.eval.seed), **task_settings(cfg))
    res = evaluate_synthetic(load_prm(export), records=recs)
    keep = ("macro_f1", "overall", "by_step_kind", "by_error_kind", "by_question_type", "solution_accuracy",
            "first_error_accuracy", "n_records", "n_with_error")
    return {k: res[k] for k in keep}


def worst_curve(correct: list, ns: list) -> list:
    """Accuracy of the worst pick of a random n-subset (correct only if all n are), averaged over problems:
    the lower bound any selection method can reach."""
    out = []
    for n in ns:
        vals = [math.comb(int(sum(c)), n) / math.comb(len(c), n) for c in correct]
        out.append(float(sum(vals) / len(vals)))
    return out


def stage_search(cfg, out: str, export: str) -> dict:
    from jaxprm.data import synthetic as syn
    from jaxprm.eval.run import evaluate_synthetic_search
    from jaxprm.scoring import load_prm

    s = cfg.search
    task = task_settings(cfg)
    recs = syn.generate_records(int(s.num_problems), seed=int(s.seed), **task)
    res = evaluate_synthetic_search(load_prm(export), recs, n_candidates=int(s.max_n),
                                    policy_error_rate=float(s.policy_error_rate),
                                    step_error_rate=float(s.step_error_rate),
                                    perception_error_share=task["perception_error_share"],
                                    guided_k=int(s.guided_k), seed=int(s.seed),
                                    aggregations=tuple(s.aggregations))
    correct = [p["correct"] for p in res["per_problem"]]
    curves = dict(res["curves"])
    curves["worst"] = {"ns": res["ns"], "acc": worst_curve(correct, res["ns"])}
    return {"ns": res["ns"], "curves": curves, "guided": res["guided"], "accuracy_at_1": res["accuracy_at_1"],
            "n_problems": res["n_problems"]}


# ------------------------------------------------------------------------------------------------ the whole run
def reproduce(cfg, out: str) -> dict:
    """Run (or continue) every stage into ``out``; returns the report's results (``results.json``)."""
    from jaxprm.reproduce import report as R

    check_config(cfg)
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "config.json")
    cfg_json = json.loads(cfg.to_json_best_effort(sort_keys=True))
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            if json.load(f) != cfg_json:
                raise ValueError(f"{out} holds a run with another config ({cfg_path}); use a new --out, or "
                                 "delete the folder to start over")
    else:
        atomic_write_json(cfg_path, cfg_json, indent=2, sort_keys=True)
    t0 = time.time()
    synth = _cached(out, "synth", lambda: stage_synth(cfg, out), "1/4 synthesis and labels")
    trained, evals, searches = {}, {}, {}
    jobs = [(run, int(seed)) for seed in cfg.seeds for run in cfg.runs]
    for i, (run, seed) in enumerate(jobs):
        trained[(run, seed)] = _cached(out, f"train-{run}-s{seed}",
                                       lambda: stage_train(cfg, out, run, seed, synth["data"][run]),
                                       f"2/4 train {run} seed {seed} ({i + 1}/{len(jobs)})")
    for i, (run, seed) in enumerate(jobs):
        evals[(run, seed)] = _cached(out, f"eval-{run}-s{seed}",
                                     lambda: stage_eval(cfg, out, trained[(run, seed)]["export"]),
                                     f"3/4 step F1 of {run} seed {seed} ({i + 1}/{len(jobs)})")
    if cfg.search_run:
        for seed in cfg.seeds:
            seed = int(seed)
            searches[seed] = _cached(out, f"search-{cfg.search_run}-s{seed}",
                                     lambda: stage_search(cfg, out, trained[(cfg.search_run, seed)]["export"]),
                                     f"3/4 test-time scaling with {cfg.search_run} seed {seed}")
    results = R.build_results(cfg, synth, evals, searches)
    results["wall_s"] = round(time.time() - t0, 1)
    paths = R.write_report(results, out)
    _say("4/4 report: " + ", ".join(paths))
    print(R.claims_table(results), file=sys.stdout, flush=True)
    return results
