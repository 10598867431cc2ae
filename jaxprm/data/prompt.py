"""The multi-turn PRM prompt, its tokenization, and the step-label positions.

Format (VL-PRM, arXiv 2509.23250, and VisualPRM, arXiv 2503.10291)
------------------------------------------------------------------
Both papers train a PRM as a chat model that answers each solution step with a one-token verdict:

* a **system** turn with a prompt that asks for ``"+"`` (correct so far) or ``"-"`` (an error so far);
* the **first user** turn ``"### Question:\\n{question}\\n\\n### Solution Process:\\n{step_1}"``;
  every later step ``step_k`` is **its own user turn**, holding the step text alone;
* after every user turn an **assistant** turn holding only ``"+"`` or ``"-"``.

What was found, and where (read with the code-search tool; nothing here is copied from them):

* VisualPRM / VisualPRM400K — ``OpenGVLab/InternVL``,
  ``internvl_chat/tools/reasoning_data_pipeline/visualprm_data_pipeline_postprocess.py`` (``item2conv_prm``):
  conversations ``[system: PRM_SYSTEM_PROMPT, (human: step, gpt: "+"|"-") per step]``, the first human
  value being the ``### Question / ### Solution Process`` string above; the gpt turn is ``"+"`` when the
  step's Monte-Carlo score is above ``--mc-threshold`` (default 0.0), else ``"-"``; with ``--early-stop`` the
  conversation ends at the first ``"-"``. The system prompt is ``PRM_SYSTEM_PROMPT`` in
  ``internvl_chat/tools/reasoning_data_pipeline/utils/constants.py`` (kept here as
  ``VISUALPRM_SYSTEM_PROMPT``). InternVL's dataset inserts ``"<image>\\n"`` at the start of the first turn
  value when it has none, and VisualPRM-8B's ``modeling_internvl_chat.py`` (``generate_steps_with_soft_score_v2``,
  public copies) prepends ``"<image>\\n"`` to the *question*, so there the image sits right after
  ``"### Question:\\n"``. At inference every assistant turn holds the placeholder ``"+"``; the score of step k
  is ``softmax(logits[+, -])[+]`` read at ``find_placeholder_idx``, which is the *last token of the assistant
  header*, i.e. the index of the placeholder minus one — the next-token prediction of the label.
* VL-PRM (Qwen2.5-VL based) — repository ``vlprm`` (copies at ``rohitsinha-iitfellow/vlprm`` and
  ``theogbrand/vlprm``): training system prompt ``PRM_SYSTEM_PROMPT_FULL_NORMAL_TOK_V2`` in
  ``train/qwen_trainer/qwenvl/data/prompts.py`` (kept here as ``PRM_SYSTEM_PROMPT``, byte for byte,
  including the two trailing spaces after "first solution step."); ``train/qwen_trainer/qwenvl/data/data_qwen.py``
  tokenizes ``system`` + each ``user``/``assistant`` turn with the ChatML template, supervising only the
  ``"+"``/``"-"`` token of each assistant turn (the assistant header and ``<|im_end|>\\n`` are masked).
  For scoring, ``eval/tts_eval/reward_guided_search/VisualPRMv2.py`` builds HF chat messages whose first user
  content is ``[{"type": "image"}, {"type": "text", "text": "### Question:..."}]`` — the image **first, before
  the text** (``utils/utils.py``, ``prepare_question_array_with_base64_image_strings``), previous assistant
  turns holding ``"+"``, and reads the ``+``/``-`` logits at the next-token position;
  ``eval/minimal_prm_evaluation.py`` does the same with all assistant turns set to the ``"+"`` placeholder
  (its InternVL port reads the logits *at* the placeholder index, an off-by-one compared with VisualPRM's
  ``find_placeholder_idx``; we follow VisualPRM and the training loss: the position before the label).

Prompt styles
-------------
Where the image goes, the system prompt, the step markup and the label tokens differ between the two
released families, and a checkpoint must be scored with the layout it was trained on. A
``PromptStyle`` fixes them; ``PROMPT_STYLES`` names one per family and the PRM's saved spec
(``prm.json``: ``prompt_style``) records which one a PRM uses:

* ``"vlprm"`` (default; VL-PRM-3B/7B, VL-PRM300K): system ``PRM_SYSTEM_PROMPT``; the first user turn is
  ``"<image>\n### Question:\n{question}\n\n### Solution Process:\n{step_1}"`` with the ``<image>``
  placeholder replaced in place by ``<|vision_start|><|image_pad|>...<|vision_end|>`` -- the layout of the
  released training code (vlprm ``train/qwen_trainer/qwenvl/data/data_qwen.py``,
  ``preprocess_qwen_2_visual``: the VL-PRM300K-train rows start with ``"<image>\n"``); the steps carry
  VL-PRM's markup (``[Visual Elements]`` / ``[Reasoning]`` headers on the first step of each section and
  ``<step_k>...</step_k>`` tags: ``jaxprm.data.solution.mark_up_steps``), as in the released training
  turns and in the policy outputs its search code scores.
* ``"visualprm"`` (VisualPRM-8B, VisualPRM-8B-v1.1, VisualPRM400K): system ``VISUALPRM_SYSTEM_PROMPT``;
  ``"### Question:\n<image>\n{question}\n\n### Solution Process:\n{step_1}"`` -- the image after the
  question header, where VisualPRM's ``generate_steps_with_soft_score_v2`` puts it (it prepends
  ``"<image>\n"`` to the question); plain steps (its data splits responses on blank lines).
* ``"chat"``: the image part(s) then the text, as transformers' chat template renders
  ``[{"type": "image"}, {"type": "text", ...}]`` (VL-PRM's evaluation code, ``VisualPRMv2.py``, builds this;
  it lacks the ``"\n"`` after the image that training had); system ``PRM_SYSTEM_PROMPT``, plain steps. This
  was jaxprm's only layout before prompt styles, so a ``prm.json`` without ``prompt_style`` means ``"chat"``.

All three use ``"+"`` / ``"-"`` as label tokens and ``"+"`` as the scoring placeholder. On the Qwen2.5-VL
backbone the image tokens are Qwen's; the tokens around them are the family's (checked token by token
in ``tests/data/test_prompt_styles.py`` against each family's own layout).

What this module does
---------------------
Qwen2-VL chat messages: system = the style's system prompt (overridable), first user turn = image
entries and the question/first-step text placed as the style says, one user turn per further step, one
assistant turn per step.
``mode="train"`` puts the true labels in the assistant turns (unlabelled steps get the placeholder);
``mode="score"`` puts the placeholder in every assistant turn (inference, as VisualPRM/VL-PRM do).
The chat-template string is tokenized once (ids equal ``tokenizer.apply_chat_template``) and each
``<|image_pad|>`` is expanded to ``t*h*w // merge_size**2`` copies, exactly like ``Qwen2_5_VLProcessor``.

On the InternVL backbone (VisualPRM) the prompt is rendered with InternVL's conversation template
(``INTERNVL_CHAT_TEMPLATE``: ChatML, ``<|im_start|>{role}\n{text}<|im_end|>\n``, the ``internvl2_5``
template of the remote code, whatever chat template the tokenizer ships; ``internvl_prompt_tokenizer``)
and each image is ``<img><IMG_CONTEXT>...</img>`` with ``256 x tiles`` context tokens
(``encode_prm_example(..., image_tokens=, image_pad="<IMG_CONTEXT>")``), as InternVL's ``chat`` replaces
``<image>``.
"""
from __future__ import annotations

