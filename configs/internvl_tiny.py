"""A tiny InternVL3-shaped PRM (InternViT + pixel shuffle + MLP projector + Qwen2 language model, random
init) on the embedded puzzles: the InternVL training path end to end without downloads, in VisualPRM's
prompt layout (``visualprm``: the backbone's default) with InternVL's template and 56 px tiles.

    python -m jaxprm.train --config configs/internvl_tiny.py
    python -m jaxprm.eval synthetic --prm runs/internvl_tiny/export --n 200 --out runs/internvl_tiny/eval

A smoke-test model (tests/train/test_internvl_train.py trains it a few steps): configs/tiny.py (short
system prompt, auxiliary LM loss, the same puzzles, optimizer and schedule) with the InternVL backbone;
nothing here is tuned for accuracy.
"""
from configs import tiny


def get_config():
    c = tiny.get_config()
    c.workdir = "runs/internvl_tiny"
    c.model.preset = "internvl-tiny"  # jaxprm.data.synthetic.tiny_internvl_config: 56 px tiles, 4 tokens each
    c.model.prompt_style = ""  # the backbone's: visualprm
    # tiny.py's synthetic_image_size=56: one tile per image (a 56 px square)
    c.data.patch_buckets = (1, 3)  # tiles per row (InternVL)
    return c
