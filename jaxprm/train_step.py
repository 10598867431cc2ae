"""Pure, jittable training and evaluation steps for a PRM.

The train state is a plain dict: ``trainable`` / ``frozen`` (NNX param states), ``opt_state``
(for ``trainable`` only) and ``step``. A global batch of B rows is split into ``accum`` micro-
batches and ``lax.scan`` sums their gradients. The loss of every micro-batch is normalised by the
label weight of the *whole* batch (known from the labels before any forward pass), so the summed
gradient equals the gradient of the big-batch loss exactly. Micro-batch j takes rows j, j+A, ...
so each micro-batch stays spread over all data-parallel devices. With ``accum=1`` there is no scan
and no accumulator (one gradient-sized buffer less, which matters at 7B on one card).

Gradients are upcast to fp32 before the optimizer (a no-op for fp32 master weights), so clipping,
Adam and weight decay run in fp32 also for bf16 weights, which are then written back with
stochastic rounding (``jaxprm.optim.apply_updates``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxprm.models.prm import lm_token_mask, step_loss
from jaxprm.optim import apply_updates

BATCH_AXIS = {"position_ids": 1}


def split_params(model, freeze_vision: bool):
    """-> (graphdef, trainable, frozen) with the vision tower (and its projector) frozen if asked:
    ``visual`` on Qwen2.5-VL, ``vision`` on InternVL."""
    frozen = nnx.Any(nnx.PathContains("visual"), nnx.PathContains("vision")) if freeze_vision else nnx.Nothing
    return nnx.split(model, nnx.All(nnx.Param, nnx.Not(frozen)), nnx.Param)


def label_weights(labels, class_weights):
    return jnp.where(labels == 1, class_weights[0], class_weights[1]) * (labels >= 0)


def microbatches(batch: dict, accum: int) -> dict:
    def one(k, x):
        ax = BATCH_AXIS.get(k, 0)
        b = x.shape[ax]
        if b % accum:
            raise ValueError(f"batch size {b} is not divisible by grad accumulation steps {accum}")
        x = jnp.moveaxis(x, ax, 0)
        x = x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)  # (A, B/A, ...): rows j, j+A, ...
        return jnp.moveaxis(x, 1, ax + 1)

    return {k: one(k, v) for k, v in batch.items()}


def make_train_step(graphdef, optimizer, *, accum: int = 1, class_weights=(1.0, 1.0),
                    accum_dtype="float32", rounding: str = "stochastic", seed: int = 0,
                    lm_loss_weight: float = 0.0, image_token_id: int | None = None):
    """-> ``train_step(state, batch) -> (state, metrics)``.

    ``accum_dtype``: dtype of the gradient accumulator when ``accum > 1``; ``rounding``/``seed``: how
    updates are written back to low-precision weights (see ``jaxprm.optim.apply_updates``).
    ``lm_loss_weight > 0`` adds that times the mean next-token cross-entropy over the prompt's text
    (``models.prm.lm_token_mask``): a dense signal for a backbone trained from random init (the tiny
    default), where a few step labels per example are too little to learn to read from. It forms the
    full-vocabulary logits, so keep it 0 (the default) for real-size backbones. It needs the model's
    ``image_token_id`` (image placeholders are not LM targets).
    """
    accum_dtype = jnp.dtype(accum_dtype)
    use_lm = lm_loss_weight > 0
    if use_lm and image_token_id is None:
        raise ValueError("lm_loss_weight > 0 needs image_token_id")

    def loss_fn(trainable, frozen, mb, totals):
        weight_total, lm_total = totals
        model = nnx.merge(graphdef, trainable, frozen)
        hidden = model.hidden_states(mb)
        logits = model.step_logits(mb, hidden)
        _, metrics = step_loss(logits, mb["labels"], class_weights)
        loss = metrics["loss_sum"] / weight_total
        if use_lm:
            metrics["lm_loss_sum"] = model.lm_loss_sum(mb, hidden)
            loss = loss + lm_loss_weight * metrics["lm_loss_sum"] / lm_total
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        trainable, frozen = state["trainable"], state["frozen"]
        weight_total = jnp.maximum(label_weights(batch["labels"], class_weights).sum(), 1e-9)
        lm_total = None
        if use_lm:
            lm_total = jnp.maximum(lm_token_mask(batch, image_token_id).sum(), 1)
        totals = (weight_total, lm_total)
        if accum == 1:
            (_, metrics), grads = grad_fn(trainable, frozen, batch, totals)
        else:
            mbs = microbatches(batch, accum)

            def body(carry, mb):
                g_acc, m_acc = carry
                (_, metrics), grads = grad_fn(trainable, frozen, mb, totals)
                g_acc = jax.tree.map(lambda a, g: (a + g.astype(jnp.float32)).astype(a.dtype), g_acc, grads)
                return (g_acc, jax.tree.map(jnp.add, m_acc, metrics)), None

            zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, accum_dtype), trainable)
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   jax.eval_shape(lambda: grad_fn(trainable, frozen, jax.tree.map(lambda x: x[0], mbs),
                                                                  totals)[0][1]))
            (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), mbs)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        # fp32 gradients must not change the stored dtype of the state (e.g. bf16 moments).
        opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state["opt_state"])
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        trainable = apply_updates(trainable, updates, rounding=rounding, key=key)
        metrics = dict(metrics, loss=metrics["loss_sum"] / weight_total, grad_norm=optax.tree.norm(grads),
                       tokens=(batch["segment_ids"] > 0).sum())
        if use_lm:
            metrics["lm_tokens"] = lm_total
        new_state = dict(state, trainable=trainable, opt_state=opt_state, step=state["step"] + 1)
        return new_state, metrics

    return train_step


def train_state_shardings(trainable, frozen, optimizer, mesh) -> dict:
    """Where each part of the train state lives on ``mesh`` (params by the rules table, the optimizer
    state as its params, the step replicated); ``trainable``/``frozen`` may be abstract."""
    from jaxprm import sharding as shd

    t_sh = shd.param_shardings(trainable, mesh)
    return {"trainable": t_sh, "frozen": shd.param_shardings(frozen, mesh),
            "opt_state": shd.opt_state_shardings(jax.eval_shape(optimizer.init, trainable), t_sh, mesh),
            "step": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}


def init_train_state(trainable, frozen, optimizer, mesh):
    """Place params and a fresh optimizer state on ``mesh`` -> (state, state shardings)."""
    sh = train_state_shardings(trainable, frozen, optimizer, mesh)
    state = {"trainable": jax.device_put(trainable, sh["trainable"]), "frozen": jax.device_put(frozen, sh["frozen"]),
             "opt_state": jax.jit(optimizer.init, out_shardings=sh["opt_state"])(trainable),
             "step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"])}
    return state, sh


def jit_train_step(train_step, state_shardings):
    """Jit with the state pinned to its shardings (so step n+1 reuses step n's executable) and donated.

    Runs (and so traces) under the state's mesh (``jax.set_mesh``), so the model's activation
    constraints (``jaxprm.sharding.constrain``) apply."""
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    jitted = jax.jit(train_step, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
                     donate_argnums=(0,))

    def step(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    step.jitted = jitted  # for ahead-of-time lowering (bench/pod_bench.py), traced under the same mesh
    return step


def make_eval_step(graphdef, *, class_weights=(1.0, 1.0)):
    def eval_step(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model.step_logits(batch)
        _, metrics = step_loss(logits, batch["labels"], class_weights)
        return metrics

    return eval_step
