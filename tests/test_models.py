"""Built-in models, freezing and weights on disk (safetensors, state dicts, kd .ckpt)."""

from __future__ import annotations

import pytest
import torch

from kd import ConfigError
from kd.models import DigitsCNN, MLPClassifier, count_parameters, freeze, load_weights, save_model


def test_shapes_and_parameter_counts():
    x = torch.randn(3, 64)
    assert MLPClassifier(hidden=[32])(x).shape == (3, 10)
    assert DigitsCNN()(x).shape == (3, 10)
    assert DigitsCNN()(x.view(3, 1, 8, 8)).shape == (3, 10)
    assert count_parameters(MLPClassifier(hidden=[32])) == 64 * 32 + 32 + 32 * 10 + 10
    assert count_parameters(None) == 0


def test_freeze():
    m = freeze(MLPClassifier(hidden=[8], dropout=0.5).train())
    assert not m.training and count_parameters(m, trainable_only=True) == 0


def test_save_and_load_round_trip(tmp_path):
    a, b = MLPClassifier(hidden=[8]), MLPClassifier(hidden=[8])
    save_model(a, tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").is_file()
    load_weights(b, tmp_path / "student")
    x = torch.randn(4, 64)
    torch.testing.assert_close(a(x), b(x))


def test_load_from_plain_state_dict_and_lightning_checkpoint(tmp_path):
    a = MLPClassifier(hidden=[8])
    torch.save(a.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": {f"student.{k}": v for k, v in a.state_dict().items()}
                | {"teacher.x": torch.zeros(1)}}, tmp_path / "run.ckpt")
    x = torch.randn(2, 64)
    for path in ("w.pt", "run.ckpt"):
        b = load_weights(MLPClassifier(hidden=[8]), tmp_path / path)
        torch.testing.assert_close(a(x), b(x))


def test_missing_or_mismatched_weights_fail_with_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass the path of a trained model"):
        load_weights(MLPClassifier(), tmp_path / "missing.pt")
    save_model(MLPClassifier(hidden=[8]), tmp_path / "small")
    with pytest.raises(ConfigError, match="do not fit the configured model"):
        load_weights(MLPClassifier(hidden=[16]), tmp_path / "small")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no weights found in directory"):
        load_weights(MLPClassifier(), tmp_path / "empty")


def _causal_lms():
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    return [
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                     num_attention_heads=2, num_key_value_heads=1)),
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=6, n_head=2, bos_token_id=0, eos_token_id=0)),
        Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8)),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["llama", "gpt2", "gemma3"])
def test_depth_pruned_causal_lm_students_copy_the_teachers_layers(index):
    from kd.models import init_from_teacher, shallower_copy

    teacher = _causal_lms()[index].eval()
    student = shallower_copy(teacher, 2)
    assert init_from_teacher(student, teacher, "even") == [0, 5]
    t_state, s_state = teacher.state_dict(), student.state_dict()
    block = "transformer.h" if index == 1 else "model.layers"
    for s_layer, t_layer in ((0, 0), (1, 5)):
        keys = [k for k in s_state if k.startswith(f"{block}.{s_layer}.")]
        assert keys
        for key in keys:
            assert torch.equal(s_state[key], t_state[key.replace(f"{block}.{s_layer}.", f"{block}.{t_layer}.", 1)])
    if index == 2:  # Gemma keeps the attention type of each copied layer
        assert student.config.layer_types == ["sliding_attention", "full_attention"]
    # a "pruned" copy that keeps every layer is the teacher
    whole = shallower_copy(teacher, 6).eval()
    init_from_teacher(whole, teacher, "even")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_a_student_with_other_layer_types_than_its_copied_layers_is_refused():
    from kd.models import init_from_teacher, shallower_copy

    teacher = _causal_lms()[2]
    student = shallower_copy(teacher, 2)  # layer types of the even map: [sliding, full]
    with pytest.raises(ConfigError, match="layer types"):
        init_from_teacher(student, teacher, [0, 1])  # two sliding layers
