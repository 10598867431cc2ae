"""PRM scoring throughput: the jitted jaxprm scorer vs transformers (PyTorch) on the same shapes.

Random weights at the real Qwen2.5-VL shapes (``jaxprm.models.qwen2_5_vl.presets``), B sequences of
``--seq`` tokens, each with one ``--image`` x ``--image`` picture (448 -> 1024 patches -> 256 image
tokens) and ``--steps`` step-label positions. Timed: the PRM scoring forward (vision tower, decoder,
the 2-row "+"/"-" step head; never the full-vocabulary logits) after warm-up, with
``jax.block_until_ready`` / ``torch.cuda.synchronize``. Reported: tokens/s (B*seq per forward) and
candidates/s (B per forward), for

* ``jax forward``: the jitted function on device-resident inputs (what the HF number measures too);
* ``jax end-to-end``: ``Scorer.score_sequences`` from host numpy arrays (padding, layouts, transfer,
  reading the probabilities back);
* ``jax shared-prefix`` (``--shared-prefix K``): the same B rows as N candidates of one problem whose
  first K tokens (system prompt + image + question) are run once and shared (``PRM.score_candidates``'s
  path); candidates/s counts the prefix run;
* ``hf`` (``--hf``): ``Qwen2_5_VLForConditionalGeneration`` with sdpa attention, same dtype and
  inputs (``mm_token_type_ids`` given, so it computes the 3D positions), under ``torch.no_grad``, on
  CUDA when available; hidden states from ``model.model`` times the "+"/"-" rows of ``lm_head``
  (``--hf-full-logits``: the plain ``model(...)`` call with full-vocabulary logits, as a user would).

Reference (one H100, HF sdpa bf16, B=8 x 1024 tokens, 448x448 image): 3B 28.0k tokens/s, 7B 19.3k
tokens/s. Target: >= 3x.

Running on a GPU (needs ``jax[cuda12]`` and a CUDA torch for ``--hf``)::

    python bench/score_bench.py --model qwen2.5-vl-3b --batch 8 --seq 1024 --image 448 --dtype bfloat16 --hf
    python bench/score_bench.py --model qwen2.5-vl-7b --batch 8 --seq 1024 --image 448 --dtype bfloat16 --hf
    python bench/score_bench.py --model qwen2.5-vl-7b --batch 32 --seq 1024 --shared-prefix 640  # BoN-style

The HF model is built, timed and freed first, then JAX starts (JAX would otherwise preallocate 75%
of the GPU memory). ``XLA_PYTHON_CLIENT_MEM_FRACTION`` / ``XLA_PYTHON_CLIENT_PREALLOCATE`` are
respected. On CPU: ``python bench/score_bench.py --model tiny --batch 2 --seq 256 --image 112``.
``--json PATH`` writes the results.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = ("tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence, image tokens included")
    p.add_argument("--image", type=int, default=448, help="square image side in pixels (0: text only)")
    p.add_argument("--steps", type=int, default=8, help="step-label positions per sequence")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attn-impl", default="auto", choices=("auto", "xla", "cudnn", "splash"))
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="also time the shared-prefix path with this many prefix tokens (0: skip)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end (host inputs) timing")
    p.add_argument("--hf", action="store_true", help="also time transformers (PyTorch)")
    p.add_argument("--hf-full-logits", action="store_true", help="HF: plain model(...) with full-vocab logits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    for k in ("batch", "seq", "iters", "steps"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1")
    if args.image < 0 or args.warmup < 0 or args.shared_prefix < 0:
        p.error("--image, --warmup and --shared-prefix must be >= 0")
    return args


# ------------------------------------------------------------------------------------------------
# shapes and inputs (numpy only, shared by both frameworks)
# ------------------------------------------------------------------------------------------------
def model_config(name: str):
    if name == "tiny":
        from jaxprm.data.synthetic import build_synthetic_tokenizer, tiny_model_config

        return tiny_model_config(build_synthetic_tokenizer())
    from jaxprm.models.qwen2_5_vl.presets import preset

    return preset(name)


def make_inputs(cfg, batch: int, seq: int, image: int, steps: int, seed: int = 0) -> dict:
    """Token ids, 3D positions, patches and label positions of B synthetic PRM sequences."""
    from jaxprm.data.preprocess import ImageProcessor
    from jaxprm.models.qwen2_5_vl import rope

    v = cfg.vision
    rng = np.random.default_rng(seed)
    if image:
        ip = ImageProcessor(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                            merge_size=v.spatial_merge_size, max_pixels=max(image * image, 56 * 56))
        grid = ip.grid_thw(image, image)
        n_img = int(grid.prod()) // v.spatial_merge_size**2
    else:
        grid, n_img = None, 0
    head = 16  # system-prompt-like text before the image
    body = seq - head - (n_img + 2 if image else 0)
    if body < steps + 1:
        raise ValueError(f"--seq {seq} too short for a {image}px image ({n_img} tokens) and {steps} steps")
    vocab_hi = min(cfg.text.vocab_size, 150000)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    ids = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        row = rng.integers(0, vocab_hi, seq)
        while np.isin(row, list(special)).any():
            bad = np.isin(row, list(special))
            row[bad] = rng.integers(0, vocab_hi, int(bad.sum()))
        if image:
            row[head] = cfg.vision_start_token_id
            row[head + 1: head + 1 + n_img] = cfg.image_token_id
            row[head + 1 + n_img] = cfg.vision_end_token_id
        ids[b] = row
    start = seq - body
    labels = np.linspace(start + (body // steps) - 1, seq - 1, steps).astype(np.int64)
    grids = None if grid is None else np.repeat(grid[None], batch, 0)
    pos, _ = rope.get_rope_index(ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                                 spatial_merge_size=v.spatial_merge_size, image_grid_thw=grids,
                                 tokens_per_second=cfg.tokens_per_second)
    n_patch = 0 if grid is None else int(grid.prod())
    pv = rng.standard_normal((batch, n_patch, v.patch_dim)).astype(np.float32) if n_patch else None
    return {"input_ids": ids, "position_ids": pos.astype(np.int32), "grid": grid, "pixel_values": pv,
            "label_positions": labels, "num_patches": n_patch, "image_tokens": n_img,
            "prefix_min": start}


def _rate(batch, seq, seconds) -> dict:
    return {"seconds": seconds, "tokens_per_s": batch * seq / seconds, "candidates_per_s": batch / seconds}


# ------------------------------------------------------------------------------------------------
# transformers
# ------------------------------------------------------------------------------------------------
def bench_hf(cfg, inp: dict, args, plus_minus=(10, 11)) -> dict:
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
    torch.manual_seed(args.seed)
    with torch.device(dev):
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
            hf_cfg, attn_implementation="sdpa", dtype=tdt).eval()
    b, seq = inp["input_ids"].shape
    ids = torch.tensor(inp["input_ids"], dtype=torch.long, device=dev)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
              mm_token_type_ids=(ids == cfg.image_token_id).int())
    if inp["pixel_values"] is not None:
        kw["pixel_values"] = torch.tensor(inp["pixel_values"].reshape(-1, inp["pixel_values"].shape[-1]),
                                          dtype=tdt, device=dev)
        kw["image_grid_thw"] = torch.tensor(np.repeat(inp["grid"][None], b, 0), device=dev)
    labels = torch.tensor(inp["label_positions"], device=dev)
    rows = model.lm_head.weight[list(plus_minus)]  # (2, D)

    def run():
        with torch.no_grad():
            if args.hf_full_logits:
                logits = model(**kw).logits[:, labels][..., list(plus_minus)]
            else:
                h = model.model(**kw).last_hidden_state[:, labels]
                logits = h @ rows.T
            return torch.softmax(logits.float(), -1)[..., 0]

    for _ in range(max(args.warmup, 1)):
        run()
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.iters):
        out = run()
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / args.iters
    res = {"device": dev, **_rate(b, seq, dt), "probs_sample": out[0, :3].float().cpu().tolist()}
    del model, kw, out, rows
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------------
# jaxprm
# ------------------------------------------------------------------------------------------------
def random_backbone(cfg, dtype, attn_impl: str = "auto", seed: int = 0, host_limit: int = 50_000_000):
    """A Qwen25VL with random weights stored in ``dtype`` (bf16 for the real sizes: 2 bytes/param).

    The module is built abstractly (``nnx.eval_shape``), then each parameter is drawn on its own:
    on the host with numpy for small models (no per-shape XLA compiles), on the device with one small
    jitted generator per shape otherwise (no float32 copy of the whole model anywhere). Kernels
    N(0, 0.02), norm weights 1 + N(0, 0.02), biases N(0, 0.02)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxprm.models.qwen2_5_vl import Qwen25VL

    abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=dtype, param_dtype=dtype, attn_impl=attn_impl,
                                                rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(state.flat_state())
    total = sum(math.prod(v.shape) for _, v in flat)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def draw(k, shape, dt, base):
        return (base + 0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dt)

    new = {}
    for i, (path, var) in enumerate(flat):
        name = "/".join(str(p) for p in path)
        base = 1.0 if ("norm" in name or "ln_q" in name) else 0.0
        if total < host_limit:
            arr = jnp.asarray((base + 0.02 * rng.standard_normal(var.shape, np.float32)), dtype=var.dtype)
        else:
            arr = draw(jax.random.fold_in(key, i), tuple(var.shape), jnp.dtype(var.dtype), base)
        new[path] = var.replace(arr)
    return nnx.merge(graphdef, nnx.State.from_flat_path(new))


