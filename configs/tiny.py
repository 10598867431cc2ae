"""The embedded default: a tiny Qwen2.5-VL-shaped PRM on generated visual puzzles. No downloads;
about a minute on a 2-core CPU (61 s measured).

    python -m jaxprm.train --config configs/tiny.py
    python -m jaxprm.eval synthetic --prm runs/tiny/export --n 200 --search 16 --out runs/tiny/eval

The backbone is trained from random init, so within this budget it learns to verify the reasoning
(counts added, subtracted and compared) but not yet to read the image: the task mix has the puzzles
whose solutions are two perception steps and two reasoning steps (sum, difference, compare), and
reasoning errors only (``synthetic_perception_share=0``; with perception errors in the mix the same
run scores them at chance, see the README). The auxiliary next-token loss (``lm_loss_weight``) and
600 small-batch steps are what let it learn arithmetic verification in time.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/tiny"
    c.model.init = "random"
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    # a short system prompt (saved in prm.json, so scoring uses it too): VL-PRM's is 350 of the
    # ~520 tokens of a tiny-task example
    c.model.system_prompt = "Is every step so far correct? Answer + or -."
    c.data.source = "synthetic"
    c.data.synthetic_train = 1600
    c.data.synthetic_eval = 200
    c.data.synthetic_image_size = 56
    c.data.synthetic_question_types = ("sum", "difference", "compare")
    c.data.synthetic_perception_share = 0.0
    c.data.seq_buckets = (256, 384)
    c.data.patch_buckets = (16, 64)
    c.data.max_steps = 10
    c.data.max_images = 1
    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.05
    c.optim.weight_decay = 0.0
    c.train.batch_size = 8
    c.train.epochs = 3  # 600 steps
    c.train.lm_loss_weight = 1.0
    c.train.class_weights = (1.0, 1.5)
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.save_every = 100
    c.mesh.data = -1
    return c
