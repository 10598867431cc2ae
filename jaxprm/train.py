"""Train a PRM: ``python -m jaxprm.train --config configs/tiny.py [--config.train.epochs=3 ...]``.

config file -> validation -> mesh -> model (HF weights or random) -> Grain loader -> jitted,
donated, sharded train step (scan grad accumulation) -> Orbax (params, optimizer, Grain iterator
state) -> TensorBoard + console -> export for ``jaxprm.load_prm``.

Resuming: rerunning the same command with the same workdir continues from the latest checkpoint
(model, optimizer, step and data position), so a killed or preempted run loses at most the steps
since the last save; SIGTERM (TPU preemption) saves before exiting.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprm import checkpointing as ckpt
from jaxprm import sharding as shd
from jaxprm.train_step import init_train_state, jit_train_step, make_eval_step, make_train_step, split_params
from jaxprm.optim import ROUNDINGS

log = logging.getLogger("jaxprm.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SOURCES = ("synthetic", "records", "tfds")
INITS = ("hf", "random")


class ConfigError(ValueError):
    pass


class TrainingError(RuntimeError):
    """The run cannot produce a model (e.g. no step could be trained); nothing is exported."""


# ------------------------------------------------------------------------------------------------
# config validation (once, at start-up, with messages that say what to change)
# ------------------------------------------------------------------------------------------------
def validate_config(c) -> None:
    from jaxprm.models.prm import HEADS, HISTORIES
    from jaxprm.models.remat import NAMES as REMATS
    from jaxprm.models.attention import IMPLS

    errs = []

    def need(cond, msg):
        if not cond:
            errs.append(msg)

    m, d, o, t = c.model, c.data, c.optim, c.train
    need(m.init in INITS, f"model.init must be one of {INITS}, got {m.init!r}")
    if m.init == "hf":
        need(bool(m.hf_dir), "model.init='hf' needs --config.model.hf_dir=/path/to/Qwen2.5-VL (config.json + safetensors)")
        need(not m.hf_dir or os.path.isdir(m.hf_dir), f"model.hf_dir={m.hf_dir!r} is not a directory")
    else:
        need(m.preset in ("tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b"),
             f"model.init='random' needs model.preset in tiny|qwen2.5-vl-3b|qwen2.5-vl-7b, got {m.preset!r}")
        need(m.preset == "tiny" or bool(m.hf_dir),
             "random init of a real-size preset needs model.hf_dir for its tokenizer")
    need(m.dtype in DTYPES, f"model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}")
    need(m.param_dtype in DTYPES, f"model.param_dtype must be one of {sorted(DTYPES)}, got {m.param_dtype!r}")
    need(m.attn_impl in IMPLS, f"model.attn_impl must be one of {IMPLS}, got {m.attn_impl!r}")
    need(m.remat in REMATS, f"model.remat must be one of {REMATS}, got {m.remat!r}")
    need(m.head in HEADS, f"model.head must be one of {HEADS}, got {m.head!r}")
    need(m.history in HISTORIES, f"model.history must be one of {HISTORIES}, got {m.history!r}")
    need(d.source in SOURCES, f"data.source must be one of {SOURCES}, got {d.source!r}")
    if d.source == "records":
        need(bool(d.records), "data.source='records' needs --config.data.records=FILE_OR_DIR")
        need(not d.records or os.path.exists(d.records), f"data.records={d.records!r} does not exist")
    if d.source == "tfds":
        need(bool(d.data_dir), "data.source='tfds' needs --config.data.data_dir=DIR (a dataset written by jaxprm.data.tfds_builder)")
    need(d.label_rule in ("", "mc", "judge", "hybrid"), f"data.label_rule must be '', mc, judge or hybrid, got {d.label_rule!r}")
    need(0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(0 <= o.warmup_ratio < 1, f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    need(o.schedule in ("cosine", "linear", "constant"), f"optim.schedule must be cosine, linear or constant, got {o.schedule!r}")
    need(o.mu_dtype in ("float32", "bfloat16"), f"optim.mu_dtype must be float32 or bfloat16, got {o.mu_dtype!r}")
    need(o.rounding in ROUNDINGS, f"optim.rounding must be one of {ROUNDINGS}, got {o.rounding!r}")
    need(t.grad_accum_dtype in ("float32", "bfloat16"),
         f"train.grad_accum_dtype must be float32 or bfloat16, got {t.grad_accum_dtype!r}")
    need(t.batch_size > 0 and t.grad_accum > 0, "train.batch_size and train.grad_accum must be > 0")
    need(t.batch_size % t.grad_accum == 0,
         f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    need(t.epochs > 0, f"train.epochs must be > 0, got {t.epochs}")
    need(len(t.class_weights) == 2 and min(t.class_weights) > 0, "train.class_weights must be two positive numbers (+, -)")
    need(t.lm_loss_weight >= 0, f"train.lm_loss_weight must be >= 0, got {t.lm_loss_weight}")
    for k in ("log_every", "eval_every", "save_every"):
        need(getattr(t, k) > 0, f"train.{k} must be > 0")
    if not errs:
        try:
            mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        except ValueError as e:
            errs.append(f"mesh: {e}")
        else:
            dp = mesh.shape["data"] * mesh.shape["fsdp"]
            micro = t.batch_size // t.grad_accum
            need(micro % dp == 0, f"micro-batch {micro} (batch_size/grad_accum) must be divisible by the "
                                  f"data-parallel size data*fsdp={dp}")
            need(t.batch_size % jax.process_count() == 0,
                 f"train.batch_size={t.batch_size} must divide over {jax.process_count()} hosts")
    if errs:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errs))


# ------------------------------------------------------------------------------------------------
# set-up pieces
# ------------------------------------------------------------------------------------------------
def model_assets(c):
    """(model_config, tokenizer, image_processor) for the config."""
    from jaxprm.data.preprocess import ImageProcessor

    if c.model.init == "random" and c.model.preset == "tiny":
        from jaxprm.data.synthetic import build_synthetic_tokenizer, tiny_model_config

        tok = build_synthetic_tokenizer()
        ip = ImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
        cfg = tiny_model_config(tok)
    else:
        from transformers import AutoTokenizer

        from jaxprm.models.qwen2_5_vl import Qwen25VLConfig
        from jaxprm.models.qwen2_5_vl.presets import preset

        tok = AutoTokenizer.from_pretrained(c.model.hf_dir)
        try:
            ip = ImageProcessor.from_pretrained(c.model.hf_dir)
        except FileNotFoundError:
            ip = ImageProcessor()
        cfg = Qwen25VLConfig.from_pretrained(c.model.hf_dir) if c.model.init == "hf" else preset(c.model.preset)
    if c.data.min_pixels or c.data.max_pixels:
        ip = ImageProcessor.from_config({**ip.to_config(), "min_pixels": c.data.min_pixels or ip.min_pixels,
                                         "max_pixels": c.data.max_pixels or ip.max_pixels})
    return cfg, tok, ip


def prepare_data(c) -> str:
    """The TFDS data_dir to read, building it first for synthetic/records sources (once)."""
    from jaxprm.data import tfds_builder

    if c.data.source == "tfds":
        return c.data.data_dir
    data_dir = c.data.data_dir or os.path.join(c.workdir, "data")
    try:
        tfds_builder.dataset_dir(data_dir)
        return data_dir  # already built (a resumed run)
    except FileNotFoundError:
        pass
    if jax.process_index() == 0:
        if c.data.source == "synthetic":
            from jaxprm.data.synthetic import generate_records

            task = synthetic_task(c)
            train = generate_records(c.data.synthetic_train, seed=c.model.seed, **task)
            evals = generate_records(c.data.synthetic_eval, seed=c.model.seed + 10_000, **task)
            tfds_builder.build_dataset({c.data.train_split: train, c.data.eval_split: evals}, data_dir,
                                       progress=c.train.progress)
        else:
            from jaxprm.data.formats import read_records
            from jaxprm.data.labels import apply_label_rule

            recs = read_records(c.data.records, format=c.data.format, image_root=c.data.image_root or None)
            if c.data.label_rule:
                recs = (apply_label_rule(r, c.data.label_rule) for r in recs)
            tfds_builder.build_dataset(list(recs), data_dir, image_root=c.data.image_root or None,
                                       splits={c.data.train_split: 1 - c.data.val_fraction,
                                               c.data.eval_split: c.data.val_fraction} if c.data.val_fraction else None,
                                       progress=c.train.progress)
    _sync("data built")
    return data_dir


def synthetic_task(c) -> dict:
    """The embedded task's settings (``generate_records`` keywords), saved in the PRM's spec so that
    ``python -m jaxprm.eval synthetic`` measures the PRM on the task it was trained on."""
    from jaxprm.data.synthetic import task_settings

    d = c.data
    return task_settings(image_size=(d.synthetic_image_size,) * 2, error_rate=d.synthetic_error_rate,
                         perception_error_share=d.synthetic_perception_share,
                         question_types=tuple(d.synthetic_question_types) or None)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def pipeline_config(c, *, train: bool, seed: int):
    """Training batches use the prompt of ``model.history``; evaluation batches always use the scoring
    prompt (placeholders in every assistant turn), so eval numbers are what ``PRM.score`` gives."""
    from jaxprm.data.pipeline import PipelineConfig
    from jaxprm.data.prompt import PRM_SYSTEM_PROMPT, encode_mode

    d = c.data
    return PipelineConfig(
        system_prompt=c.model.system_prompt or PRM_SYSTEM_PROMPT,
        batch_size=(c.train.batch_size if train else max(c.train.batch_size // c.train.grad_accum, 1)) // jax.process_count(),
        seq_buckets=tuple(d.seq_buckets), patch_buckets=tuple(d.patch_buckets), max_steps=d.max_steps,
        max_images=d.max_images, packing=d.packing, seed=seed, shuffle=train,
        num_epochs=c.train.epochs if train else 1, drop_remainder=train, worker_count=d.worker_count,
        label_mode=encode_mode(c.model.history, train=train))


def estimate_flops_per_token(cfg) -> float:
    """6 x (non-embedding text params) + attention, per token, forward+backward (an MFU estimate)."""
    t = cfg.text
    per_layer = (t.hidden_size * t.head_dim * (t.num_attention_heads * 2 + t.num_key_value_heads * 2)
                 + 3 * t.hidden_size * t.intermediate_size)
    return 6.0 * per_layer * t.num_hidden_layers


PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "v5e": 197.0, "v5 lite": 197.0, "v4": 275.0,
               "v5p": 459.0, "v6": 918.0, "l4": 121.0}


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    for k, v in PEAK_TFLOPS.items():
        if k in kind:
            return v * 1e12 * jax.device_count()
    return None


class _Stop:
    """SIGTERM/SIGINT -> finish the current step, save, exit."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM,):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        log.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def train(c, *, step_hook=None) -> dict:
    """Run (or resume) training for config ``c``; returns the final metrics.

    ``step_hook(step)`` is called after every step (tests use it to simulate a kill).
    """
    import orbax.checkpoint as ocp

    from jaxprm.data.pipeline import make_loader
    from jaxprm.models.prm import PRMModel
    from jaxprm.models.qwen2_5_vl import Qwen25VL, from_pretrained
    from jaxprm.optim import make_optimizer

    validate_config(c)
    os.makedirs(c.workdir, exist_ok=True)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    model_cfg, tok, ip = model_assets(c)
    spec = dataclasses.replace(ckpt.default_spec(tok, head=c.model.head), system_prompt=c.model.system_prompt or None,
                               history=c.model.history, task=synthetic_task(c) if c.data.source == "synthetic" else None)
    if jax.process_index() == 0:
        ckpt.save_assets(os.path.join(c.workdir, ckpt.ASSETS), spec=spec, model_config=model_cfg, tokenizer=tok,
                         image_processor=ip)
    data_dir = prepare_data(c)

    # -- model, sharded from the start ---------------------------------------------------------------
    dtype, pdtype = DTYPES[c.model.dtype], DTYPES[c.model.param_dtype]
    kw = dict(dtype=dtype, param_dtype=pdtype, attn_impl=c.model.attn_impl,
              remat_policy=None if c.model.remat == "none" else c.model.remat)

    def build():
        if c.model.init == "hf":
            return PRMModel(from_pretrained(c.model.hf_dir, **kw), spec)
        return PRMModel(Qwen25VL(model_cfg, rngs=nnx.Rngs(c.model.seed), **kw), spec)

    if c.model.init == "hf":  # read the checkpoint once, then place it
        model = build()
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.device_put(params, shd.param_shardings(params, mesh)))
    else:  # initialise directly into the shardings, never whole on one device
        model = nnx.eval_shape(build)
        shardings = shd.param_shardings(nnx.state(model, nnx.Param), mesh)
        nnx.update(model, jax.jit(lambda: nnx.state(build(), nnx.Param), out_shardings=shardings)())
    graphdef, trainable, frozen = split_params(model, c.model.freeze_vision)

    # -- data ------------------------------------------------------------------------------------------
    from jaxprm.data.tfds_builder import split_sizes

    sizes = split_sizes(data_dir)
    n_train = sizes.get(c.data.train_split, 0)
    if not n_train:
        raise TrainingError(f"{data_dir}: the training split {c.data.train_split!r} has no records "
                            f"(splits: {sizes}); nothing to train on")
    has_eval = sizes.get(c.data.eval_split, 0) > 0
    if not has_eval:
        log.info("%s has no records in the eval split %r (splits: %s): training without evaluation",
                 data_dir, c.data.eval_split, sizes)
    steps_per_epoch = max(n_train // c.train.batch_size, 1)
    total_steps = steps_per_epoch * c.train.epochs
    if c.train.max_steps:
        total_steps = min(total_steps, c.train.max_steps)
    train_loader = make_loader(data_dir, c.data.train_split, tok, ip, model_cfg,
                               pipeline_config(c, train=True, seed=c.model.seed))

    # -- optimizer and state -----------------------------------------------------------------------------
    optimizer, sched = make_optimizer(lr=c.optim.lr, total_steps=steps_per_epoch * c.train.epochs,
                                      warmup_ratio=c.optim.warmup_ratio, schedule_kind=c.optim.schedule,
                                      b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                                      weight_decay=c.optim.weight_decay, clip=c.optim.clip, mu_dtype=c.optim.mu_dtype)
    state, state_sh = init_train_state(trainable, frozen, optimizer, mesh)

    # -- resume ---------------------------------------------------------------------------------------
    mngr = ckpt.checkpoint_manager(c.workdir, max_to_keep=c.train.keep_checkpoints,
                                   async_save=c.train.async_checkpoint)
    train_iter = iter(train_loader)
    start = 0
    latest = mngr.latest_step()
    export_dir = os.path.join(c.workdir, "export")
    if latest is not None:
        state, data_state = _restore(mngr, latest, state, state_sh, graphdef, c.model.freeze_vision)
        train_iter.set_state(data_state)
        start = int(latest)
        if start >= total_steps:
            return _already_done(c, mngr, start, graphdef, state, tok, ip, export_dir)
        log.info("resumed from %s at step %d of %d", os.path.join(c.workdir, ckpt.CHECKPOINTS), start, total_steps)

    train_step = jit_train_step(make_train_step(graphdef, optimizer, accum=c.train.grad_accum,
                                                class_weights=tuple(c.train.class_weights),
                                                accum_dtype=c.train.grad_accum_dtype, rounding=c.optim.rounding,
                                                seed=c.model.seed, lm_loss_weight=c.train.lm_loss_weight,
                                                image_token_id=model_cfg.image_token_id), state_sh)
    eval_step = jax.jit(make_eval_step(graphdef, class_weights=tuple(c.train.class_weights)))

    writer = _writer(c.workdir)
    flops_tok, peak = estimate_flops_per_token(model_cfg), peak_flops()
    final: dict = {}
    bar = _progress(c, start, total_steps)
    window = {"t": time.perf_counter(), "sums": {}}

    def save(step: int, force: bool = False):
        params = nnx.merge_state(state["trainable"], state["frozen"])
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            data=ocp.args.JsonSave(train_iter.get_state()),
            meta=ocp.args.JsonSave({"step": step, "metrics": {k: float(v) for k, v in final.items()}})),
            force=force)

    def run_eval(step: int):
        ev = evaluate(c, eval_step, state, data_dir, tok, ip, model_cfg, mesh)
        final.update(ev)
        _write(writer, step, ev)
        log.info("step %d eval %s", step, _fmt(ev))

    step = start
    with _Stop() as stop:
        while step < total_steps:
            try:
                batch = next(train_iter)
            except StopIteration:
                log.info("data exhausted after %d steps", step)
                break
            state, metrics = train_step(state, shd.shard_batch(_agree_on_bucket(batch), mesh))
            step += 1
            _accumulate(window, metrics)
            if step % c.train.log_every == 0 or step == total_steps:
                final.update(_log_train(window, step, sched, flops_tok, peak, writer, bar))
            if has_eval and step % c.train.eval_every == 0 and step < total_steps:
                run_eval(step)
            if step % c.train.save_every == 0:
                save(step)
            if bar is not None:
                bar.update(1)
            if step_hook is not None:
                step_hook(step)
            if stop.requested or mngr.reached_preemption(step):
                save(step, force=True)
                mngr.wait_until_finished()
                log.warning("stopped at step %d; rerun the same command to resume", step)
                break
        if not stop.requested and step > start and mngr.latest_step() != step:
            save(step, force=True)
        mngr.wait_until_finished()
    if bar is not None:
        bar.close()
    mngr.close()
    final["step"] = step
    final["skipped_records"] = int(getattr(getattr(train_iter, "stats", None), "skipped", 0) or 0)
    final["stopped"] = stop.requested
    if step == 0:
        if writer is not None:
            writer.close()
        raise TrainingError(
            f"trained 0 steps: the training split of {data_dir} gave no batch of {c.train.batch_size} rows "
            f"({n_train} records, {final['skipped_records']} skipped; see the log). Nothing was exported.")
    if not stop.requested:
        # the checkpoint (above) and the export come first; the final evaluation is optional
        if c.train.export and jax.process_index() == 0:
            _export(graphdef, state, tok, ip, export_dir)
        if has_eval and step > start:
            run_eval(step)
    if writer is not None:
        writer.close()
    return final


