"""Configs of the command-line programs: one system for ``python -m jaxprm.train`` and ``jaxprm.synth``.

A config is an ml_collections file whose ``get_config()`` returns a ``ConfigDict`` (training:
``configs/base.py`` and the files built on it; synthesis: ``jaxprm.synth.config.base_config``),
read with ``ml_collections.config_flags``: ``--config path.py[:arg]`` and ``--config.a.b=value`` (or
``--config.a.b value``) overrides typed by the field. ``parse_flags`` turns a command line that
cannot give a config (an override naming no field, a value of the wrong type, a missing config
file) into one usage message and exit status 2; ``validate_train_config`` checks a training config's
values once, at start-up, and raises one ``ConfigError`` listing every field to change. Each choice
list it checks comes from the module that owns the choice (presets, heads, remat policies,
attention implementations, label rules, schedules, roundings), so adding a choice is one edit there.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Any, NoReturn, Sequence

from ml_collections import ConfigDict

from jaxprm.dtypes import FLOAT_NAMES

# the training config's own vocabulary (jaxprm.train dispatches on these)
INITS = ("hf", "random")  # model.init: weights from model.hf_dir | random init of model.preset
SOURCES = ("synthetic", "records", "tfds")  # data.source
TINY_PRESET = "tiny"  # the embedded task's model (jaxprm.data.synthetic.tiny_model_config)
TINY_INTERNVL_PRESET = "internvl-tiny"  # a tiny InternVL3-shaped model (jaxprm.data.synthetic.tiny_internvl_config)
FLOAT_DTYPES = FLOAT_NAMES  # model.dtype, model.param_dtype
STATE_DTYPES = ("float32", "bfloat16")  # optim.mu_dtype, train.grad_accum_dtype


class ConfigError(ValueError):
    """A config that cannot run; the message lists every field to change."""


def alternatives(choices: Sequence[Any]) -> str:
    """``("a", "b", "c")`` -> ``"a, b or c"`` ("" shown as ``''``)."""
    names = [c if c else "''" for c in map(str, choices)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


class Problems:
    """Collects what is wrong with a config; ``raise_if_any`` raises them as one ``ConfigError``."""

    def __init__(self):
        self.errors: list[str] = []

    def need(self, ok: bool, message: str) -> bool:
        if not ok:
            self.errors.append(message)
        return bool(ok)

    def choice(self, field: str, value: Any, choices: Sequence[Any]) -> bool:
        return self.need(value in choices, f"{field} must be {alternatives(choices)}, got {value!r}")

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(self.errors))


# ------------------------------------------------------------------------------------------------
# python -m jaxprm.train
# ------------------------------------------------------------------------------------------------
def internvl_presets() -> tuple[str, ...]:
    """The ``model.preset`` names of InternVL backbones: the tiny one and the released InternVL shapes."""
    from jaxprm.models.internvl.presets import HF_CONFIGS

    return (TINY_INTERNVL_PRESET, *HF_CONFIGS)


def presets() -> tuple[str, ...]:
    """Names ``model.preset`` accepts: the embedded task's model, the released Qwen2.5-VL shapes and the
    InternVL ones (``internvl_presets``)."""
    from jaxprm.models.qwen2_5_vl.presets import HF_CONFIGS

    return (TINY_PRESET, *HF_CONFIGS, *internvl_presets())


def validate_train_config(c) -> None:
    """Check a training config (``configs/base.py`` fields); raises ``ConfigError`` naming every problem."""
    import jax

    from jaxprm import sharding as shd
    from jaxprm.data.labels import LABEL_RULES
    from jaxprm.models.attention import IMPLS
    from jaxprm.data.prompt import PROMPT_STYLES
    from jaxprm.models.prm import HEADS, HISTORIES
    from jaxprm.models.remat import NAMES as REMATS
    from jaxprm.optim import ROUNDINGS, SCHEDULES

    p = Problems()
    need = p.need
    m, d, o, t = c.model, c.data, c.optim, c.train
    need(m.init in INITS, f"model.init must be one of {INITS}, got {m.init!r}")
    if m.init == "hf":
        need(bool(m.hf_dir), "model.init='hf' needs --config.model.hf_dir=/path/to/Qwen2.5-VL or InternVL "
                             "(config.json + safetensors)")
        need(not m.hf_dir or os.path.isdir(m.hf_dir), f"model.hf_dir={m.hf_dir!r} is not a directory")
    else:
        names = presets()
        need(m.preset in names, f"model.init='random' needs model.preset in {'|'.join(names)}, got {m.preset!r}")
        need(m.preset in (TINY_PRESET, TINY_INTERNVL_PRESET) or bool(m.hf_dir),
             "random init of a real-size preset needs model.hf_dir for its tokenizer")
    need(m.dtype in FLOAT_DTYPES, f"model.dtype must be one of {sorted(FLOAT_DTYPES)}, got {m.dtype!r}")
    need(m.param_dtype in FLOAT_DTYPES, f"model.param_dtype must be one of {sorted(FLOAT_DTYPES)}, got {m.param_dtype!r}")
    need(m.attn_impl in IMPLS, f"model.attn_impl must be one of {IMPLS}, got {m.attn_impl!r}")
    need(m.remat in REMATS, f"model.remat must be one of {REMATS}, got {m.remat!r}")
    need(m.head in HEADS, f"model.head must be one of {HEADS}, got {m.head!r}")
    need(m.history in HISTORIES, f"model.history must be one of {HISTORIES}, got {m.history!r}")
    p.choice("model.prompt_style", m.prompt_style, ("", *PROMPT_STYLES))  # "": the backbone's
    need(d.source in SOURCES, f"data.source must be one of {SOURCES}, got {d.source!r}")
    if d.source == "records":
        need(bool(d.records), "data.source='records' needs --config.data.records=FILE_OR_DIR")
        need(not d.records or os.path.exists(d.records), f"data.records={d.records!r} does not exist")
    if d.source == "tfds":
        need(bool(d.data_dir), "data.source='tfds' needs --config.data.data_dir=DIR (a dataset written by jaxprm.data.tfds_builder)")
    p.choice("data.label_rule", d.label_rule, ("", *LABEL_RULES))
    need(isinstance(d.allow_images_outside_root, bool),
         f"data.allow_images_outside_root must be True or False, got {d.allow_images_outside_root!r}")
    need(int(d.get("max_tiles", 0)) >= 0, f"data.max_tiles must be >= 0 (0: the image processor's), got {d.get('max_tiles')}")
    need(0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    p.choice("data.pixel_dtype", d.get("pixel_dtype", "auto"), ("auto", "float32", "bfloat16"))
    need(int(d.worker_count) >= -1, f"data.worker_count must be >= 0, or -1 for auto, got {d.worker_count}")
    need(float(d.get("workers_per_chip", 0.0)) >= 0,
         f"data.workers_per_chip must be >= 0, got {d.get('workers_per_chip')}")
    need(int(d.worker_count) != -1 or float(d.get("workers_per_chip", 0.0)) > 0,
         "data.worker_count=-1 (auto) needs data.workers_per_chip > 0 (bench/pipeline_bench.py measures it)")
    need(float(d.get("pack_buffer", 0)) >= 0,
         f"data.pack_buffer must be >= 0 (examples held per batch row; 0: no lookahead), got {d.get('pack_buffer')}")
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(0 <= o.warmup_ratio < 1, f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    p.choice("optim.schedule", o.schedule, SCHEDULES)
    p.choice("optim.mu_dtype", o.mu_dtype, STATE_DTYPES)
    need(o.rounding in ROUNDINGS, f"optim.rounding must be one of {ROUNDINGS}, got {o.rounding!r}")
    p.choice("train.grad_accum_dtype", t.grad_accum_dtype, STATE_DTYPES)
    need(t.batch_size > 0 and t.grad_accum > 0, "train.batch_size and train.grad_accum must be > 0")
    need(t.batch_size % t.grad_accum == 0,
         f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    need(t.epochs > 0, f"train.epochs must be > 0, got {t.epochs}")
    need(len(t.class_weights) == 2 and min(t.class_weights) > 0, "train.class_weights must be two positive numbers (+, -)")
    need(t.lm_loss_weight >= 0, f"train.lm_loss_weight must be >= 0, got {t.lm_loss_weight}")
    need(t.get("resume_step", 0) >= 0, f"train.resume_step must be >= 0 (0: the latest restorable step), got {t.get('resume_step')}")
    for k in ("log_every", "eval_every", "save_every"):
        need(getattr(t, k) > 0, f"train.{k} must be > 0")
    if not p.errors:
        try:
            mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        except ValueError as e:
            p.errors.append(f"mesh: {e}")
        else:
            dp = mesh.shape["data"] * mesh.shape["fsdp"]
            micro = t.batch_size // t.grad_accum
            need(micro % dp == 0, f"micro-batch {micro} (batch_size/grad_accum) must be divisible by the "
                                  f"data-parallel size data*fsdp={dp}")
            need(t.batch_size % jax.process_count() == 0,
                 f"train.batch_size={t.batch_size} must divide over {jax.process_count()} hosts")
    p.raise_if_any()


# ------------------------------------------------------------------------------------------------
# config files and command lines
# ------------------------------------------------------------------------------------------------
def load_config(spec: str, *, name: str = "config") -> ConfigDict:
    """The config of ``path.py`` or ``path.py:arg`` (``get_config(arg)``), loaded as ``--config spec``
    loads it (ml_collections' loader), unlocked."""
    from absl import flags
    from ml_collections import config_flags

    path = str(spec).partition(":")[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    argv = ["load_config", f"--{name}={spec}"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(name, None, flag_values=fv, lock_config=False, sys_argv=argv)
    fv(argv)
    cfg = fv[name].value
    return cfg if isinstance(cfg, ConfigDict) else ConfigDict(cfg)


def usage_error(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` to stderr and exit with status 2 (argparse's convention)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: Sequence[str], flag_values=None, *, prog: str, name: str = "config") -> list[str]:
    """``flag_values(argv)`` (absl; default ``absl.flags.FLAGS``) where a command line that gives no
    usable config is a usage error (exit status 2) that names the flags to change: overrides naming
    no field (with the fields there), values that do not parse as the field's type, a config file
    that cannot be loaded. Returns the remaining (positional) arguments, ``argv[0]`` first."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    argv = list(argv)
    spec = _config_spec(argv, name)
    if spec and not os.path.isfile(spec.partition(":")[0]):
        usage_error(prog, f"--{name}: config file not found: {spec.partition(':')[0]}")
    try:
        rest = fv(argv)
    except flags.Error as e:
        usage_error(prog, str(e))
    except (AttributeError, KeyError) as e:  # ml_collections: an override path that is not in the config
        unknown = _unknown_overrides(argv, name)
        if not unknown:  # not an override: an error inside the config file, shown as such
            raise
        usage_error(prog, "no such config field:\n  - " + "\n  - ".join(unknown))
    return rest


def _config_spec(argv: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", a)
        if m:
            return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _unknown_overrides(argv: Sequence[str], name: str) -> list[str]:
    """``--name.a.b`` overrides in ``argv`` whose path is not in the config file, with what is there."""
    spec = _config_spec(argv, name)
    if not spec:
        return []
    try:
        cfg = load_config(spec, name=name)
    except Exception:  # noqa: BLE001 - only used to explain an error already being reported
        return []
    out = []
    for a in argv:
        m = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", a)
        if not m:
            continue
        path = m.group(1)
        node, parts = cfg, path.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, (ConfigDict, dict)) and part in node:
                node = node[part]
                continue
            where = ".".join([name, *parts[:i]])
            fields = sorted(node.keys()) if isinstance(node, (ConfigDict, dict)) else []
            close = difflib.get_close_matches(part, fields, n=1)
            msg = f"--{name}.{path}: {where} has no field {part!r}"
            if close:
                msg += f"; did you mean --{name}.{'.'.join([*parts[:i], close[0]])}?"
            elif fields:
                msg += f"; fields there: {', '.join(fields)}"
            out.append(msg)
            break
    return out


__all__ = ["ConfigError", "FLOAT_DTYPES", "INITS", "Problems", "SOURCES", "STATE_DTYPES", "alternatives",
           "load_config", "parse_flags", "presets", "usage_error", "validate_train_config"]
