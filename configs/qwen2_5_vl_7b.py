"""VL-PRM-7B: Qwen2.5-VL-7B fine-tuned as a PRM on VL-PRM300K with the paper's hyperparameters
(the 3B recipe with full remat and a bf16 Adam first moment).

    python -m jaxprm.train --config configs/qwen2_5_vl_7b.py \
        --config.model.hf_dir=/path/to/Qwen2.5-VL-7B-Instruct \
        --config.data.records=/path/to/VL-PRM300K --config.data.image_root=/path/to/images \
        --config.workdir=runs/vlprm_7b
"""
from configs import qwen2_5_vl_3b


def get_config():
    c = qwen2_5_vl_3b.get_config()
    c.workdir = "runs/vlprm_7b"
    c.model.remat = "full"
    # bf16 first moments save 2 bytes/param; fp32 master weights + grads + second moments still need
    # ~14 bytes/param (~107 GB for 7B): shard over several devices (fsdp). For ONE 80 GB card use
    # configs/qwen2_5_vl_7b_one_card.py (bf16 weights with stochastic rounding).
    c.optim.mu_dtype = "bfloat16"
    # the 3B data settings (lookahead packing, bf16 pixels); a 7B step (~8.3e9 params with the vision
    # tower) takes ~2.7x fewer examples/s than the 3B's, so fewer worker processes keep a chip fed
    c.data.workers_per_chip = 0.25
    return c
