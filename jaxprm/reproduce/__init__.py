"""The VL-PRM recipe end to end in miniature: synthesis -> training -> evaluation -> report.

``python -m jaxprm.reproduce --config configs/reproduce_tiny.py --out DIR`` runs the whole pipeline on
the embedded puzzles, whose every step has a ground-truth label (no public benchmark has that), so the
paper's claims can be checked where its data cannot: which labels train a better PRM, whether
supervising perception steps helps, whether PRM-guided selection beats majority vote.

Runs (``config.runs``): a label rule of ``jaxprm.data.labels`` (``mc``, ``judge``, ``hybrid``,
``vlprm_v2``: the labels the synthesis wrote for it), or an ablation of ``hybrid``:
``hybrid_no_perception`` (perception steps unsupervised) and ``hybrid_all_steps`` (every step after
the first "-" labelled "-", instead of unsupervised as VL-PRM's truncated transcripts leave them).

Stages are cached as JSON under ``DIR/stages/`` (written atomically when a stage finishes) and each
training run resumes from its own checkpoints, so a killed run continues where it stopped. See
``jaxprm.reproduce.pipeline`` (the stages) and ``jaxprm.reproduce.report`` (claims, tables, plots).
"""
from jaxprm.reproduce.pipeline import RUN_KINDS, reproduce

__all__ = ["RUN_KINDS", "reproduce"]
