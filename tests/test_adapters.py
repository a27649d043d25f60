"""LoRA students (peft=lora, kd/adapters.py): only the adapters train, checkpoints hold only
them, the merged export equals the adapted model, the adapter export loads with peft, and
an on-policy GKD run generates with the adapted student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd import ConfigError
from kd.adapters import LoRA, frozen_keys, merged, merged_state_dict, save_adapter
from kd.models import tiny_causal_lm

pytest.importorskip("peft")


def _adapted(seed=0, **settings):
    torch.manual_seed(seed)
    model = tiny_causal_lm(vocab_size=64, hidden_size=32, num_layers=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    LoRA(r=4, alpha=8.0, **settings).apply(model)
    with torch.no_grad():  # a trained-looking update: B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, base


def test_only_the_adapters_train_and_the_update_is_scale_b_a():
    model, base = _adapted()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert "lm_head.weight" in frozen_keys(model)  # all-linear leaves the output head alone
    layer = model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 32)
    expected = x @ base["model.layers.0.self_attn.q_proj.weight"].T + (8.0 / 4) * x @ a.T @ b.T
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ConfigError, match="apply peft once"):
        LoRA().apply(model)
    with pytest.raises(ConfigError, match="matches no layer"):
        LoRA(target_modules=["nope"]).apply(tiny_causal_lm(vocab_size=64, hidden_size=32, num_layers=1))
    with pytest.raises(ConfigError, match="export must be one of"):
        LoRA(export="both")


def test_merged_export_equals_the_adapted_model_and_the_adapter_loads_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, base = _adapted()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits
        plain = merged(model)
        assert not any("lora_" in k for k in plain.state_dict())
        plain.save_pretrained(tmp_path / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)
        # the adapter alone, on the base weights, through peft's own loader
        save_adapter(model, tmp_path / "adapter")
        fresh = tiny_causal_lm(vocab_size=64, hidden_size=32, num_layers=2)
        fresh.load_state_dict(base)
        peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
        torch.testing.assert_close(peft_model(input_ids=ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_a_lora_gkd_run_generates_with_the_adapted_student_and_checkpoints_only_adapters(make_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    from kd.build import build
    from kd.runs import train as run
    from kd.subruns import prepare
    from tests.conftest import SMALL_TASK

    overrides = [*SMALL_TASK, "recipe=gkd", "regime.lmbda=1", "peft=lora", "peft.r=4", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=2", "scratch_baseline=false", "optimizer.lr=1e-2"]
    prepared = build(make_cfg(*overrides, root=tmp_path / "probe"))
    prepare(prepared)
    start = merged_state_dict(prepared.student)  # B = 0: the student's starting weights, plain names
    summary = run(make_cfg(*overrides))
    assert 0.0 <= summary["results"]["student, gkd"]["test/exact_match"] <= 1.0
    ckpt = torch.load(next((tmp_path / "run" / "checkpoints").glob("last*.ckpt")), map_location="cpu",
                      weights_only=False)
    student_keys = [k for k in ckpt["state_dict"] if k.startswith("student.")]
    assert student_keys and all("lora_" in k for k in student_keys)
    # the merged export: the frozen weights are the start's, plus the trained updates
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    same_shape = [k for k, v in exported.state_dict().items() if k in start and v.shape == start[k].shape]
    changed = [k for k in same_shape if not torch.equal(exported.state_dict()[k], start[k])]
    assert len(same_shape) > 10 and changed
    assert all(k.endswith("proj.weight") for k in changed)  # only the adapted layers moved
    # its adapters-only checkpoint resumes (the architecture check fits each adapter to its layer)
    resumed = run(make_cfg(*overrides, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                           root=tmp_path / "resumed"))
    assert 0.0 <= resumed["results"]["student, gkd"]["test/exact_match"] <= 1.0


def test_the_adapter_export_holds_peft_files(make_cfg, tmp_path):
    from kd.runs import train as run
    from tests.conftest import SMALL_TASK

    run(make_cfg(*SMALL_TASK, "recipe=hinton", "peft=lora", "peft.export=adapter", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=1", "scratch_baseline=false"))
    files = {p.name for p in Path(tmp_path / "run" / "student").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files


@pytest.mark.parametrize("here_width,here_layers,refused", [(32, 2, None), (48, 2, "takes 48 inputs here"),
                                                            (32, 1, "which this student lacks")])
def test_a_lora_resume_checks_each_adapter_against_the_layer_it_adapts(here_width, here_layers, refused):
    """A LoRA checkpoint holds only the adapters; the resume check used to compare only the
    names both sides share (none), so any architecture passed."""
    from kd.resume import _check_architecture

    model, _ = _adapted()
    saved = {"state_dict": {f"student.{k}": v for k, v in model.state_dict().items() if "lora_" in k}}
    recipe = torch.nn.Module()
    recipe.student = tiny_causal_lm(vocab_size=64, hidden_size=here_width, num_layers=here_layers)
    if refused is None:
        _check_architecture("run.ckpt", saved, recipe, adapted=True)
        return
    with pytest.raises(ConfigError, match="holds the weights of another architecture") as e:
        _check_architecture("run.ckpt", saved, recipe, adapted=True)
    assert refused in str(e.value)
    with pytest.raises(ConfigError, match="holds no LoRA adapters"):
        _check_architecture("run.ckpt", {"state_dict": {f"student.{k}": v for k, v in
                                                        recipe.student.state_dict().items()}}, recipe, adapted=True)
