"""VisualPRM-8B-v1.1-like: InternVL3-8B (InternViT-300M + Qwen2.5-7B) fine-tuned as a PRM on VisualPRM400K,
in VisualPRM's prompt layout (``visualprm``, the default on an InternVL backbone) with InternVL's
conversation template and dynamic 448 px tiles.

    python -m jaxprm.train --config configs/internvl3_8b.py \
        --config.model.hf_dir=/path/to/InternVL3-8B \
        --config.data.records=/path/to/VisualPRM400K/annotations --config.data.image_root=/path/to/VisualPRM400K/images \
        --config.workdir=runs/visualprm_8b

``model.hf_dir`` is an InternVL directory in either layout: the remote-code one OpenGVLab ships
(``config.json`` with ``llm_config``) or transformers' native ``model_type: internvl``. Starting from a
released VisualPRM-8B-v1.1 instead continues its training. The labels are VisualPRM's own ("+" iff
the step's Monte-Carlo score > 0; ``data.label_rule`` relabels). The optimizer, epochs and batch size
are base.py's defaults (lr 1e-5, cosine, 2 epochs, 64 rows per step), not a published VisualPRM
recipe; override them with ``--config.optim.*`` / ``--config.train.*``.

Memory: ~8.1B params with fp32 master weights, fp32 grads, a bf16 first and an fp32 second moment need
~14 bytes/param (~113 GB), so the params and optimizer state are sharded over every device
(``mesh.fsdp=-1``) and activations are fully rematerialised.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/visualprm_8b"
    c.model.init = "hf"  # weights from --config.model.hf_dir (InternVL3-8B)
    c.model.prompt_style = ""  # the backbone's: "visualprm"
    c.model.remat = "full"
    c.data.source = "records"
    c.data.format = "visualprm400k"
    c.data.label_rule = ""  # the authors' labels
    # tiles per image: InternVL3's max_dynamic_patch (12 tiles + a thumbnail = 13 x 256 image tokens)
    c.data.max_tiles = 12
    c.data.seq_buckets = (4096, 8192)
    c.data.patch_buckets = (7, 13)  # tiles per row on InternVL (a thumbnail included)
    c.train.grad_accum = 8
    c.optim.mu_dtype = "bfloat16"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
