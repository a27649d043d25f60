"""kd.generation: our batched decoding loop against independent references.

Tiny random GPT-2 (absolute positions: catches wrong position ids under left padding) and
Llama (rotary, grouped-query attention) models built from configs. A large init std makes
the random logits peaked, so greedy decoding is varied and far from ties.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kd import ConfigError
from kd.batches import left_pad
from kd.generation import (
    Generation,
    GenerationConfig,
    TeacherMix,
    filter_log_probs,
    generate,
    position_ids_from_mask,
    sample_from_log_probs,
)

VOCAB = 50
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 9, 10], [11], [3, 3, 8, 20]]


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64,
        bos_token_id=1, eos_token_id=2, initializer_range=0.5,
    )
    return GPT2LMHeadModel(config).eval()


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.5,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"gpt2": _gpt2(), "llama": _llama()}


ARCHS = ["gpt2", "llama"]


def _greedy(**kw) -> GenerationConfig:
    return GenerationConfig(temperature=0.0, **{"max_new_tokens": 8, **kw})


def _recomputed_logprobs(model, out: Generation, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) at the sampled tokens from ONE full forward, 0 where masked."""
    pos = position_ids_from_mask(out.attention_mask)
    logits = model(input_ids=out.sequences, attention_mask=out.attention_mask, position_ids=pos).logits
    p = out.prompt_length
    lp = torch.log_softmax(logits[:, p - 1:-1].float() / temperature, -1)
    lp = lp.gather(-1, out.responses[..., None]).squeeze(-1)
    return lp.masked_fill(~out.response_mask, 0.0)


def test_left_pad():
    ids, mask = left_pad([[4, 5], [6], []], pad_token_id=9)
    assert ids.tolist() == [[4, 5], [9, 6], [9, 9]]
    assert mask.tolist() == [[1, 1], [0, 1], [0, 0]]
    assert ids.dtype == mask.dtype == torch.long


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_cache_equals_no_cache(models, arch):
    ids, mask = left_pad(PROMPTS)
    a = generate(models[arch], ids, mask, _greedy(use_cache=True))
    b = generate(models[arch], ids, mask, _greedy(use_cache=False))
    assert a.sequences.shape == (len(PROMPTS), ids.shape[1] + 8)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert len(set(a.responses.flatten().tolist())) > 4  # not a degenerate repetition


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_left_padded_equals_alone(models, arch):
    ids, mask = left_pad(PROMPTS)
    batched = generate(models[arch], ids, mask, _greedy())
    for i, prompt in enumerate(PROMPTS):
        alone = generate(models[arch], torch.tensor([prompt]), None, _greedy())
        assert alone.responses[0].tolist() == batched.responses[i].tolist()
        assert torch.allclose(alone.logprobs[0], batched.logprobs[i], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_generate(models, arch):
    model = models[arch]
    prompt = torch.tensor([PROMPTS[1]])
    ours = generate(model, prompt, None, _greedy(max_new_tokens=10, eos_token_id=2))
    ref = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
        max_new_tokens=10, eos_token_id=2, pad_token_id=0,
    )
    assert torch.equal(ours.sequences, ref)
    assert ours.responses.shape[1] >= 3
    # and on a left-padded batch (transformers also derives positions from the mask)
    ids, mask = left_pad(PROMPTS)
    ours = generate(model, ids, mask, _greedy(max_new_tokens=10, eos_token_id=2))
    ref = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False,
        max_new_tokens=10, eos_token_id=2, pad_token_id=0,
    )
    assert torch.equal(ours.sequences, ref)


def test_right_padding_is_repacked(models):
    ids, mask = left_pad(PROMPTS)
    left = generate(models["gpt2"], ids, mask, _greedy())
    right_ids = torch.zeros_like(ids)
    right_mask = torch.zeros_like(mask)
    for i, p in enumerate(PROMPTS):
        right_ids[i, : len(p)] = torch.tensor(p)
        right_mask[i, : len(p)] = 1
    right = generate(models["gpt2"], right_ids, right_mask, _greedy())
    assert torch.equal(left.sequences, right.sequences)
    assert torch.equal(left.attention_mask, right.attention_mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_reproducible_and_logprobs_match_full_forward(models, arch):
    model = models[arch]
    ids, mask = left_pad(PROMPTS)
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.7, eos_token_id=2)
    a = generate(model, ids, mask, cfg, generator=torch.Generator().manual_seed(3))
    b = generate(model, ids, mask, cfg, generator=torch.Generator().manual_seed(3))
    c = generate(model, ids, mask, cfg, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)
    assert a.logprobs.dtype == torch.float32
    assert torch.allclose(a.logprobs, _recomputed_logprobs(model, a, 0.7), atol=1e-5)
    assert (a.logprobs[~a.response_mask] == 0).all()
    # no-cache sampling draws the same tokens
    d = generate(model, ids, mask, GenerationConfig(**{**cfg.__dict__, "use_cache": False}),
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.sequences, d.sequences)


