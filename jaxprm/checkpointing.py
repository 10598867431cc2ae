"""Where a PRM's weights and everything needed to use them live on disk.

A training workdir::

    workdir/
      assets/            prm.json, config.json (HF Qwen2.5-VL config), preprocessor_config.json,
                         tokenizer files -- written once at start-up
      checkpoints/<step>/ Orbax CheckpointManager steps, one item each (ITEMS):
                           params     nnx.Param state of the whole PRM, trainable and frozen (pure dict)
                           opt_state  optimizer state (of the trainable params)
                           data       JSON: Grain iterator state (the data position); multi-host:
                                      {"processes": [state of process 0, 1, ...]} (each host's own slice)
                           meta       JSON: {"step": int, "metrics": {name: float}} (the last logged ones)
      events/            TensorBoard event files
      export/            the final PRM (``export_hf``), when train.export is on

``save_train_state`` / ``restore_train_state`` / ``restore_meta`` write and read the steps of a
training run; ``restore_params`` reads only ``params`` (what ``load_prm_model`` needs).

An exported PRM (``export_hf``) is a plain HF Qwen2.5-VL directory (config.json, model.safetensors,
tokenizer, preprocessor_config.json) plus prm.json (and step_head.safetensors for a linear head),
so transformers can load the backbone and ``load_prm_model`` the whole PRM. A PRM on the InternVL backbone
exports transformers' native InternVL layout (``model_type: internvl``) the same way; ``load_prm_model``
also reads the remote-code InternVL layout the released VisualPRMs ship (``config.json`` with
``llm_config``). It is written atomically
(a temporary directory renamed into place) and its model.safetensors carries jaxprm's writer metadata;
a directory jaxprm wrote but without prm.json is refused, while a plain HF directory without one gets
``default_spec`` (said once in the log).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprm.atomic import _UMASK, atomic_write_json, fsync_dir
from jaxprm.data.preprocess import ImageProcessor
from jaxprm.models.prm import PRMModel, PRMSpec
from jaxprm.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from jaxprm.models.qwen2_5_vl.convert import (from_pretrained, read_safetensors, save_pretrained, write_safetensors,
                                              written_by_jaxprm)

log = logging.getLogger(__name__)

ASSETS, CHECKPOINTS = "assets", "checkpoints"
ITEMS = ("params", "opt_state", "data", "meta")  # the items of a checkpoint step (module docstring)


# ------------------------------------------------------------------------------------------------
# assets: what turns arrays into a usable PRM
# ------------------------------------------------------------------------------------------------
def save_assets(directory: str, *, spec: PRMSpec, model_config, tokenizer, image_processor) -> None:
    """Write what turns a checkpoint's arrays into a PRM: prm.json, config.json (HF Qwen2.5-VL, or
    transformers' native InternVL for an ``InternVLConfig``), the image processor and the tokenizer."""
    os.makedirs(directory, exist_ok=True)
    spec.save(directory)
    arch = "Qwen2_5_VLForConditionalGeneration" if isinstance(model_config, Qwen25VLConfig) else \
        "InternVLForConditionalGeneration"
    atomic_write_json(os.path.join(directory, "config.json"), {**model_config.to_hf_dict(), "architectures": [arch]},
                      indent=2)
    image_processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def default_spec(tokenizer, head: str = "lm_rows", prompt_style: str | None = None) -> PRMSpec:
    """The VL-PRM / VisualPRM convention: the "+" and "-" tokens' rows of the lm head (prompt style: the
    default, ``"vlprm"``, unless given)."""
    from jaxprm.data.prompt import label_token_ids

    plus, minus = label_token_ids(tokenizer)
    kw = {} if prompt_style is None else {"prompt_style": prompt_style}
    return PRMSpec(plus_id=plus, minus_id=minus, head=head, **kw)


INTERNVL_PROMPT_STYLE = "visualprm"  # an InternVL directory without prm.json: a released VisualPRM


def _config_dict(directory: str) -> dict:
    import json

    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def is_internvl_dir(directory: str) -> bool:
    """Whether ``directory``'s config.json is an InternVL one (remote-code ``llm_config`` layout, or
    transformers' ``model_type: internvl``); False when it is missing or unreadable."""
    d = _config_dict(directory)
    return "llm_config" in d or d.get("model_type") in ("internvl", "internvl_chat")


def _is_remote_code_dir(directory: str) -> bool:
    return "llm_config" in _config_dict(directory)


