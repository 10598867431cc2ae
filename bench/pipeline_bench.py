"""Training input pipeline: examples/s per worker process and packing efficiency on VL-PRM300K-shaped
data (issue 19 item 2).

    python bench/pipeline_bench.py             # ~1-2 minutes on one core
    python bench/pipeline_bench.py --quick     # the smoke test's size (~20 s)

What it measures:

(a) examples/s of ONE worker process (one thread) for the real path of ``make_loader``: read the
    TFDS ArrayRecord record, decode the PNG (Pillow), resize (bicubic), rescale + normalise + patchify
    (``ImageProcessor``), tokenize the prompt (``encode_prm_example``), 3D M-RoPE positions
    (``get_rope_index``), then pack into the batch arrays (``BatchAssembler``), with the time of each
    phase. The records are written with ``tfds_builder.build_dataset`` and read back through
    ``ExampleTransform``, so the numbers include everything a worker does.
(b) packing efficiency (real tokens / B*L, real patches / B*P, used label slots / B*S) of the
    batches ``make_loader`` builds: the old 3B defaults (64 rows on one host, buckets (2048, 4096) x
    (4096, 16384), one example per row, and ``packing=True`` first-fit) against
    ``configs/qwen2_5_vl_3b.py``'s current data settings (lookahead packing, 32 rows of ~2 examples).
    Sizes come from the same prompt encoding and image grids as (a) (checked against ``ExampleTransform``
    on the records of (a)), for a few thousand examples, through ``pipeline.simulate_packing`` (the
    loader's own ``BatchIterator``, without pixels).
(c) how many such workers keep one chip fed: a 3B train step at 45% MFU (model FLOPs = 6 x N x real
    tokens, N = 3.1e9 parameters, vision tower included and counted per LM token as the issue says)
    consumes 0.45 * peak / (6 N) real tokens/s: ~23.9k on an H100 (989 TFLOP/s dense bf16), ~11.1k on a
    TPU v5p chip (459); divided by the mean real tokens per example, that is the examples/s the
    pipeline must deliver per chip.

The synthetic records ("VL-PRM300K-shaped"; the release itself is not on this machine, so these are
assumptions, stated here and in the output):
  - one image per record; its merged image-token count lies in 256..1280, the pixel range Qwen2.5-VL's
    model card recommends and VL-PRM-style training uses (min_pixels = 256*28*28, max_pixels =
    1280*28*28: 1024..5120 patches). The original pixel area is drawn log-uniformly from 200 to 1600
    tokens' worth (so ~15% hit the 1280 cap and ~5% are scaled up to 256), aspect ratio log-uniform in
    [1/2, 2]; content: a flat background with filled shapes, lines and text-like bars (a chart or
    diagram, as most VL-PRM300K images are), PNG-encoded so decoding costs what it does on such images;
  - steps: VL-PRM's solutions have up to 12 "[Visual Elements]" and 12 "[Reasoning]" steps
    (``configs/synth_vlprm.py``: max_steps_per_section=12), so 2..12 of each: 4..24 steps;
    a step has 12..60 words (GPT-4.1 step lines), the question 10..80 words; words are drawn from the
    embedded task's corpus, which its small BPE tokenizer (``jaxprm.data.synthetic``) encodes at ~1.3
    tokens per word. Qwen's 151k-vocabulary tokenizer is slower per token, so read the prompt time as a
    lower bound;
  - labels: "+" up to a first error (at a random step in half the records), "-" there, none after.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import numpy as np  # noqa: E402

MIN_TOKENS, MAX_TOKENS = 256, 1280  # merged image tokens (x4 patches)
PEAK_TFLOPS = {"H100": 989.0, "TPU v5p": 459.0}
MFU = 0.45
N_PARAMS = 3.1e9  # Qwen2.5-VL-3B incl. the vision tower


def _words():
    from jaxprm.data.synthetic import tokenizer_corpus

    return sorted({w for line in tokenizer_corpus() for w in line.split() if w.isalpha()})


def make_specs(n: int, seed: int) -> list[dict]:
    """Record specs (image size, question, steps, labels) of the distribution in the docstring."""
    rng = np.random.default_rng(seed)
    words = _words()
    specs = []
    for i in range(n):
        area = math.exp(rng.uniform(math.log(200), math.log(1600))) * 28 * 28
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        h, w = max(28, int(math.sqrt(area / aspect))), max(28, int(math.sqrt(area * aspect)))
        n_steps = int(rng.integers(2, 13)) + int(rng.integers(2, 13))
        steps = [" ".join(rng.choice(words, int(rng.integers(12, 61)))) for _ in range(n_steps)]
        err = int(rng.integers(0, n_steps)) if rng.random() < 0.5 else None
        labels = [1 if err is None or j < err else (0 if j == err else None) for j in range(n_steps)]
        question = " ".join(rng.choice(words, int(rng.integers(10, 81)))) + "?"
        specs.append({"id": f"bench-{seed}-{i:06d}", "hw": (h, w), "question": question, "steps": steps,
                      "labels": labels, "seed": int(rng.integers(2**31))})
    return specs


def render(h: int, w: int, seed: int) -> bytes:
    """A chart/diagram-like PNG: flat background, filled shapes, lines, text-like bars."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(8, 24))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, max(11, w // 3))), y0 + int(rng.integers(10, max(11, h // 3)))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            d.rectangle((x0, y0, x1, y1), fill=col)
        elif kind == 1:
            d.ellipse((x0, y0, x1, y1), fill=col)
        else:
            d.line((x0, y0, x1, y1), fill=col, width=int(rng.integers(1, 5)))
    for _ in range(int(rng.integers(5, 30))):  # "text": short dark bars
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.rectangle((x0, y0, x0 + int(rng.integers(5, 60)), y0 + 6), fill=(30, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def to_record(spec: dict):
    from jaxprm.data.schema import Record, Step

    steps = [Step(text=t, kind="perception" if j < len(spec["steps"]) // 2 else "reasoning", label=lab)
             for j, (t, lab) in enumerate(zip(spec["steps"], spec["labels"]))]
    return Record(id=spec["id"], question=spec["question"], steps=steps, images=[render(*spec["hw"], spec["seed"])],
                  answer="1", source="bench").validate()


def image_processor():
    from jaxprm.data.preprocess import ImageProcessor

    return ImageProcessor(min_pixels=MIN_TOKENS * 28 * 28, max_pixels=MAX_TOKENS * 28 * 28)


def spec_sizes(specs, tok, ip, cfg) -> np.ndarray:
    """(tokens, patches, steps, images) of each spec's example as ``ExampleTransform`` encodes it."""
    from jaxprm.data.prompt import encode_prm_example

    out = []
    for s in specs:
        g = ip.grid_thw(*s["hw"])[None]
        steps = s["steps"][: cfg.max_steps]
        enc = encode_prm_example(tok, s["question"], steps, s["labels"][: len(steps)], image_grid_thw=g,
                                 max_length=cfg.effective_max_length, mode=cfg.label_mode,
                                 style=cfg.prompt_style)
        out.append((len(enc.input_ids), int(g.prod()), len(enc.labels), 1))
    return np.array(out, np.int64)


# ------------------------------------------------------------------------------------------------
def bench_worker(n: int, seed: int, dtypes, tok, mc, reps: int = 1) -> dict:
    """(a): one process, one thread, the loader's per-example path and the packing, timed by phase; best
    of ``reps`` (the dev machine is shared), the pixel dtypes interleaved."""
    import dataclasses

    from PIL import Image

    from jaxprm.data import pipeline as pl
    from jaxprm.data import tfds_builder as tb
    from jaxprm.data.prompt import encode_prm_example
    from jaxprm.data.tfds_builder import data_source, example_to_record
    from jaxprm.models.qwen2_5_vl.rope import get_rope_index

    specs = make_specs(n, seed)
    recs = [to_record(s) for s in specs]
    ip = image_processor()
    # the 3B config's rows and buckets, 8 rows per batch (the pack cost per example is the same at 64)
    base = dataclasses.replace(packing_configs()[-1][1], batch_size=8, pack_buffer=0)
    best = {dt: {"total": float("inf"), "pack": float("inf")} for dt in dtypes}
    phases = dict.fromkeys(("read", "decode_png", "resize_normalise_patchify", "prompt", "positions"), float("inf"))
    with tempfile.TemporaryDirectory() as d:
        src = data_source(tb.build_dataset(recs, d, progress=False), "train")
        order = list(range(len(src)))
        for rep in range(reps):
            for dt in dtypes:
                cfg = dataclasses.replace(base, pixel_dtype=dt)
                tf = pl.ExampleTransform(src, tok, ip, mc, cfg)
                tf(order[0])  # warm caches (tokenizer, templates)
                t0 = time.perf_counter()
                exs = [tf(i) for i in order]
                best[dt]["total"] = min(best[dt]["total"], time.perf_counter() - t0)
                bad = [e for e in exs if "skip" in e]
                if bad:
                    raise RuntimeError(f"bench records were skipped: {bad[:3]}")
                # pack: rows planned by the lookahead packer, then the batch arrays
                sizes = np.array([(len(e["input_ids"]), len(e["pixel_values"]), len(e["labels"]), 1) for e in exs])
                asm = pl.BatchAssembler(cfg, mc, 0)
                t = time.perf_counter()
                left = list(range(len(exs)))
                while left:
                    plan = pl.plan_batch(sizes[left], np.zeros(len(left), bool), cfg)
                    rows = []
                    for r in plan:
                        row = pl._Row()
                        for j in r:
                            row.add(exs[left[j]])
                        rows.append(row)
                    asm(rows)
                    used = {left[j] for r in plan for j in r}
                    left = [i for i in left if i not in used]
                best[dt]["pack"] = min(best[dt]["pack"], time.perf_counter() - t)
                best[dt]["sizes"] = sizes
                best[dt]["exs"] = {e["id"]: (len(e["input_ids"]), len(e["pixel_values"]), len(e["labels"]), 1) for e in exs}
            acc = dict.fromkeys(phases, 0.0)
            for i in order:  # the same work again, phase by phase
                t = time.perf_counter()
                rec = example_to_record(src[i])
                t1 = time.perf_counter()
                np.asarray(Image.open(io.BytesIO(rec.images[0])).convert("RGB"))
                t2 = time.perf_counter()
                vis = ip(rec.images)
                t3 = time.perf_counter()
                g = np.asarray(vis["image_grid_thw"]).reshape(-1, 3)
                enc = encode_prm_example(tok, rec.question, [s.text for s in rec.steps], [s.label for s in rec.steps],
                                         image_grid_thw=g, max_length=base.effective_max_length, mode="train",
                                         style=base.prompt_style)
                t4 = time.perf_counter()
                get_rope_index(np.asarray(enc.input_ids)[None], image_token_id=mc.image_token_id,
                               video_token_id=mc.video_token_id, image_grid_thw=g)
                t5 = time.perf_counter()
                acc["read"] += t1 - t
                acc["decode_png"] += t2 - t1
                acc["resize_normalise_patchify"] += (t3 - t2) - (t2 - t1)  # ip() decodes again
                acc["prompt"] += t4 - t3
                acc["positions"] += t5 - t4
            phases = {k: min(v, acc[k]) for k, v in phases.items()}
    want = spec_sizes(specs, tok, ip, base)
    out = {}
    for dt, r in best.items():
        mismatch = [s["id"] for s, w in zip(specs, want) if tuple(w) != r["exs"][s["id"]]]
        if mismatch:
            raise RuntimeError(f"spec_sizes disagrees with ExampleTransform on {mismatch[:3]}")
        per_ex = (r["total"] + r["pack"]) / n
        ph = {k: 1e3 * v / n for k, v in phases.items()}
        ph["other (record checks, pixel cast, ...)"] = max(0.0, 1e3 * r["total"] / n - sum(ph.values()))
        ph["pack"] = 1e3 * r["pack"] / n
        out[dt] = {"examples": n, "pixel_dtype": dt, "examples_per_s": 1.0 / per_ex, "ms_per_example": 1e3 * per_ex,
                   "phase_ms_per_example": ph, "mean_patches": float(r["sizes"][:, 1].mean()),
                   "mean_tokens": float(r["sizes"][:, 0].mean())}
    return out


def packing_configs():
    """(name, PipelineConfig) of the old behaviour and the 3B config's current data settings."""
    import dataclasses

    from configs import qwen2_5_vl_3b
    from jaxprm.train import pipeline_config

    c = qwen2_5_vl_3b.get_config()
    new = dataclasses.replace(pipeline_config(c, train=True, seed=0), worker_count=0, shard_index=0, shard_count=1,
                              label_mode="train")
    # the 3B config before lookahead packing: 64 rows of one example each, its buckets, fp32 pixels
    old = dataclasses.replace(new, batch_size=64, seq_buckets=(2048, 4096), patch_buckets=(4096, 16384), max_steps=32,
                              packing=False, pack_buffer=0, pixel_dtype="float32")
    return [("before: one example per row", old),
            ("before: packing=True (first-fit)", dataclasses.replace(old, packing=True)),
            ("now: configs/qwen2_5_vl_3b.py", new)]


def bench_packing(n: int, seed: int, tok) -> list[dict]:
    """(b): the efficiencies of each config's batches on ``n`` examples."""
    from jaxprm.data import pipeline as pl

    ip = image_processor()
    specs = make_specs(n, seed)
    out = []
    for name, cfg in packing_configs():
        sizes = spec_sizes(specs, tok, ip, cfg)
        t = time.perf_counter()
        batches, st = pl.simulate_packing(sizes, cfg)
        dt = time.perf_counter() - t
        eff = st.efficiency()
        shapes = sorted({(int(b["input_ids"].shape[1]), int(b["pixel_values"].shape[1])) for b in batches})
        out.append({"config": name, "batch_size": cfg.batch_size, "seq_buckets": list(cfg.seq_buckets),
                    "patch_buckets": list(cfg.patch_buckets), "max_steps": cfg.max_steps, "packing": cfg.packing,
                    "pack_buffer": cfg.pack_buffer, "pixel_dtype": cfg.pixel_dtype,
                    "token_efficiency": eff["data/token_efficiency"], "patch_efficiency": eff["data/patch_efficiency"],
                    "label_slot_efficiency": eff["data/label_slot_efficiency"],
                    "examples_per_batch": eff["data/examples_per_batch"], "batches": st.num_batches,
                    "examples": st.num_examples, "dropped_remainder": st.dropped_remainder,
                    "pixel_gib_per_batch": st.pixel_bytes / max(st.num_batches, 1) / 2**30,
                    "shapes_used": shapes, "plan_ms_per_batch": 1e3 * dt / max(st.num_batches, 1),
                    "mean_tokens": float(sizes[:, 0].mean()), "mean_patches": float(sizes[:, 1].mean()),
                    "mean_steps": float(sizes[:, 2].mean())})
    return out


def workers_needed(mean_tokens: float, per_worker: float) -> dict:
    """(c): examples/s per chip at the target rate and workers per chip."""
    out = {}
    for chip, tflops in PEAK_TFLOPS.items():
        tok_s = MFU * tflops * 1e12 / (6 * N_PARAMS)
        ex_s = tok_s / mean_tokens
        out[chip] = {"tokens_per_s": tok_s, "examples_per_s": ex_s, "workers": math.ceil(ex_s / per_worker),
                     "workers_exact": ex_s / per_worker, "workers_per_8_chip_host": math.ceil(8 * ex_s / per_worker)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (the smoke test)")
    ap.add_argument("--worker-examples", type=int, default=None, help="records timed in (a)")
    ap.add_argument("--pack-examples", type=int, default=None, help="examples batched in (b)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    n_worker = args.worker_examples or (6 if args.quick else 40)
    n_pack = args.pack_examples or (700 if args.quick else 6000)

    from jaxprm.data.synthetic import build_synthetic_tokenizer, tiny_model_config

    tok = build_synthetic_tokenizer()
    mc = tiny_model_config(tok)
    t0 = time.perf_counter()
    worker = bench_worker(n_worker, 1, ("bfloat16", "float32"), tok, mc, reps=1 if args.quick else 3)
    packing = bench_packing(n_pack, 2, tok)
    now = packing[-1]
    need = workers_needed(now["mean_tokens"], worker["bfloat16"]["examples_per_s"])
    res = {"machine": f"{os.cpu_count()}-CPU host, one process, one thread", "worker": worker, "packing": packing,
           "target": {"mfu": MFU, "n_params": N_PARAMS, "per_chip": need}, "seconds": time.perf_counter() - t0}

    w = worker["bfloat16"]
    print(f"(a) one worker, {n_worker} records (mean {w['mean_tokens']:.0f} tokens, {w['mean_patches']:.0f} patches):")
    for dt, r in worker.items():
        print(f"    pixels {dt:8s}: {r['examples_per_s']:.1f} examples/s ({r['ms_per_example']:.1f} ms/example)")
    print("    phases, bfloat16 (ms/example): " + ", ".join(f"{k} {v:.1f}" for k, v in w["phase_ms_per_example"].items()))
    print(f"(b) packing, {n_pack} examples (mean {now['mean_tokens']:.0f} tokens, {now['mean_patches']:.0f} patches, "
          f"{now['mean_steps']:.1f} steps), batch {now['batch_size']} rows:")
    for r in packing:
        print(f"    {r['config']:36s} tokens {r['token_efficiency']:6.1%}  patches {r['patch_efficiency']:6.1%}  "
              f"label slots {r['label_slot_efficiency']:6.1%}  {r['examples_per_batch']:5.1f} ex/batch  "
              f"{r['pixel_gib_per_batch']:.2f} GiB pixels/batch  shapes {r['shapes_used']}  "
              f"plan {r['plan_ms_per_batch']:.0f} ms/batch")
    print(f"(c) 3B step at {MFU:.0%} MFU (6 x {N_PARAMS:.2g} x real tokens), {now['mean_tokens']:.0f} tokens/example:")
    for chip, r in need.items():
        print(f"    {chip:8s}: {r['tokens_per_s'] / 1e3:.1f}k tokens/s = {r['examples_per_s']:.1f} examples/s per chip "
              f"-> {r['workers_exact']:.2f} workers per chip, {r['workers_per_8_chip_host']} per 8-chip host")
    print(f"done in {res['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
