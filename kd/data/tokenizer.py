"""A small BPE tokenizer trained locally, with a Q/A chat template: no download needed.

Built with the ``tokenizers`` library and wrapped as a transformers fast tokenizer, so it
saves with ``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained`` (the
path real users take) with its special tokens and chat template. transformers 5 writes the
template to ``chat_template.jinja`` beside ``tokenizer.json`` and records the class as
``TokenizersBackend`` (``PreTrainedTokenizerFast`` is an alias of it).

How text is cut before BPE merges (the pre-tokenizer):

1. after every run of whitespace: a word keeps its trailing whitespace (``"Q: "``,
   ``"add "``), so the chat cues ``"Q: "`` and ``"A: "`` become single tokens;
2. around every digit: numbers are always spelled digit by digit, which keeps arithmetic
   learnable;
3. ``byte_level=True`` (the default): into bytes, so any text (any Unicode) round-trips
   and nothing is ever unknown; ``byte_level=False``: spaces become ``▁`` (Metaspace) and
   characters never seen in training become ``<unk>``.

Because a piece always ends at whitespace, a prompt that ends in whitespace (every prompt
the chat template renders ends in ``"A: "``) tokenizes to a prefix of prompt + answer:
tokenizing the prompt and the answer separately and concatenating the ids gives the same
ids as tokenizing the whole text, so prompt masks and generation see the same tokens as
training.

Special tokens (:data:`SPECIAL_TOKENS`) take ids 0-3 in the order pad, eos, bos, unk.
Nothing is added automatically when encoding (no bos, no eos): the chat template writes
the eos after each answer. Padding is on the right, for training; generation code
left-pads its prompts itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from kd import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from kd.data.tasks import Example

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "train_bpe_tokenizer", "render_chats", "task_tokenizer"]

SPECIAL_TOKENS = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
"""Role -> token text. Their ids are 0, 1, 2, 3 in this order."""

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'Q: ' + message['content'] + '\\nA: ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ raise_exception('this chat template knows the roles system, user and assistant, not ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
"""Jinja chat template: a system message renders as ``"{content}\\n"``, a user turn as
``"Q: {content}\\nA: "``, an assistant turn as ``"{content}<eos>"``.

The user turn already ends with the answer cue ``"A: "``, so the prompt is the same with
or without ``add_generation_prompt=True`` and is always a prefix of the full conversation.
The assistant turn sits in a ``{% generation %}`` block, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks the answer and its
eos."""


def _pre_tokenizer(byte_level: bool):
    from tokenizers import Regex, pre_tokenizers

    pieces = [
        pre_tokenizers.Split(Regex(r"\s+"), behavior="merged_with_previous"),
        pre_tokenizers.Digits(individual_digits=True),
    ]
    if byte_level:
        pieces.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    else:
        pieces.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False))
    return pre_tokenizers.Sequence(pieces)


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    """The texts cut at special-token strings, as encoding will cut them (so none is learnt as merges)."""
    pattern = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS.values()))
    for text in texts:
        for piece in pattern.split(text):
            if piece:
                yield piece


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    *,
    byte_level: bool = True,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on ``texts`` and wrap it for transformers.

    Training is deterministic: the same texts (in any order) and settings give the same
    vocabulary and merges.

    Args:
        texts: training text; special-token strings inside it (``"<eos>"``) are cut out
            first, as encoding cuts them, so they are not learnt as ordinary merges.
        vocab_size: the largest vocabulary, special tokens included (fewer when the text
            has fewer merges that occur ``min_frequency`` times). Byte-level needs at least
            260: 256 bytes + 4 special tokens.
        byte_level: byte-level BPE (any text round-trips); False: character-level BPE with
            Metaspace spaces and ``<unk>`` for characters absent from ``texts``.
        min_frequency: a merge is learnt only from pairs seen at least this often.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/eos/bos/unk set, :data:`CHAT_TEMPLATE`, and
        right padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    smallest = len(specials) + (256 if byte_level else 1)
    if vocab_size < smallest:
        raise ConfigError(
            f"vocab_size must be at least {smallest} for a {'byte-level' if byte_level else 'character'} BPE "
            f"tokenizer (got {vocab_size}); raise it"
        )
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1 (got {min_frequency}); raise it")

    if byte_level:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"], fuse_unk=True))
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=False)
        alphabet = []
    tokenizer.pre_tokenizer = _pre_tokenizer(byte_level)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_without_special_tokens(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=SPECIAL_TOKENS["pad"],
        eos_token=SPECIAL_TOKENS["eos"],
        bos_token=SPECIAL_TOKENS["bos"],
        unk_token=SPECIAL_TOKENS["unk"],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        # Decoding must give back the exact text (no " ," -> "," clean-up).
        clean_up_tokenization_spaces=False,
    )


def render_chats(conversations: Iterable[Sequence[dict[str, str]]]) -> list[str]:
    """Conversations rendered with :data:`CHAT_TEMPLATE` as text, without a tokenizer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [list(c) for c in conversations],
        chat_template=CHAT_TEMPLATE,
        eos_token=SPECIAL_TOKENS["eos"],
        bos_token=SPECIAL_TOKENS["bos"],
    )
    return rendered


def task_tokenizer(examples: Iterable[Example], vocab_size: int = 512, **kw) -> PreTrainedTokenizerFast:
    """A BPE tokenizer for task examples, trained on them as the chat template renders them.

    Training on rendered conversations (``"Q: 12+345=\\nA: 357<eos>"``) rather than bare
    prompts lets the chat cues merge into single tokens.

    Args:
        examples: :class:`kd.data.tasks.Example` items (usually the training split).
        vocab_size: the largest vocabulary (see :func:`train_bpe_tokenizer`).
        **kw: passed on to :func:`train_bpe_tokenizer` (``byte_level``, ``min_frequency``).
    """
    return train_bpe_tokenizer(render_chats(e.messages() for e in examples), vocab_size=vocab_size, **kw)


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 2000, *, lowercase: bool = True,
                              min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on ``texts`` (deterministic), wrapped for
    transformers with ``[PAD]`` (id 0), ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]`` and the
    ``[CLS] text [SEP]`` post-processor: the tokenizer of the embedded masked-LM models."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if vocab_size < 100:
        raise ConfigError(f"vocab_size must be at least 100 for a WordPiece tokenizer (got {vocab_size}); raise it")
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
