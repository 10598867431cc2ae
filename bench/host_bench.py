"""Host-side cost of one scoring batch, by phase, against the device budget (issue 19 item 1).

    python bench/host_bench.py                 # the current code
    PYTHONPATH=<older checkout> python bench/host_bench.py --label before   # the same bench on older code

For best-of-N style batches (8/32/64 candidates of one problem, 448x448 and 896x896 images, ~1k text
tokens per candidate) it times, on one CPU core, what ``PRM.score_batch`` does on the host before the
device runs: image preprocessing (once per problem), prompt encoding (chat template, tokenization,
label positions; ``encode_prm_example`` as ``PRM._encode`` calls it), 3D M-RoPE positions, and packing
into the bucketed batch arrays the jitted function takes (token rows, pixel rows, vision layouts: what
is transferred), in chunks of 8 rows with the scorer's default length and patch buckets.

Each of the 3 repeats scores a new problem (another question, new candidates: nothing of a candidate
is memoised from an earlier repeat; the system prompt and the image tokens are, as in serving) and the
best repeat is reported. The device budget is the issue's: a batch of 8 x 1024 tokens at the target
rate on one H100 (3 x 28.0k tokens/s at 3B) takes ~100 ms, so the host must stay under 10% of the device
time of the same tokens. The tokenizer is the embedded task's (a small BPE); Qwen's 151k-vocabulary
tokenizer is slower per token, so read the prompt numbers as a lower bound.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core

import numpy as np  # noqa: E402

# CPU time of this thread (user + system, page faults included): what the host work costs one core, not
# what other processes on a shared machine take from it (--wall: wall-clock time instead)
CLOCK = time.thread_time
DEVICE_MS_PER_TOKEN = 100.0 / (8 * 1024)  # the target rate on one H100 (issue 19)
QUESTION = "How many red squares are left of the blue circle? Answer with a number."


def build_prm():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxprm import checkpointing as ck
    from jaxprm.data import synthetic as syn
    from jaxprm.data.preprocess import ImageProcessor
    from jaxprm.models.prm import PRMModel
    from jaxprm.models.qwen2_5_vl import Qwen25VL
    from jaxprm.scoring import PRM

    tok = syn.build_synthetic_tokenizer()
    cfg = syn.tiny_model_config(tok)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: PRMModel(Qwen25VL(cfg), ck.default_spec(tok))))
    state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state)
    ip = ImageProcessor(max_pixels=1024 * 28 * 28)
    return PRM(nnx.merge(graphdef, state), tok, ip)  # the scorer's default buckets, batch size 8


def candidates(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    words = "the red square left of blue circle count total two three four so answer is plus".split()
    out = []
    for _ in range(n):
        steps = []
        for _ in range(8):  # ~1k text tokens per candidate
            steps.append(" ".join(rng.choice(words, size=int(rng.integers(40, 70)))) + ".")
        out.append(steps)
    return out


def one_batch(prm, img, question: str, cands) -> dict:
    """Host phases of scoring ``cands`` of one problem (ms), and the tokens per candidate."""
    from jaxprm.data.prompt import encode_prm_example
    from jaxprm.models.qwen2_5_vl import rope
    from jaxprm.scoring.device import TokenSequence, bucket_size

    cfg, sc = prm.config, prm.scorer
    t0 = CLOCK()
    pv, grid = prm._images(img)
    t1 = CLOCK()
    encs = [encode_prm_example(prm.prompt_tokenizer, question, c, max_length=prm.max_length, mode="score",
                               system_prompt=prm.system_prompt, style=prm.prompt_style, image_grid_thw=grid,
                               merge_size=cfg.vision.spatial_merge_size) for c in cands]
    t2 = CLOCK()
    if hasattr(prm, "_positions"):
        pos = [prm._positions(e.input_ids, grid) for e in encs]
    else:  # older code: get_rope_index per candidate
        pos = [rope.get_rope_index(e.input_ids[None], image_token_id=cfg.image_token_id,
                                   video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision.spatial_merge_size,
                                   image_grid_thw=grid, tokens_per_second=cfg.tokens_per_second)[0][:, 0]
               for e in encs]
    t3 = CLOCK()
    seqs = [TokenSequence(e.input_ids, p, e.label_positions, pv, grid) for e, p in zip(encs, pos)]
    rows = sc.batch_size
    for i in range(0, len(seqs), rows):
        chunk = seqs[i:i + rows]
        sc._pack(chunk, sc._rows(len(chunk)), bucket_size(max(len(s) for s in chunk), sc.length_buckets),
                 sc._patches(chunk[0].num_patches))
    t4 = CLOCK()
    return {"image_ms": (t1 - t0) * 1e3, "prompt_ms": (t2 - t1) * 1e3, "positions_ms": (t3 - t2) * 1e3,
            "pack_ms": (t4 - t3) * 1e3, "tokens": float(np.mean([len(e.input_ids) for e in encs]))}


def run(label: str, repeat: int = 3) -> dict:
    from PIL import Image

    prm = build_prm()
    rows = []
    for side in (448, 896):
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
        for n in (8, 32, 64):
            best = None
            for r in range(repeat):  # a new problem each time: another question and new candidates
                res = one_batch(prm, img, f"{QUESTION} (problem {side}-{n}-{r})",
                                candidates(n, seed=(side * 1000 + n) * 100 + r))
                res["total_ms"] = res["image_ms"] + res["prompt_ms"] + res["positions_ms"] + res["pack_ms"]
                if best is None or res["total_ms"] < best["total_ms"]:
                    best = res
            total, tokens = best["total_ms"], best["tokens"]
            rows.append({"image": side, "candidates": n, "tokens_per_candidate": round(tokens),
                         **{k: round(best[k], 1) for k in ("image_ms", "prompt_ms", "positions_ms", "pack_ms",
                                                           "total_ms")},
                         "ms_per_candidate": round(total / n, 2),
                         # device time of the n candidates' tokens at the target rate
                         "share_of_device_budget": round(total / (DEVICE_MS_PER_TOKEN * n * tokens), 3)})
    return {"mode": label, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="now", help="name of this run in the output (e.g. before / after)")
    ap.add_argument("--repeat", type=int, default=3, help="problems per row; the fastest is reported")
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of this thread's CPU time")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()
    if args.wall:
        global CLOCK
        CLOCK = time.perf_counter
    res = run(args.label, args.repeat)
    print(f"host work per scoring batch ({res['mode']}; {'wall-clock' if args.wall else 'CPU'} time of one core, "
          f"best of {args.repeat}; device budget: "
          f"{DEVICE_MS_PER_TOKEN * 8192:.0f} ms per 8 x 1024 tokens, goal < 10%):")
    print("| image | N | tokens | image ms | prompt ms | positions ms | pack ms | total ms | ms/cand | share of device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['image']} | {r['candidates']} | {r['tokens_per_candidate']} | {r['image_ms']} | {r['prompt_ms']} | "
              f"{r['positions_ms']} | {r['pack_ms']} | {r['total_ms']} | {r['ms_per_candidate']} | "
              f"{r['share_of_device_budget']:.0%} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
