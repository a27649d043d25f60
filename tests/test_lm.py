"""Language-model data, token batches in the recipe, word-level KD, tokenizer checks,
and a run on the embedded task whose student loads in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd import ConfigError
from kd.runs import evaluate, train as run
from kd.data import IGNORE_INDEX
from kd.data.lm import LMDataModule
from kd.data.sources import JsonlSource, TaskSource
from kd.data.tokenizer import train_bpe_tokenizer
from kd.models import check_same_tokenizer, load_weights, save_model, tiny_causal_lm
from kd.divergences import ForwardKL
from recipes.hinton import Hinton
from recipes.supervised import Supervised
from tests.conftest import SMALL_TASK

@pytest.fixture
def dm(task_dm):
    return task_dm


def test_labels_cover_exactly_the_response_and_eos(dm):
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    for row in range(len(batch["input_ids"])):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        gold = labels != IGNORE_INDEX
        assert torch.equal(labels[gold], ids[gold])  # labels are the tokens themselves (the recipe shifts)
        assert not gold[mask == 0].any()  # padding never in the loss
        first = int(gold.nonzero()[0])
        prompt_text = tok.decode(ids[:first])
        assert prompt_text.startswith("Q: ") and prompt_text.endswith("A: ")  # the prompt is never in the loss
        assert ids[gold][-1] == tok.eos_token_id
        response = tok.decode(ids[gold][:-1])
        assert any(ex.response == response for ex in dm.splits["train"].examples)


def test_prompt_batches_are_left_padded_and_indexed(dm):
    loader = dm.val_dataloader()[1]
    batch = next(iter(loader))
    assert (batch["prompt_mask"][:, -1] == 1).all()  # every prompt ends at the right edge
    i = int(batch["index"][0])
    ids = batch["prompt_ids"][0][batch["prompt_mask"][0] == 1]
    assert dm.tokenizer.decode(ids) == f"Q: {dm.splits['val'].examples[i].prompt}\nA: "


def test_supervised_loss_is_ce_on_response_tokens_only(dm):
    torch.manual_seed(0)
    model = tiny_causal_lm(vocab_size=320, hidden_size=32, num_layers=1)
    recipe = Supervised(student=model)
    recipe.set_vocabulary(len(dm.tokenizer))
    batch = next(iter(dm.train_dataloader()))
    loss = recipe.compute_loss(batch)["loss"]
    # independent: per row, next-token CE at every position whose target is a response token
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = 0.0, 0
    for b in range(len(logits)):
        for t in range(1, logits.shape[1]):
            target = int(batch["labels"][b, t])
            if target != IGNORE_INDEX:
                total += -F.log_softmax(logits[b, t - 1, : len(dm.tokenizer)], -1)[target].item()
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_word_level_kd_is_hinton_on_response_token_rows(dm):
    torch.manual_seed(0)
    student, teacher = tiny_causal_lm(vocab_size=300, hidden_size=32, num_layers=1), tiny_causal_lm(
        vocab_size=320, hidden_size=32, num_layers=1)  # the teacher's output layer is padded past the tokenizer
    student, teacher = student.double(), teacher.double()  # the KL is small: float32 rounding is 1e-5 of it
    recipe = Hinton(divergence=ForwardKL(), student=student, teacher=teacher, lam=0.3, temperature=2.0)
    recipe.set_vocabulary(V := len(dm.tokenizer))
    batch = next(iter(dm.train_dataloader()))
    terms = recipe.compute_loss(batch)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    labels = batch["labels"][:, 1:]
    rows = labels != IGNORE_INDEX
    s_rows, t_rows, y = s[rows], t[rows], labels[rows]  # (N, V): one row per response token
    kl = F.kl_div(F.log_softmax(s_rows / 2, -1), F.log_softmax(t_rows / 2, -1), log_target=True,
                  reduction="sum") / len(y)
    ce = F.cross_entropy(s_rows, y)
    expected = 0.7 * ce + 0.3 * 4 * kl
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-10)
    assert terms["soft_kd"].item() == pytest.approx(4 * kl.item(), rel=1e-10)


def test_logits_smaller_than_the_tokenizer_are_refused(dm):
    recipe = Supervised(student=tiny_causal_lm(vocab_size=50, hidden_size=32, num_layers=1))
    with pytest.raises(ConfigError, match="the student has 50 embedding rows .* at least as large as the tokenizer"):
        recipe.set_vocabulary(len(dm.tokenizer))


def test_tokenizers_with_same_size_but_different_strings_are_refused():
    a = train_bpe_tokenizer(["aaa bbb ccc abc"] * 20, vocab_size=280)
    b = train_bpe_tokenizer(["xxx yyy zzz xyz"] * 20, vocab_size=280)
    assert len(a) == len(b)
    check_same_tokenizer(a, train_bpe_tokenizer(["aaa bbb ccc abc"] * 20, vocab_size=280))
    with pytest.raises(ConfigError, match="map .* ids to different strings.*recipe=byte_kd"):
        check_same_tokenizer(a, b)


def test_hf_weights_with_tied_embeddings_load_strictly(tmp_path):
    torch.manual_seed(0)
    a, b = tiny_causal_lm(vocab_size=64, hidden_size=32, num_layers=1), tiny_causal_lm(
        vocab_size=64, hidden_size=32, num_layers=1)
    save_model(a, tmp_path)
    load_weights(b, tmp_path)
    x = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits)
    with pytest.raises(ConfigError, match="do not fit"):
        load_weights(tiny_causal_lm(vocab_size=64, hidden_size=32, num_layers=2), tmp_path)


@pytest.mark.parametrize("content,needle", [
    ("", "holds no records"),
    ('{"prompt": "hi", "response": "yo"}\nnot json\n', "line 2 is not valid JSON"),
    ('{"question": "hi", "answer": "yo"}\n', "has neither 'prompt'/'response' fields"),
])
def test_empty_or_malformed_data_files_fail_clearly(tmp_path, content, needle):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        JsonlSource(str(path)).load()
    with pytest.raises(ConfigError, match="does not exist"):
        JsonlSource(str(tmp_path / "missing.jsonl")).load()


def test_jsonl_source_with_chat_messages(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(40)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    splits = JsonlSource(str(path), val_fraction=0.1, test_fraction=0.1).load()
    assert [len(splits[k]) for k in ("train", "val", "test")] == [32, 4, 4]
    prompts = {ex.prompt for split in splits.values() for ex in split}
    assert len(prompts) == 40  # disjoint splits covering every record


def test_hinton_run_on_the_embedded_task_exports_a_plain_transformers_student(make_cfg, tmp_path):
    summary = run(make_cfg(*SMALL_TASK, "debug=fast_dev_run"))
    results = summary["results"]
    assert set(results) == {"teacher", "student, from scratch", "student, hinton"}
    for row in results.values():
        assert 0.0 <= row["test/exact_match"] <= 1.0
    student_dir = tmp_path / "run" / "student"
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tok = AutoTokenizer.from_pretrained(student_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2="}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] >= len(tok)

    # kd-eval on the exported student reproduces the run's own test metrics
    data = [o for o in SMALL_TASK if o.startswith("data")]
    metrics = evaluate(make_cfg(*data, "student=hf", f"student.name_or_path={student_dir}", config_name="eval",
                                root=tmp_path / "eval"))
    assert json.loads((tmp_path / "eval" / "run" / "eval.json").read_text()) == metrics
    for key in ("test/loss", "test/exact_match", "test/acc"):
        assert metrics[key] == pytest.approx(results["student, hinton"][key], abs=1e-5)


def test_a_foreign_teacher_tokenizer_is_refused_before_training(make_cfg, tmp_path, monkeypatch):
    import lightning as L

    def trained(*args, **kwargs):  # reaching any training (the scratch baseline's, the run's) fails the test
        raise AssertionError("trained")

    monkeypatch.setattr(L.Trainer, "fit", trained)
    other = train_bpe_tokenizer(["xxx yyy zzz"] * 20, vocab_size=280)
    teacher_dir = tmp_path / "teacher"
    save_model(tiny_causal_lm(vocab_size=300, hidden_size=32, num_layers=1), teacher_dir)
    other.save_pretrained(teacher_dir)
    # no debug=fast_dev_run: a run that got past the check would train and write checkpoints
    cfg = make_cfg(*[o for o in SMALL_TASK if not o.startswith(("teacher", "student.hidden"))],
                   "student.hidden_size=32", "teacher=hf", f"teacher.name_or_path={teacher_dir}")
    assert not cfg.trainer.fast_dev_run
    with pytest.raises(ConfigError, match="the data's and the teacher's tokenizers .*recipe=byte_kd"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "student").exists()
    assert not (tmp_path / "cache" / "teachers").exists() and not (tmp_path / "cache" / "baselines").exists()


def test_prompts_without_a_chat_template_start_as_the_tokenizer_would():
    from tokenizers import processors

    from kd.data.lm import encode_example
    from kd.data.tasks import Example

    tok = train_bpe_tokenizer(["Q: a\nA: b", "hello world"] * 10, vocab_size=280)
    tok.chat_template = None
    ex = Example(prompt="hello", response="world", skill="x")
    plain, _ = encode_example(tok, ex, 32)
    assert plain == tok("hello", add_special_tokens=False)["input_ids"]  # adds nothing: nothing prepended
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])  # a Gemma-like tokenizer
    with_bos, response = encode_example(tok, ex, 32)
    assert with_bos == [tok.bos_token_id, *plain]
    assert response[-1] == tok.eos_token_id and tok.bos_token_id not in response


def test_hf_dataset_source_loads_builder_files_and_names_bad_splits(tmp_path):
    pytest.importorskip("datasets")
    from kd.data.sources import HFDatasetSource

    for split, n in (("train", 30), ("test", 5)):
        rows = [{"question": f"{split} q{i}", "answer": f"a{i}", "other": i} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    source = HFDatasetSource("json", data_files=files, test_split="test", prompt_key="question",
                             response_key="answer", val_fraction=0.1)
    splits = source.load()
    assert [len(splits[k]) for k in ("train", "val", "test")] == [27, 3, 5]
    assert {ex.prompt for ex in splits["test"]} == {f"test q{i}" for i in range(5)}
    assert all(ex.prompt.startswith("train") for ex in splits["train"] + splits["val"])
    with pytest.raises(ConfigError, match="could not load split 'validation'"):
        HFDatasetSource("json", data_files=files, val_split="validation").load()
    with pytest.raises(ConfigError, match="has neither 'prompt'/'response' fields"):
        HFDatasetSource("json", data_files=files).load()


def test_chatterbot_source_pairs_consecutive_turns():
    pytest.importorskip("chatterbot_corpus")
    import yaml

    from kd.data.sources import ChatterbotSource

    folder = ChatterbotSource.directory()
    conversations = yaml.safe_load((folder / "greetings.yml").read_text())["conversations"]
    expected = sum(len(c) - 1 for c in conversations)
    splits = ChatterbotSource(categories=["greetings"], val_fraction=0.1, test_fraction=0.1).load()
    assert sum(len(s) for s in splits.values()) == expected
    first = conversations[0]
    pairs = {(ex.prompt, ex.response) for s in splits.values() for ex in s}
    assert (first[0], first[1]) in pairs
    with pytest.raises(ConfigError, match="no categories \\['klingon'\\]"):
        ChatterbotSource(categories=["klingon"]).load()


def test_chatterbot_dedup_keeps_each_pair_once_and_holds_out_whole_prompts():
    pytest.importorskip("chatterbot_corpus")
    from kd.data.sources import ChatterbotSource

    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    raw = ChatterbotSource(val_fraction=0.1, test_fraction=0.1).load()
    raw_pairs = [(norm(e.prompt), norm(e.response)) for s in raw.values() for e in s]
    train_pairs = {(norm(e.prompt), norm(e.response)) for e in raw["train"]}
    # the plain split leaks: some test pairs are training pairs too
    assert any((norm(e.prompt), norm(e.response)) in train_pairs for e in raw["test"])

    splits = ChatterbotSource(val_fraction=0.1, test_fraction=0.1, dedup=True).load()
    pairs = [(norm(e.prompt), norm(e.response)) for s in splits.values() for e in s]
    assert len(pairs) == len(set(pairs)) == len(set(raw_pairs))  # each distinct pair exactly once
    prompts = {name: {norm(e.prompt) for e in s} for name, s in splits.items()}
    assert not prompts["test"] & prompts["train"] and not prompts["val"] & prompts["train"]
    assert not prompts["test"] & prompts["val"]
    distinct = len({p for p, _ in raw_pairs})
    assert len(prompts["test"]) == len(prompts["val"]) == int(0.1 * distinct)
    assert ChatterbotSource(dedup=True).fingerprint() != ChatterbotSource().fingerprint()


def test_text_windows_hold_out_whole_documents_and_cover_every_token(tmp_path):
    from kd.data.sources import TextWindows

    docs = [" ".join(f"d{d}w{i}" for i in range(50)) for d in range(20)]  # 20 documents of 50 words
    (tmp_path / "text.txt").write_text("\n".join(docs))
    splits = TextWindows(str(tmp_path / "text.txt"), words=20, val_fraction=0.1, test_fraction=0.1).load()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16 * 3, 2 * 3, 2 * 3]  # 50 words: 20 + 20 + 10
    doc_of = lambda ex: ex.response.split()[0].split("w")[0]  # noqa: E731
    train_docs = {doc_of(ex) for ex in splits["train"]}
    assert train_docs.isdisjoint({doc_of(ex) for s in ("val", "test") for ex in splits[s]})
    assert all(ex.prompt == "" for s in splits.values() for ex in s)
    assert sorted(len(ex.response.split()) for ex in splits["train"])[:16] == [10] * 16
    assert len(TextWindows(str(tmp_path / "text.txt"), words=20, max_windows=7).load()["train"]) == 7
    # the datamodule without the chat template: no prompt tokens, every token after the first is a label
    tok = train_bpe_tokenizer(docs, vocab_size=300)
    assert tok.chat_template  # kd's trained tokenizers carry one; chat_template=false must ignore it
    tok.save_pretrained(tmp_path / "tok")
    data = LMDataModule(TextWindows(str(tmp_path / "text.txt"), words=20), tokenizer=str(tmp_path / "tok"),
                        max_length=256, generation_eval_size=0, chat_template=False)
    data.setup()
    prompt, response = data.splits["train"].encoded[0]
    assert prompt == [] and tok.decode(response[:-1]) == data.splits["train"].examples[0].response
    batch = next(iter(data.train_dataloader()))
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"] != IGNORE_INDEX, real)


def test_wikipedia_slice_is_plain_text():
    pytest.importorskip("gensim")
    from kd.data.sources import wikipedia_articles

    articles = wikipedia_articles()
    assert len(articles) > 50 and all(len(a.split()) >= 50 for a in articles)
    assert articles[0].startswith("Anarchism is a political philosophy")  # bold quotes and markup gone
    assert not any("'''" in a or "[[" in a or "\n" in a for a in articles)


def test_a_transfer_set_gets_soft_targets_on_every_answer_and_hard_labels_on_its_gold_share():
    """gold_fraction 0.5: unlabelled examples carry no labels (so no CE, also for the
    supervised baseline) but their answer tokens stay in target_mask, where Hinton's soft
    term covers them; checked against per-row sums written out here."""
    from kd.data.lm import collate_train

    data = LMDataModule(TaskSource(train_size=64, val_size=8, test_size=8, gold_fraction=0.5), vocab_size=300,
                        batch_size=16, max_length=48, generation_eval_size=0)
    data.setup()
    split = data.splits["train"]
    assert len(split.unlabelled) == 32
    batch = collate_train([split[i] for i in range(16)], data.pad_token_id)
    gold = torch.tensor([i not in split.unlabelled for i in range(16)])
    assert 0 < int(gold.sum()) < 16
    responses = torch.zeros_like(batch["labels"], dtype=torch.bool)
    for row in range(16):
        prompt, response = split.encoded[row]
        responses[row, len(prompt) : len(prompt) + len(response)] = True
    assert torch.equal(batch["target_mask"], responses)
    assert torch.all(batch["labels"][~gold] == IGNORE_INDEX) and torch.all((batch["labels"] != IGNORE_INDEX)[gold] == responses[gold])

    torch.manual_seed(0)
    student, teacher = tiny_causal_lm(vocab_size=300, hidden_size=32, num_layers=1), tiny_causal_lm(
        vocab_size=300, hidden_size=32, num_layers=1)
    V = len(data.tokenizer)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    labels, every = batch["labels"][:, 1:], responses[:, 1:]
    hard_rows = labels != IGNORE_INDEX
    ce = F.cross_entropy(s[hard_rows], labels[hard_rows])
    kl = F.kl_div(F.log_softmax(s[every], -1), F.log_softmax(t[every], -1), log_target=True,
                  reduction="sum") / int(every.sum())
    recipe = Hinton(divergence=ForwardKL(), student=student, teacher=teacher, lam=0.5, temperature=1.0)
    recipe.set_vocabulary(V)
    terms = recipe.compute_loss(batch)
    assert terms["hard_ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["soft_kd"].item() == pytest.approx(kl.item(), rel=1e-5)
    baseline = Supervised(student=student)
    baseline.set_vocabulary(V)
    assert baseline.compute_loss(batch)["loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    # answers the teacher writes for the transfer set are labels (Seq-KD on it)
    unlabelled = sorted(split.unlabelled)[0]
    data.replace_responses("train", [[5, 6, data.tokenizer.eos_token_id] if i == unlabelled else None
                                     for i in range(len(split))])
    assert unlabelled not in split.unlabelled and split[unlabelled]["labelled"]