import dataclasses
import re
import threading
import weakref
from collections.abc import Sequence

import numpy as np

from jaxprm.data.tokenizer import INTERNVL_ADDED_TOKENS, QWEN_SPECIAL_TOKENS, QWEN_VL_CHAT_TEMPLATE
from jaxprm.models.spec import DEFAULT_PROMPT_STYLE, LEGACY_PROMPT_STYLE  # noqa: F401  (the spec's names)

# VL-PRM's training system prompt (vlprm: train/qwen_trainer/qwenvl/data/prompts.py). Kept verbatim: the
# checkpoints were trained with it, so any change shifts the model's inputs.
PRM_SYSTEM_PROMPT = (
    "**You are a process supervision model for visual reasoning tasks. You will receive an image and an "
    "image-based problem statement, followed by solution steps to evaluate.**\n"
    "\n"
    "First round: problem statement and first solution step.  \n"
    "Subsequent rounds: one new step per round.\n"
    "\n"
    "Assess the cumulative correctness of the entire solution up to each step.\n"
    "\n"
    "## Evaluation Criteria:\n"
    "\n"
    "1. **Visual Accuracy**: Are visual elements from the image correctly identified (shapes, colors, "
    "positions, quantities, spatial relationships)?\n"
    "\n"
    "2. **Logical Validity**: Do all inferences and calculations follow correctly from the image and "
    "previous steps?\n"
    "\n"
    "## Response:\n"
    '- **"+"** if correct up to this step\n'
    '- **"-"** if any error exists up to this step\n'
    "\n"
    'Only respond with "+" or "-". No explanations.\n'
    "\n"
    "An error in any step invalidates all subsequent steps."
)

# VisualPRM's system prompt (OpenGVLab/InternVL: internvl_chat/tools/reasoning_data_pipeline/utils/constants.py).
VISUALPRM_SYSTEM_PROMPT = (
    "You are an advanced AI assistant, designed to serve as a process supervision model. In this task, I will "
    "provide a problem statement followed by the first step of the solution process. For each subsequent turn, "
    "I will give you a new step in the solution. Your role is to assess whether the solution process is correct "
    "up to the current step.\n"
    "\n"
    "- In the **first round**, I will input the problem and the first step of the solution process.\n"
    "- In **each subsequent round**, I will provide the next step in the solution.\n"
    "\n"
    "For each step, you should:\n"
    "\n"
    '- Respond with **"+"** if you believe the solution process is correct up to this step.\n'
    '- Respond with **"-"** if you detect any issues or errors in the process up to this step.\n'
    "\n"
    "Please note:\n"
    '- Only respond with **"+"** or **"-"**. Do not provide any additional explanations, comments, or '
    "justifications.\n"
    "\n"
    "Your task is to verify the accuracy and correctness of each step in the given solution process."
)

POSITIVE_TOKEN = "+"
NEGATIVE_TOKEN = "-"
IMAGE_PAD = "<|image_pad|>"
INTERNVL_IMAGE_PAD = "<IMG_CONTEXT>"  # one per image in the rendered template, repeated to 256 x tiles

# InternVL's conversation template (the remote code's ``internvl2_5`` template: system
# ``<|im_start|>system\n{system_message}``, roles ``<|im_start|>user\n`` / ``<|im_start|>assistant\n``, every
# message followed by ``<|im_end|>\n``) as a chat template over content lists; an image part is
# ``<img><IMG_CONTEXT></img>``, whose context token ``encode_prm_example`` repeats to the image's token count
# (what ``<image>`` -> ``<img>`` + ``<IMG_CONTEXT>`` x 256 x tiles + ``</img>`` gives in the remote code).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<img><IMG_CONTEXT></img>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODES = ("train", "score")

