"""Train a PRM: ``python -m jaxprm.train --config configs/tiny.py [--config.train.epochs=3 ...]``.

config file -> validation (``jaxprm.config``) -> mesh -> model (HF weights or random) -> Grain loader
-> jitted, donated, sharded train step (scan grad accumulation) -> Orbax (``jaxprm.checkpointing``:
params, optimizer, Grain iterator state) -> TensorBoard + console (``jaxprm.metrics``) -> export
for ``jaxprm.load_prm``.

Resuming: rerunning the same command with the same workdir continues from the latest checkpoint
(model, optimizer, step and data position), so a killed or preempted run loses at most the steps
since the last save. SIGTERM (TPU preemption) and SIGINT (Ctrl-C) finish the current step, save and
exit with status 128 + the signal (143, 130), so schedulers can tell a stopped run from a finished
one (0) and a failed one (1; 2 for config errors). A checkpoint that cannot be restored is skipped
for the next older one (logged); ``--config.train.resume_step=N`` resumes from step N instead.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprm import checkpointing as ckpt
from jaxprm.atomic import atomic_write_json
from jaxprm import config
from jaxprm import sharding as shd
from jaxprm.metrics import TrainMetrics, estimate_flops_per_token, fmt
from jaxprm.train_step import init_train_state, jit_train_step, make_eval_step, make_train_step, split_params

log = logging.getLogger("jaxprm.train")

_SHOW_REASONS = 5  # skip reasons shown in the log (all kept ones go to the dataset's metadata.json)

# the names users and tests import from here
ConfigError = config.ConfigError
validate_config = config.validate_train_config


class TrainingError(RuntimeError):
    """The run cannot produce a model (e.g. no step could be trained); nothing is exported."""


# ------------------------------------------------------------------------------------------------
# set-up pieces
# ------------------------------------------------------------------------------------------------
def model_assets(c):
    """(model_config, tokenizer, image_processor) for the config."""
    from jaxprm.data.preprocess import ImageProcessor

    if c.model.init == "random" and c.model.preset == config.TINY_PRESET:
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
            from jaxprm.data.formats import ImportStats, read_records
            from jaxprm.data.labels import apply_label_rule

            # malformed rows are skipped and counted (the README's rule), not fatal
            stats = ImportStats()
            recs = read_records(c.data.records, format=c.data.format, image_root=c.data.image_root or None,
                                allow_outside_root=c.data.allow_images_outside_root, on_error="skip", stats=stats)
            if c.data.label_rule:
                recs = (apply_label_rule(r, c.data.label_rule) for r in recs)
            recs = list(recs)
            if stats.skipped:
                log.warning("%s: skipped %d of %d rows as malformed (kept %d); the first: %s%s", c.data.records,
                            stats.skipped, stats.rows, len(recs), "; ".join(stats.errors[:_SHOW_REASONS]),
                            " ..." if stats.skipped > _SHOW_REASONS else "")
            tfds_builder.build_dataset(recs, data_dir, image_root=c.data.image_root or None,
                                       allow_images_outside_root=c.data.allow_images_outside_root,
                                       splits={c.data.train_split: 1 - c.data.val_fraction,
                                               c.data.eval_split: c.data.val_fraction} if c.data.val_fraction else None,
                                       progress=c.train.progress,
                                       source_report={"path": os.fspath(c.data.records), "format": c.data.format,
                                                      "rows": stats.rows, "skipped": stats.skipped,
                                                      "reasons": list(stats.errors)})
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
    from jaxprm.data.prompt import encode_mode

    d = c.data
    return PipelineConfig(
        prompt_style=c.model.prompt_style, system_prompt=c.model.system_prompt or None,
        batch_size=(c.train.batch_size if train else max(c.train.batch_size // c.train.grad_accum, 1)) // jax.process_count(),
        seq_buckets=tuple(d.seq_buckets), patch_buckets=tuple(d.patch_buckets), max_steps=d.max_steps,
        max_images=d.max_images, packing=d.packing, seed=seed, shuffle=train,
        num_epochs=c.train.epochs if train else 1, drop_remainder=train, worker_count=d.worker_count,
        label_mode=encode_mode(c.model.history, train=train))


# exit status of ``python -m jaxprm.train`` when a signal stopped it after saving: 128 + the signal's
# number, as a shell reports a process killed by it (130: SIGINT/Ctrl-C, 143: SIGTERM/preemption);
# 0 means finished, 1 an error, 2 a config or usage error.
def stopped_exit_status(signum: int) -> int:
    return 128 + int(signum)


class _Stop:
    """SIGTERM/SIGINT -> finish the current step, save, exit; a second SIGINT interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # Ctrl-C twice: the user does not want to wait
            raise KeyboardInterrupt
        log.warning("received %s: saving a checkpoint and stopping after this step (Ctrl-C again to "
                    "interrupt at once)", signal.Signals(signum).name)
        self.requested = True
        self.signum = int(signum)

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
    from jaxprm.data.pipeline import make_loader
    from jaxprm.models.prm import PRMModel
    from jaxprm.models.qwen2_5_vl import Qwen25VL, from_pretrained
    from jaxprm.optim import make_optimizer

    validate_config(c)
    os.makedirs(c.workdir, exist_ok=True)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    model_cfg, tok, ip = model_assets(c)
    spec = dataclasses.replace(ckpt.default_spec(tok, head=c.model.head), system_prompt=c.model.system_prompt or None,
                               prompt_style=c.model.prompt_style, history=c.model.history, task=synthetic_task(c) if c.data.source == "synthetic" else None)
    if jax.process_index() == 0:
        ckpt.save_assets(os.path.join(c.workdir, ckpt.ASSETS), spec=spec, model_config=model_cfg, tokenizer=tok,
                         image_processor=ip)
    data_dir = prepare_data(c)

    # -- model, sharded from the start ---------------------------------------------------------------
    kw = dict(dtype=jnp.dtype(c.model.dtype), param_dtype=jnp.dtype(c.model.param_dtype),
              attn_impl=c.model.attn_impl, remat_policy=None if c.model.remat == "none" else c.model.remat)

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
    def open_mngr():
        return ckpt.checkpoint_manager(c.workdir, max_to_keep=c.train.keep_checkpoints,
                                       async_save=c.train.async_checkpoint)

    mngr = open_mngr()
    train_iter = iter(train_loader)
    start = 0
    export_dir = os.path.join(c.workdir, "export")
    restored = _resume(c, mngr, state, graphdef=graphdef, step_sharding=state_sh["step"], reopen=open_mngr)
    if restored is not None:
        latest, state, data_state, mngr = restored
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

    final: dict = {}
    bar = _progress(c, start, total_steps)
    metrics_log = TrainMetrics(c.workdir, schedule=sched, flops_per_token=estimate_flops_per_token(model_cfg), bar=bar)

    def save(step: int, force: bool = False):
        ckpt.save_train_state(mngr, step, state, data=train_iter.get_state(), metrics=final, force=force)

    def run_eval(step: int):
        ev = evaluate(c, eval_step, state, data_dir, tok, ip, model_cfg, mesh)
        final.update(ev)
        metrics_log.write(step, ev)
        log.info("step %d eval %s", step, fmt(ev))

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
            metrics_log.add(metrics)
            if step % c.train.log_every == 0 or step == total_steps:
                final.update(metrics_log.log_train(step))
            if has_eval and step % c.train.eval_every == 0 and step < total_steps:
                run_eval(step)
            if step % c.train.save_every == 0:
                save(step)
            if bar is not None:
                bar.update(1)
            if step_hook is not None:
                step_hook(step)
            if not stop.requested and mngr.reached_preemption(step):  # another host got the signal
                stop.requested, stop.signum = True, int(signal.SIGTERM)
            if stop.requested:
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
    if stop.requested:
        final["signal"] = stop.signum
    if step == 0:
        metrics_log.close()
        raise TrainingError(
            f"trained 0 steps: the training split of {data_dir} gave no batch of {c.train.batch_size} rows "
            f"({n_train} records, {final['skipped_records']} skipped; see the log). Nothing was exported.")
    if not stop.requested:
        # the checkpoint (above) and the export come first; the final evaluation is optional
        if c.train.export and jax.process_index() == 0:
            _export(graphdef, state, tok, ip, export_dir)
        if has_eval and step > start:
            run_eval(step)
        if jax.process_index() == 0:  # what a rerun of the finished workdir reports
            atomic_write_json(os.path.join(c.workdir, FINAL_METRICS),
                              {k: v for k, v in final.items() if isinstance(v, (int, float))}, indent=2)
    metrics_log.close()
    return final


