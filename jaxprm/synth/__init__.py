"""Hybrid step-label synthesis (VL-PRM style): policy rollouts, Monte-Carlo values, a VLM judge,
and fusion of the two into step labels.

    python -m jaxprm.synth --config configs/synth_tiny.py --out OUT [--config.x=y ...] [--shard i/n]
    python -m jaxprm.synth.report --records OUT

Modules: ``format`` (tagged "[Visual Elements]"/"[Reasoning]" format: prompt, parser, renderers),
``questions`` (input questions, sharding), ``policies`` (synthesis requests served by any
``jaxprm.search.policy.Policy``; the OpenAI-compatible and scripted puzzle policies), ``rollout``
(re-asks, batched MC values), ``judge`` (VLM judge over ``OpenAIChatClient``, scripted judge),
``fuse`` (label rules from ``jaxprm.data.labels``), ``run`` (resumable, sharded pipeline),
``report`` (label accuracy on the puzzle task), ``puzzle`` (ground truth for puzzles), ``config``
(defaults and ``--config.*`` overrides).
"""