def _export(graphdef, state, tok, ip, export_dir) -> None:
    model = nnx.merge(graphdef, state["trainable"], state["frozen"])
    out = ckpt.export_hf(model, tok, ip, export_dir)
    log.info("exported the PRM to %s (load with jaxprm.load_prm)", out)


def _already_done(c, mngr, step, graphdef, state, tok, ip, export_dir) -> dict:
    """A rerun of a finished workdir: say so, write the export if a kill came before it, change nothing else."""
    import orbax.checkpoint as ocp

    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
    mngr.close()
    if c.train.export and jax.process_index() == 0 and not os.path.exists(os.path.join(export_dir, "prm.json")):
        _export(graphdef, state, tok, ip, export_dir)
    log.info("%s already finished %d steps; nothing to do (use a new workdir or raise train.epochs / "
             "train.max_steps to train more). The PRM is in %s", c.workdir, step, export_dir)
    return {**meta.get("metrics", {}), "step": step, "already_done": True, "stopped": False}


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _restore(mngr, step, state, state_sh, graphdef, freeze_vision):
    import orbax.checkpoint as ocp

    params_full = nnx.merge_state(state["trainable"], state["frozen"])
    r = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(ckpt.abstract(nnx.to_pure_dict(params_full))),
        opt_state=ocp.args.StandardRestore(ckpt.abstract(state["opt_state"])),
                                                   data=ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(params_full, r["params"])
    model = nnx.merge(graphdef, params_full)
    _, trainable, frozen = split_params(model, freeze_vision)
    step_arr = jax.device_put(jnp.asarray(step, jnp.int32), state_sh["step"])
    return {"trainable": trainable, "frozen": frozen, "opt_state": r["opt_state"], "step": step_arr}, r["data"]