def internvl_image_processor(directory: str, config):
    """preprocessor_config.json, else the remote-code config.json's tiling fields, else InternVL's defaults
    (1..12 tiles and a thumbnail) at the model's tile size; checked against the model."""
    from jaxprm.data.preprocess_internvl import InternVLImageProcessor

    has_own = os.path.exists(os.path.join(directory, "preprocessor_config.json"))
    if has_own or _is_remote_code_dir(directory):  # else a native config.json, which has no tiling fields
        ip = InternVLImageProcessor.from_pretrained(directory)
    else:
        ip = InternVLImageProcessor(image_size=config.vision.image_size)
    if ip.image_size != config.vision.image_size:
        raise ValueError(f"{directory}: the image processor makes {ip.image_size} px tiles but the vision tower "
                         f"takes {config.vision.image_size} px")
    return ip


JAXPRM_MARKERS = ("step_head.safetensors",)  # files only jaxprm writes (plus WRITER_METADATA in model.safetensors)


def looks_like_jaxprm(directory: str) -> str | None:
    """The file that shows ``directory`` was written by jaxprm (an export or workdir assets), or None."""
    for m in JAXPRM_MARKERS:
        if os.path.exists(os.path.join(directory, m)):
            return m
    if written_by_jaxprm(os.path.join(directory, "model.safetensors")):
        return "model.safetensors (written by jaxprm)"
    return None


def _read_json_file(what: str, fn):
    """``fn()`` with JSON/encoding errors of ``what`` (a file) turned into one ``ValueError`` naming it."""
    try:
        return fn()
    except (ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as e:
        msg = str(e)
        if what in msg:
            raise
        raise ValueError(f"{what}: not a valid file ({type(e).__name__}: {msg})") from None


def load_assets(directory: str, *, jaxprm_dir: bool = False):
    """(spec, model_config, tokenizer, image_processor) from an assets dir or an HF/exported PRM dir.

    prm.json is required in a directory jaxprm wrote (``jaxprm_dir``, or one ``looks_like_jaxprm``):
    without it the head, label ids and system prompt are unknown. A plain HF directory (a released
    VL-PRM) without one gets ``default_spec`` (the "+"/"-" rows of the lm head, the default system
    prompt), said once in the log. The spec's label ids are checked against the vocabulary and the
    tokenizer's "+"/"-" tokens."""
    from transformers import AutoTokenizer

    from jaxprm.data.prompt import label_token_ids

    if not os.path.exists(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory}: no config.json; expected a jaxprm workdir, an exported PRM "
                                "or an HF Qwen2.5-VL directory")
    prm_json = os.path.join(directory, "prm.json")
    if not os.path.exists(prm_json):
        marker = "the jaxprm workdir's assets" if jaxprm_dir else looks_like_jaxprm(directory)
        if marker:
            raise FileNotFoundError(f"{prm_json} is missing, but {directory} is a jaxprm export ({marker}): "
                                    "without it the head, label ids and system prompt are unknown; re-export "
                                    "the PRM or restore prm.json")
    internvl = is_internvl_dir(directory)
    if internvl:
        from jaxprm.models.internvl import InternVLConfig

        config = _read_json_file(os.path.join(directory, "config.json"), lambda: InternVLConfig.from_pretrained(directory))
    else:
        config = _read_json_file(os.path.join(directory, "config.json"),
                                 lambda: Qwen25VLConfig.from_pretrained(directory))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{directory}: could not load a tokenizer ({e}); copy the base model's "
                                "tokenizer files into this directory") from e
    if internvl:
        if config.image_token_id is None:  # remote-code config.json; the tokenizer files did not name it
            import dataclasses

            from jaxprm.data.prompt import INTERNVL_IMAGE_PAD

            tid = tokenizer.convert_tokens_to_ids(INTERNVL_IMAGE_PAD)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"{directory}: the tokenizer has no {INTERNVL_IMAGE_PAD} token; is it the "
                                 "checkpoint's own tokenizer?")
            config = dataclasses.replace(config, image_token_id=int(tid))
        image_processor = internvl_image_processor(directory, config)
    else:
        try:
            image_processor = _read_json_file(os.path.join(directory, "preprocessor_config.json"),
                                              lambda: ImageProcessor.from_pretrained(directory))
        except FileNotFoundError:
            image_processor = ImageProcessor(patch_size=config.vision.patch_size,
                                             temporal_patch_size=config.vision.temporal_patch_size,
                                             merge_size=config.vision.spatial_merge_size)
    spec = PRMSpec.load(directory)
    if spec is None and internvl:
        spec = default_spec(tokenizer, prompt_style=INTERNVL_PROMPT_STYLE)
        log.info("%s has no prm.json: an InternVL directory, using the VisualPRM spec (head 'lm_rows', the "
                 "\"+\"/\"-\" rows %d/%d of the lm head, prompt style %r)", directory, spec.plus_id, spec.minus_id,
                 spec.prompt_style)
    elif spec is None:
        spec = default_spec(tokenizer)
        log.info("%s has no prm.json: using the default VL-PRM spec (head 'lm_rows', the \"+\"/\"-\" rows "
                 "%d/%d of the lm head, prompt style %r)", directory, spec.plus_id, spec.minus_id, spec.prompt_style)
    spec.check_ids(vocab_size=config.text.vocab_size, label_ids=label_token_ids(tokenizer),
                   where=prm_json if os.path.exists(prm_json) else directory)
    return spec, config, tokenizer, image_processor


