"""The VL-PRM recipe end to end in miniature, on the embedded puzzles (offline, CPU).

    python -m jaxprm.reproduce --config configs/reproduce_tiny.py --out runs/reproduce
    python -m jaxprm.reproduce --config configs/reproduce_tiny.py:smoke --out /tmp/repro_smoke

Stages (each cached under --out; rerunning continues from the last finished one):
1. synth: rollouts of a noisy scripted policy on ``synth.num_questions`` training puzzles, 16 Monte-Carlo
   continuations per step, a scripted judge (``synth.judge_noise``, more on perception errors:
   ``synth.judge_perception_noise``), labels under every rule (mc, judge, hybrid, vlprm_v2);
2. train: one tiny PRM per run in ``runs`` (a label rule, or an ablation of ``hybrid``: perception steps
   unsupervised, all steps after the first error "-") and per seed, same steps;
3. eval: step macro-F1 (VisualProcessBench definition) of every PRM on held-out puzzles with ground
   truth, split by step kind; test-time scaling of the ``search_run`` PRM with a noisy policy:
   accuracy vs N for majority vote, best-of-N under each aggregation (one-shot = "orm"), guided greedy
   search with ``search.guided_k`` candidates, the oracle (pass@N) and the worst pick;
4. report: report.md, results.json and plots, with each testable claim of the paper stated as held,
   contradicted or inconclusive (95% t-intervals over seeds).

``:smoke`` is the suite's version (a minute on 2 CPU cores): a few puzzles, few steps, one seed.
"""
import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.seeds = (0, 1, 2)
    # the embedded task, as the tiny default trains it (sum / difference / compare puzzles, reasoning
    # errors only): the tiny backbone, trained from scratch, does not learn to read the image in this
    # budget, and solutions with perception errors (later steps "-" though their arithmetic is right)
    # keep it from learning to verify reasoning too (README: step F1 0.70 instead of 0.94). With
    # perception_error_share > 0 the perception claim is tested, on a PRM that cannot see.
    c.task = ml_collections.ConfigDict({
        "image_size": (56, 56), "question_types": ("sum", "difference", "compare"),
        "error_rate": 0.5, "perception_error_share": 0.0})
    c.synth = ml_collections.ConfigDict({
        "num_questions": 800, "rollouts_per_question": 2, "mc_continuations": 16,
        "policy_error_rate": 0.5, "malformed_rate": 0.05, "slip_rate": 0.05, "hard_fraction": 0.2,
        "judge_noise": 0.2, "judge_perception_noise": 0.4, "judge_miss_share": 0.5, "seed": 0})
    # training runs: a label rule of jaxprm.data.labels, or an ablation of hybrid (see jaxprm.reproduce).
    # "judge" is also the paper's released rule (VL-PRM300K's labels follow the judge's first error);
    # "vlprm_v2" (the repository's consensus rule) can be added
    c.runs = ("mc", "judge", "hybrid", "hybrid_no_perception", "hybrid_all_steps")
    # the tiny default's budget: 600 steps of 8 (it learns to verify arithmetic between steps 400 and 600)
    c.train = ml_collections.ConfigDict({"steps": 600, "batch_size": 8, "lr": 3e-3, "lm_loss_weight": 1.0})
    c.eval = ml_collections.ConfigDict({"num_puzzles": 200, "seed": 12345})
    c.search_run = "hybrid"  # the PRM whose test-time scaling is measured (per seed)
    c.search = ml_collections.ConfigDict({
        "num_problems": 60, "max_n": 64, "policy_error_rate": 0.7, "step_error_rate": 0.2, "guided_k": 8,
        "aggregations": ("mean", "min", "last", "product", "length_normalized", "orm"), "seed": 777})
    if arg == "smoke":
        c.seeds = (0,)
        c.synth.num_questions = 12
        c.runs = ("mc", "hybrid", "hybrid_no_perception")
        c.train.steps = 6
        c.eval.num_puzzles = 8
        c.search.num_problems = 4
        c.search.max_n = 4
        c.search.guided_k = 2
        c.search.aggregations = ("mean", "min", "orm")
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use configs/reproduce_tiny.py or configs/reproduce_tiny.py:smoke")
    return c
