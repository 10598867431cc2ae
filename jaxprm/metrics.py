"""Training metrics: per-window sums of the train step's on-device counters -> loss, accuracy, macro-F1,
grad norm, learning rate, tokens/s and MFU -> console (or the progress bar) and TensorBoard.

The train step returns sums (``loss_sum``, ``weight_sum``, confusion counts, ``tokens``, ...); they
stay on device until a log step, when one ``device_get`` turns the window into means.
"""
from __future__ import annotations

import logging
import os
import time

import jax

log = logging.getLogger("jaxprm.train")

# dense bf16 peak per chip, TFLOP/s (device_kind substrings, lower case)
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "v5e": 197.0, "v5 lite": 197.0, "v4": 275.0,
               "v5p": 459.0, "v6": 918.0, "l4": 121.0}


def estimate_flops_per_token(cfg) -> float:
    """6 x (non-embedding text params) + attention, per token, forward+backward (an MFU estimate)."""
    t = cfg.text
    per_layer = (t.hidden_size * t.head_dim * (t.num_attention_heads * 2 + t.num_key_value_heads * 2)
                 + 3 * t.hidden_size * t.intermediate_size)
    return 6.0 * per_layer * t.num_hidden_layers


def peak_flops() -> float | None:
    """Peak FLOP/s of all devices, or None for an unknown device kind (then no MFU is reported)."""
    kind = jax.devices()[0].device_kind.lower()
    for k, v in PEAK_TFLOPS.items():
        if k in kind:
            return v * 1e12 * jax.device_count()
    return None


def fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in d.items())


def open_writer(workdir: str):
    """A TensorBoard writer for ``workdir/events`` on process 0 (None elsewhere or without tensorboardX)."""
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        log.warning("tensorboardX not installed: no TensorBoard event files")
        return None
    return SummaryWriter(os.path.join(workdir, "events"))


class TrainMetrics:
    """What a run reports: ``add`` each step's metrics, ``log_train`` at log steps (returns the means),
    ``write`` any other scalars (eval) to the same TensorBoard run."""

    def __init__(self, workdir: str, *, schedule, flops_per_token: float, bar=None):
        self.writer = open_writer(workdir)
        self.schedule = schedule
        self.flops_per_token = flops_per_token
        self.peak = peak_flops()
        self.bar = bar
        self._t = time.perf_counter()
        self._sums: dict = {}

    def add(self, metrics) -> None:
        self._sums["_n"] = self._sums.get("_n", 0) + 1
        for k, v in metrics.items():
            self._sums[k] = self._sums.get(k, 0) + v  # device arrays; summed lazily

    def log_train(self, step: int) -> dict:
        """The window's means (``train/*``, ``perf/*``), logged and written; starts a new window."""
        from jaxprm.models.prm import f1_from_counts

        sums = {k: float(v) for k, v in jax.device_get(self._sums).items()}
        dt = time.perf_counter() - self._t
        n_steps = max(1, int(round(sums.get("_n", 0))))
        tokens = sums.get("tokens", 0.0)
        f1 = f1_from_counts(sums)
        out = {"train/loss": sums["loss_sum"] / max(sums["weight_sum"], 1e-9), "train/acc": f1["acc"],
               "train/macro_f1": f1["macro_f1"], "train/grad_norm": sums.get("grad_norm", 0.0) / max(n_steps, 1),
               "train/lr": float(self.schedule(step)), "perf/tokens_per_s": tokens / max(dt, 1e-9)}
        if "lm_tokens" in sums:
            out["train/lm_loss"] = sums["lm_loss_sum"] / max(sums["lm_tokens"], 1.0)
        if self.peak:
            out["perf/mfu"] = self.flops_per_token * tokens / max(dt, 1e-9) / self.peak
        self.write(step, out)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{out['train/loss']:.4f}", acc=f"{out['train/acc']:.3f}",
                                 tok_s=f"{out['perf/tokens_per_s']:.0f}")
        else:
            log.info("step %d %s", step, fmt(out))
        self._t, self._sums = time.perf_counter(), {}
        return out

    def write(self, step: int, d: dict) -> None:
        if self.writer is None:
            return
        for k, v in d.items():
            self.writer.add_scalar(k, float(v), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


__all__ = ["PEAK_TFLOPS", "TrainMetrics", "estimate_flops_per_token", "fmt", "open_writer", "peak_flops"]