# ------------------------------------------------------------------------------------------------
# Orbax checkpoints of a training run
# ------------------------------------------------------------------------------------------------
def checkpoint_manager(workdir: str, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                       async_save: bool = True, item_names=ITEMS):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                        enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINTS)), options=opts,
                                 item_names=item_names)


def abstract(tree):
    """ShapeDtypeStructs (with shardings where the leaves have them): what Orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _gather_json(obj) -> list:
    """Every process's JSON-able ``obj``, in process order, on every process (a collective)."""
    import json

    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64))).reshape(-1)
    n = int(sizes.max())
    padded = np.zeros(n, np.uint8)
    padded[:raw.size] = raw
    allb = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), n)
    return [json.loads(bytes(allb[i, :sizes[i]]).decode()) for i in range(len(sizes))]


def _data_item(data):
    """The ``data`` item: one process's loader state, or (multi-host) every process's, gathered (Orbax
    writes JSON items from process 0 only, and each host reads a different slice)."""
    if jax.process_count() == 1:
        return data
    return {"processes": _gather_json(data)}


def _own_data_state(data, where: str):
    """This process's loader state from a ``data`` item (see ``_data_item``)."""
    n, i = jax.process_count(), jax.process_index()
    per = data.get("processes") if isinstance(data, dict) else None
    saved = len(per) if isinstance(per, list) else 1
    if saved != n:
        raise ValueError(f"{where}: written by a run of {saved} process(es), but this run has {n}: each host's "
                         "data position belongs to its slice of the data, which depends on the number of hosts; "
                         "resume with the same number of hosts (or start a new workdir)")
    return per[i] if isinstance(per, list) else data


def save_train_state(mngr, step: int, state: dict, *, data: dict, metrics: dict | None = None,
                     force: bool = False) -> None:
    """Save a training step: ``state`` is the train step's (trainable, frozen, opt_state, step),
    ``data`` the loader iterator's state (this process's; multi-host: every process calls this),
    ``metrics`` the last logged metrics."""
    import orbax.checkpoint as ocp

    params = nnx.merge_state(state["trainable"], state["frozen"])
    data = _data_item(data)
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        data=ocp.args.JsonSave(data),
        meta=ocp.args.JsonSave({"step": step, "metrics": {k: float(v) for k, v in (metrics or {}).items()}})),
        force=force)


def restore_train_state(mngr, step: int, state: dict, *, graphdef, freeze_vision: bool, step_sharding):
    """``(state, data)`` of checkpoint ``step``, restored into the shardings of ``state`` (a freshly
    initialised train state of the same run); ``data`` is this process's loader iterator state."""
    import orbax.checkpoint as ocp

    from jaxprm.train_step import split_params

    params_full = nnx.merge_state(state["trainable"], state["frozen"])
    r = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(nnx.to_pure_dict(params_full))),
        opt_state=ocp.args.StandardRestore(abstract(state["opt_state"])),
        data=ocp.args.JsonRestore()))
    data = _own_data_state(r["data"], f"checkpoint step {step}")
    nnx.replace_by_pure_dict(params_full, r["params"])
    _, trainable, frozen = split_params(nnx.merge(graphdef, params_full), freeze_vision)
    step_arr = jax.device_put(jnp.asarray(step, jnp.int32), step_sharding)
    return {"trainable": trainable, "frozen": frozen, "opt_state": r["opt_state"], "step": step_arr}, data