IMAGE_BEFORE_TEXT = "before_text"  # image(s) first, then "### Question:..." (VL-PRM)
IMAGE_AFTER_QUESTION_HEADER = "after_question_header"  # "### Question:\n", image(s), question (VisualPRM)
IMAGE_PLACEMENTS = (IMAGE_BEFORE_TEXT, IMAGE_AFTER_QUESTION_HEADER)
STEP_MARKUPS = ("vlprm", "none")  # VL-PRM's headers and <step_k> tags | plain step text


@dataclasses.dataclass(frozen=True)
class PromptStyle:
    """How one family of released PRMs lays out its prompt (see the module docstring).

    ``image_suffix`` is the text right after each image (``"\n"`` for an ``"<image>\n"`` placeholder).
    ``step_markup`` is the step text the family's checkpoints saw: ``"vlprm"`` (section headers and
    ``<step_k>`` tags, ``jaxprm.data.solution.mark_up_steps``) or ``"none"``. The prompt holds steps as
    they are given; the importers of each published format keep its markup, and a policy prompted with
    the family's format writes it.
    """

    name: str
    system_prompt: str
    image_placement: str
    image_suffix: str
    step_markup: str
    positive: str = POSITIVE_TOKEN
    negative: str = NEGATIVE_TOKEN
    placeholder: str = POSITIVE_TOKEN

    def __post_init__(self):
        if self.image_placement not in IMAGE_PLACEMENTS:
            raise ValueError(f"image_placement must be one of {IMAGE_PLACEMENTS}, got {self.image_placement!r}")
        if self.step_markup not in STEP_MARKUPS:
            raise ValueError(f"step_markup must be one of {STEP_MARKUPS}, got {self.step_markup!r}")
        if (self.positive, self.negative) != (POSITIVE_TOKEN, NEGATIVE_TOKEN):
            raise ValueError('only "+"/"-" label tokens are supported (every released VL-PRM/VisualPRM uses them)')

    def first_turn(self, question: str, first_step: str, num_images: int) -> list[dict]:
        """The content parts of the first user turn."""
        images = []
        for _ in range(int(num_images)):
            images.append({"type": "image"})
            if self.image_suffix:
                images.append({"type": "text", "text": self.image_suffix})
        if self.image_placement == IMAGE_BEFORE_TEXT or not images:
            return images + [{"type": "text", "text": first_turn_text(question, first_step)}]
        return ([{"type": "text", "text": "### Question:\n"}] + images
                + [{"type": "text", "text": f"{question}\n\n### Solution Process:\n{first_step}"}])


PROMPT_STYLES = {
    "vlprm": PromptStyle("vlprm", PRM_SYSTEM_PROMPT, IMAGE_BEFORE_TEXT, "\n", "vlprm"),
    "visualprm": PromptStyle("visualprm", VISUALPRM_SYSTEM_PROMPT, IMAGE_AFTER_QUESTION_HEADER, "\n", "none"),
    "chat": PromptStyle("chat", PRM_SYSTEM_PROMPT, IMAGE_BEFORE_TEXT, "", "none"),
}


def get_prompt_style(style: "str | PromptStyle | None" = None) -> PromptStyle:
    """A ``PromptStyle`` by name (None: ``DEFAULT_PROMPT_STYLE``); a ``PromptStyle`` passes through."""
    if isinstance(style, PromptStyle):
        return style
    name = DEFAULT_PROMPT_STYLE if style is None else style
    if name not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {name!r}; choose one of {sorted(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def encode_mode(history: str, *, train: bool) -> str:
    """The ``encode_prm_example`` mode for a PRM's prompt history (``PRMSpec.history``).

    Scoring never knows the labels, so it always uses ``"score"`` (every assistant turn holds the
    placeholder, as VisualPRM and VL-PRM score). Training uses the same prompt for
    ``history="placeholder"`` (the default: the model is trained on exactly what it is scored on; with
    VL-PRM's released data, which stop after the first "-", every earlier turn is "+" anyway), and the
    true labels for ``history="labels"`` (teacher forcing: with labels that stay "-" after the first
    error the model can read the answer from the history, and scores from ``PRM.score`` differ from
    what it was trained on).
    """
    from jaxprm.models.spec import HISTORIES

    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
    return "train" if train and history == "labels" else "score"


def first_turn_text(question: str, first_step: str) -> str:
    """The text of the first user turn (the image entries come before it)."""
    return f"### Question:\n{question}\n\n### Solution Process:\n{first_step}"


def _label_text(label, placeholder: str) -> str:
    if label is None:
        return placeholder
    if label == 1:
        return POSITIVE_TOKEN
    if label == 0:
        return NEGATIVE_TOKEN
    raise ValueError(f"step labels must be 1, 0 or None, got {label!r}")


def _check_labels(labels, n_steps: int) -> list:
    if labels is None:
        return [None] * n_steps
    labels = list(labels)
    if len(labels) != n_steps:
        raise ValueError(f"got {len(labels)} labels for {n_steps} steps")
    out = []
    for i, lab in enumerate(labels):
        if isinstance(lab, (bool, np.bool_)):
            raise ValueError(f"labels[{i}]: must be 1, 0 or None, got the bool {lab!r}")
        if lab is None or (isinstance(lab, (int, np.integer)) and int(lab) == -1):
            out.append(None)
        elif isinstance(lab, (int, np.integer)) and int(lab) in (0, 1):
            out.append(int(lab))
        else:
            raise ValueError(f"labels[{i}]: must be 1, 0 or None (or -1 for None), got {lab!r}")
    return out


def _check_text(question, steps) -> None:
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise TypeError(f"steps must be a list of strings, got {type(steps).__name__}")
    if len(steps) == 0:
        raise ValueError("steps must not be empty")
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise TypeError(f"steps[{i}] must be a string, got {type(s).__name__}")


def build_messages(
    question: str,
    steps: Sequence[str],
    labels: Sequence[int | None] | None = None,
    num_images: int = 1,
    placeholder: str = POSITIVE_TOKEN,
    system_prompt: str | None = None,
    *,
    style: "str | PromptStyle | None" = None,
) -> list[dict]:
    """Chat messages (HF format, content lists) for the PRM prompt in ``style`` (default ``"vlprm"``).

    Assistant turn k holds ``"+"`` if ``labels[k] == 1``, ``"-"`` if 0, and ``placeholder`` if the label is
    None or ``labels`` is None. ``num_images`` ``{"type": "image"}`` entries go where the style puts them
    in the first user turn. ``system_prompt`` (None: the style's) replaces the system turn.
    """
    st = get_prompt_style(style)
    _check_text(question, steps)
    if int(num_images) < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    labs = _check_labels(labels, len(steps))
    system_prompt = st.system_prompt if system_prompt is None else system_prompt
    messages: list[dict] = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
    for k, (step, lab) in enumerate(zip(steps, labs)):
        if k == 0:
            content = st.first_turn(question, step, num_images)
        else:
            content = [{"type": "text", "text": step}]
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": _label_text(lab, placeholder)}]})
    return messages


@dataclasses.dataclass
class PromptEncoding:
    input_ids: np.ndarray  # (L,) int32, image pads expanded
    label_positions: np.ndarray  # (n_kept,) int32: index whose next-token logits predict the step's "+"/"-"
    label_token_index: np.ndarray  # (n_kept,) int32: index of the "+"/"-" (or placeholder) token itself
    labels: np.ndarray  # (n_kept,) int32: 1, 0, or -1 (unsupervised)
    num_steps_dropped: int
    plus_id: int
    minus_id: int
    num_image_tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))  # per image
    text: str = dataclasses.field(default="", repr=False)  # the chat-template string (image pads not expanded)

    @property
    def num_steps(self) -> int:
        return int(self.label_positions.shape[0])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _single_token_id(tokenizer, s: str, what: str) -> int:
    memo = _tokenizer_memo(tokenizer)
    ids = None if memo is None else memo.single_ids.get(s)
    if ids is None:
        ids = list(tokenizer.encode(s, add_special_tokens=False))
        if memo is not None:
            memo.single_ids[s] = ids
    if len(ids) != 1:
        raise ValueError(
            f"{what} {s!r} must be a single token in this tokenizer, but it encodes to {len(ids)} tokens {ids}"
        )
    return int(ids[0])