def test_greedy_logprobs_are_temperature_one(models):
    model = models["llama"]
    ids, mask = left_pad(PROMPTS)
    out = generate(model, ids, mask, _greedy())
    assert torch.allclose(out.logprobs, _recomputed_logprobs(model, out, 1.0), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_stops_sequences(models, arch):
    model = models[arch]
    ids, mask = left_pad(PROMPTS)
    free = generate(model, ids, mask, _greedy(max_new_tokens=10))
    eos = int(free.responses[0, 2])  # row 0 emits it at step 2 at the latest
    out = generate(model, ids, mask, _greedy(max_new_tokens=10, eos_token_id=eos, pad_token_id=49))
    n = out.responses.shape[1]
    ends = []
    for i in range(len(PROMPTS)):
        hits = (free.responses[i] == eos).nonzero().flatten().tolist()
        end = hits[0] + 1 if hits else 10  # counted response length
        ends.append(end)
        assert out.response_mask[i].tolist() == [t < end for t in range(n)]
        assert out.responses[i, :end].tolist() == free.responses[i, :end].tolist()
        assert (out.responses[i, end:] == 49).all()
        assert (out.logprobs[i, end:] == 0).all()
    assert n == max(ends)
    p = out.prompt_length
    assert torch.equal(out.attention_mask[:, p:], out.response_mask.long())
    assert torch.equal(out.attention_mask[:, :p], mask)
    assert out.response_lengths.tolist() == ends

    # every row stops at step 0 -> a single step is run
    first = sorted(set(free.responses[:, 0].tolist()))
    out = generate(model, ids, mask, _greedy(max_new_tokens=10, eos_token_id=first))
    assert out.responses.shape == (len(PROMPTS), 1) and out.response_mask.all()


def test_top_k_one_and_tiny_top_p_are_greedy(models):
    model = models["gpt2"]
    ids, mask = left_pad(PROMPTS)
    greedy = generate(model, ids, mask, _greedy())
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        out = generate(model, ids, mask, GenerationConfig(max_new_tokens=8, temperature=1.3, **kw),
                       generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.sequences, greedy.sequences)
        assert torch.allclose(out.logprobs, torch.zeros_like(out.logprobs))  # one token kept


def test_filter_log_probs():
    lp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]), -1)
    assert torch.equal(filter_log_probs(lp), lp)
    k2 = filter_log_probs(lp, top_k=2)
    assert torch.isinf(k2[0, 2:]).all() and torch.allclose(k2.exp().sum(), torch.tensor(1.0))
    p = lp.exp()[0]
    # smallest set with mass >= top_p: the first two tokens cover p0 + p1
    nucleus = filter_log_probs(lp, top_p=float(p[0] + p[1]) - 1e-4)
    assert torch.isfinite(nucleus[0]).tolist() == [True, True, False, False, False]
    assert torch.allclose(nucleus[0, :2], torch.log(p[:2] / p[:2].sum()))
    # top-p computed on the top-k-renormalized distribution
    both = filter_log_probs(lp, top_k=3, top_p=0.99)
    assert torch.isfinite(both[0]).tolist() == [True, True, True, False, False]


