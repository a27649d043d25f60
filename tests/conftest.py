"""Shared fixtures: compose configs through Hydra's compose API, like the `kd` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from kd.cli import CONF_DIR

# Tiny models: more intra-op threads only add contention on a 2-core machine.
torch.set_num_threads(1)

@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state, whatever ran before it."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """Every test leaves logging as it found it: kd's entry point run in-process configures
    Hydra's job logging (a stderr handler on the root logger), which would otherwise print
    later tests' log records among the one-sentence errors they check."""
    import logging

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in ("kd", "kd.pretrained", "hydra")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


# Quiet, quick defaults for runs made by tests (each test adds its own overrides).
QUIET = ["trainer.enable_progress_bar=false", "logger=none"]

# The embedded generative task at toy size with toy models (seconds, not minutes).
SMALL_TASK = ["data=task", "data.source.train_size=300", "data.source.val_size=30", "data.source.test_size=30",
              "data.vocab_size=300", "data.min_frequency=20", "data.generation_eval_size=8", "data.max_new_tokens=6",
              "data.batch_size=16", "teacher=task_llama", "student=task_llama", "teacher.fit.max_epochs=1",
              "student.hidden_size=32", "teacher.model.hidden_size=32", "teacher.model.num_layers=1"]


def compose_cfg(overrides: list[str], root: Path, config_name: str = "train") -> DictConfig:
    """The config `kd <overrides>` would run, writing into ``root``/run with caches in ``root``/cache."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
        if "overwrite" in cfg and not any(o.startswith("overwrite=") for o in overrides):
            cfg.overwrite = True  # tests train into root/run again and again on purpose
        cfg.paths.cache_dir = str(root / "cache")
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path):
    def _make(*overrides: str, quiet: bool = True, root: Path | None = None, config_name: str = "train") -> DictConfig:
        return compose_cfg([*(QUIET if quiet else []), *overrides], root or tmp_path, config_name)

    return _make


@pytest.fixture(scope="session")
def task_dm():
    """The embedded task at toy size, set up (tokenizer trained): 200 training examples,
    batches of 8 holding both the training view and the left-padded prompts."""
    from kd.data.lm import LMDataModule

    from kd.data.sources import TaskSource
    module = LMDataModule(TaskSource(train_size=200, val_size=20, test_size=20), vocab_size=300, batch_size=8,
                          max_length=64)
    module.setup()
    return module


@pytest.fixture(scope="module")
def dm():
    """The embedded task's data at toy size (48 training examples), set up: the regimes'
    tests share it (a test module may define its own ``dm``)."""
    from kd.data.lm import LMDataModule
    from kd.data.sources import TaskSource

    module = LMDataModule(TaskSource(train_size=48, val_size=8, test_size=8), vocab_size=300, batch_size=8,
                          max_length=48, max_new_tokens=6)
    module.setup()
    return module