def label_token_ids(tokenizer) -> tuple[int, int]:
    """Ids of ``"+"`` and ``"-"``; raises ``ValueError`` unless each is exactly one token."""
    plus = _single_token_id(tokenizer, POSITIVE_TOKEN, "the positive label")
    minus = _single_token_id(tokenizer, NEGATIVE_TOKEN, "the negative label")
    if plus == minus:
        raise ValueError(f'"+" and "-" map to the same token id {plus}')
    return plus, minus


class TemplatedTokenizer:
    """A tokenizer whose ``apply_chat_template`` renders with ``chat_template`` instead of its own; every
    other attribute and call goes to the tokenizer (ids, offsets, special tokens are the tokenizer's)."""

    def __init__(self, tokenizer, chat_template: str):
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def apply_chat_template(self, messages, **kwargs):
        kwargs.pop("chat_template", None)
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __repr__(self) -> str:
        return f"TemplatedTokenizer({self.tokenizer!r})"


def internvl_prompt_tokenizer(tokenizer) -> TemplatedTokenizer:
    """``tokenizer`` rendering InternVL's conversation template (``INTERNVL_CHAT_TEMPLATE``): what the
    PRM prompt of an InternVL backbone is encoded with (the remote code builds its prompts with that
    template in Python, not with the tokenizer's chat template)."""
    if isinstance(tokenizer, TemplatedTokenizer):
        tokenizer = tokenizer.tokenizer
    return TemplatedTokenizer(tokenizer, INTERNVL_CHAT_TEMPLATE)


