"""Resume that changes nothing: a run stopped and resumed with ``ckpt_path=`` ends with the
weights and metrics of the run that was never stopped.

Where it stops:

* **SIGTERM** (a scheduler's pre-emption, ``kill``) or Ctrl-C: Lightning finishes the
  batch in progress, then :class:`CheckpointOnSigterm` (the ``interrupted`` callback of
  ``conf/callbacks/default.yaml``) writes ``checkpoints/interrupted.ckpt``, mid-epoch;
* **SIGKILL** or a crash: the last checkpoint written is ``checkpoints/last.ckpt`` (every
  epoch) or a periodic one (``callbacks.last_checkpoint.every_n_train_steps=N``).

What a checkpoint carries, so that the resumed run continues exactly:

* weights, optimizer and scheduler state, Lightning's loop counters (Lightning);
* the regime's state, e.g. the mixed regime's coin (:class:`kd.recipe.DistillationRecipe`);
* the data position: the epoch and the batches it completed
  (:class:`kd.data.ResumableData`); the training order is a permutation seeded by the run's
  seed and the epoch (:class:`kd.data.TrainOrder`), so the resumed epoch skips what was
  trained and goes on with the same batches;
* nothing random: every training batch reseeds torch's generators from
  :func:`step_seed` (run seed, epoch, batch, rank) before the regime samples and the
  student runs (dropout, on-policy samples), so a batch's randomness does not depend on
  what ran before it in this process.

Nothing half-written is ever read: checkpoints are written to a temporary file and renamed
into place (:class:`AtomicCheckpointIO`); the exported student and cache entries are written
to a temporary directory renamed into place (:func:`kd.cache.atomic_directory`).

Nothing in a checkpoint runs: :class:`AtomicCheckpointIO` loads with ``torch.load(...,
weights_only=True)`` on every supported torch (Lightning passes ``weights_only=None``, which
torch before 2.6 reads as ``False``: unpickling, which can run any code), and refuses a
checkpoint holding other Python objects than tensors and plain containers in one sentence.

How a stopped ``kd`` ends (:func:`stop_handlers`, around ``kd`` and ``kd-eval``):
never with exit code 0. A SIGTERM exits with 143 and Ctrl-C with 130 (:data:`EXIT_CODES`:
128 + the signal's number, what a shell reports for a process a signal ended and what
schedulers read as "terminated", never as success; distinct from 1, a crash, and 2, a
configuration error), after one sentence naming the checkpoint to resume from and the
``ckpt_path=`` command that does it (:func:`stop_message`), wherever the signal arrived:
in the run's fit (Lightning finishes the batch, ``interrupted.ckpt`` is written), in a cached
teacher's or baseline's fit, in a test, between stages. Under ``kd -m`` the sweep stops with
the same code: its later jobs do not run, and are not reported as a success.

What a resume may change (:func:`check_resume`): every checkpoint ``kd`` writes records the
settings that shaped its training (:func:`training_settings`: the whole config but for
:data:`MAY_CHANGE_ON_RESUME`), and ``ckpt_path=`` with other settings (another ``seed``,
``recipe.lam``, recipe, student...) is refused in one sentence naming the keys that differ,
as are a checkpoint of another architecture and a file that is not a readable checkpoint:
before anything trains.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kd import ConfigError, disk_full
from kd.cache import partial_path
from kd.cache import key as cache_key

log = logging.getLogger("kd")


def run_seed() -> int:
    """The run's seed, as Lightning's ``seed_everything`` left it in ``PL_GLOBAL_SEED``
    (0 when nothing seeded): what the training order and the per-batch seeds derive from."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def step_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A 63-bit seed for one training batch, a function of nothing else."""
    state = np.random.SeedSequence([seed % 2**32, epoch, batch, rank]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class CheckpointOnSigterm(Callback):
    """Write ``<dirpath>/<filename>.ckpt`` when Lightning stops a fit on SIGTERM (it finishes
    the batch in progress first) or Ctrl-C, so the run resumes mid-epoch from there.

    Unlike Lightning's ``OnExceptionCheckpoint``, its presence never makes a later
    ``fit(ckpt_path=None)`` in the same directory resume on its own: a run resumes only
    when ``ckpt_path=`` says so."""

    def __init__(self, dirpath: str | os.PathLike, filename: str = "interrupted") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        raise_if_stopped()  # a signal a finished stage let pass (see raise_if_stopped): train nothing more

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        raise_if_stopped()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written to a temporary file beside the target
    and renamed over it: a process killed while saving leaves the previous checkpoint whole;
    read with ``weights_only=True`` whatever the caller asks, so that loading one (a resume,
    ``test(ckpt_path=...)``) never unpickles arbitrary objects."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(target)
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, target)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # one sentence naming the checkpoint, no partial file
                raise ConfigError(disk_full(target)) from None
            raise
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise pickled_objects(path, e) from None


