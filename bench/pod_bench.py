"""Pod-scale sizing by ahead-of-time compilation: the sharded train step of a config, compiled for a
multi-chip TPU topology on any machine (no TPU needed), with XLA's per-chip memory and the Pallas
kernels it contains.

    pip install "jax[tpu]"      # libtpu: the TPU compiler; nothing runs on a TPU
    python bench/pod_bench.py --config configs/qwen2_5_vl_3b.py --model qwen2.5-vl-3b --topology v5p:2x2x1
    python bench/pod_bench.py --config configs/qwen2_5_vl_3b.py --config.model.remat=full --topology v5e:4x4
    python bench/pod_bench.py --table --json runs/pod_table.json      # the README's table (all rows)

``--config`` and its ``--config.KEY=VALUE`` overrides are read as ``python -m jaxprm.train`` reads them.

What is compiled is what ``python -m jaxprm.train --config X`` runs on that pod: the config's mesh
(``mesh.data`` / ``mesh.fsdp`` / ``mesh.tensor`` over the topology's chips), its dtypes, remat
policy, attention implementation (``auto``, resolved for TPU), optimizer and gradient accumulation,
the parameter/optimizer shardings of ``jaxprm.sharding`` and the donated, state-pinned jit of
``jaxprm.train_step``. The batch is the pipeline's (``jaxprm.data.pipeline.batch_spec``) in the
config's largest bucket (max ``data.seq_buckets`` x max ``data.patch_buckets``): the worst case a
run can meet. The global batch is ``train.batch_size`` rows; when a micro-batch does not split over
the chips, gradient accumulation is lowered until it does (the row says which it used).

Reported per chip (SPMD: every chip runs the same program): arguments (its shard of weights +
optimizer state + batch), temporaries and the peak (arguments + outputs - donated aliases +
temporaries), against the chip's HBM. ``kernels`` counts the Pallas TPU custom calls in the
compiled program by kernel name (``--check-kernels`` fails when the attention kernels are absent,
i.e. a silent fallback to XLA attention). ``--score`` compiles the jitted scoring forward of
``jaxprm.scoring`` instead of the train step.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time

# compile only: several processes may load libtpu at once (its lockfile guards a real TPU's chips)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 2**30
# HBM per chip (GiB) that XLA's TPU compiler counts as available (its RESOURCE_EXHAUSTED message).
# XLA refuses a program whose temporaries alone exceed it; a run also needs the arguments there, so a
# row fits when its peak (arguments + temporaries + outputs - donated) does.
HBM_GIB = {"v5e": 15.75, "v5p": 95.74}
# (config, model preset, topology, config overrides as on the train command line): the README's table.
TABLE = (
    ("configs/qwen2_5_vl_3b.py", "qwen2.5-vl-3b", "v5p:2x2x1", ()),
    ("configs/qwen2_5_vl_3b.py", "qwen2.5-vl-3b", "v5p:2x2x2", ()),
    ("configs/qwen2_5_vl_3b.py", "qwen2.5-vl-3b", "v5e:2x4", ()),
    ("configs/qwen2_5_vl_3b.py", "qwen2.5-vl-3b", "v5e:2x4", ("--config.model.remat=full",)),
    ("configs/qwen2_5_vl_3b.py", "qwen2.5-vl-3b", "v5e:4x4", ("--config.model.remat=full",)),
    ("configs/qwen2_5_vl_7b.py", "qwen2.5-vl-7b", "v5p:2x2x1", ()),
    ("configs/qwen2_5_vl_7b.py", "qwen2.5-vl-7b", "v5p:2x2x2", ()),
    ("configs/qwen2_5_vl_7b.py", "qwen2.5-vl-7b", "v5p:2x2x4", ()),
    ("configs/qwen2_5_vl_7b.py", "qwen2.5-vl-7b", "v5e:2x4", ()),
)
PALLAS_TARGET = "tpu_custom_call"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="--config FILE and --config.KEY=VALUE overrides: as for python -m jaxprm.train "
                                       "(default --config=configs/qwen2_5_vl_3b.py)")
    p.add_argument("--model", default="qwen2.5-vl-3b", help="model preset (jaxprm.models.qwen2_5_vl.presets) or 'tiny'")
    p.add_argument("--topology", default="v5p:2x2x1", help="TPU topology, e.g. v5p:2x2x1 (4 chips), v5e:2x4 (8 chips)")
    p.add_argument("--seq", type=int, default=0, help="tokens per row (default: the config's largest seq bucket)")
    p.add_argument("--patches", type=int, default=0, help="patches per row (default: the largest patch bucket)")
    p.add_argument("--score", action="store_true", help="compile the scoring forward instead of the train step")
    p.add_argument("--check-kernels", action="store_true", help="exit 1 when no Pallas attention kernel is compiled in")
    p.add_argument("--hlo", default="", help="write the compiled program's HLO text here")
    p.add_argument("--table", action="store_true", help="every row of the README's table, one subprocess each")
    p.add_argument("--json", default="", help="write the result(s) here")
    args, rest = p.parse_known_args(argv)
    bad = [a for i, a in enumerate(rest) if not re.match(r"^--?config(\.|=|$)", a)
           and not (i and re.match(r"^--?config$", rest[i - 1]))]  # the value of a bare --config
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    from jaxprm.config import _config_spec

    if _config_spec(rest, "config") is None:
        rest = ["--config=configs/qwen2_5_vl_3b.py", *rest]
    args.config_args = rest
    return args


def topology_devices(topology: str):
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # no libtpu: say what to install
        raise SystemExit(f"cannot compile for TPU topology {topology!r}: {type(e).__name__}: {e}\n"
                         "Install the TPU compiler with: pip install \"jax[tpu]\" (no TPU is needed)") from e


def chip_kind(topology: str) -> str:
    return topology.split(":")[0].lower()


def _model_config(name: str):
    from bench.score_bench import model_config

    return model_config(name)


def load_train_config(config_args: list[str]):
    """The config of ``--config FILE [--config.KEY=VALUE ...]``, parsed as ``python -m jaxprm.train`` parses
    it (``jaxprm.config.parse_flags``: unknown fields and bad values are usage errors)."""
    from absl import flags
    from ml_collections import config_flags

    from jaxprm.config import parse_flags

    argv = ["bench/pod_bench.py", *config_args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=False, sys_argv=argv)
    parse_flags(argv, fv, prog="bench/pod_bench.py")
    return fv.config


def count_kernels(hlo_text: str) -> dict[str, int]:
    """Pallas TPU custom calls in a compiled program's HLO text, by kernel name."""
    counts: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        if f'custom_call_target="{PALLAS_TARGET}"' not in line:
            continue
        m = re.match(r"\s*(?:ROOT\s+)?%([A-Za-z_][\w-]*?)(?:\.\d+)*\s*=", line)  # the kernel's name
        counts[m.group(1) if m else "pallas"] += 1
    return dict(counts)


