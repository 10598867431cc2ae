"""VL-PRM-style label synthesis with real models behind OpenAI-compatible APIs.

Policy: a VLM served by vLLM/SGLang (``policy.base_url``, ``policy.model``; key from
``$OPENAI_API_KEY``, none needed for a local server); rollouts in the "[Visual Elements]" /
"[Reasoning]" tagged format, 16 Monte-Carlo continuations per step prefix, continued with
vLLM's ``continue_final_message``. Judge: o4-mini (``judge.base_url``, ``judge.model``; key from
``$JUDGE_API_KEY``; no fallback to the policy's key), with retries/backoff on 429/5xx and a
cost counter (o4-mini list prices). Questions from a jsonl (``--config.input.path``)::

    export JUDGE_API_KEY=...
    python -m jaxprm.synth --config configs/synth_vlprm.py --config.input.path data/questions.jsonl \\
        --config.policy.base_url http://127.0.0.1:8000/v1 --out out/vlprm --shard 0/8

``get_config("synthetic")`` runs the same models on the embedded puzzles instead (no ground
truth: a real policy does not write the task's canonical phrasing).
"""
from jaxprm.synth.config import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.name = "synth_vlprm"
    c.source = "synthetic" if arg == "synthetic" else "jsonl"
    c.num_questions = 0 if c.source == "jsonl" else 100
    c.input.path = ""
    c.input.format = "generic"
    c.rollouts_per_question = 6  # VL-PRM: num_return_sequences = 6
    c.max_rollout_attempts = 3
    c.max_steps_per_section = 12  # VL-PRM: max_perception_steps = max_reasoning_steps = 12
    c.mc.num_continuations = 16  # VL-PRM: num_mc_sequences = 16
    c.mc.early_stop = False  # VL-PRM rollout.py: early_stop False; VisualPRM-style stop: True
    c.mc.chunk = 2
    c.policy.kind = "openai"
    c.policy.base_url = "http://127.0.0.1:8000/v1"
    c.policy.model = "Qwen/Qwen2.5-VL-7B-Instruct"
    c.policy.api_key_env = "OPENAI_API_KEY"
    c.policy.temperature = 1.0  # VL-PRM: temperature 1.0
    c.policy.max_tokens = 4096
    c.policy.prefix_mode = "continue_final_message"
    c.policy.max_workers = 32
    c.judge.kind = "openai"
    c.judge.base_url = "https://api.openai.com/v1"
    c.judge.model = "o4-mini"
    c.judge.api_key_env = "JUDGE_API_KEY"
    c.judge.temperature = -1.0  # not sent: o-series models only accept the default
    c.judge.extra_json = '{"max_completion_tokens": 16000}'
    c.judge.max_attempts = 3
    c.judge.max_requests_per_second = 5.0
    c.judge.include_answer = True
    c.labels.primary = "hybrid"
    c.on_question_error = "skip"
    c.max_consecutive_failures = 10
    return c
