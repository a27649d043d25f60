"""The locally trained BPE tokenizer: round trips, digits, chat template, save/reload, determinism."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kd import ConfigError
from kd.data.tasks import make_task
from kd.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, render_chats, task_tokenizer, train_bpe_tokenizer

TEXTS = [
    "Q: add 12 and 345\nA: 357",
    "Q: reverse hello\nA: olleh",
    "the quick brown fox jumps over the lazy dog",
    "what is 12 plus 345? it is 357.",
] * 25


@pytest.fixture(scope="module")
def examples():
    return make_task(train_size=1200, val_size=60, test_size=120, seed=0)


@pytest.fixture(scope="module")
def tok(examples):
    return task_tokenizer(examples["train"], vocab_size=400)


@pytest.fixture(scope="module")
def reloaded(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "text",
    ["héllo wörld ✓", "Q: 2+2=\nA: 4", "  two  spaces\t\ttabs\n\n", "emoji 🙂 and 中文", "CAPS, punct.!?", ""],
)
def test_byte_level_round_trips_any_text(tok, text):
    assert tok.decode(ids(tok, text)) == text
    assert tok.unk_token_id not in ids(tok, text)


def test_digits_are_single_tokens(tok):
    pieces = tok.convert_ids_to_tokens(ids(tok, "12345 and 9876+10=9886"))
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list("12345987610" "9886")
    # no learnt merge joins a digit with anything
    assert all(len(t) == 1 for t in tok.get_vocab() if any(c.isdigit() for c in t))


def test_special_tokens_are_distinct_with_fixed_ids(tok, reloaded):
    for t in (tok, reloaded):
        assert [t.pad_token, t.eos_token, t.bos_token, t.unk_token] == list(SPECIAL_TOKENS.values())
        assert [t.pad_token_id, t.eos_token_id, t.bos_token_id, t.unk_token_id] == [0, 1, 2, 3]
        assert t.padding_side == "right"
        assert len(t) <= 400
    assert ids(tok, "x<eos>y")[1] == tok.eos_token_id
    # "<eos>" in the training text is cut out, not learnt as merges
    assert not [t for t in tok.get_vocab() if "eos" in t and t != "<eos>"]


def test_encoding_adds_nothing_and_pads_right(tok):
    assert tok("12")["input_ids"] == ids(tok, "12")
    batch = tok(["1", "123"], padding=True)
    assert batch["input_ids"][0][1:] == [tok.pad_token_id] * 2
    assert batch["attention_mask"][0] == [1, 0, 0]


def test_chat_template_renders_q_and_a(tok):
    user = [{"role": "user", "content": "2+2="}]
    assert tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == "Q: 2+2=\nA: "
    assert tok.apply_chat_template(user, tokenize=False) == "Q: 2+2=\nA: "
    chat = [{"role": "system", "content": "Be brief."}, *user, {"role": "assistant", "content": "4"}]
    chat += [{"role": "user", "content": "3+3="}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "Be brief.\nQ: 2+2=\nA: 4<eos>Q: 3+3=\nA: "
    assert render_chats([chat]) == [text]
    with pytest.raises(Exception, match="roles system, user and assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_full_conversation_is_prompt_answer_eos(tok, examples):
    for ex in examples["test"][:60]:
        prompt = tok.apply_chat_template(ex.messages()[:1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(ex.messages(), tokenize=False)
        assert full == prompt + ex.response + tok.eos_token
        # the prompt's ids are a prefix: tokenizing prompt and answer apart gives the same ids
        full_ids = tok.apply_chat_template(ex.messages(), tokenize=True, return_dict=True)["input_ids"]
        assert full_ids == ids(tok, prompt) + ids(tok, ex.response) + [tok.eos_token_id]


def test_assistant_mask_marks_answer_and_eos(tok):
    chat = [{"role": "user", "content": "what is 12 plus 345?"}, {"role": "assistant", "content": "357"}]
    out = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    n_answer = len(ids(tok, "357")) + 1
    assert out["assistant_masks"] == [0] * (len(out["input_ids"]) - n_answer) + [1] * n_answer


def test_save_and_auto_reload_keep_ids_and_template(tok, reloaded, examples):
    assert type(reloaded).__name__ == type(tok).__name__
    assert reloaded.chat_template == tok.chat_template == CHAT_TEMPLATE
    assert reloaded.get_vocab() == tok.get_vocab()
    for text in ["héllo wörld ✓", "Q: what is 12 plus 345?\nA: 357<eos>", *[e.prompt for e in examples["val"]]]:
        assert ids(reloaded, text) == ids(tok, text)
        assert reloaded.decode(ids(reloaded, text)) == text
    chat = examples["val"][0].messages()
    assert reloaded.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    assert (
        reloaded.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
        == f"Q: {chat[0]['content']}\nA: "
    )


def test_chat_cues_merge_into_single_tokens(tok):
    pieces = tok.convert_ids_to_tokens(ids(tok, "Q: 2+2=\nA: "))
    assert pieces[0] == "Q:Ġ" and pieces[-1] == "A:Ġ"


def test_training_is_deterministic():
    a = train_bpe_tokenizer(TEXTS, vocab_size=300)
    b = train_bpe_tokenizer(list(reversed(TEXTS)), vocab_size=300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert train_bpe_tokenizer(TEXTS, vocab_size=280).get_vocab() != a.get_vocab()


def test_character_level_variant_uses_unk(tmp_path):
    t = train_bpe_tokenizer(TEXTS, vocab_size=120, byte_level=False)
    for text in TEXTS[:4]:
        assert t.decode(ids(t, text)) == text
    assert t.unk_token_id in ids(t, "héllo")
    t.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert ids(back, TEXTS[0]) == ids(t, TEXTS[0])
    assert back.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "Q: hello\nA: "


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="vocab_size must be at least 260"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ConfigError, match="min_frequency"):
        train_bpe_tokenizer(TEXTS, min_frequency=0)
