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
def backbone_kind(c) -> str:
    """``"internvl"`` or ``"qwen2_5_vl"``: the backbone the config trains. Random init: the preset's family
    (``config.internvl_presets()``); HF weights: what ``model.hf_dir``'s config.json is (an InternVL one:
    remote-code ``llm_config`` layout or ``model_type: internvl``)."""
    if c.model.init == "random":
        return "internvl" if c.model.preset in config.internvl_presets() else "qwen2_5_vl"
    return "internvl" if ckpt.is_internvl_dir(c.model.hf_dir) else "qwen2_5_vl"


def prompt_style(c) -> str:
    """``model.prompt_style``, or when it is "" the backbone's family's: ``"visualprm"`` (VisualPRM's layout)
    on InternVL, the default ``"vlprm"`` (VL-PRM's) on Qwen2.5-VL."""
    from jaxprm.data.prompt import DEFAULT_PROMPT_STYLE

    if c.model.prompt_style:
        return c.model.prompt_style
    return ckpt.INTERNVL_PROMPT_STYLE if backbone_kind(c) == "internvl" else DEFAULT_PROMPT_STYLE


def _internvl_assets(c):
    """(InternVLConfig, tokenizer, InternVLImageProcessor): the tiny preset (the embedded task's tokenizer
    with InternVL's added tokens), a released shape (``model.preset``, tokenizer from ``model.hf_dir``) or
    the checkpoint in ``model.hf_dir``."""
    import dataclasses as dc

    from jaxprm.data.preprocess_internvl import InternVLImageProcessor
    from jaxprm.data.prompt import INTERNVL_IMAGE_PAD

    if c.model.init == "random" and c.model.preset == config.TINY_INTERNVL_PRESET:
        from jaxprm.data.synthetic import build_synthetic_internvl_tokenizer, tiny_internvl_config

        tok = build_synthetic_internvl_tokenizer()
        cfg = tiny_internvl_config(tok)
        ip = InternVLImageProcessor(image_size=cfg.vision.image_size, max_tiles=6)
    else:
        from transformers import AutoTokenizer

        from jaxprm.models.internvl import InternVLConfig
        from jaxprm.models.internvl.presets import preset

        tok = AutoTokenizer.from_pretrained(c.model.hf_dir)
        cfg = InternVLConfig.from_pretrained(c.model.hf_dir) if c.model.init == "hf" else preset(c.model.preset)
        if cfg.image_token_id is None:  # remote-code config.json: the id is the tokenizer's
            tid = tok.convert_tokens_to_ids(INTERNVL_IMAGE_PAD)
            if tid is None or tid == tok.unk_token_id:
                raise config.ConfigError(f"model.hf_dir={c.model.hf_dir}: the tokenizer has no {INTERNVL_IMAGE_PAD} "
                                         "token; is it the InternVL checkpoint's own tokenizer?")
            cfg = dc.replace(cfg, image_token_id=int(tid))
        ip = ckpt.internvl_image_processor(c.model.hf_dir, cfg)
    if c.data.max_tiles:
        ip = InternVLImageProcessor.from_config({**ip.to_config(), "max_tiles": int(c.data.max_tiles)})
    return cfg, tok, ip


def model_assets(c):
    """(model_config, tokenizer, image_processor) for the config."""
    from jaxprm.data.preprocess import ImageProcessor

    if backbone_kind(c) == "internvl":
        return _internvl_assets(c)
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
    """The TFDS data_dir to read, building it first for synthetic/records sources (once).

    Multi-host: process 0 alone decides whether the dataset exists and builds it; the others wait
    (``once_on_process_0``) and then read the same directory (a shared filesystem). A build that
    fails on process 0 stops every process with its error instead of leaving them waiting."""
    from jaxprm.data import tfds_builder

    if c.data.source == "tfds":
        return c.data.data_dir
    data_dir = c.data.data_dir or os.path.join(c.workdir, "data")

    def build():
        try:
            tfds_builder.dataset_dir(data_dir)
            return  # already built (a resumed run)
        except FileNotFoundError:
            pass
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

    once_on_process_0(f"building the dataset in {data_dir}", build)
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


