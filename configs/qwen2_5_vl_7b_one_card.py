"""VL-PRM-7B full fine-tuning on ONE 80 GB GPU: bf16 weights with stochastic rounding.

fp32 master weights + fp32 gradients + Adam need ~16 bytes/param (~122 GB for the 7.6B trainable
parameters): no single card holds that, which is why transformers + torch runs out of memory here.
This config keeps weights, gradients and both Adam moments in bf16 (8 bytes/param, 44 GiB of state)
while the optimizer math runs in fp32 and the result is written back with stochastic rounding
(``jaxprm.optim.apply_updates``), full remat, a frozen vision tower, and no gradient-accumulation
buffer (grad_accum=1). XLA's memory analysis of this step (``bench/memory_bench.py``, B=4 x 2048
tokens, one 448px image per row, compiled for one TPU v5p chip): 64.7 GiB peak.

    python -m jaxprm.train --config configs/qwen2_5_vl_7b_one_card.py \
        --config.model.hf_dir=/path/to/Qwen2.5-VL-7B-Instruct \
        --config.data.records=/path/to/VL-PRM300K --config.data.image_root=/path/to/images
"""
from configs import qwen2_5_vl_7b


def get_config():
    c = qwen2_5_vl_7b.get_config()
    c.workdir = "runs/vlprm_7b_one_card"
    c.model.param_dtype = "bfloat16"
    c.model.freeze_vision = True
    # the first Adam moment is bf16 already (qwen2_5_vl_7b.py), the second follows param_dtype;
    # optim.rounding="stochastic" is base.py's default
    # Gradient accumulation needs a second gradient-sized buffer (+14 GiB, over the card); one
    # optimizer step is one micro-batch here.
    c.train.batch_size = 4
    c.train.grad_accum = 1
    c.data.seq_buckets = (2048,)
    c.data.patch_buckets = (4096,)
    c.data.max_pixels = 4096 * 14 * 14  # at most 4096 patches (1024 image tokens) per row
    c.mesh.fsdp = 1  # one device (mesh.data=1 from the 3B config)
    return c
