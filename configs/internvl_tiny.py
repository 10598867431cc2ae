"""A tiny InternVL3-shaped PRM (InternViT + pixel shuffle + MLP projector + Qwen2 language model, random
init) on the embedded puzzles: the InternVL training path end to end without downloads, in VisualPRM's
prompt layout (``visualprm``: the backbone's default) with InternVL's template and 56 px tiles.

    python -m jaxprm.train --config configs/internvl_tiny.py
    python -m jaxprm.eval synthetic --prm runs/internvl_tiny/export --n 200 --out runs/internvl_tiny/eval

A smoke-test model (tests/train/test_internvl_train.py trains it a few steps): the settings follow
configs/tiny.py (short system prompt, auxiliary LM loss) but nothing here is tuned for accuracy.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/internvl_tiny"
    c.model.init = "random"
    c.model.preset = "internvl-tiny"  # jaxprm.data.synthetic.tiny_internvl_config: 56 px tiles, 4 tokens each
    c.model.dtype = "float32"
    c.model.prompt_style = ""  # the backbone's: visualprm
    c.model.system_prompt = "Is every step so far correct? Answer + or -."
    c.data.source = "synthetic"
    c.data.synthetic_train = 1600
    c.data.synthetic_eval = 200
    c.data.synthetic_image_size = 56  # one tile per image (a 56 px square)
    c.data.synthetic_question_types = ("sum", "difference", "compare")
    c.data.synthetic_perception_share = 0.0
    c.data.seq_buckets = (256, 384)
    c.data.patch_buckets = (1, 3)  # tiles per row (InternVL)
    c.data.max_steps = 10
    c.data.max_images = 1
    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.05
    c.optim.weight_decay = 0.0
    c.train.batch_size = 8
    c.train.epochs = 3
    c.train.lm_loss_weight = 1.0
    c.train.class_weights = (1.0, 1.5)
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.save_every = 100
    c.mesh.data = -1
    return c