# ------------------------------------------------------------------------------------------------
# multi-host: work done once, agreement between processes, failing fast
# ------------------------------------------------------------------------------------------------
# how long processes 1..N-1 wait for process 0's one-off work (the dataset import: can be hours)
BARRIER_TIMEOUT_ENV = "JAXPRM_BARRIER_TIMEOUT"
_DEFAULT_BARRIER_TIMEOUT_S = 24 * 3600


class PeerProcessError(TrainingError):
    """Another process of a multi-host run failed; this one stops with its error."""


def _distributed_client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized, but jax.process_count() > 1")
    return client


def once_on_process_0(what: str, fn) -> None:
    """Run ``fn()`` on process 0 while the other processes wait; then everyone goes on together.

    If ``fn`` raises on process 0, every other process raises ``PeerProcessError`` with that error
    (through the distributed runtime's key-value store) instead of waiting at a barrier that process 0
    never reaches. The wait is bounded by ``$JAXPRM_BARRIER_TIMEOUT`` seconds (default 24 h); a
    process 0 that dies outright ends the wait through JAX's heartbeat (``JAXPRM_HEARTBEAT_TIMEOUT``).
    """
    if jax.process_count() == 1:
        fn()
        return
    client = _distributed_client()
    key = "jaxprm/once/" + "".join(ch if ch.isalnum() else "_" for ch in what)[:200]
    timeout_ms = int(float(os.environ.get(BARRIER_TIMEOUT_ENV, _DEFAULT_BARRIER_TIMEOUT_S)) * 1000)
    if jax.process_index() == 0:
        try:
            fn()
        except BaseException as e:
            client.key_value_set(key, f"error: {type(e).__name__}: {e}")
            try:  # make sure the others have read it before this process exits
                client.wait_at_barrier(key + "/error_read", 60_000)
            except Exception:  # noqa: BLE001 - they may be gone already
                pass
            raise
        client.key_value_set(key, "ok")
    else:
        log.info("process %d waits for process 0: %s", jax.process_index(), what)
        status = client.blocking_key_value_get(key, timeout_ms)
        if status != "ok":
            try:
                client.wait_at_barrier(key + "/error_read", 60_000)
            except Exception:  # noqa: BLE001
                pass
            raise PeerProcessError(f"process 0 failed while {what}, so process {jax.process_index()} stops too. "
                                   f"Process 0's error: {status.removeprefix('error: ')}")
    _sync(what[:100])


def _agree(batch, signum: int, *, eval_rows: bool = False, empty=None):
    """One exchange between the processes per step: ``(batch, signum, exhausted)``.

    Hosts choose buckets independently and a global array needs one shape, so ``batch`` grows to the
    largest (seq_len, patches) of any host. ``signum``: the largest signal number any host received
    (SIGTERM/SIGINT on one host stops all of them at the same step). ``exhausted``: how many hosts have
    no batch left. Training stops when one host runs out (the others would wait for it forever);
    evaluation (``eval_rows``) goes on while any host has a batch, the others feeding ``empty(rows,
    seq_len, patches)`` (all padding, no labels), and rows grow to the largest count. ``batch`` is None
    when the step is not to be taken."""
    if jax.process_count() == 1:
        return batch, signum, int(batch is None)
    from jax.experimental import multihost_utils

    from jaxprm.data.pipeline import pad_batch

    has = batch is not None
    mine = np.array([batch["input_ids"].shape[1] if has else 0, batch["pixel_values"].shape[1] if has else 0,
                     batch["input_ids"].shape[0] if has else 0, int(has), int(signum or 0)], np.int64)
    allv = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 5)
    seq_len, patches, rows = (int(x) for x in allv[:, :3].max(0))
    exhausted = int((allv[:, 3] == 0).sum())
    sig = int(allv[:, 4].max())
    if exhausted == len(allv) or (exhausted and not eval_rows):
        return None, sig, exhausted
    if not has:
        batch = empty(rows, seq_len, patches)
    batch = pad_batch(batch, seq_len, patches)
    if eval_rows and batch["input_ids"].shape[0] < rows:
        batch = _pad_rows(batch, rows)
    return batch, sig, exhausted


