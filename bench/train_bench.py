"""PRM training throughput: jaxprm's train step vs transformers (PyTorch) on the same shapes.

Random weights at the real Qwen2.5-VL shapes, B sequences of ``--seq`` tokens each with one
``--image`` x ``--image`` picture (448 px -> 1024 patches -> 256 image tokens) and ``--steps`` step
labels. One optimizer step = forward + backward + AdamW (lr 1e-5, betas 0.9/0.95, wd 1e-4, clip 1.0)
over the "+"/"-" step loss at the label positions. Reported after warm-up: tokens/s (B*seq per step)
and an MFU estimate (6 x non-embedding decoder params per token, over the device's bf16 peak).

* ``jax``: ``jaxprm.train_step.make_train_step`` jitted with donation, bf16 compute, fp32 master
  weights (``--param-dtype``; bf16 weights are updated with stochastic rounding), ``--remat``
  policy, ``--mu-dtype`` for Adam's first moment, the batch and state sharded over all local
  devices (fsdp) as ``python -m jaxprm.train`` does.
* ``hf`` (``--hf``): ``Qwen2_5_VLForConditionalGeneration`` in bf16 with sdpa attention, gradient
  checkpointing (``--remat != none``), fused AdamW, the same loss on ``model.model`` hidden states
  times the "+"/"-" rows of ``lm_head``.

Reference measured on one H100 80GB: HF transformers 5.17 + torch 2.11 sdpa, 3B, remat, B=4 x 2048
tokens, fused AdamW: 4.7k tokens/s (about 11% MFU); 7B ran out of memory. Target: >= 4x.

On a GPU (``jax[cuda12]``; a CUDA torch for ``--hf``)::

    python bench/train_bench.py --model qwen2.5-vl-3b --batch 4 --seq 2048 --image 448 --remat full --hf
    python bench/train_bench.py --model qwen2.5-vl-7b --batch 4 --seq 2048 --image 448 --remat full \
        --param-dtype bfloat16 --mu-dtype bfloat16   # 7B on one 80 GB card: bf16 weights, stochastic rounding

The HF run goes first and frees its memory before JAX starts. On CPU (a smoke run):
``python bench/train_bench.py --model tiny --batch 2 --seq 256 --image 56 --iters 2``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.score_bench import MODELS, make_inputs, model_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--image", type=int, default=448)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--param-dtype", default="float32", choices=("bfloat16", "float32"))
    p.add_argument("--mu-dtype", default="float32", choices=("bfloat16", "float32"))
    p.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch", "save_out"))
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--iters", type=int, default=5, help="timed steps after 2 warm-up steps")
    p.add_argument("--hf", action="store_true", help="also time transformers on the same shapes")
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


def _labels(batch, steps, seed=0):
    return np.random.default_rng(seed).integers(0, 2, (batch, steps)).astype(np.int32)


def make_batch(cfg, inp) -> dict:
    """The pipeline's batch format (per-row vision arrays) for ``score_bench.make_inputs`` output."""
    from jaxprm.models.qwen2_5_vl import rope

    b, l = inp["input_ids"].shape
    batch = {"input_ids": inp["input_ids"], "position_ids": inp["position_ids"],
             "segment_ids": np.ones((b, l), np.int32),
             "label_positions": np.broadcast_to(inp["label_positions"], (b, len(inp["label_positions"]))).astype(np.int32),
             "labels": _labels(b, len(inp["label_positions"]))}
    if inp["pixel_values"] is not None:
        v = cfg.vision
        lay = rope.vision_layout(inp["grid"][None], merge=v.spatial_merge_size, window_size=v.window_size,
                                 patch_size=v.patch_size).as_dict()
        batch["pixel_values"] = inp["pixel_values"].astype(np.float32)
        batch.update({k: np.repeat(a[None], b, 0) for k, a in lay.items()})
    return batch