def render_messages(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``, the same
    string; for the known ChatML templates written without jinja (see below)."""
    spec = _chatml_spec(tokenizer)
    if spec is not None:
        out = _render_chatml(messages, spec, add_generation_prompt)
        if out is not None:
            return out[0]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_render = render_messages


# ------------------------------------------------------------------------------------------------
# Host speed (scoring and the training pipeline encode a prompt per example; issue 19)
#
# 1. The chat templates jaxprm renders with (Qwen2-VL's ``QWEN_VL_CHAT_TEMPLATE``, InternVL's
#    ``INTERNVL_CHAT_TEMPLATE``) are ChatML that writes every text part verbatim; for a tokenizer whose
#    ``apply_chat_template`` is transformers' own and whose template is exactly one of them, the text is
#    written here without jinja (``_render_chatml``), with each assistant turn's content start and end
#    found while writing (no second, marked render). Any other template (or one rendered with extra
#    options) goes through ``apply_chat_template``. tests/data/test_prompt_fast.py compares the two.
# 2. A fast tokenizer splits its input at its added tokens before anything else (normalizer,
#    pre-tokenizer, model run on the text between them), so the text is split here at the special tokens
#    that can be split exactly (``_SegmentTokenizer``) and the pieces between them are tokenized once and
#    memoised per tokenizer: the system prompt, the question turn and the short turn glue are tokenized
#    once per problem, not once per candidate. The first call of each is checked against tokenizing the
#    whole text; a mismatch turns it off for that tokenizer.
# ------------------------------------------------------------------------------------------------
_QWEN_DEFAULT_SYSTEM = ("{% if loop.first and message['role'] != 'system' %}"
                        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}")
_CHATML_IMAGE = {QWEN_VL_CHAT_TEMPLATE: ("<|vision_start|><|image_pad|><|vision_end|>", "You are a helpful assistant."),
                 # the same without the default system turn (fine-tuned Qwen2.5-VL checkpoints ship it too)
                 QWEN_VL_CHAT_TEMPLATE.replace(_QWEN_DEFAULT_SYSTEM, ""): ("<|vision_start|><|image_pad|><|vision_end|>",
                                                                          None),
                 INTERNVL_CHAT_TEMPLATE: ("<img><IMG_CONTEXT></img>", None)}
assert len(_CHATML_IMAGE) == 3, "QWEN_VL_CHAT_TEMPLATE changed: update _QWEN_DEFAULT_SYSTEM"


def _hf_apply_chat_template():
    try:
        from transformers import PreTrainedTokenizerBase
    except Exception:  # noqa: BLE001 - transformers missing: no fast path
        return None
    return PreTrainedTokenizerBase.apply_chat_template


def _chatml_spec(tokenizer) -> tuple[str, str | None] | None:
    """(image string, default system turn) when ``tokenizer.apply_chat_template`` is transformers' own
    rendering one of the known ChatML templates (``_CHATML_IMAGE``); None otherwise."""
    base = tokenizer.tokenizer if isinstance(tokenizer, TemplatedTokenizer) else tokenizer
    template = tokenizer.chat_template if isinstance(tokenizer, TemplatedTokenizer) else getattr(base, "chat_template",
                                                                                                  None)
    if not isinstance(template, str) or template not in _CHATML_IMAGE:
        return None
    hf = _hf_apply_chat_template()
    if hf is None or getattr(type(base), "apply_chat_template", None) is not hf:
        return None
    return _CHATML_IMAGE[template]


def _render_chatml(messages, spec, add_generation_prompt: bool = False):
    """(text, [content start char of each message], [end char of each message]) as the ChatML template of
    ``spec`` renders ``messages`` (role/content dicts, content a string or a list of ``{"type": "image"}`` /
    ``{"type": "text", "text": str}`` parts); None for anything else (the caller renders with jinja)."""
    image, default_system = spec
    parts, starts, ends, n = [], [], [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"} or not isinstance(m["role"], str):
            return None
        role, content = m["role"], m["content"]
        if i == 0 and role != "system" and default_system is not None:
            s = f"<|im_start|>system\n{default_system}<|im_end|>\n"
            parts.append(s)
            n += len(s)
        head = f"<|im_start|>{role}\n"
        parts.append(head)
        n += len(head)
        starts.append(n)
        if isinstance(content, str):
            parts.append(content)
            n += len(content)
        elif isinstance(content, list):
            for c in content:
                if not isinstance(c, dict):
                    return None
                if c == {"type": "image"}:
                    parts.append(image)
                    n += len(image)
                elif set(c) == {"type", "text"} and c["type"] == "text" and isinstance(c["text"], str):
                    parts.append(c["text"])
                    n += len(c["text"])
                else:
                    return None
        else:
            return None
        parts.append("<|im_end|>\n")
        n += len("<|im_end|>\n")
        ends.append(n)
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts), starts, ends


class _SegmentTokenizer:
    """Tokenizes a text piece by piece between ``split`` tokens (added tokens that split exactly, see
    ``_segment_tokenizer``), memoising the pieces; ids and offsets equal the tokenizer's on the whole text."""

    max_cached = 4096  # pieces (a few MB); cleared when full: the hot ones (system turn, glue) come back at once

    def __init__(self, split: dict[str, int]):
        self.split = split  # (no reference to the tokenizer: the memo is held weakly by it)
        self.pattern = re.compile("|".join(re.escape(t) for t in sorted(split, key=len, reverse=True)))
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.checked = False
        self.disabled = False

    def __call__(self, tokenizer, text: str):
        """(ids (n,) int64, offsets (n, 2) int64) of ``text`` in ``tokenizer`` (the one this belongs to)."""
        cache, split = self.cache, self.split
        pieces, at = [], 0  # (start, piece) in order
        for m in self.pattern.finditer(text):
            if m.start() > at:
                pieces.append((at, text[at:m.start()]))
            pieces.append((m.start(), m.group()))
            at = m.end()
        if at < len(text):
            pieces.append((at, text[at:]))
        got = {}
        missing = []
        for _, p in pieces:
            if p not in got:
                hit = cache.get(p)
                if hit is None:
                    if p in split:
                        hit = cache[p] = (np.asarray([split[p]], np.int64), np.asarray([[0, len(p)]], np.int64))
                    else:
                        missing.append(p)
                        continue
                got[p] = hit
        if missing:
            missing = list(dict.fromkeys(missing))
            enc = tokenizer(missing, add_special_tokens=False, return_offsets_mapping=True)
            if len(cache) + len(missing) > self.max_cached:
                cache.clear()
            for p, pid, off in zip(missing, enc["input_ids"], enc["offset_mapping"]):
                got[p] = cache[p] = (np.asarray(pid, np.int64), np.asarray(off, np.int64).reshape(-1, 2))
        if not pieces:
            return np.zeros((0,), np.int64), np.zeros((0, 2), np.int64)
        chunks = [got[p] for _, p in pieces]
        ids = np.concatenate([c[0] for c in chunks])
        offs = np.concatenate([c[1] for c in chunks])  # within each piece
        shift = np.repeat(np.asarray([a for a, _ in pieces], np.int64), [len(c[0]) for c in chunks])
        return ids, offs + shift[:, None]


_SEGMENT_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SEGMENT_LOCK = threading.Lock()


def _exact_split_tokens(backend) -> dict[str, int]:
    """The special tokens (Qwen's and InternVL's image tokens) at which ``backend`` (a ``tokenizers.Tokenizer``)
    splits any text exactly: added, not normalized, no strip / single-word options, and no other added token
    overlaps them (contains one, or ends with a start of one / starts with an end of one)."""
    added = backend.get_added_tokens_decoder()
    contents = [t.content for t in added.values()]
    out = {}
    for tid, t in added.items():
        s = t.content
        if s not in QWEN_SPECIAL_TOKENS + INTERNVL_ADDED_TOKENS[:3]:
            continue
        if t.normalized or t.lstrip or t.rstrip or t.single_word:
            continue
        if any(c != s and (s in c or any(c.endswith(s[:k]) or c.startswith(s[-k:]) for k in range(1, len(s))))
               for c in contents):
            continue
        out[s] = int(tid)
    return out


class _TokenizerMemo:
    """What is memoised per fast tokenizer (``_tokenizer_memo``): its ``_SegmentTokenizer`` (None when no
    special token splits exactly) and the ids of single-token strings (``"+"``, ``"-"``, the placeholder)."""

    def __init__(self, backend):
        split = _exact_split_tokens(backend)
        self.segments = _SegmentTokenizer(split) if split else None
        self.single_ids: dict[str, list[int]] = {}


def _tokenizer_memo(tokenizer) -> _TokenizerMemo | None:
    """The memo of a transformers fast tokenizer (a ``TemplatedTokenizer``'s: its tokenizer's), rebuilt
    when tokens are added; None for anything else."""
    base = tokenizer.tokenizer if isinstance(tokenizer, TemplatedTokenizer) else tokenizer
    if not getattr(base, "is_fast", False) or getattr(base, "split_special_tokens", False):
        return None
    backend = getattr(base, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        return None
    size = backend.get_vocab_size(with_added_tokens=True)
    try:
        entry = _SEGMENT_TOKENIZERS.get(base)
    except TypeError:  # not weak-referenceable
        return None
    if entry is None or entry[0] != size:
        entry = (size, _TokenizerMemo(backend))
        with _SEGMENT_LOCK:
            _SEGMENT_TOKENIZERS[base] = entry
    return entry[1]


def _segment_tokenizer(tokenizer) -> _SegmentTokenizer | None:
    memo = _tokenizer_memo(tokenizer)
    seg = None if memo is None else memo.segments
    return None if seg is None or seg.disabled else seg


def _check_no_control_tokens(question: str, steps: Sequence[str], system_prompt: str, placeholder: str,
                             extra: Sequence[str] = ()):
    tokens = QWEN_SPECIAL_TOKENS + tuple(extra)

    def check(s, where):
        for t in tokens:
            if t in s:
                raise ValueError(f"{where} contains the special token string {t!r}, which would break the prompt")

    check(question, "question")
    check(system_prompt, "system_prompt")
    check(placeholder, "placeholder")
    for i, s in enumerate(steps):
        check(s, f"steps[{i}]")


def tokenize_with_offsets(tokenizer, text: str):
    """(ids (int64 array), token start offsets, token end offsets) of ``text`` (no special tokens added),
    equal to ``tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)``; the offsets None
    for a slow tokenizer. Memoised piece by piece between special tokens (see above)."""
    if getattr(tokenizer, "is_fast", False):
        seg = _segment_tokenizer(tokenizer)
        if seg is not None:
            ids, offs = seg(tokenizer, text)
            if not seg.checked:  # the first text of each tokenizer: compare with tokenizing it whole
                enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                ref_ids = np.asarray(enc["input_ids"], np.int64)
                ref_offs = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
                if np.array_equal(ref_ids, ids) and np.array_equal(ref_offs, offs):
                    seg.checked = True
                else:  # pragma: no cover - _exact_split_tokens rules this out
                    seg.disabled = True
                    ids, offs = ref_ids, ref_offs
            return ids, offs[:, 0], offs[:, 1]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offs = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
        return np.asarray(enc["input_ids"], np.int64), offs[:, 0], offs[:, 1]
    return np.asarray(list(tokenizer(text, add_special_tokens=False)["input_ids"]), np.int64), None, None


_tokenize = tokenize_with_offsets


def _count_tokens_before(tokenizer, text: str, ids, starts, char_pos):
    """Number of leading tokens of ``text`` that lie before ``char_pos`` (a token boundary); an array of
    them for an array of positions."""
    if starts is not None:
        out = np.searchsorted(starts, char_pos, side="left")
        return out if np.ndim(out) else int(out)
    if np.ndim(char_pos):
        return np.asarray([_count_tokens_before(tokenizer, text, ids, starts, int(c)) for c in char_pos], np.int64)
    prefix = list(tokenizer(text[:char_pos], add_special_tokens=False)["input_ids"])
    if list(ids[: len(prefix)]) != prefix:
        raise RuntimeError("tokenization of the prompt prefix is not a prefix of the full tokenization")
    return len(prefix)


# Private-use code points: marks standing in for the assistant labels in one extra render, never in real text.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


_SUFFIX_CACHE: dict[str, str | None] = {}


def _assistant_turn_suffix(tokenizer) -> str | None:
    """What the chat template writes after an assistant turn's content (``"<|im_end|>\\n"`` for ChatML),
    from a two-message conversation (cached per template); None when it cannot tell."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template in _SUFFIX_CACHE:
        return _SUFFIX_CACHE[template]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": POSITIVE_TOKEN}]}]
    head, through = _render(tokenizer, msgs[:1], add_generation_prompt=True), _render(tokenizer, msgs)
    suffix = through[len(head) + len(POSITIVE_TOKEN):] if through.startswith(head + POSITIVE_TOKEN) else None
    if isinstance(template, str):
        _SUFFIX_CACHE[template] = suffix
    return suffix


def _label_spans_marked(tokenizer, messages, label_strs, text):
    """(label start chars, assistant turn end chars) from one render in which every assistant label is a
    numbered mark; None when that cannot be trusted (the caller then renders prefix by prefix).

    The marked render, with each mark put back to its label, must equal ``text`` exactly; a turn ends
    with the template's assistant suffix (``_assistant_turn_suffix``), checked in ``text``. 2 renders per
    prompt instead of ``2n + 1`` for n steps."""
    if _MARK_OPEN in text or _MARK_CLOSE in text:
        return None
    marked = [dict(m) for m in messages]
    for k in range(len(label_strs)):
        marked[2 * k + 2] = {"role": "assistant", "content": [{"type": "text", "text": f"{_MARK_OPEN}{k}{_MARK_CLOSE}"}]}
    mt = _render(tokenizer, marked)
    suffix = _assistant_turn_suffix(tokenizer)
    if suffix is None:
        return None
    starts, ends, parts, at, shift = [], [], [], 0, 0
    for k, lab in enumerate(label_strs):
        mark = f"{_MARK_OPEN}{k}{_MARK_CLOSE}"
        i = mt.find(mark, at)
        if i < 0:
            return None
        parts.append(mt[at:i])
        parts.append(lab)
        start = i - shift
        starts.append(start)
        ends.append(start + len(lab) + len(suffix))
        shift += len(mark) - len(lab)
        at = i + len(mark)
    parts.append(mt[at:])
    if "".join(parts) != text:
        return None
    if any(text[s + len(lab): e] != suffix for s, e, lab in zip(starts, ends, label_strs)):
        return None
    return starts, ends


def _label_spans_by_prefix(tokenizer, messages, label_strs, text):
    """The same spans for any template: the conversation rendered up to user turn k with the generation
    prompt ends exactly where assistant turn k's content starts."""
    label_chars, turn_end_chars = [], []
    for k, lab_s in enumerate(label_strs):
        head = _render(tokenizer, messages[: 2 * k + 2], add_generation_prompt=True)
        through = _render(tokenizer, messages[: 2 * k + 3])
        if not text.startswith(head) or not text.startswith(through) or text[len(head): len(head) + len(lab_s)] != lab_s:
            raise RuntimeError(
                "the tokenizer's chat template does not render conversations prefix by prefix; cannot locate "
                f"the label of step {k}"
            )
        label_chars.append(len(head))
        turn_end_chars.append(len(through))
    return label_chars, turn_end_chars


def encode_prm_example(
    tokenizer,
    question: str,
    steps: Sequence[str],
    labels: Sequence[int | None] | None = None,
    image_grid_thw: np.ndarray | None = None,
    merge_size: int = 2,
    max_length: int | None = None,
    placeholder: str = POSITIVE_TOKEN,
    *,
    mode: str = "score",
    system_prompt: str | None = None,
    style: "str | PromptStyle | None" = None,
    image_tokens: Sequence[int] | None = None,
    image_pad: str = IMAGE_PAD,
) -> PromptEncoding:
    """Tokenize one (image(s), question, steps) example into the PRM prompt.

    mode: ``"train"`` — assistant turns hold the true labels (``"+"``/``"-"``; unlabelled steps get
      ``placeholder``); ``"score"`` — every assistant turn holds ``placeholder`` (inference). ``labels`` are
      carried into ``PromptEncoding.labels`` in both modes (1/0, -1 for None).
    image_grid_thw: ``(n_images, 3)`` grids from the image processor (None: no image); each image's
      ``<|image_pad|>`` is expanded to ``t*h*w // merge_size**2`` tokens.
    max_length: drop whole trailing steps (never part of a step or of the image tokens) until the sequence
      fits; ``num_steps_dropped`` says how many. Raises ``ValueError`` if the question and first step alone
      do not fit.
    style: the prompt style (``PROMPT_STYLES`` name or ``PromptStyle``; default ``"vlprm"``): image
      placement and system prompt; ``system_prompt`` (None: the style's) overrides the latter.
    image_tokens, image_pad: instead of ``image_grid_thw``, the number of tokens of each image, and the
      token the chat template writes once per image that is repeated to that number (InternVL:
      ``256 x tiles`` and ``"<IMG_CONTEXT>"``, with ``internvl_prompt_tokenizer(tokenizer)``).
    """
    st = get_prompt_style(style)
    system_prompt = st.system_prompt if system_prompt is None else system_prompt
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(placeholder, str) or not placeholder:
        raise ValueError(f"placeholder must be a non-empty string, got {placeholder!r}")
    _check_text(question, steps)
    labs = _check_labels(labels, len(steps))
    if image_tokens is not None:
        if image_grid_thw is not None:
            raise ValueError("give image_grid_thw or image_tokens, not both")
        n_tok = np.asarray(image_tokens, dtype=np.int64).reshape(-1)
        grids = np.zeros((len(n_tok), 3), np.int64)  # one row per image (only the count is used)
    elif image_grid_thw is None:
        grids = np.zeros((0, 3), np.int64)
    else:
        grids = np.asarray(image_grid_thw, dtype=np.int64)
        if grids.ndim == 1 and grids.shape == (3,):
            grids = grids[None]
        if grids.ndim != 2 or grids.shape[1] != 3:
            raise ValueError(f"image_grid_thw must have shape (n_images, 3), got {grids.shape}")
    if merge_size <= 0:
        raise ValueError(f"merge_size must be positive, got {merge_size}")
    if image_tokens is None:
        n_tok = grids.prod(axis=1) // (merge_size**2) if len(grids) else np.zeros((0,), np.int64)
        if np.any(n_tok <= 0):
            raise ValueError(f"every image needs at least one token; image_grid_thw={grids.tolist()}, "
                             f"merge_size={merge_size}")
    elif np.any(n_tok <= 0):
        raise ValueError(f"every image needs at least one token; image_tokens={n_tok.tolist()}")
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")

    plus_id, minus_id = label_token_ids(tokenizer)
    placeholder_id = _single_token_id(tokenizer, placeholder, "the placeholder")
    pad_id = tokenizer.convert_tokens_to_ids(image_pad)
    if len(grids) and (pad_id is None or pad_id == tokenizer.unk_token_id):
        family = "a Qwen2/Qwen2.5-VL" if image_pad == IMAGE_PAD else "an InternVL"
        raise ValueError(f"tokenizer has no {image_pad!r} token; is it {family} tokenizer?")

    turn_labels = labs if mode == "train" else [None] * len(labs)
    messages = build_messages(question, steps, turn_labels, num_images=len(grids), placeholder=placeholder,
                              system_prompt=system_prompt, style=st)
    _check_no_control_tokens(question, steps, system_prompt, placeholder,
                             () if image_pad == IMAGE_PAD else INTERNVL_ADDED_TOKENS[:3])
    n_steps = len(steps)

    label_strs = [_label_text(turn_labels[k], placeholder) for k in range(n_steps)]
    spec = _chatml_spec(tokenizer)
    fast = None if spec is None else _render_chatml(messages, spec)
    if fast is not None:  # the text and, per assistant turn, where its content starts and where it ends
        text, content_starts, message_ends = fast
        label_chars, turn_end_chars = content_starts[2::2], message_ends[2::2]
    else:
        text = _render(tokenizer, messages)
    ids, starts, ends = _tokenize(tokenizer, text)
    if fast is None:
        spans = _label_spans_marked(tokenizer, messages, label_strs, text)
        label_chars, turn_end_chars = spans if spans is not None else _label_spans_by_prefix(tokenizer, messages,
                                                                                             label_strs, text)

    # Token index of each label (before image-pad expansion) and its verification.
    label_tok = []
    label_js = _count_tokens_before(tokenizer, text, ids, starts, np.asarray(label_chars, np.int64))
    for k, c in enumerate(label_chars):
        j = int(label_js[k])
        expect = {POSITIVE_TOKEN: plus_id, NEGATIVE_TOKEN: minus_id}.get(label_strs[k], placeholder_id)
        ok = j < len(ids) and ids[j] == expect
        if starts is not None:
            ok = ok and starts[j] == c and ends[j] == c + len(label_strs[k])
        if not ok:
            got = ids[j] if j < len(ids) else None
            raise ValueError(
                f"step {k}: the label {label_strs[k]!r} did not tokenize to its own token in context "
                f"(expected id {expect} at token {j}, got {got}); the tokenizer merges it with its neighbours"
            )
        label_tok.append(j)

    # Image pads: expand each to its number of tokens.
    ids_arr = np.asarray(ids, dtype=np.int64)
    pad_pos = np.flatnonzero(ids_arr == pad_id) if len(grids) else np.zeros((0,), np.int64)
    if len(pad_pos) != len(grids):
        raise ValueError(f"the prompt has {len(pad_pos)} {image_pad} tokens but "
                         f"{'image_grid_thw' if image_tokens is None else 'image_tokens'} has {len(grids)} images")
    repeats = np.ones(len(ids_arr), dtype=np.int64)
    repeats[pad_pos] = n_tok
    new_start = np.concatenate([[0], np.cumsum(repeats)])  # new index of old token i; new_start[-1] = total
    input_ids = np.repeat(ids_arr, repeats)

    label_token_index = new_start[np.asarray(label_tok, dtype=np.int64)]
    turn_end_tokens = new_start[_count_tokens_before(tokenizer, text, ids, starts,
                                                     np.asarray(turn_end_chars, np.int64))].astype(np.int64)
    if turn_end_tokens[-1] != len(input_ids):
        raise RuntimeError("the chat template adds text after the last assistant turn; cannot truncate by steps")

    n_keep = n_steps
    if max_length is not None and len(input_ids) > max_length:
        fits = np.flatnonzero(turn_end_tokens <= max_length)
        if len(fits) == 0:
            raise ValueError(
                f"the prompt needs {int(turn_end_tokens[0])} tokens for the question and the first step "
                f"({int(n_tok.sum())} of them image tokens) but max_length={max_length}"
            )
        n_keep = int(fits[-1]) + 1
        cut = int(turn_end_tokens[n_keep - 1])
        # The kept prefix must equal what the shorter conversation tokenizes to on its own.
        short_text = _render(tokenizer, messages[: 2 * n_keep + 1])
        short_ids = list(tokenizer(short_text, add_special_tokens=False)["input_ids"])
        if short_ids != list(ids[: len(short_ids)]) or new_start[len(short_ids)] != cut:
            raise RuntimeError("truncating the conversation changed the tokenization of the kept steps")
        input_ids = input_ids[:cut]
        text = short_text

    label_token_index = label_token_index[:n_keep]
    out_labels = np.asarray([-1 if lab is None else lab for lab in labs[:n_keep]], dtype=np.int32)
    return PromptEncoding(
        input_ids=input_ids.astype(np.int32),
        label_positions=(label_token_index - 1).astype(np.int32),
        label_token_index=label_token_index.astype(np.int32),
        labels=out_labels,
        num_steps_dropped=n_steps - n_keep,
        plus_id=plus_id,
        minus_id=minus_id,
        num_image_tokens=n_tok.astype(np.int64),
        text=text,
    )
