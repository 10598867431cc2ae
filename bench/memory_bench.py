"""Device memory of one PRM train step at real shapes, from XLA's compiled memory analysis.

Nothing is allocated: the train step (``jaxprm.train_step.make_train_step``, donation as in
``python -m jaxprm.train``) is traced with abstract parameters, optimizer state and batch, compiled
for the target, and XLA's buffer assignment is read back: arguments (weights + optimizer state +
batch), temporaries (gradients, activations kept for the backward pass, workspace) and the peak
(arguments + outputs - donated aliases + temporaries). Compare the peak with the card's memory.

Targets:
* the local backend (default): exact for that device. On CPU, XLA computes bf16 ops in fp32 and
  assigns buffers differently, so CPU numbers over-state a GPU's temporaries;
* ``--tpu v5p:2x2x1`` (needs ``pip install "jax[tpu]"``, no TPU needed): ahead-of-time compilation
  for one TPU chip, a bf16-native proxy for an 80 GB GPU.

::

    python bench/memory_bench.py --model qwen2.5-vl-7b --param-dtype bfloat16 --mu-dtype bfloat16 --tpu v5p:2x2x1
    python bench/memory_bench.py --model qwen2.5-vl-7b --param-dtype float32 --mu-dtype bfloat16   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.score_bench import MODELS, make_inputs, model_config  # noqa: E402
from bench.train_bench import make_batch  # noqa: E402

GiB = 2**30


def peak_bytes(m) -> int:
    """A compiled program's peak device memory from XLA's ``memory_analysis()``: arguments + outputs -
    donated (aliased) outputs + temporaries."""
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="tiny")
    p.add_argument("--batch", type=int, default=4, help="rows per micro-batch x --grad-accum")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--image", type=int, default=448)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--param-dtype", default="float32", choices=("bfloat16", "float32"))
    p.add_argument("--mu-dtype", default="float32", choices=("bfloat16", "float32"))
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--accum-dtype", default="float32", choices=("bfloat16", "float32"))
    p.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch", "save_out"))
    p.add_argument("--train-vision", action="store_true", help="train the vision tower too (frozen by default)")
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--tpu", default="", help="compile ahead of time for this TPU topology, e.g. v5p:2x2x1 (one chip of it is used)")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def _target_mesh(tpu: str):
    import jax
    import numpy as np
    from jax.sharding import Mesh

    if tpu:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology_name=tpu, platform="tpu").devices
    else:
        devices = jax.devices()
    return Mesh(np.asarray(devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")), devices[0]


def analyse(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxprm.models.prm import PRMModel, PRMSpec
    from jaxprm.models.qwen2_5_vl import Qwen25VL
    from jaxprm.optim import make_optimizer
    from jaxprm.train_step import make_train_step, split_params

    cfg = model_config(args.model)
    mesh, device = _target_mesh(args.tpu)
    attn = "splash" if args.tpu and args.attn_impl == "auto" else args.attn_impl
    model = nnx.eval_shape(lambda: PRMModel(Qwen25VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.dtype(args.param_dtype),
                                                     attn_impl=attn, remat_policy=args.remat),
                                            PRMSpec(plus_id=10, minus_id=11)))
    graphdef, trainable, frozen = split_params(model, not args.train_vision)
    opt, _ = make_optimizer(lr=1e-5, total_steps=1000, warmup_ratio=0.0, mu_dtype=args.mu_dtype)
    state = {"trainable": trainable, "frozen": frozen, "opt_state": jax.eval_shape(opt.init, trainable),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    batch = make_batch(cfg, make_inputs(cfg, args.batch, args.seq, args.image, args.steps))
    repl = NamedSharding(mesh, PartitionSpec())
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl)  # noqa: E731
    state, batch = jax.tree.map(spec, state), jax.tree.map(spec, batch)
    step = make_train_step(graphdef, opt, accum=args.grad_accum, accum_dtype=args.accum_dtype)
    t = time.perf_counter()
    traced = jax.jit(step, donate_argnums=(0,)).trace(state, batch)
    lowered = traced.lower(lowering_platforms=("tpu",)) if args.tpu else traced.lower()
    try:
        m = lowered.compile().memory_analysis()
    except Exception as e:  # XLA refuses to compile a program that cannot fit the target's memory
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"target": f"tpu {args.tpu}" if args.tpu else jax.default_backend(), "fits": False,
                "error": str(e).strip().splitlines()[0], "compile_s": time.perf_counter() - t}
    compile_s = time.perf_counter() - t

    def nbytes(tree):
        return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    out = {
        "target": f"tpu {args.tpu}" if args.tpu else f"{jax.default_backend()} {device.device_kind}",
        "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)),
        "frozen_params": sum(x.size for x in jax.tree.leaves(frozen)),
        "weights_gib": (nbytes(state["trainable"]) + nbytes(state["frozen"])) / GiB,
        "optimizer_gib": nbytes(state["opt_state"]) / GiB,
        "arguments_gib": m.argument_size_in_bytes / GiB,
        "temporaries_gib": m.temp_size_in_bytes / GiB,
        "peak_gib": peak_bytes(m) / GiB,
        "compile_s": compile_s,
        "fits": True,
    }
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = analyse(args)
    if not res["fits"]:
        print(f"{args.model} on {res['target']}: does not fit: {res['error']}")
        return res
    print(f"{args.model} on {res['target']}: params {res['trainable_params'] / 1e9:.2f}B trainable + "
          f"{res['frozen_params'] / 1e9:.2f}B frozen ({args.param_dtype}), Adam mu {args.mu_dtype}, "
          f"accum {args.grad_accum} ({args.accum_dtype}), B={args.batch} x {args.seq}, remat {args.remat}")
    print(f"  weights {res['weights_gib']:.2f} GiB + optimizer {res['optimizer_gib']:.2f} GiB; "
          f"arguments {res['arguments_gib']:.2f} GiB, temporaries {res['temporaries_gib']:.2f} GiB, "
          f"peak {res['peak_gib']:.2f} GiB  (compile {res['compile_s']:.0f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **res}, f, indent=2)
    return res


if __name__ == "__main__":
    main()
