"""VL-PRM-7B: Qwen2.5-VL-7B fine-tuned as a PRM on VL-PRM300K with the paper's hyperparameters.

    python -m jaxprm.train --config configs/qwen2_5_vl_7b.py \
        --config.model.hf_dir=/path/to/Qwen2.5-VL-7B-Instruct \
        --config.data.records=/path/to/VL-PRM300K --config.data.image_root=/path/to/images \
        --config.workdir=runs/vlprm_7b
"""
from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/vlprm_7b"
    c.model.init = "hf"
    c.model.hf_dir = ""  # required: --config.model.hf_dir=...
    c.model.remat = "full"
    # bf16 first moments save 2 bytes/param; fp32 master weights + grads + second moments still need
    # ~14 bytes/param (~115 GB for 7B): use an fsdp mesh over several devices. One-card 7B is unmeasured.
    c.optim.mu_dtype = "bfloat16"
    c.data.source = "records"
    c.data.format = "vlprm300k"
    c.data.label_rule = "hybrid"
    c.data.seq_buckets = (2048, 4096)
    c.data.patch_buckets = (4096, 16384)
    c.optim.lr = 1e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.05
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 1e-4
    c.optim.clip = 1.0
    c.train.epochs = 2
    c.train.batch_size = 64
    c.train.grad_accum = 8
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