def bench_jax(cfg, inp: dict, args) -> dict:
    import jax
    from flax import nnx

    from jaxprm.models.prm import PRMModel, PRMSpec
    from jaxprm.scoring.device import Scorer, TokenSequence
    from jaxprm.dtypes import jax_float_type

    dt = jax_float_type(args.dtype)
    t0 = time.perf_counter()
    backbone = random_backbone(cfg, dt, args.attn_impl, args.seed)
    model = PRMModel(backbone, PRMSpec(plus_id=10, minus_id=11))
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - t0
    b, seq = inp["input_ids"].shape
    n_patch = inp["num_patches"]
    scorer = Scorer(model, batch_size=b, batch_buckets=(b,), length_buckets=(seq,),
                    patch_buckets=(max(n_patch, cfg.vision.spatial_merge_size**2),))
    seqs = [TokenSequence(inp["input_ids"][i], inp["position_ids"][:, i], inp["label_positions"],
                          None if inp["pixel_values"] is None else inp["pixel_values"][i],
                          None if inp["grid"] is None else inp["grid"][None]) for i in range(b)]
    pb = scorer._patches(n_patch)
    batch = jax.device_put(scorer._pack(seqs, b, seq, pb))
    fn = scorer._fns.full
    t0 = time.perf_counter()
    jax.block_until_ready(fn(scorer.state, batch))
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        jax.block_until_ready(fn(scorer.state, batch))
    t0 = time.perf_counter()
    outs = [fn(scorer.state, batch) for _ in range(args.iters)]
    jax.block_until_ready(outs)
    fwd = (time.perf_counter() - t0) / args.iters
    probs = np.asarray(outs[-1])[:, inp["label_positions"]]
    res = {"device": str(jax.devices()[0]), "init_s": init_s, "compile_s": compile_s,
           "forward": _rate(b, seq, fwd), "probs_sample": probs[0, :3].tolist(),
           "traces": scorer.trace_counts}
    if not np.isfinite(probs).all():
        raise RuntimeError("non-finite probabilities from the jax scorer")

    if not args.no_e2e:
        scorer.score_sequences(seqs)  # same bucket: no compile
        t0 = time.perf_counter()
        for _ in range(args.iters):
            scorer.score_sequences(seqs)
        res["end_to_end"] = _rate(b, seq, (time.perf_counter() - t0) / args.iters)

    k = args.shared_prefix
    if k:
        if not inp["prefix_min"] <= k < int(inp["label_positions"][0]) + 1:
            raise ValueError(f"--shared-prefix must lie in [{inp['prefix_min']}, {int(inp['label_positions'][0])}] "
                             "(after the image, before the first label)")
        ids0, pos0 = inp["input_ids"][0], inp["position_ids"][:, 0]
        prefix = TokenSequence(ids0[:k], pos0[:, :k], [], None if inp["pixel_values"] is None else
                               inp["pixel_values"][0], None if inp["grid"] is None else inp["grid"][None])
        # N candidates of one problem: same prefix (row 0's), own continuations (rows' tails)
        suffixes = [TokenSequence(inp["input_ids"][i, k:], pos0[:, k:], inp["label_positions"] - k) for i in range(b)]
        sh = Scorer(model, batch_size=b, batch_buckets=(b,), prefix_buckets=(k,), suffix_buckets=(seq - k,),
                    patch_buckets=scorer.patch_buckets)
        t0 = time.perf_counter()
        sh.score_shared(prefix, suffixes)
        res["shared_compile_s"] = time.perf_counter() - t0
        for _ in range(args.warmup):
            sh.score_shared(prefix, suffixes)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            sh.score_shared(prefix, suffixes)
        res["shared_prefix"] = {"prefix_tokens": k, **_rate(b, seq, (time.perf_counter() - t0) / args.iters)}
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = model_config(args.model)
    inp = make_inputs(cfg, args.batch, args.seq, args.image, args.steps, args.seed)
    results = {"model": args.model, "batch": args.batch, "seq": args.seq, "image": args.image,
               "image_tokens": inp["image_tokens"], "patches_per_row": inp["num_patches"], "dtype": args.dtype}
    print(f"{args.model}: B={args.batch} x {args.seq} tokens ({inp['image_tokens']} image tokens, "
          f"{inp['num_patches']} patches per row), {args.dtype}", flush=True)
    if args.hf:  # first, so that JAX's preallocation does not starve PyTorch
        results["hf"] = bench_hf(cfg, inp, args)
        h = results["hf"]
        print(f"  hf ({h['device']}, sdpa):      {h['tokens_per_s']:12.1f} tokens/s  "
              f"{h['candidates_per_s']:9.2f} candidates/s", flush=True)
    j = bench_jax(cfg, inp, args)
    results["jax"] = j
    f = j["forward"]
    print(f"  jax forward ({j['device']}): {f['tokens_per_s']:12.1f} tokens/s  {f['candidates_per_s']:9.2f} "
          f"candidates/s   (init {j['init_s']:.1f}s, compile {j['compile_s']:.1f}s)", flush=True)
    if "end_to_end" in j:
        e = j["end_to_end"]
        print(f"  jax end-to-end:          {e['tokens_per_s']:12.1f} tokens/s  {e['candidates_per_s']:9.2f} candidates/s")
    if "shared_prefix" in j:
        s = j["shared_prefix"]
        print(f"  jax shared prefix ({s['prefix_tokens']} tok): {s['tokens_per_s']:12.1f} tokens/s  "
              f"{s['candidates_per_s']:9.2f} candidates/s")
    if args.hf:
        results["speedup_forward"] = f["tokens_per_s"] / results["hf"]["tokens_per_s"]
        msg = f"  speedup vs hf: forward {results['speedup_forward']:.2f}x"
        if "end_to_end" in j:
            results["speedup_end_to_end"] = j["end_to_end"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
            msg += f", end-to-end {results['speedup_end_to_end']:.2f}x"
        print(msg, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