def evaluate(c, eval_step, state, data_dir, tok, ip, model_cfg, mesh) -> dict:
    """Step accuracy / F1 (VisualProcessBench-style, "-" = error class) on the held-out split, with the
    scoring prompt (placeholders in every assistant turn): the numbers ``PRM.score_batch`` gives."""
    from jaxprm.data.pipeline import make_loader
    from jaxprm.models.prm import f1_from_counts

    loader = make_loader(data_dir, c.data.eval_split, tok, ip, model_cfg, pipeline_config(c, train=False, seed=0))
    sums: dict = {}
    n = 0
    for batch in loader:
        with jax.set_mesh(mesh):  # the model's activation sharding constraints apply
            m = eval_step(state["trainable"], state["frozen"],
                          shd.shard_batch(_pad_rows(_agree_on_bucket(batch), mesh), mesh))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
        if c.train.eval_batches and n >= c.train.eval_batches:
            break
    if not sums:
        return {}
    out = {f"eval/{k}": v for k, v in f1_from_counts(sums).items()}
    out["eval/loss"] = sums["loss_sum"] / max(sums["weight_sum"], 1e-9)
    out["eval/steps"] = sums["steps"]
    return out


def _agree_on_bucket(batch):
    """Hosts pick buckets independently; a global array needs one shape: grow to the largest."""
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    from jaxprm.data.pipeline import pad_batch

    mine = np.array([batch["input_ids"].shape[1], batch["pixel_values"].shape[1]], np.int64)
    seq_len, patches = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2).max(0)
    return pad_batch(batch, int(seq_len), int(patches))