def restore_meta(mngr, step: int) -> dict:
    """The ``meta`` item of checkpoint ``step`` (``{}`` if empty)."""
    import orbax.checkpoint as ocp

    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}


def param_state(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def restore_params(workdir: str, model, step: int | None = None) -> int:
    """Fill ``model``'s params in place from the checkpoint at ``step`` (default: latest); returns the step."""
    import orbax.checkpoint as ocp

    mngr = checkpoint_manager(workdir, async_save=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}: no checkpoints under {CHECKPOINTS}/")
    # onto this process's first device, whatever the mesh of the run that saved it (a multi-host run's
    # shardings name devices this process does not have)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), param_state(model))
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, restored["params"])
    nnx.update(model, state)
    mngr.close()
    return step


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, ASSETS)) and os.path.isdir(os.path.join(path, CHECKPOINTS))


# ------------------------------------------------------------------------------------------------
# loading and exporting whole PRMs
# ------------------------------------------------------------------------------------------------
def load_prm_model(path: str, dtype=jnp.float32, step: int | None = None, attn_impl: str = "auto"):
    """(PRMModel, tokenizer, image_processor) from a training workdir (latest or given ``step``) or
    an HF-format directory (an exported jaxprm PRM, or a released VL-PRM/Qwen-VL checkpoint)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory")
    if is_workdir(path):
        spec, config, tok, ip = load_assets(os.path.join(path, ASSETS), jaxprm_dir=True)
        backbone_cls = Qwen25VL if isinstance(config, Qwen25VLConfig) else _internvl_class()
        # abstract (no allocation, no random init); the restore fills in the arrays
        model = nnx.eval_shape(lambda: PRMModel(backbone_cls(config, dtype=dtype, attn_impl=attn_impl), spec))
        restore_params(path, model, step)
        return model, tok, ip
    if step is not None:
        raise ValueError(f"step={step} only applies to a training workdir; {path} is an HF/exported directory")
    spec, config, tok, ip = load_assets(path)
    if isinstance(config, Qwen25VLConfig):
        backbone = from_pretrained(path, dtype=dtype, attn_impl=attn_impl)
    else:
        from jaxprm.models import internvl

        backbone = internvl.from_pretrained(path, dtype=dtype, attn_impl=attn_impl, image_token_id=config.image_token_id)
    model = PRMModel(backbone, spec)
    if spec.head == "linear":
        f = os.path.join(path, "step_head.safetensors")
        if not os.path.exists(f):
            raise FileNotFoundError(f"{path}: prm.json says head='linear' but step_head.safetensors is missing")
        t = read_safetensors(f)
        for name, var in (("step_head", model.step_head), ("step_bias", model.step_bias)):
            if name not in t:
                raise ValueError(f"{f}: no tensor {name!r} (has {sorted(t)})")
            if tuple(t[name].shape) != tuple(var.shape):
                raise ValueError(f"{f}: tensor {name!r} has shape {tuple(t[name].shape)}, the model needs "
                                 f"{tuple(var.shape)}")
            var[...] = jnp.asarray(np.asarray(t[name]), var[...].dtype)
    return model, tok, ip


def _internvl_class():
    from jaxprm.models.internvl import InternVL

    return InternVL


def export_hf(model: PRMModel, tokenizer, image_processor, out_dir: str, dtype=None) -> str:
    """Write the PRM as an HF Qwen2.5-VL (or native InternVL) directory + prm.json (see module docstring),
    atomically: all files go to a temporary directory next to ``out_dir`` that is then renamed to it (an
    existing ``out_dir`` is replaced), so a reader sees the old export, the new one, or none -- never a part."""
    given, out_dir = out_dir, os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's 0o700 -> what os.makedirs gives
        if model.backbone_kind == "internvl":
            from jaxprm.models import internvl

            internvl.save_pretrained(model.backbone, tmp, dtype=dtype)
        else:
            save_pretrained(model.backbone, tmp, dtype=dtype)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        if model.step_head is not None:
            write_safetensors(os.path.join(tmp, "step_head.safetensors"),
                              {"step_head": np.asarray(model.step_head[...]), "step_bias": np.asarray(model.step_bias[...])})
        model.spec.save(tmp)  # last: a directory with prm.json is complete
        if os.path.lexists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        fsync_dir(parent)
    except BaseException:
        if old is not None and not os.path.lexists(out_dir):
            os.replace(old, out_dir)  # put the previous export back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return given