def pickled_objects(path: str | os.PathLike, e: pickle.UnpicklingError) -> ConfigError:
    """The one sentence for a checkpoint that a ``weights_only`` load refused: it holds
    pickled Python objects (named when torch names one), whose unpickling could run code."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
    return ConfigError(f"checkpoint {path} holds {what}, not only tensors and plain values, so kd refuses to load it "
                       "(checkpoints load with weights_only=True: unpickling can run arbitrary code); resume only "
                       "from checkpoints kd wrote")


# ----------------------------------------------------------------------------- stopping on a signal

#: the exit code of a ``kd`` run stopped by each signal: 128 + the signal's number, as a shell
#: reports a process a signal ended (SIGTERM 143, SIGINT 130)
EXIT_CODES = {"SIGTERM": 128 + int(signal.SIGTERM), "SIGINT": 128 + int(signal.SIGINT)}

#: the stop signals this process received, in order (:func:`stop_handlers`)
_received: list[str] = []
#: while Ctrl-C is handed to Lightning's SIGTERM handlers, which call ours again
_forwarding = threading.local()
#: when this process started: a checkpoint older than this was not written by this run
_STARTED_NS = time.time_ns()


class Stopped(BaseException):
    """A stop signal that arrived while no Lightning fit was there to finish its batch first
    (composing, building, preparing, exporting, between stages). A ``BaseException``, like
    ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"stopped by {name}")
        self.name = name


def received() -> str | None:
    """The first stop signal this process received (``"SIGTERM"``, ``"SIGINT"``), or None."""
    return _received[0] if _received else None


def raise_if_stopped() -> None:
    """Raise :class:`Stopped` when a stop signal arrived: Lightning lets one pass when it
    comes in the last batch of a test or after a fit's last epoch, and the run then goes on
    to its next stage, where this is called (:class:`CheckpointOnSigterm`)."""
    if _received:
        raise Stopped(_received[0])


def _lightning_handler() -> Any:
    """Lightning's SIGTERM handler while a trainer runs a stage (it finishes the batch in
    progress, then raises ``SIGTERMException``), else None."""
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

    handler = signal.getsignal(signal.SIGTERM)
    return handler if isinstance(handler, _HandlersCompose) else None


#: what this process did with a SIGTERM for its sweep workers: the pids it forwarded it to
FORWARDED: list[int] = []


def sweep_workers() -> list[int]:
    """The pids of this process's children that run sweep jobs for Hydra's joblib launcher
    (loky's worker processes), read from ``/proc``; none elsewhere."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and b"loky" in command and b"resource_tracker" not in command:
            pids.append(int(stat.parent.name))
    return pids


def _forward_to_workers(signum: int, timeout: float = 300.0) -> None:
    """A SIGTERM to a sweep whose jobs run in worker processes (joblib) reaches only this
    one: forward it, so each running job writes its checkpoint and its sentence, and wait
    (bounded) until they have ended."""
    workers = sweep_workers()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    FORWARDED.extend(workers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) and not _stopped_marker(os.getpid(), pid).exists()
                                              for pid in workers):
        time.sleep(0.1)
    for pid in workers:  # done (or past the deadline): they take no further job
        _stopped_marker(os.getpid(), pid).unlink(missing_ok=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stopped_marker(parent: int, worker: int) -> Path:
    """The file a sweep's worker process touches once its stopped job has written its
    checkpoint and sentence (:func:`worker_stopped`)."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"kd-stopped-{parent}-{worker}"