def _fail_fast(e: BaseException, workdir: str) -> None:
    """Multi-host: after an error, say what happened and exit at once (status 1).

    A normal exit first waits at JAX's shutdown barrier for every other process: when one of them has
    died, that is up to the heartbeat timeout and then an abort with a C++ stack trace, and meanwhile
    this process keeps its connections open, so peers blocked in a collective wait too. Exiting
    closes them, and a peer blocked in a collective fails at once."""
    import traceback

    i, n = jax.process_index(), jax.process_count()
    text = f"{type(e).__name__}: {e}"
    lost = any(s in text for s in ("Gloo", "Connection reset", "Connection closed", "heartbeat", "UNAVAILABLE",
                                   "DEADLINE_EXCEEDED", "NCCL", "Socket closed"))
    tb = "".join(traceback.format_exception(e))
    log.error("%s", tb.rstrip())
    if isinstance(e, PeerProcessError):
        why = str(e)
    elif lost:
        why = (f"lost contact with the other processes ({text.splitlines()[0][:300]}): another host has "
               "probably died or been preempted; its log says why")
    else:
        why = f"failed: {text.splitlines()[0][:500] if text.strip() else type(e).__name__}"
    log.error("process %d of %d %s. Every process of the run stops; rerun the same command on every host to "
              "resume from the last complete checkpoint in %s.", i, n, why, os.path.join(workdir, ckpt.CHECKPOINTS))
    for h in logging.getLogger("jaxprm").handlers + logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def pipeline_config(c, *, train: bool, seed: int):
    """Training batches use the prompt of ``model.history``; evaluation batches always use the scoring
    prompt (placeholders in every assistant turn), so eval numbers are what ``PRM.score`` gives."""
    from jaxprm.data.pipeline import PipelineConfig, auto_worker_count, resolve_pixel_dtype
    from jaxprm.data.prompt import encode_mode

    d = c.data
    rows = (c.train.batch_size if train else max(c.train.batch_size // c.train.grad_accum, 1)) // jax.process_count()
    workers = int(d.worker_count)
    if workers < 0:
        workers = auto_worker_count(float(d.get("workers_per_chip", 0.0)))
    pack_buffer = float(d.get("pack_buffer", 0))
    return PipelineConfig(
        prompt_style=prompt_style(c), system_prompt=c.model.system_prompt or None, batch_size=rows,
        seq_buckets=tuple(d.seq_buckets), patch_buckets=tuple(d.patch_buckets), max_steps=d.max_steps,
        max_images=d.max_images, packing=d.packing, pack_buffer=max(rows, int(np.ceil(pack_buffer * rows))) if pack_buffer > 0 else 0,
        pixel_dtype=resolve_pixel_dtype(d.get("pixel_dtype", "auto"), c.model.dtype), seed=seed, shuffle=train,
        num_epochs=c.train.epochs if train else 1, drop_remainder=train, worker_count=workers,
        label_mode=encode_mode(c.model.history, train=train))


def config_optimizer(c, *, total_steps: int):
    """(optax optimizer, lr schedule) of the config's ``optim`` settings over ``total_steps``."""
    from jaxprm.optim import make_optimizer

    o = c.optim
    return make_optimizer(lr=o.lr, total_steps=total_steps, warmup_ratio=o.warmup_ratio, schedule_kind=o.schedule,
                          b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip=o.clip, mu_dtype=o.mu_dtype)


def config_train_step(c, graphdef, optimizer, image_token_id: int):
    """The pure train step (``make_train_step``) with the config's accumulation, loss and rounding."""
    return make_train_step(graphdef, optimizer, accum=c.train.grad_accum, class_weights=tuple(c.train.class_weights),
                           accum_dtype=c.train.grad_accum_dtype, rounding=c.optim.rounding, seed=c.model.seed,
                           lm_loss_weight=c.train.lm_loss_weight, image_token_id=image_token_id)


def steps_in_an_epoch(c, loader, n_train: int) -> int:
    """Optimizer steps per epoch: records // ``train.batch_size`` with one example per row. With
    ``data.packing`` a batch holds several examples per row (~2x as many on VL-PRM300K-shaped data),
    so it is the loader's estimate of its packed batches (``PrmLoader.batches_per_epoch``, from a
    sample of the records; deterministic, so a resumed run gets the same schedule), the smallest over
    the hosts since training stops when one runs out."""
    if not c.data.packing:
        return max(n_train // c.train.batch_size, 1)
    n = int(loader.batches_per_epoch())
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        n = int(np.min(multihost_utils.process_allgather(np.array([n], np.int64))))
    log.info("packing: ~%d batches of %d rows per epoch (%.1f records per batch; estimated from a sample)",
             n, c.train.batch_size, n_train / max(n, 1))
    return max(n, 1)


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

    validate_config(c)
    os.makedirs(c.workdir, exist_ok=True)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    model_cfg, tok, ip = model_assets(c)
    spec = dataclasses.replace(ckpt.default_spec(tok, head=c.model.head), system_prompt=c.model.system_prompt or None,
                               prompt_style=prompt_style(c), history=c.model.history, task=synthetic_task(c) if c.data.source == "synthetic" else None)
    if jax.process_index() == 0:
        ckpt.save_assets(os.path.join(c.workdir, ckpt.ASSETS), spec=spec, model_config=model_cfg, tokenizer=tok,
                         image_processor=ip)
    data_dir = prepare_data(c)

    # -- model, sharded from the start ---------------------------------------------------------------
    kw = dict(dtype=jnp.dtype(c.model.dtype), param_dtype=jnp.dtype(c.model.param_dtype),
              attn_impl=c.model.attn_impl, remat_policy=None if c.model.remat == "none" else c.model.remat)

    if backbone_kind(c) == "internvl":
        from jaxprm.models.internvl import InternVL as backbone_cls
        from jaxprm.models.internvl import from_pretrained

        hf_kw = dict(kw, image_token_id=model_cfg.image_token_id)  # remote-code layout: the tokenizer's id
    else:
        from jaxprm.models.qwen2_5_vl import Qwen25VL as backbone_cls
        from jaxprm.models.qwen2_5_vl import from_pretrained

        hf_kw = kw

    def build():
        if c.model.init == "hf":
            return PRMModel(from_pretrained(c.model.hf_dir, **hf_kw), spec)
        return PRMModel(backbone_cls(model_cfg, rngs=nnx.Rngs(c.model.seed), **kw), spec)

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
    train_loader = make_loader(data_dir, c.data.train_split, tok, ip, model_cfg,
                               pipeline_config(c, train=True, seed=c.model.seed))
    steps_per_epoch = steps_in_an_epoch(c, train_loader, n_train)
    total_steps = steps_per_epoch * c.train.epochs
    if c.train.max_steps:
        total_steps = min(total_steps, c.train.max_steps)

    # -- optimizer and state -----------------------------------------------------------------------------
    optimizer, sched = config_optimizer(c, total_steps=steps_per_epoch * c.train.epochs)
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

    train_step = jit_train_step(config_train_step(c, graphdef, optimizer, model_cfg.image_token_id), state_sh)
    eval_step = jax.jit(make_eval_step(graphdef, class_weights=tuple(c.train.class_weights)))

    final: dict = {}
    bar = _progress(c, start, total_steps)
    metrics_log = TrainMetrics(c.workdir, schedule=sched, flops_per_token=estimate_flops_per_token(model_cfg), bar=bar)

    def save(step: int, force: bool = False, data=None):
        ckpt.save_train_state(mngr, step, state, data=train_iter.get_state() if data is None else data,
                              metrics=final, force=force)

    def run_eval(step: int):
        ev = evaluate(c, eval_step, state, data_dir, tok, ip, model_cfg, mesh)
        final.update(ev)
        metrics_log.write(step, ev)
        log.info("step %d eval %s", step, fmt(ev))

    step = start
    data_mark = train_iter.stats.state_dict()  # the loader's counters at the start of the log window
    stopped_by = 0  # the signal all hosts agreed to stop on (0: not stopped)
    with _Stop() as stop:
        while True:
            # the data position before this step's batch: what a stop before the step saves
            before = train_iter.get_state()
            batch = None
            if step < total_steps:
                try:
                    batch = next(train_iter)
                except StopIteration:
                    pass
            # one exchange between the hosts: the batch shape, a signal on any host, data left on all.
            # Every host acts on the agreed signal only: a signal that lands during the exchange is
            # sent at the next one (acting on it at once would leave the other hosts in the next step)
            mine = stop.signum if stop.requested else 0
            batch, sig, exhausted = _agree(batch, mine)
            if sig and not mine:
                log.warning("another process received %s: saving and stopping with it", signal.Signals(sig).name)
            if sig:
                stopped_by = sig
            if sig or batch is None:
                if step < total_steps and batch is None and not sig:
                    log.info("data exhausted after %d steps%s", step,
                             f" (on {exhausted} of {jax.process_count()} processes)" if jax.process_count() > 1 else "")
                if step > start and mngr.latest_step() != step:
                    save(step, force=True, data=before)
                if sig:
                    mngr.wait_until_finished()
                    log.warning("stopped at step %d; rerun the same command to resume", step)
                break
            state, metrics = train_step(state, shd.shard_batch(batch, mesh))
            step += 1
            metrics_log.add(metrics)
            if step % c.train.log_every == 0 or step == total_steps:
                final.update(metrics_log.log_train(step))
                # how full the window's batches were (real / carried tokens, patches, label slots): console + TensorBoard
                data_eff = train_iter.stats.efficiency(since=data_mark)
                data_mark = train_iter.stats.state_dict()
                metrics_log.write(step, data_eff)
                log.info("step %d %s", step, fmt(data_eff))
            if has_eval and step % c.train.eval_every == 0 and step < total_steps:
                run_eval(step)
            if step % c.train.save_every == 0:
                save(step)
            if bar is not None:
                bar.update(1)
            if step_hook is not None:
                step_hook(step)
            if not stop.requested and mngr.reached_preemption(step):  # JAX's preemption notice (all hosts)
                stop.requested, stop.signum = True, int(signal.SIGTERM)
        mngr.wait_until_finished()
    if bar is not None:
        bar.close()
    mngr.close()
    final["step"] = step
    final["skipped_records"] = int(getattr(getattr(train_iter, "stats", None), "skipped", 0) or 0)
    final["stopped"] = bool(stopped_by)
    if stopped_by:
        final["signal"] = stopped_by
    if step == 0:
        metrics_log.close()
        raise TrainingError(
            f"trained 0 steps: the training split of {data_dir} gave no batch of {c.train.batch_size} rows "
            f"({n_train} records, {final['skipped_records']} skipped; see the log). Nothing was exported.")
    if not stopped_by:
        # the checkpoint (above) and the export come first; the final evaluation is optional
        if c.train.export:
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
    """Every process calls this (multi-host: the params are gathered to host memory, a collective);
    process 0 writes."""
    trainable, frozen = state["trainable"], state["frozen"]
    if jax.process_count() > 1:  # sharded over hosts (fsdp/tensor): not readable from one process
        from jax.experimental import multihost_utils

        trainable, frozen = (jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), t)
                             for t in (trainable, frozen))
    if jax.process_index() != 0:
        return
    model = nnx.merge(graphdef, trainable, frozen)
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
    # every process decides alike (the same shared file), as _export is a collective
    if c.train.export and not os.path.exists(os.path.join(export_dir, "prm.json")):
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
    from jaxprm.data.pipeline import batch_spec, make_loader
    from jaxprm.models.prm import f1_from_counts

    pcfg = pipeline_config(c, train=False, seed=0)
    loader = make_loader(data_dir, c.data.eval_split, tok, ip, model_cfg, pcfg)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    local_dp = max(dp // jax.process_count(), 1)

    def empty(rows, seq_len, patches):  # a host whose slice is used up: rows of padding only
        spec = batch_spec(dataclasses.replace(pcfg, batch_size=rows), model_cfg, seq_len, patches)
        return {k: np.full(shape, -1 if k == "labels" else 0, dtype) for k, (shape, dtype) in spec.items()}

    sums: dict = {}
    n = 0
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            batch = None
        if batch is not None:  # a short (last) batch: a multiple of this host's data-parallel devices
            batch = _pad_rows(batch, -(-batch["input_ids"].shape[0] // local_dp) * local_dp)
        # every host takes part in every batch (a collective) until all are done
        batch, _, _ = _agree(batch, 0, eval_rows=True, empty=empty)
        if batch is None:
            break
        with jax.set_mesh(mesh):  # the model's activation sharding constraints apply
            m = eval_step(state["trainable"], state["frozen"], shd.shard_batch(batch, mesh))
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


def _pad_rows(batch, rows: int):
    """Grow a (short, last) eval batch to ``rows`` rows with empty ones (no labels)."""
    b = batch["input_ids"].shape[0]
    extra = rows - b
    if extra <= 0:
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
HEARTBEAT_TIMEOUT_ENV = "JAXPRM_HEARTBEAT_TIMEOUT"


def maybe_initialize_distributed() -> None:
    """Multi-host runs: ``jax.distributed.initialize`` before any JAX call (docs/multihost.md).

    On when ``JAX_COORDINATOR_ADDRESS`` is set (then ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are
    read too: launch/gpu_multihost.sh) or when ``JAXPRM_DISTRIBUTED=1`` (TPU pods, SLURM and Open MPI:
    JAX reads the cluster's environment). ``JAXPRM_HEARTBEAT_TIMEOUT`` (seconds, JAX's default 100):
    how long the processes wait for a silent one before the distributed runtime ends them.
    """
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    kw = {}
    if os.environ.get(HEARTBEAT_TIMEOUT_ENV):
        kw["heartbeat_timeout_seconds"] = int(float(os.environ[HEARTBEAT_TIMEOUT_ENV]))
    if addr:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not os.environ.get(k)]
        if missing:
            raise config.ConfigError(f"JAX_COORDINATOR_ADDRESS={addr} is set but {' and '.join(missing)} not: "
                                     "set all three on every host (launch/gpu_multihost.sh)")
        kw.update(coordinator_address=addr, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("JAXPRM_DISTRIBUTED") != "1":
        return
    jax.distributed.initialize(**kw)
    log.info("process %d of %d (%d local of %d devices: %s); if a process dies, the others stop at their next "
             "collective or, at the latest, after the %s s heartbeat timeout (%s)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count(), jax.local_devices()[0].platform,
             kw.get("heartbeat_timeout_seconds", 100), HEARTBEAT_TIMEOUT_ENV)


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
        try:
            maybe_initialize_distributed()
        except ConfigError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
        if jax.process_count() > 1:  # one log per host, often merged (SLURM): say whose line it is
            handler.setFormatter(logging.Formatter(
                f"%(asctime)s %(levelname)s [process {jax.process_index()}/{jax.process_count()}] %(name)s: %(message)s"))
        try:
            metrics = train(flags_.config)
        except ConfigError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
        except Exception as e:  # noqa: BLE001
            if jax.process_count() > 1:
                _fail_fast(e, flags_.config.workdir)  # exits
            raise
        print("final: " + fmt({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
        if metrics.get("stopped"):  # saved, not finished: tell schedulers apart from success and errors
            sys.exit(stopped_exit_status(metrics.get("signal") or signal.SIGTERM))

    app.run(run, argv=argv, flags_parser=lambda a: config.parse_flags(a, prog="python -m jaxprm.train"))


if __name__ == "__main__":
    main()
