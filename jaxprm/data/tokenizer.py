"""Qwen2-style tokenizers built offline.

Real runs use the tokenizer that ships with a Qwen2.5-VL checkpoint (``AutoTokenizer``). Tests and
the embedded task need one with the same special tokens and chat template but without a download:
``build_tokenizer`` trains a small byte-level BPE on a corpus with the ``tokenizers`` library and
wraps it as a ``PreTrainedTokenizerFast``.
"""
from __future__ import annotations

from collections.abc import Iterable

# Order matches Qwen2/Qwen2.5-VL: the ids are assigned after the BPE vocabulary in this order.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen2-VL chat template (ChatML with vision placeholders).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The tokens InternVL (InternVL2.5 / InternVL3, VisualPRM) adds after its language model's vocabulary, in
# its order (InternVL3-8B: <img> = 151665, </img> = 151666, <IMG_CONTEXT> = 151667, ...).
INTERNVL_ADDED_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, extra_special_tokens: tuple[str, ...] = ()):
    """Train a byte-level BPE tokenizer with Qwen's special tokens and chat template.

    Deterministic for a given corpus and vocab size. The special tokens take the ids right after
    the learned vocabulary, so ``<|image_pad|>`` etc. have fixed ids for a given tokenizer.
    ``extra_special_tokens`` follow them (``build_internvl_tokenizer``); ``vocab_size`` counts them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = QWEN_SPECIAL_TOKENS + tuple(extra_special_tokens)
    n_learned = vocab_size - len(specials)
    if n_learned < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {257 + len(specials)}")
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_special_tokens(list(specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(specials[1:]),
    )
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    return fast


def build_internvl_tokenizer(corpus: Iterable[str], vocab_size: int = 1024):
    """``build_tokenizer`` with InternVL's added tokens (``INTERNVL_ADDED_TOKENS``) after Qwen's, as
    InternVL3's tokenizer (a Qwen2.5 tokenizer + ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ...) has them:
    a tokenizer for tiny InternVL models in tests. InternVL's prompts are rendered with its own
    conversation template (``jaxprm.data.prompt.INTERNVL_CHAT_TEMPLATE``), whatever the tokenizer's."""
    return build_tokenizer(corpus, vocab_size, extra_special_tokens=INTERNVL_ADDED_TOKENS)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the Qwen special tokens in ``tokenizer`` (works for real Qwen tokenizers too)."""
    out = {}
    for t in QWEN_SPECIAL_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no special token {t!r}; is it a Qwen2/Qwen2.5-VL tokenizer?")
        out[t] = int(i)
    return out
