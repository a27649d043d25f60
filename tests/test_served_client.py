"""kd.served without vLLM: the launcher's process group, the client's retries and one
sentences, the conversion of prompt_logprobs to a TopK, and the refusals before training.
A stand-in server (tests/served_fake.py) plays vLLM; tests/test_served.py runs the real one."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd import ConfigError
from kd.batches import ATTENTION_MASK, INPUT_IDS, LABELS
from kd.served import FLOOR, Server, ServedTeacher, ServerError, free_port
from tests.conftest import QUIET, SMALL_TASK

FAKE = str(Path(__file__).with_name("served_fake.py"))
ROOT = Path(__file__).resolve().parent.parent
#: the small task without its teacher settings (the teacher is served)
TASK = [o for o in SMALL_TASK if not o.startswith("teacher")]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def pids(directory: Path) -> list[int]:
    return [int((directory / f).read_text()) for f in ("server.pid", "child.pid")]


def fake_server(tmp_path: Path, *flags: str, **settings) -> Server:
    return Server(str(model_dir_stub(tmp_path)), command=[sys.executable, FAKE, "--pid-dir", str(tmp_path / "pids"),
                                                           *flags], log_dir=str(tmp_path), **settings)


def model_dir_stub(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    return d


def test_launched_server_and_its_children_are_stopped(tmp_path):
    server = fake_server(tmp_path)
    url = server.start()
    server_pid, child_pid = pids(tmp_path / "pids")
    assert url.startswith("http://127.0.0.1:") and alive(server_pid) and alive(child_pid)
    server.stop()
    assert not alive(server_pid) and not alive(child_pid)


def test_a_server_that_exits_while_starting_is_one_sentence(tmp_path):
    server = Server(str(model_dir_stub(tmp_path)), command=[sys.executable, "-c", "import sys; print('Error: no "
                                                                                      "model'); sys.exit(3)"],
                    log_dir=str(tmp_path))
    with pytest.raises(ServerError, match=r"exited with code 3 while starting \(Error: no model\)"):
        server.start()


def test_a_server_that_never_gets_healthy_is_stopped_at_the_deadline(tmp_path):
    server = fake_server(tmp_path, "--health-delay", "60", startup_timeout=3)
    with pytest.raises(ServerError, match=r"did not answer /health within 3 s"):
        server.start()
    assert not any(alive(p) for p in pids(tmp_path / "pids"))


def test_a_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a model directory"):
        ServedTeacher(launch=str(tmp_path))
    with pytest.raises(ConfigError, match="exactly one of teacher.url"):
        ServedTeacher()


@pytest.mark.parametrize("mode, problem", [("down", "Connection refused"), ("malformed", "a malformed answer"),
                                           ("slow", "timed out")])
def test_after_the_retries_a_failing_server_is_one_sentence(tmp_path, mode, problem):
    client = {"retries": 1, "backoff": 0.05, "timeout": 1.0}
    if mode == "down":
        teacher = ServedTeacher(url=f"http://127.0.0.1:{free_port()}", client=client, model_name="m")
        server = None
    else:
        server = fake_server(tmp_path, "--mode", mode)
        teacher = ServedTeacher(url=server.start(), client=client, model_name="m")
    try:
        with pytest.raises(ServerError, match=rf"failed /v1/completions 2 times \({problem}.*ckpt_path="):
            teacher.score([[1, 2, 3]], 2)
    finally:
        if server is not None:
            server.stop()


def test_request_threads_share_one_start_of_a_launched_server(tmp_path):
    # 6 prompts, one per request, 4 threads, before the server ever started: it starts once
    command = [sys.executable, FAKE, "--pid-dir", str(tmp_path / "pids")]
    (tmp_path / "logs").mkdir()
    teacher = ServedTeacher(launch=str(model_dir_stub(tmp_path)), top_k=4,
                            server={"command": command, "log_dir": str(tmp_path / "logs")},
                            client={"concurrency": 4, "prompts_per_request": 1})
    teacher.vocab_size = 64
    try:
        scored = teacher.score([[1, 2, 3 + i] for i in range(6)], 4)
    finally:
        teacher.close()
    assert [ids.shape for ids, _, _ in scored] == [torch.Size([2, 4])] * 6
    assert len(list((tmp_path / "logs").glob("server-*.log"))) == 1
    assert not any(alive(p) for p in pids(tmp_path / "pids"))


def test_k_above_the_servers_max_logprobs_is_refused(tmp_path):
    server = fake_server(tmp_path)  # allows at most 4
    try:
        teacher = ServedTeacher(url=server.start(), top_k=8, model_name="m")
        teacher.check_k(4)
        with pytest.raises(ConfigError, match=r"fewer than k=8 .*--max-logprobs 8"):
            teacher.check_k(8)
    finally:
        server.stop()


def test_prompt_logprobs_become_a_topk_with_padding_rows_in_the_tail():
    teacher = ServedTeacher(url="http://127.0.0.1:1", model_name="m")
    teacher.vocab_size = 8
    # position 1 predicts token 7: top-3 are 5, 9 (a padding row past the vocabulary) and 2; 7 is ranked 4th
    row = [None, {"7": {"logprob": -4.0, "rank": 4}, "9": {"logprob": -1.5, "rank": 2},
                  "5": {"logprob": -0.5, "rank": 1}, "2": {"logprob": -3.0, "rank": 3}}]
    ids, logprobs, actual = teacher._topk([4, 7], row, 3)
    assert ids.tolist() == [[5, 0, 2]]  # 9 -> the first id not among the others, at the floor
    assert logprobs.tolist() == [[-0.5, FLOOR, -3.0]]
    assert actual.tolist() == [-4.0]


def test_rows_are_sent_without_padding_so_an_eos_pad_keeps_its_position():
    eos = pad = 1
    teacher = ServedTeacher(url="http://127.0.0.1:1", top_k=2, model_name="m")
    sent = []

    def score(sequences, k):  # row i of a sequence: ids (10 * i, 10 * i + 1), log-probs (-i, -i - 1)
        sent.extend(sequences)
        return [(torch.tensor([[10 * i, 10 * i + 1] for i in range(len(s) - 1)]),
                 torch.tensor([[-float(i), -i - 1.0] for i in range(len(s) - 1)]), torch.zeros(len(s) - 1))
                for s in sequences]

    teacher.score = score
    ids = torch.tensor([[5, 6, 7, eos, pad, pad], [5, 8, eos, pad, pad, pad]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, eos, -100, -100], [-100, 8, eos, -100, -100, -100]])
    out = teacher.outputs({INPUT_IDS: ids, ATTENTION_MASK: attention, LABELS: labels})
    assert sent == [[5, 6, 7, eos], [5, 8, eos]]
    # shifted positions: row 0 predicts 7 at position 1 and EOS at position 2; row 1 predicts 8 at 0, EOS at 1
    assert out.mask.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert out.logits.ids[0, 2].tolist() == [20, 21] and out.logits.logprobs[0, 2].tolist() == [-2.0, -3.0]
    assert out.logits.ids[1, 1].tolist() == [10, 11] and out.logits.logprobs[1, 0].tolist() == [0.0, -1.0]
    assert torch.allclose(out.logits.logprobs[0, 0], torch.full((2,), -math.log(2)))  # filler, off the mask


def test_a_loss_temperature_or_a_logits_recipe_is_refused_before_any_server_is_asked(make_cfg):
    from kd.build import build

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would fail differently
    with pytest.raises(ConfigError, match=r"untempered \(T = 1\).*temperature 4 .*recipe.temperature=1"):
        build(make_cfg(*TASK, "recipe=hinton", "teacher=served", f"teacher.url={url}"))
    with pytest.raises(ConfigError, match="reads the teacher's logits, which a served teacher does not give"):
        build(make_cfg(*TASK, "recipe=minillm", "teacher=served", f"teacher.url={url}"))


@pytest.fixture(scope="module")
def task_model(tmp_path_factory):
    """A tiny Llama saved with the small task's tokenizer, and the cache that tokenizer is in."""
    from kd.build import build
    from kd.models import tiny_causal_lm
    from tests.conftest import compose_cfg

    root = tmp_path_factory.mktemp("served-model")
    cfg = compose_cfg([*QUIET, *TASK, "recipe=gkd"], root)
    tok = build(cfg).datamodule.tokenizer
    model = tiny_causal_lm(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def kd_command(root: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "kd.cli", *QUIET, *TASK, "recipe=gkd", "regime=on_policy", "teacher=served",
            f"teacher.launch={root / 'model'}", f"hydra.run.dir={root / 'run'}", *overrides]


def kd_env(root: Path) -> dict[str, str]:
    return {**os.environ, "KD_CACHE_DIR": str(root / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def fake_command(pid_dir: Path, *flags: str) -> str:
    return "teacher.server.command=[" + ",".join(f'"{a}"' for a in [sys.executable, FAKE, "--pid-dir", str(pid_dir),
                                                                      *flags]) + "]"


def test_kd_stops_the_server_it_launched_after_an_error(task_model, tmp_path):
    # the stand-in's /tokenize disagrees with the data's tokenizer: refused after the server started
    done = subprocess.run(kd_command(task_model, fake_command(tmp_path)), env=kd_env(task_model), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("kd: error: the served teacher's tokenizer differs")
    assert not any(alive(p) for p in pids(tmp_path))


def test_kd_stops_the_server_it_launched_on_sigterm(task_model, tmp_path):
    process = subprocess.Popen(kd_command(task_model, fake_command(tmp_path, "--health-delay", "120")),
                               env=kd_env(task_model), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "child.pid").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        launched = pids(tmp_path)
        assert all(alive(p) for p in launched)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err
    assert not any(alive(p) for p in launched)


def eval_cfg(root: Path, pid_dir: Path):
    """``kd-eval`` of the saved tiny model with a served teacher launched on the stand-in."""
    from tests.conftest import compose_cfg

    data = [o for o in TASK if not o.startswith("student")]
    return compose_cfg([*QUIET, *data, "data.generation_eval_size=0", "student=hf",
                        f"student.name_or_path={root / 'model'}", "teacher=served", f"teacher.launch={root / 'model'}",
                        "teacher.top_k=4", fake_command(pid_dir)], pid_dir.parent / "eval", config_name="eval")


def test_kd_eval_stops_the_server_it_launched_when_it_ends_not_at_exit(task_model, tmp_path, monkeypatch):
    from kd.runs import evaluate
    from kd.served import live_servers

    before = live_servers()
    # an error after the server started (the stand-in's /tokenize disagrees): stopped on the way out
    with pytest.raises(ConfigError, match="tokenizer differs"):
        evaluate(eval_cfg(task_model, tmp_path / "error"))
    launched = pids(tmp_path / "error")
    assert not any(alive(p) for p in launched) and live_servers() == before

    # a finished evaluation (the tokenizer check skipped; the stand-in's uniform top-4 scores the test set)
    def no_check(self, tokenizer, k=None):
        self.vocab_size = len(tokenizer)

    monkeypatch.setattr(ServedTeacher, "check", no_check)
    metrics = evaluate(eval_cfg(task_model, tmp_path / "done"))
    launched = pids(tmp_path / "done")
    assert any("kl" in k for k in metrics), metrics
    assert not any(alive(p) for p in launched) and live_servers() == before