def _pad_rows(batch, mesh):
    """Pad a short (last) eval batch to a multiple of the data-parallel size with empty rows."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    b = batch["input_ids"].shape[0]
    extra = (-b) % dp
    if not extra:
        return batch
    out = {}
    for k, v in batch.items():
        ax = shd.BATCH_AXIS.get(k, 0)
        pad = [(0, 0)] * v.ndim
        pad[ax] = (0, extra)
        out[k] = np.pad(v, pad, constant_values=-1 if k == "labels" else 0)
    return out


def _accumulate(window, metrics):
    window["sums"]["_n"] = window["sums"].get("_n", 0) + 1
    for k, v in metrics.items():
        window["sums"][k] = window["sums"].get(k, 0) + v  # device arrays; summed lazily


def _log_train(window, step, sched, flops_tok, peak, writer, bar) -> dict:
    from jaxprm.models.prm import f1_from_counts

    sums = {k: float(v) for k, v in jax.device_get(window["sums"]).items()}
    dt = time.perf_counter() - window["t"]
    n_steps = max(1, int(round(sums.get("_n", 0))))
    tokens = sums.get("tokens", 0.0)
    f1 = f1_from_counts(sums)
    out = {"train/loss": sums["loss_sum"] / max(sums["weight_sum"], 1e-9), "train/acc": f1["acc"],
           "train/macro_f1": f1["macro_f1"], "train/grad_norm": sums.get("grad_norm", 0.0) / max(n_steps, 1),
           "train/lr": float(sched(step)), "perf/tokens_per_s": tokens / max(dt, 1e-9)}
    if "lm_tokens" in sums:
        out["train/lm_loss"] = sums["lm_loss_sum"] / max(sums["lm_tokens"], 1.0)
    if peak:
        out["perf/mfu"] = flops_tok * tokens / max(dt, 1e-9) / peak
    _write(writer, step, out)
    if bar is not None:
        bar.set_postfix(loss=f"{out['train/loss']:.4f}", acc=f"{out['train/acc']:.3f}",
                        tok_s=f"{out['perf/tokens_per_s']:.0f}")
    else:
        log.info("step %d %s", step, _fmt(out))
    window.update(t=time.perf_counter(), sums={})
    return out


def _fmt(d):
    return " ".join(f"{k}={v:.4g}" for k, v in d.items())


def _writer(workdir):
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        log.warning("tensorboardX not installed: no TensorBoard event files")
        return None
    return SummaryWriter(os.path.join(workdir, "events"))


def _write(writer, step, d):
    if writer is None:
        return
    for k, v in d.items():
        writer.add_scalar(k, float(v), step)
    writer.flush()


def _progress(c, start, total):
    if not c.train.progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def maybe_initialize_distributed() -> None:
    """Multi-host runs: ``jax.distributed.initialize`` before any JAX call.

    On when ``JAXPRM_DISTRIBUTED=1`` (TPU pods, SLURM and Open MPI are auto-detected by JAX) or when
    ``JAX_COORDINATOR_ADDRESS`` is set (then ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are read
    too). See launch/.
    """
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        jax.distributed.initialize(coordinator_address=addr, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("JAXPRM_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    flags_ = flags.FLAGS
    if "config" not in flags_:
        config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. configs/tiny.py",
                                        lock_config=True)

    def run(_):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax/Grain log every file operation at INFO
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in ("jaxprm",):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.INFO)
            logging.getLogger(name).propagate = False
        if flags_.config is None:
            raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
        maybe_initialize_distributed()
        try:
            metrics = train(flags_.config)
        except ConfigError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
        print("final: " + _fmt({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