def bench_hf(cfg, inp, args) -> dict:
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(dev):
        model = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).to(dt)
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4,
                            fused=dev == "cuda")
    ids = torch.tensor(inp["input_ids"], device=dev)
    b, l = ids.shape
    kw = {}
    if inp["pixel_values"] is not None:
        kw = dict(pixel_values=torch.tensor(inp["pixel_values"].reshape(-1, inp["pixel_values"].shape[-1]), device=dev, dtype=dt),
                  image_grid_thw=torch.tensor(np.repeat(inp["grid"][None], b, 0), device=dev),
                  mm_token_type_ids=(ids == cfg.image_token_id).int())
    lp = torch.tensor(inp["label_positions"], device=dev)[None].expand(b, -1)
    labels = torch.tensor(_labels(b, lp.shape[1]), device=dev)
    rows = torch.tensor([10, 11], device=dev)

    def step():
        h = model.model(input_ids=ids, **kw).last_hidden_state
        h = torch.gather(h, 1, lp[..., None].expand(-1, -1, h.shape[-1]))
        logits = (h @ model.lm_head.weight[rows].T).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), (1 - labels).reshape(-1).long())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    sec = (time.perf_counter() - t) / args.iters
    out = {"device": dev, "step_s": sec, "tokens_per_s": b * l / sec}
    if dev == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def bench_jax(cfg, inp, args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxprm import sharding as shd
    from jaxprm.models.prm import PRMModel, PRMSpec
    from jaxprm.models.qwen2_5_vl import Qwen25VL
    from jaxprm.optim import make_optimizer
    from jaxprm.metrics import estimate_flops_per_token, peak_flops
    from jaxprm.train_step import init_train_state, jit_train_step, make_train_step, split_params

    if args.batch % jax.device_count():
        raise SystemExit(f"--batch {args.batch} must be divisible by the {jax.device_count()} devices (fsdp mesh)")
    mesh = shd.make_mesh(data=1, fsdp=-1, tensor=1)
    spec = PRMSpec(plus_id=10, minus_id=11)
    dtype, param_dtype = jnp.dtype(args.dtype), jnp.dtype(args.param_dtype)
    build = lambda: PRMModel(Qwen25VL(cfg, dtype=dtype, param_dtype=param_dtype,  # noqa: E731
                                      attn_impl=args.attn_impl, remat_policy=args.remat), spec)
    abstract = nnx.eval_shape(build)
    sh = shd.param_shardings(nnx.state(abstract, nnx.Param), mesh)
    params = jax.jit(lambda: nnx.state(build(), nnx.Param), out_shardings=sh)()
    nnx.update(abstract, params)
    graphdef, trainable, frozen = split_params(abstract, False)
    opt, _ = make_optimizer(lr=1e-5, total_steps=1000, warmup_ratio=0.0, b1=0.9, b2=0.95, weight_decay=1e-4,
                            clip=1.0, mu_dtype=args.mu_dtype)
    state, state_sh = init_train_state(trainable, frozen, opt, mesh)
    step = jit_train_step(make_train_step(graphdef, opt, accum=args.grad_accum), state_sh)

    batch = make_batch(cfg, inp)
    b, l = inp["input_ids"].shape
    batch = shd.shard_batch(batch, mesh)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state, m = step(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(args.iters):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    sec = (time.perf_counter() - t) / args.iters
    out = {"device": jax.devices()[0].device_kind, "n_devices": jax.device_count(), "step_s": sec,
           "tokens_per_s": b * l / sec, "compile_s": compile_s, "loss": float(m["loss"])}
    peak = peak_flops()
    if peak:
        out["mfu"] = estimate_flops_per_token(cfg) * out["tokens_per_s"] / peak
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["peak_mem_gb"] = stats["peak_bytes_in_use"] / 2**30
    except Exception:
        pass
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = model_config(args.model)
    inp = make_inputs(cfg, args.batch, args.seq, args.image, args.steps)
    res = {"args": vars(args)}
    if args.hf:
        res["hf"] = bench_hf(cfg, inp, args)
        print(f"hf : {res['hf']['tokens_per_s']:.0f} tokens/s  ({res['hf']['step_s'] * 1e3:.1f} ms/step)")
    res["jax"] = bench_jax(cfg, inp, args)
    j = res["jax"]
    print(f"jax: {j['tokens_per_s']:.0f} tokens/s  ({j['step_s'] * 1e3:.1f} ms/step, compile {j['compile_s']:.1f}s"
          + (f", MFU {j['mfu']:.1%}" if "mfu" in j else "") + ")")
    if args.hf:
        res["speedup"] = j["tokens_per_s"] / res["hf"]["tokens_per_s"]
        print(f"speed-up jax/hf: {res['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
