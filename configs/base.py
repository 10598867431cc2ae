"""Defaults shared by every training config; the other configs state only how they differ.

Each field is checked at start-up by jaxprm.config.validate_train_config, whose choice lists come from
the modules that own them (e.g. model.preset: jaxprm.models.qwen2_5_vl.presets).
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"

    c.model = ml_collections.ConfigDict()
    c.model.init = "hf"  # "hf": weights from model.hf_dir; "random": random init of model.preset
    # HF Qwen2.5-VL or InternVL directory (config.json, safetensors, tokenizer, preprocessor_config.json); the
    # backbone is what its config.json says
    c.model.hf_dir = ""
    # random init only: "tiny" (embedded task), "internvl-tiny", or a name in qwen2_5_vl.presets.HF_CONFIGS or
    # internvl.presets.HF_CONFIGS
    c.model.preset = ""
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights; "bfloat16" halves them (see optim.rounding)
    c.model.attn_impl = "auto"  # auto | xla | cudnn | splash
    c.model.remat = "none"  # none | full | dots | dots_no_batch | save_out
    c.model.freeze_vision = False
    c.model.head = "lm_rows"  # lm_rows ("+"/"-" rows of the lm head) | linear
    c.model.seed = 0
    # the prompt layout (jaxprm.data.prompt.PROMPT_STYLES): "vlprm" (VL-PRM's training layout and system
    # prompt) | "visualprm" (VisualPRM's: image after "### Question:") | "chat"; saved in the PRM's prm.json.
    # "": the backbone's family's: "vlprm" on Qwen2.5-VL, "visualprm" on InternVL
    c.model.prompt_style = ""
    c.model.system_prompt = ""  # "": the prompt style's system prompt
    # assistant turns of earlier steps in the training prompt: "placeholder" ("+" everywhere: the prompt
    # PRM.score uses) | "labels" (teacher-forced true labels; scores then differ from training)
    c.model.history = "placeholder"

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # synthetic | records | tfds
    c.data.data_dir = ""  # TFDS data_dir (source=tfds); default for the others: {workdir}/data
    c.data.records = ""  # source=records: file(s)/dir read with jaxprm.data.formats.read_records
    c.data.format = "jsonl"  # source=records: jsonl | vlprm300k | vlprm300k_train | visualprm400k | ...
    c.data.label_rule = ""  # source=records: relabel with a rule of jaxprm.data.labels ("" keeps the file's labels)
    c.data.image_root = ""
    c.data.allow_images_outside_root = False  # True follows image paths outside image_root (../, absolute)
    c.data.val_fraction = 0.02  # source=records: held-out share (by record id hash)
    c.data.synthetic_train = 2000  # source=synthetic: number of generated puzzles
    c.data.synthetic_eval = 200
    c.data.synthetic_image_size = 112
    c.data.synthetic_error_rate = 0.5  # share of solutions with one injected error
    c.data.synthetic_perception_share = 0.5  # share of those errors that are perception errors
    c.data.synthetic_question_types = ()  # (): all of jaxprm.data.synthetic.QUESTION_TYPES
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.seq_buckets = (1024, 2048)
    c.data.patch_buckets = (1024, 4096)
    c.data.max_steps = 32  # label slots per row (and the most steps an example keeps)
    c.data.max_images = 4
    c.data.packing = False  # several examples per row (segment ids)
    # lookahead packing: the loader holds pack_buffer x (rows per host) examples and builds each batch from
    # them, rows filled close to the bucket in tokens and patches (jaxprm.data.pipeline.plan_batch);
    # 0: fill rows in arrival order
    c.data.pack_buffer = 0.0
    # pixel_values of the batches: "auto" = model.dtype when that is bfloat16 (the vision tower casts its
    # input to model.dtype first, so the values it computes with are the same) else float32 | float32 | bfloat16
    c.data.pixel_dtype = "auto"
    # Grain worker processes per host; -1 = "auto": ceil(workers_per_chip x local chips), at most the
    # host's CPUs - 1 (bench/pipeline_bench.py measures workers_per_chip)
    c.data.worker_count = 0
    c.data.workers_per_chip = 0.0
    c.data.min_pixels = 0  # 0: the image processor's own setting
    c.data.max_pixels = 0
    c.data.max_tiles = 0  # InternVL: tiles per image (0: the checkpoint's max_dynamic_patch, 12 for the released)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-4
    c.optim.clip = 1.0
    c.optim.mu_dtype = "float32"  # "bfloat16": first moment in bf16 (the second follows model.param_dtype)
    c.optim.rounding = "stochastic"  # how updates are written to bf16 weights: stochastic | nearest

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64  # global rows per optimizer step
    c.train.grad_accum = 1  # micro-batches per step (scan)
    c.train.grad_accum_dtype = "float32"  # gradient accumulator when grad_accum > 1
    c.train.epochs = 2
    c.train.max_steps = 0  # > 0: stop after this many steps (the schedule still spans the epochs)
    c.train.class_weights = (1.0, 1.0)  # weight of "+" and "-" steps in the loss
    # > 0: add this times the next-token loss on the prompt text (a dense signal for a backbone trained
    # from random init, like the tiny default; forms full-vocabulary logits, so 0 for real backbones)
    c.train.lm_loss_weight = 0.0
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.eval_batches = 0  # 0: the whole eval split
    c.train.save_every = 200
    c.train.keep_checkpoints = 3
    # resume from this checkpoint step; 0: the newest one that restores (a corrupt newer one is skipped,
    # logged). Steps newer than the one resumed from are moved to {workdir}/checkpoints_set_aside/
    c.train.resume_step = 0
    c.train.async_checkpoint = True
    c.train.export = True  # write {workdir}/export (HF format + prm.json) at the end
    c.train.progress = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c
