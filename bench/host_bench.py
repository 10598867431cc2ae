"""Host-side cost of one scoring batch, by phase, against the device budget (issue 19 item 1).

    python bench/host_bench.py                 # the current code
    python bench/host_bench.py --before        # the prompt located prefix by prefix, images per item

For best-of-N style batches (8/32/64 candidates of one problem, 448x448 and 896x896 images, ~1k
tokens per candidate) it times, on one CPU core, what ``PRM.score_batch`` does before the device
runs: image preprocessing, prompt encoding (chat template, tokenization, label positions), 3D
positions, and packing into the padded bucket arrays. The device budget is the issue's: a batch of 8
x 1024 tokens at the target rate on one H100 takes ~100 ms, so the host must stay under 10% of that
(~1.2 ms per 1k-token candidate). The tokenizer is the embedded task's (a small BPE); Qwen's 151k-
vocabulary tokenizer is slower per token, so read the prompt numbers as a lower bound.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import numpy as np  # noqa: E402


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
    return PRM(nnx.merge(graphdef, state), tok, ip, length_buckets=(4096,), patch_buckets=(1024, 4096))


def candidates(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    words = "the red square left of blue circle count total two three four so answer is plus".split()
    out = []
    for _ in range(n):
        steps = []
        for _ in range(8):  # ~1k tokens per candidate with the image
            steps.append(" ".join(rng.choice(words, size=int(rng.integers(40, 70)))) + ".")
        out.append(steps)
    return out


def timed(fn, repeat: int = 3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, out


def run(before: bool) -> dict:
    from PIL import Image

    import jaxprm.data.prompt as P
    from jaxprm.models.qwen2_5_vl import rope
    from jaxprm.scoring.device import TokenSequence

    if before:
        P._label_spans_marked = lambda *a: None
    prm = build_prm()
    cfg = prm.config
    rows = []
    for side in (448, 896):
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
        for n in (8, 32, 64):
            cands = candidates(n, seed=n)
            q = "How many red squares are left of the blue circle? Answer with a number."
            per_item = n if before else 1  # score_batch preprocessed the image once per item before
            t_img, (pv, grid) = timed(lambda: [prm._images(img) for _ in range(per_item)][-1])
            t_enc, encs = timed(lambda: [P.encode_prm_example(prm.tokenizer, q, c, image_grid_thw=grid,
                                                              style=prm.prompt_style,
                                                              system_prompt=prm.system_prompt) for c in cands])
            t_pos, _ = timed(lambda: [rope.get_rope_index(e.input_ids[None].astype(np.int32),
                                                          image_token_id=cfg.image_token_id,
                                                          video_token_id=cfg.video_token_id,
                                                          spatial_merge_size=cfg.vision.spatial_merge_size,
                                                          image_grid_thw=grid,
                                                          tokens_per_second=cfg.tokens_per_second) for e in encs])
            e_all = [prm._encode(pv, grid, q, c) for c in cands]
            seqs = [TokenSequence(e.input_ids, e.position_ids, e.label_positions, e.pixel_values, e.grid)
                    for e in e_all]
            sc = prm.scorer
            length = max(len(s) for s in seqs)
            t_pack, _ = timed(lambda: [sc._pack(seqs[i:i + 8], 8, 4096, 4096) for i in range(0, n, 8)])
            tokens = float(np.mean([len(e.input_ids) for e in e_all]))
            total = t_img + t_enc + t_pos + t_pack
            rows.append({"image": side, "candidates": n, "tokens_per_candidate": round(tokens),
                         "image_ms": round(t_img, 1), "prompt_ms": round(t_enc, 1), "positions_ms": round(t_pos, 1),
                         "pack_ms": round(t_pack, 1), "total_ms": round(total, 1),
                         "ms_per_candidate": round(total / n, 2),
                         # device time of n candidates at the target rate: 100 ms per 8 x 1024 tokens
                         "share_of_device_budget": round(total / (100.0 * n * tokens / (8 * 1024)), 3),
                         "max_length": length})
    return {"mode": "before" if before else "after", "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", action="store_true", help="time the old paths (prefix-by-prefix prompt, "
                                                          "image per candidate)")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()
    res = run(args.before)
    print(f"host work per scoring batch ({res['mode']}; one CPU core, best of 3):")
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
