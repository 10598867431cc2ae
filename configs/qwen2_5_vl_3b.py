"""VL-PRM-3B: Qwen2.5-VL-3B fine-tuned as a PRM on VL-PRM300K with the paper's hyperparameters.

    python -m jaxprm.train --config configs/qwen2_5_vl_3b.py \
        --config.model.hf_dir=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.data.records=/path/to/VL-PRM300K --config.data.image_root=/path/to/images \
        --config.workdir=runs/vlprm_3b
"""
from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/vlprm_3b"
    # base.py's defaults are the paper's optimizer, epochs and batch size, and model.init="hf" (weights
    # from --config.model.hf_dir)
    c.model.remat = "dots_no_batch"
    c.data.source = "records"
    c.data.format = "vlprm300k"
    # "": the importer's default, the authors' released labels (judge's first error; see
    # jaxprm.data.formats.vlprm300k); "hybrid", "mc", ... relabel by name
    c.data.label_rule = ""
    c.data.seq_buckets = (2048, 4096)
    c.data.patch_buckets = (4096, 16384)
    c.train.grad_accum = 8
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