def test_teacher_mix(models):
    student, teacher = models["gpt2"], _gpt2(seed=1)
    ids, mask = left_pad(PROMPTS)
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.9)

    def run(mix=None, seed=5):
        return generate(student, ids, mask, cfg, generator=torch.Generator().manual_seed(seed), mix=mix)

    plain = run()
    assert plain.student_logprobs is None and plain.teacher_logprobs is None
    zero = run(TeacherMix(teacher, alpha=0.0))
    assert torch.equal(zero.sequences, plain.sequences)
    assert torch.equal(zero.logprobs, plain.logprobs)
    assert torch.equal(zero.student_logprobs, zero.logprobs)
    assert torch.equal(zero.importance_weights, torch.ones_like(zero.logprobs))

    one = run(TeacherMix(teacher, alpha=1.0))
    assert torch.equal(one.logprobs, one.teacher_logprobs)
    # the teacher's log-probs agree with a full forward of the teacher (its own cache works)
    assert torch.allclose(one.teacher_logprobs, _recomputed_logprobs(teacher, one, 0.9), atol=1e-5)
    # alpha=1 samples the same tokens as the teacher alone
    alone = generate(teacher, ids, mask, cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one.sequences, alone.sequences)

    alpha = 0.3
    mixed = run(TeacherMix(teacher, alpha=alpha))
    m = mixed.response_mask
    expected = torch.log(alpha * mixed.teacher_logprobs.exp() + (1 - alpha) * mixed.student_logprobs.exp())
    assert torch.allclose(mixed.logprobs[m], expected[m], atol=1e-5)
    assert torch.allclose(mixed.student_logprobs, _recomputed_logprobs(student, mixed, 0.9), atol=1e-5)
    assert torch.allclose(mixed.teacher_logprobs, _recomputed_logprobs(teacher, mixed, 0.9), atol=1e-5)
    assert (mixed.student_logprobs[~m] == 0).all() and (mixed.teacher_logprobs[~m] == 0).all()
    w = mixed.importance_weights
    assert torch.allclose(w, (mixed.student_logprobs - mixed.logprobs).exp())

    # no cache for both models: the same draws
    nc = generate(student, ids, mask, GenerationConfig(max_new_tokens=8, temperature=0.9, use_cache=False),
                  generator=torch.Generator().manual_seed(5), mix=TeacherMix(teacher, alpha=alpha))
    assert torch.equal(nc.sequences, mixed.sequences)

    with pytest.raises(ValueError, match="alpha"):
        TeacherMix(teacher, alpha=1.5)


def test_no_grad_and_training_mode_restored(models):
    student, teacher = _llama(), models["gpt2"]
    student.train()
    teacher.train()
    ids, mask = left_pad(PROMPTS)
    seen: list[bool] = []
    handle = student.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    try:
        out = generate(student, ids, mask, GenerationConfig(max_new_tokens=3),
                       generator=torch.Generator().manual_seed(0), mix=TeacherMix(teacher, alpha=0.5))
    finally:
        handle.remove()
        teacher.eval()
    assert seen and not any(seen)  # ran in eval mode
    assert student.training
    for t in (out.logprobs, out.student_logprobs, out.teacher_logprobs):
        assert not t.requires_grad


def test_max_new_tokens_zero_and_validation(models):
    ids, mask = left_pad(PROMPTS)
    out = generate(models["gpt2"], ids, mask, GenerationConfig(max_new_tokens=0))
    assert out.responses.shape == (len(PROMPTS), 0) and out.logprobs.shape == (len(PROMPTS), 0)
    assert torch.equal(out.sequences, ids)
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"max_new_tokens": -2}):
        with pytest.raises(ConfigError):
            GenerationConfig(**bad)
    with pytest.raises(ValueError, match="at least one real token"):
        generate(models["gpt2"], ids, torch.zeros_like(mask), GenerationConfig(max_new_tokens=2))


def test_mix_in_log_space_is_stable():
    from kd.generation import mix_log_probs

    q = torch.tensor([[-200.0, 0.0, float("-inf")]])
    p = torch.tensor([[0.0, -300.0, float("-inf")]])
    m = mix_log_probs(q, p, 0.25)
    assert torch.isfinite(m[0, :2]).all() and m[0, 2] == float("-inf")
    assert math.isclose(float(m[0, 0]), math.log(0.25), rel_tol=1e-6)
    assert math.isclose(float(m[0, 1]), math.log(0.75), rel_tol=1e-6)


def test_ids_past_the_tokenizer_vocabulary_are_never_generated():
    """Output rows that only pad the embedding table are never trained; with
    ``vocab_size`` they cannot be sampled even when they carry the most mass."""
    model = _llama()
    V = model.config.vocab_size
    with torch.no_grad():
        model.lm_head.weight[V - 10 :] = 0.0
        model.model.norm.weight.zero_()  # all logits 0 ...
    prompts = torch.randint(3, V - 10, (4, 5))
    sampled = generate(model, prompts, None, GenerationConfig(max_new_tokens=8, temperature=1.0),
                       generator=torch.Generator().manual_seed(0))
    assert (sampled.responses >= V - 10).any()  # ... so padding ids get sampled without the limit
    limited = generate(model, prompts, None, GenerationConfig(max_new_tokens=8, temperature=1.0, vocab_size=V - 10),
                       generator=torch.Generator().manual_seed(0))
    assert (limited.responses < V - 10).all()


