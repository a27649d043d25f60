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


def test_calibrated_layer_maps_keep_the_layers_the_distances_say():
    """Hand-made distances between the states entering 4 layers (x_0..x_4): per-layer
    changes d(x_i, x_i+1) = 0.30, 0.05, 0.35, 0.40; two-layer spans d(x_0,x_2) = 0.30,
    d(x_1,x_3) = 0.20, d(x_2,x_4) = 0.50. Keeping 2 layers: importance keeps the two that
    change their input most (2, 3); block drops the span of 2 with the closest ends (1, 2)."""
    from kd.models import calibrated_layer_map

    d = torch.zeros(5, 5)
    for (i, j), v in {(0, 1): 0.30, (1, 2): 0.05, (2, 3): 0.35, (3, 4): 0.40,
                      (0, 2): 0.30, (1, 3): 0.20, (2, 4): 0.50}.items():
        d[i, j] = d[j, i] = v
    assert calibrated_layer_map(d, 2, "importance") == [2, 3]
    assert calibrated_layer_map(d, 2, "block") == [0, 3]
    assert calibrated_layer_map(d, 4, "block") == calibrated_layer_map(d, 4, "importance") == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="cannot keep"):
        calibrated_layer_map(d, 5, "block")
    with pytest.raises(ConfigError, match="measured on data"):
        from kd.models import layer_map

        layer_map(4, 2, "block")


def test_layer_distances_are_the_angles_between_hidden_states_over_real_tokens():
    """Against transformers' own hidden states: hidden_states[i] enters layer i (the last
    entry is after the final norm, so the check stops before it); padding never counts."""
    import math

    import torch.nn.functional as F

    from kd.models import layer_distances

    teacher = _causal_lms()[0].eval()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    got = layer_distances(teacher, [{"input_ids": ids, "attention_mask": mask}])
    with torch.no_grad():
        states = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for i in range(6):
        for j in range(6):
            cos = F.cosine_similarity(states[i][real].double(), states[j][real].double(), dim=-1).clamp(-1, 1)
            assert got[i, j].item() == pytest.approx((torch.arccos(cos) / math.pi).mean().item(), abs=1e-6)
    assert got.shape == (7, 7) and torch.all(got.diagonal() < 1e-6)
    assert not teacher.training