FINAL_METRICS = "final_metrics.json"  # {workdir}/FINAL_METRICS: the finished run's last metrics
SET_ASIDE = "checkpoints_set_aside"  # {workdir}/SET_ASIDE/<step>: steps a resume could not or did not use


def _resume(c, mngr, state, *, graphdef, step_sharding, reopen):
    """``(step, state, data_state, mngr)`` of the checkpoint to resume from, or ``None`` for a fresh run.

    ``train.resume_step`` = 0: the newest step that restores; a step that does not (a corrupt or
    half-deleted directory) is logged with the reason and the next older one is tried. > 0: that
    step, or an error naming the steps there are. ``mngr`` is the manager to go on with. Newer steps than the one resumed from are moved
    to ``{workdir}/checkpoints_set_aside/`` (kept for inspection; the resumed run re-saves them).
    """
    want = int(c.train.get("resume_step", 0) or 0)
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        if want:
            raise TrainingError(f"train.resume_step={want}: {c.workdir} has no checkpoints")
        return None
    if want:
        if want not in steps:
            raise TrainingError(f"train.resume_step={want}: no such checkpoint in "
                                f"{os.path.join(c.workdir, ckpt.CHECKPOINTS)} (steps: {sorted(steps)})")
        candidates = [want]
    else:
        candidates = steps
    failed: dict[int, str] = {}
    for step in candidates:
        try:
            new_state, data_state = ckpt.restore_train_state(mngr, step, state, graphdef=graphdef,
                                                             freeze_vision=c.model.freeze_vision,
                                                             step_sharding=step_sharding)
        except Exception as e:  # noqa: BLE001 - Orbax/tensorstore/JSON errors alike: the step is unusable
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            failed[step] = reason
            log.warning("checkpoint step %d in %s cannot be restored (%s)%s", step,
                        os.path.join(c.workdir, ckpt.CHECKPOINTS), reason,
                        "" if want else "; trying the next older step")
            continue
        if failed or step != steps[0]:
            log.warning("resuming from step %d, not the newest step %d%s", step, steps[0],
                        f" (unrestorable: {', '.join(map(str, failed))})" if failed else
                        f" (train.resume_step={want})")
        newer = [s for s in steps if s > step]
        if newer:
            _set_aside(c.workdir, mngr, newer, failed)
            mngr = reopen()  # a manager that no longer lists them
        return step, new_state, data_state, mngr
    raise TrainingError(f"no checkpoint in {os.path.join(c.workdir, ckpt.CHECKPOINTS)} can be restored: "
                        + "; ".join(f"step {s}: {r}" for s, r in failed.items())
                        + ". Move them away (or use a new workdir) to start from scratch.")