def _reference_generate(model, ids, mask, config: GenerationConfig, generator=None) -> Generation:
    """The documented conventions, spelled out naively: no cache (one full forward per step),
    sequences grown by concatenation, positions recomputed from the whole mask."""
    eos = set(config.eos_token_ids)
    t = 1.0 if config.greedy else config.temperature
    seqs, m = ids.clone(), mask.clone()
    finished = [False] * len(ids)
    toks, lps, valids = [], [], []
    with torch.no_grad():
        for _ in range(config.max_new_tokens):
            logits = model(input_ids=seqs, attention_mask=m, position_ids=position_ids_from_mask(m)).logits[:, -1]
            lp = filter_log_probs(torch.log_softmax(logits.float() / t, -1), config.top_k if t else 0, config.top_p)
            tok = lp.argmax(-1) if config.greedy else sample_from_log_probs(lp, generator)
            valid = torch.tensor([not f for f in finished])
            tok = torch.where(valid, tok, torch.full_like(tok, config.pad_token_id))
            lps.append(torch.where(valid, lp.gather(-1, tok[:, None]).squeeze(-1), torch.zeros(len(ids))))
            toks.append(tok)
            valids.append(valid)
            seqs = torch.cat([seqs, tok[:, None]], 1)
            m = torch.cat([m, valid.long()[:, None]], 1)
            finished = [f or (v and int(k) in eos) for f, v, k in zip(finished, valid.tolist(), tok)]
            if eos and all(finished):
                break
    return Generation(seqs, m, torch.stack(valids, 1), torch.stack(lps, 1), ids.shape[1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_preallocated_loop_equals_naive_reference_with_eos_mid_batch(models, arch, temperature):
    """Left-padded batch, an EOS that ends some rows in the middle and others not at all:
    the cached, preallocated loop returns what the naive loop returns."""
    model = models[arch]
    ids, mask = left_pad(PROMPTS)
    free = generate(model, ids, mask, GenerationConfig(max_new_tokens=10, temperature=temperature),
                    generator=torch.Generator().manual_seed(1))
    eos = int(free.responses[0, 3])  # row 0 stops at step 3 at the latest
    cfg = GenerationConfig(max_new_tokens=10, temperature=temperature, eos_token_id=eos, pad_token_id=49)
    ours = generate(model, ids, mask, cfg, generator=torch.Generator().manual_seed(1))
    ref = _reference_generate(model, ids, mask, cfg, generator=torch.Generator().manual_seed(1))
    assert not ours.response_mask.all() and ours.response_mask[:, 0].all()  # EOS hit mid-way
    assert torch.equal(ours.sequences, ref.sequences)
    assert torch.equal(ours.attention_mask, ref.attention_mask)
    assert torch.equal(ours.response_mask, ref.response_mask)
    assert torch.allclose(ours.logprobs, ref.logprobs, atol=1e-5)
    for t in (ours.sequences, ours.attention_mask, ours.response_mask, ours.logprobs):
        assert t.is_contiguous()


def test_preallocated_loop_with_top_k_top_p_equals_naive_reference(models):
    model = models["llama"]
    ids, mask = left_pad(PROMPTS)
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.2, top_k=10, top_p=0.9, eos_token_id=2)
    ours = generate(model, ids, mask, cfg, generator=torch.Generator().manual_seed(7))
    ref = _reference_generate(model, ids, mask, cfg, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours.sequences, ref.sequences)
    assert torch.allclose(ours.logprobs, ref.logprobs, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_generate_batch_16(models, arch):
    model = models[arch]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 12, (16,), generator=g)]
    ids, mask = left_pad(prompts)
    ours = generate(model, ids, mask, _greedy(max_new_tokens=12, eos_token_id=2))
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=12, eos_token_id=2, pad_token_id=0)
    assert torch.equal(ours.sequences, ref)
    # and without EOS (every row runs the whole budget)
    ours = generate(model, ids, mask, _greedy(max_new_tokens=12))
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                         min_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.sequences, ref)


def test_sample_from_log_probs():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    lp = torch.log(probs).expand(20000, 5)
    draws = sample_from_log_probs(lp, torch.Generator().manual_seed(0))
    assert draws.shape == (20000,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[1] == 0 and freq[4] == 0  # zero-probability tokens (also the last one) are never drawn
    assert torch.allclose(freq, probs, atol=0.015)
    again = sample_from_log_probs(lp, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    # unnormalized log-probs: the same uniforms pick the same tokens (up to boundary rounding)
    shifted = sample_from_log_probs(lp + 3.0, torch.Generator().manual_seed(0))
    assert (shifted == draws).float().mean() > 0.999
    # a single possible token is always drawn
    one = torch.full((4, 6), float("-inf"))
    one[:, 5] = 0.0
    assert sample_from_log_probs(one).tolist() == [5] * 4
    with pytest.raises(ValueError, match="non-finite"):
        sample_from_log_probs(torch.tensor([[0.0, float("nan")]]))