def worker_stopped(code: int) -> None:
    """End a stopped job in a sweep's worker process: tell the sweep's process (which waits
    for it, :func:`_forward_to_workers`) and take no further job; the sweep's process ends
    the worker. (Exiting at once would make loky kill the other workers mid-checkpoint.)"""
    with contextlib.suppress(OSError):
        _stopped_marker(os.getppid(), os.getpid()).touch()
    time.sleep(120)
    os._exit(code)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (not ended, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _on_signal(signum: int, frame: Any) -> None:
    if getattr(_forwarding, "active", False):  # Lightning's handlers calling this one back for a Ctrl-C
        return
    name = signal.Signals(signum).name
    first = not _received
    _received.append(name)
    if not first:  # already stopping: a second SIGTERM changes nothing, a second Ctrl-C stops now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        return
    lightning = _lightning_handler()
    if lightning is None:
        if signum == signal.SIGTERM:  # Ctrl-C in a terminal reaches the workers by itself
            _forward_to_workers(signum)
        raise Stopped(name)
    if signum != signal.SIGTERM:  # Ctrl-C in a fit: Lightning's graceful stop, as for SIGTERM
        _forwarding.active = True
        try:
            lightning(signal.SIGTERM, frame)
        finally:
            _forwarding.active = False
    # SIGTERM in a fit: Lightning's handler, which called this one, stops it after the batch


@contextlib.contextmanager
def stop_handlers() -> Iterator[None]:
    """Handle SIGTERM and SIGINT while the block runs (``kd`` runs in one): in a Lightning
    stage, the stage stops gracefully after its batch (Lightning's own SIGTERM handling,
    which calls this one too); anywhere else :class:`Stopped` is raised. The console script
    turns either into :func:`stop_message` and :data:`EXIT_CODES`. On the way out the
    previous handlers are back and the signals received are forgotten, so a process that
    calls ``kd``'s entry point more than once (a test session) starts each call afresh."""
    main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)} if main else {}
    for signum in previous:
        signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()
        FORWARDED.clear()


def outside_run_stop_message(name: str) -> str:
    """What ``kd`` says when a stop signal came while no run of this process trained: a
    sweep whose jobs run in worker processes (they said their own sentences), or no run."""
    if FORWARDED:
        return (f"stopped by {name}; its {len(FORWARDED)} worker process(es) stopped their jobs, each naming the "
                "command that resumes it above; later jobs did not run")
    return f"stopped by {name} while no run was training; start it again with the same command"


def in_worker() -> bool:
    """Whether this process is a sweep's worker (:func:`worker_stop_handlers` installed the
    stop handlers here): a stopped job then ends the worker process itself (loky keeps a
    worker alive after a job's ``SystemExit``, and the sweep's process waits for it)."""
    return bool(_IN_WORKER)


_IN_WORKER: list[bool] = []


@contextlib.contextmanager
def worker_stop_handlers() -> Iterator[None]:
    """:func:`stop_handlers` where they are not installed yet: in a sweep's worker process
    (joblib), which runs jobs without passing through ``kd``'s entry point; else nothing."""
    if signal.getsignal(signal.SIGTERM) is _on_signal:
        yield
        return
    _IN_WORKER.append(True)
    try:
        with stop_handlers():
            yield
    finally:
        _IN_WORKER.clear()


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint that resumes ``cfg``'s run after it stopped: the newest this process
    wrote into the run's output directory (``interrupted.ckpt`` after a stopped fit, else the
    last epoch's), else the checkpoint the run itself resumed from, else None."""
    out = Path(str(cfg.paths.output_dir))
    written = [p for p in (out.rglob("*.ckpt") if out.is_dir() else []) if not p.name.startswith(".")
               and p.is_file() and p.stat().st_mtime_ns >= _STARTED_NS]
    if written:
        newest = max(written, key=lambda p: (p.stat().st_mtime_ns, p.name == "interrupted.ckpt", p.name == "last.ckpt"))
        return newest.resolve()
    resumed = cfg.get("ckpt_path")
    return Path(str(resumed)).resolve() if resumed and Path(str(resumed)).is_file() else None


