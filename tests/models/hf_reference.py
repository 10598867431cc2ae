"""Tiny random Qwen2.5-VL checkpoints built offline with transformers, and inputs for them."""
from __future__ import annotations

import numpy as np
import torch
import transformers

from .reference_inputs import fill_random, image_rows, left_pad

IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253


def tiny_hf_config(tie: bool = False, legacy: bool = False, **over):
    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1],
                  in_channels=3, tokens_per_second=2)
    text.update(over.pop("text", {}))
    vision.update(over.pop("vision", {}))
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                         video_token_id=VIDEO, vision_start_token_id=VSTART,
                                         vision_end_token_id=VEND, tie_word_embeddings=tie, **over)


def build_hf_model(config, seed: int = 0):
    """Random weights with non-trivial norms and biases (HF's init leaves those at 1 / 0)."""
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    return fill_random(model, seed + 1,
                       lambda name, noise: 1.0 + 0.1 * noise if "norm" in name or "ln_q" in name else 0.05 * noise)


def save_hf(model, path, legacy_names: bool = False):
    """save_pretrained; with ``legacy_names`` rewrite keys to the pre-v5 visual.* / model.* layout."""
    model.save_pretrained(path)
    if legacy_names:
        from jaxprm.models.qwen2_5_vl.convert import read_safetensors, write_safetensors
        import os
        f = os.path.join(path, "model.safetensors")
        t = {k: np.array(v) for k, v in read_safetensors(f).items()}
        ren = {}
        for k, v in t.items():
            if k.startswith("model.visual."):
                k = k[len("model."):]
            elif k.startswith("model.language_model."):
                k = "model." + k[len("model.language_model."):]
            ren[k] = v
        write_safetensors(f, ren)
    return path


def make_inputs(grids, text_lens, seed=0, pad_to=None, merge=2, patch_dim=3 * 2 * 14 * 14, vocab=240):
    """One row per entry of ``text_lens`` (list of per-segment text lengths); images are placed
    between segments, consuming ``grids`` in order. Left-pads rows to equal length."""
    rng = np.random.default_rng(seed)
    it = iter(grids)

    def next_image():
        t, h, w = next(it)
        return [VSTART] + [IMAGE] * (t * h * w // merge**2) + [VEND]

    input_ids, mask = left_pad(image_rows(rng, text_lens, vocab, next_image), pad_to)
    grid = np.asarray(grids, np.int64).reshape(-1, 3)
    n_patches = int(grid.prod(-1).sum())
    pixel_values = rng.standard_normal((n_patches, patch_dim)).astype(np.float32)
    return input_ids, mask, pixel_values, grid


def hf_logits(model, input_ids, mask, pixel_values, grid):
    mm = (torch.tensor(input_ids) == IMAGE).int()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask),
                    pixel_values=None if pixel_values is None else torch.tensor(pixel_values),
                    image_grid_thw=None if grid is None else torch.tensor(grid), mm_token_type_ids=mm)
    return out.logits.float().numpy()