def analyse(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from bench.memory_bench import peak_bytes
    from jaxprm import sharding as shd
    from jaxprm.config import _config_spec
    from jaxprm.data.pipeline import batch_spec
    from jaxprm.models import attention
    from jaxprm.models.prm import PRMModel, PRMSpec
    from jaxprm.models.qwen2_5_vl import Qwen25VL
    from jaxprm.train import config_optimizer, config_train_step, pipeline_config
    from jaxprm.train_step import jit_train_step, split_params, train_state_shardings

    c = load_train_config(args.config_args)
    devices = topology_devices(args.topology)
    if args.score:  # PRM.score runs on one device (jaxprm.scoring.device)
        devices = devices[:1]
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    chips = len(devices)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    cfg = _model_config(args.model)

    # the global batch of the config; grad accumulation lowered until a micro-batch splits over the chips
    batch_size, accum = int(c.train.batch_size), int(c.train.grad_accum)
    if args.score:
        accum = 1
        batch_size = max(batch_size // int(c.train.grad_accum), dp)
    while accum > 1 and (batch_size % accum or (batch_size // accum) % dp):
        accum -= 1
    if (batch_size // accum) % dp:
        raise SystemExit(f"train.batch_size={batch_size} does not split over {dp} data-parallel chips")
    c.train.batch_size, c.train.grad_accum = batch_size, accum
    seq = args.seq or max(c.data.seq_buckets)
    patches = args.patches or max(c.data.patch_buckets)
    pc = pipeline_config(c, train=not args.score, seed=0)
    bspec = batch_spec(pc, cfg, seq, patches)

    spec = PRMSpec(plus_id=10, minus_id=11)
    model = nnx.eval_shape(lambda: PRMModel(Qwen25VL(cfg, dtype=jnp.dtype(c.model.dtype),
                                                     param_dtype=jnp.dtype(c.model.param_dtype),
                                                     attn_impl=c.model.attn_impl,
                                                     remat_policy=None if c.model.remat == "none" else c.model.remat),
                                            spec))
    graphdef, trainable, frozen = split_params(model, c.model.freeze_vision)
    repl = NamedSharding(mesh, PartitionSpec())

    def abstract(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape), shd.BATCH_AXIS.get(k, 0)))
             for k, (shape, dtype) in bspec.items()}
    state_bytes, opt_bytes = _nbytes(trainable) + _nbytes(frozen), 0
    t = time.perf_counter()
    # training runs under its mesh (jit_train_step); the Scorer on one device, with no mesh set
    with attention.target_platform("tpu"), contextlib.nullcontext() if args.score else jax.set_mesh(mesh):
        if args.score:  # the Scorer's own jitted forward (scores of every step of every row)
            from jaxprm.scoring.device import _compiled_for

            params = nnx.state(model)
            full = _compiled_for(nnx.graphdef(model)).full
            traced = full.trace(abstract(params, jax.tree.map(lambda _: repl, params)), batch)
        else:  # the train command's optimizer, step, state shardings and jit (donated, state pinned)
            opt, _ = config_optimizer(c, total_steps=1000)
            state_sh = train_state_shardings(trainable, frozen, opt, mesh)
            opt_abs = jax.eval_shape(opt.init, trainable)
            state = abstract({"trainable": trainable, "frozen": frozen, "opt_state": opt_abs,
                              "step": jax.ShapeDtypeStruct((), jnp.int32)}, state_sh)
            step = jit_train_step(config_train_step(c, graphdef, opt, cfg.image_token_id), state_sh)
            traced = step.jitted.trace(state, batch)
            opt_bytes = _nbytes(opt_abs)
        lowered = traced.lower(lowering_platforms=("tpu",))
    trace_s = time.perf_counter() - t
    row = {"config": _config_spec(args.config_args, "config"),
           "overrides": [a for a in args.config_args if "--config." in a],
           "model": args.model, "topology": args.topology, "chips": chips,
           "program": "score forward" if args.score else "train step",
           "mesh": {k: int(v) for k, v in mesh.shape.items()}, "global_batch": batch_size, "grad_accum": accum,
           "rows_per_chip": batch_size // accum // dp, "seq": seq, "patches": patches,
           "dtype": c.model.dtype, "param_dtype": c.model.param_dtype, "mu_dtype": c.optim.mu_dtype,
           "remat": c.model.remat, "attn_impl": c.model.attn_impl, "freeze_vision": bool(c.model.freeze_vision),
           "trainable_params": _count(trainable), "frozen_params": _count(frozen),
           "state_gib_total": (state_bytes + opt_bytes) / GiB, "hbm_gib": HBM_GIB.get(chip_kind(args.topology))}
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA refuses a program that cannot fit the chip's memory
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        row.update(fits=False, compiled=False, error=str(e).strip().splitlines()[0][:400],
                   compile_s=time.perf_counter() - t)
        return row
    compile_s = time.perf_counter() - t - trace_s
    m = compiled.memory_analysis()
    hlo = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    peak = peak_bytes(m) / GiB
    row.update(
        fits=row["hbm_gib"] is None or peak <= row["hbm_gib"], compiled=True, trace_s=trace_s, compile_s=compile_s,
        arguments_gib=m.argument_size_in_bytes / GiB, temporaries_gib=m.temp_size_in_bytes / GiB, peak_gib=peak,
        kernels=count_kernels(hlo),
    )
    return row


def _nbytes(tree) -> int:
    import jax
    import numpy as np

    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _count(tree) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def describe(r: dict) -> str:
    head = (f"{r['model']} {r['program']} on {r['topology']} ({r['chips']} chips, mesh {r['mesh']}), "
            f"{r['global_batch']} rows x {r['seq']} tokens x {r['patches']} patches, accum {r['grad_accum']} "
            f"({r['rows_per_chip']} rows/chip/micro-batch)")
    if not r["compiled"]:
        return f"{head}: does not fit: {r['error']}"
    over = "" if r["fits"] else " (DOES NOT FIT)"
    return (f"{head}{over}: per chip arguments {r['arguments_gib']:.1f} GiB, temporaries {r['temporaries_gib']:.1f} GiB, "
            f"peak {r['peak_gib']:.1f} of {r['hbm_gib']} GiB; Pallas kernels {r['kernels'] or 'none'} "
            f"(compile {r['compile_s']:.0f}s)")


def markdown(rows: list[dict]) -> str:
    out = ["| model (remat; weights / Adam μ) | TPU (chips) | mesh data x fsdp x tensor | global batch x tokens "
           "(accum, rows per chip) | per chip: arguments | temporaries | peak / HBM | Pallas kernels fwd / dq / dkv |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mesh = "x".join(str(r["mesh"][k]) for k in ("data", "fsdp", "tensor"))
        model = f"{r['model']} ({r['remat']}; {_short(r['param_dtype'])} / {_short(r['mu_dtype'])})"
        b = f"{r['global_batch']} x {r['seq']} ({r['grad_accum']}, {r['rows_per_chip']})"
        if r["compiled"]:
            k = " / ".join(str(sum(n for name, n in r["kernels"].items() if f"_{kind}_" in name))
                           for kind in ("fwd", "dq", "dkv"))
            out.append(f"| {model} | {r['topology']} ({r['chips']}) | {mesh} | {b} | {r['arguments_gib']:.1f} GiB | "
                       f"{r['temporaries_gib']:.1f} GiB | {_peak(r)} | {k} |")
        else:
            need = re.search(r"temporaries \(([\d.]+G)\)", r["error"])
            why = f"no: temporaries {need.group(1)}iB" if need else "no"
            out.append(f"| {model} | {r['topology']} ({r['chips']}) | {mesh} | {b} | — | — | {why} / {r['hbm_gib']} GiB | — |")
    return "\n".join(out)


def _peak(r: dict) -> str:
    peak = f"{r['peak_gib']:.1f} / {r['hbm_gib']} GiB"
    return f"**{peak}**" if r["fits"] else f"{peak}: over"


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)


def run_table(args) -> list[dict]:
    rows = []
    extra = [a for a in args.config_args if "--config." in a]  # overrides for every row
    for config, model, topology, overrides in TABLE:
        cmd = [sys.executable, os.path.abspath(__file__), f"--config={config}", *overrides, *extra, "--model", model,
               "--topology", topology, "--json", "/dev/stdout"]
        print("$", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{config} on {topology} failed (exit {proc.returncode})")
        row = json.loads(proc.stdout[proc.stdout.index("{"):])
        print(describe(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        rows = run_table(args)
        print(markdown(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return rows
    row = analyse(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    else:
        print(describe(row))
    if args.check_kernels and row["compiled"] and not row["kernels"]:
        print("no Pallas kernel in the compiled TPU program: attention fell back to XLA", file=sys.stderr)
        raise SystemExit(1)
    return row


if __name__ == "__main__":
    main()