def resume_command(overrides: list[str], checkpoint: Path) -> str:
    """``kd <overrides> ckpt_path=<checkpoint>``, quoted for a POSIX shell."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]
    return " ".join(["kd", *map(shlex.quote, kept), shlex.quote(f"ckpt_path={checkpoint}")])


def stop_message(name: str, cfg: DictConfig, overrides: list[str], job: str | None = None) -> str:
    """The one sentence ``kd`` prints when ``name`` (a signal) stopped the run of ``cfg``
    (started with ``overrides``; ``job``: its sweep job)."""
    what = f"sweep job {job} was stopped by {name}, so the sweep stops and its later jobs do not run" if job else (
        f"stopped by {name}")
    checkpoint = None if cfg.get("pipeline") else resume_checkpoint(cfg)  # a pipeline's stages do not resume
    if checkpoint is None:
        again = " ".join(["kd", *map(shlex.quote, overrides)])
        return (f"{what} before the run wrote a checkpoint (cached teachers and baselines that finished are kept); "
                f"start it again with: {again}")
    return f"{what}; resume it from {checkpoint} with: {resume_command(overrides, checkpoint)}"


# ----------------------------------------------------------------------------- what a resume may change

#: settings a resumed run (``ckpt_path=``) may change: how long it trains, where it writes,
#: what it logs, shows and evaluates, on what hardware. An entry covers the key and
#: everything under it. Every other setting shaped the training the checkpoint holds, and a
#: resume that changes it is refused (:func:`check_resume`). (A longer run with a scheduler
#: continues its schedule stretched to the new length.)
MAY_CHANGE_ON_RESUME = (
    "ckpt_path", "paths", "hydra", "logger", "callbacks", "threads", "optimized_metric", "scratch_baseline",
    "downstream",
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.min_epochs", "trainer.min_steps",
    "trainer.default_root_dir", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.log_every_n_steps", "trainer.profiler", "trainer.accelerator", "trainer.limit_val_batches",
    "trainer.limit_test_batches", "trainer.check_val_every_n_epoch", "trainer.val_check_interval",
    "trainer.num_sanity_val_steps",
    "data.num_workers", "data.cache_dir", "data.eval_batch_size", "data.generation_eval_size",
    "data.max_new_tokens", "data.eval_seed", "regime.cache_dir",
    # where a served teacher answers and how kd talks to it (the teacher is the same: kd.served)
    "teacher.url", "teacher.server", "teacher.client", "teacher.model.url", "teacher.model.server",
    "teacher.model.client",
)

#: where a checkpoint keeps :func:`training_settings` (:class:`RecordSettings`)
RECORD = "kd_settings"


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") or key.startswith(f"{k}[") for k in MAY_CHANGE_ON_RESUME)


def training_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings that shaped a run's training: every key of the resolved config (dotted,
    lists whole) but :data:`MAY_CHANGE_ON_RESUME`, with ``paths`` left unresolved (a value
    under the cache or output directory stays the same when the run moves)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    plain["paths"] = {k: f"<paths.{k}>" for k in (plain.get("paths") or {})}
    node = OmegaConf.create(plain)
    flat: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if _may_change(key):
            return
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            flat[key] = json.loads(json.dumps(value, default=str))  # plain values: a weights_only load reads them

    for top in node:
        if not _may_change(str(top)):
            value = node[top]
            walk(OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value, str(top))
    return flat


class RecordSettings(Callback):
    """Write :func:`training_settings` of the run (and their hash, ``run_key``) into every
    checkpoint it saves, for :func:`check_resume`."""

    def __init__(self, cfg: DictConfig) -> None:
        settings = training_settings(cfg)
        self.record = {"run_key": cache_key(settings), "settings": settings}

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD] = self.record


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read the checkpoint ``path`` (``torch.load(weights_only=True)``: tensors and plain
    values only, as Lightning reads a local checkpoint), or say in one sentence why not."""
    import zipfile

    import torch

    try:  # mapped, not read, where the format allows (torch.save's zip files): a large checkpoint costs little
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL " in str(e):  # objects a weights_only load refuses
            raise pickled_objects(path, e) from None
        raise ConfigError(f"ckpt_path {path} cannot be read as a checkpoint (it is truncated or not a checkpoint: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); pass a run's "
                          "checkpoints/last.ckpt or interrupted.ckpt") from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"ckpt_path {path} cannot be read as a checkpoint (it is truncated or not a checkpoint: "
                          f"{reason}); pass a run's checkpoints/last.ckpt or interrupted.ckpt") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ConfigError(f"ckpt_path {path} is not a Lightning checkpoint (it has no state_dict); pass a run's "
                          "checkpoints/last.ckpt or interrupted.ckpt")
    return state