def _set_aside(workdir: str, mngr, steps, failed: dict) -> None:
    """Move checkpoint ``steps`` out of the manager's directory (so the resumed run can save them
    again); closes ``mngr``."""
    mngr.wait_until_finished()
    mngr.close()
    if jax.process_index() == 0:
        import time

        dest_root = os.path.join(workdir, SET_ASIDE)
        os.makedirs(dest_root, exist_ok=True)
        for step in steps:
            src = os.path.join(os.fspath(mngr.directory), str(step))
            if not os.path.isdir(src):  # a non-default step name format: let Orbax remove nothing
                continue
            dest = os.path.join(dest_root, f"{step}-{'unrestorable' if step in failed else 'newer'}-{int(time.time())}")
            os.replace(src, dest)
            log.warning("moved checkpoint step %d to %s (%s)", step, dest,
                        failed.get(step, "newer than the step resumed from"))
    _sync("checkpoints set aside")


def _export(graphdef, state, tok, ip, export_dir) -> None:
    model = nnx.merge(graphdef, state["trainable"], state["frozen"])
    out = ckpt.export_hf(model, tok, ip, export_dir)
    log.info("exported the PRM to %s (load with jaxprm.load_prm)", out)


def _already_done(c, mngr, step, graphdef, state, tok, ip, export_dir) -> dict:
    """A rerun of a finished workdir: say so, write the export if a kill came before it, change nothing else."""
    meta = ckpt.restore_meta(mngr, step)
    mngr.close()
    try:  # the final metrics (with the final eval, which runs after the last checkpoint)
        with open(os.path.join(c.workdir, FINAL_METRICS)) as f:
            meta = {"metrics": json.load(f)}
    except (OSError, ValueError):
        pass
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
        print("final: " + fmt({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
        if metrics.get("stopped"):  # saved, not finished: tell schedulers apart from success and errors
            sys.exit(stopped_exit_status(metrics.get("signal") or signal.SIGTERM))

    app.run(run, argv=argv, flags_parser=lambda a: config.parse_flags(a, prog="python -m jaxprm.train"))


if __name__ == "__main__":
    main()