def _differences(then: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(key, value now, value then)`` of every setting that differs, a swapped section
    once: by its ``_target_`` (another recipe, model...) or as a whole (a section set on one
    side only, e.g. ``teacher=null``); other classes first."""
    unset = object()
    differ = {k for k in set(then) | set(now) if then.get(k, unset) != now.get(k, unset)}

    def value(side: dict[str, Any], key: str) -> str:
        if key in side:
            return _shown(side[key])
        return "{...}" if any(k.startswith(f"{key}.") for k in side) else "<unset>"

    heads: list[str] = []
    for key in sorted(differ):
        parts = key.split(".")
        head = key
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix in differ:
                head = prefix
                break
            if f"{prefix}._target_" in differ:
                head = f"{prefix}._target_"
                break
        if head not in heads:
            heads.append(head)
    heads.sort(key=lambda k: (not k.endswith("_target_"), k))
    return [(k, value(now, k), value(then, k)) for k in heads]


def _check_settings(path: Any, state: dict[str, Any], cfg: DictConfig) -> None:
    record = state.get(RECORD)
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        log.warning("ckpt_path %s does not record the settings it was trained with (written by an older kd or "
                    "another program); resuming without checking them", path)
        return
    then = {k: v for k, v in record["settings"].items() if not _may_change(k)}
    differ = _differences(then, training_settings(cfg))
    if not differ:
        return
    shown = [f"{k}={now} (trained with {before})" for k, now, before in differ[:6]]
    more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
    raise ConfigError(f"ckpt_path {path} was trained with other settings than this run's: {', '.join(shown)}{more}; "
                      "resume with the settings it was trained with (only those in kd.resume.MAY_CHANGE_ON_RESUME, "
                      "e.g. trainer.max_epochs, may change) or start a new run with ckpt_path=null")


def _adapter_problems(theirs: dict[str, tuple], mine: dict[str, tuple]) -> list[str]:
    """A LoRA checkpoint's adapters against this student's layers: ``<layer>.lora_A.*`` is
    (r, inputs) and ``<layer>.lora_B.*`` is (outputs, r) of the linear ``<layer>.weight``."""
    adapters = {k: s for k, s in theirs.items() if k.startswith("student.") and ".lora_" in k}
    if not adapters:
        return ["it holds no LoRA adapters, which this run (peft) trains"]
    problems = []
    for k, shape in sorted(adapters.items()):
        layer, _, rest = k.partition(".lora_")
        base = mine.get(f"{layer}.weight")
        if base is None:
            problems.append(f"it adapts {layer}, which this student lacks")
        elif rest.startswith("A.") and len(base) == 2 and shape[-1] != base[1]:
            problems.append(f"{k} has shape {list(shape)} there, but {layer} takes {base[1]} inputs here")
        elif rest.startswith("B.") and len(base) == 2 and shape[0] != base[0]:
            problems.append(f"{k} has shape {list(shape)} there, but {layer} gives {base[0]} outputs here")
    return problems


def _check_architecture(path: Any, state: dict[str, Any], recipe: Any, adapted: bool) -> None:
    """The checkpoint's weights must be the student's (and the recipe's other trained
    modules'): the same names and shapes. With adapters (``peft``, injected later, when the
    run is prepared) the checkpoint holds only the adapters, and each must fit the layer it
    adapts (:func:`_adapter_problems`)."""
    mine = {k: tuple(v.shape) for k, v in recipe.state_dict().items()
            if not k.startswith(("teacher.", "teachers.")) and hasattr(v, "shape")}
    theirs = {k: tuple(v.shape) for k, v in state["state_dict"].items() if hasattr(v, "shape")}
    problems = [f"{k} has shape {list(theirs[k])} there, {list(mine[k])} here" for k in sorted(set(mine) & set(theirs))
                if mine[k] != theirs[k]]
    if not adapted:
        missing = sorted(k for k in mine if k.startswith("student.") and k not in theirs)
        extra = sorted(k for k in theirs if k.startswith("student.") and k not in mine)
        problems += [f"it lacks {k}" for k in missing[:2]] + [f"it has {k}, which this student lacks" for k in extra[:2]]
        problems += [f"{len(missing) + len(extra) - min(len(missing), 2) - min(len(extra), 2)} more names differ"] if (
            len(missing) + len(extra) > min(len(missing), 2) + min(len(extra), 2)) else []
    if adapted:  # a LoRA checkpoint holds the adapters only: each must fit the layer it adapts here
        problems += _adapter_problems(theirs, mine)
    if problems:
        raise ConfigError(f"ckpt_path {path} holds the weights of another architecture than this run's student "
                          f"({'; '.join(problems[:4])}); resume a checkpoint of this student, or choose the student it "
                          "was trained with")


def check_resume(cfg: DictConfig, recipe: Any) -> None:
    """Refuse, in one sentence, a ``ckpt_path`` that cannot continue this run: a file that is
    not a readable checkpoint, one trained with other settings (:func:`training_settings`,
    but :data:`MAY_CHANGE_ON_RESUME`), one of another architecture than ``recipe``'s student.
    Called on the built run before anything trains (no teacher, SFT or baseline first)."""
    path = cfg.get("ckpt_path")
    if not path:
        return
    state = load_checkpoint(path)
    _check_settings(path, state, cfg)
    _check_architecture(path, state, recipe, adapted=bool(cfg.get("peft")))


__all__ = ["run_seed", "step_seed", "CheckpointOnSigterm", "AtomicCheckpointIO", "EXIT_CODES", "Stopped",
           "received", "raise_if_stopped", "stop_handlers", "resume_checkpoint", "stop_message",
           "MAY_CHANGE_ON_RESUME", "training_settings", "RecordSettings", "load_checkpoint", "check_resume"]
