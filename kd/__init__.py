"""kd: knowledge-distillation recipes on PyTorch Lightning, configured with Hydra.

The library (everything under ``kd``) is importable without Hydra; ``kd.cli`` is the
only module that imports it. Recipes live in the sibling package ``recipes``.
"""

__version__ = "0.1.0"


class ConfigError(ValueError):
    """A configuration that cannot work. The message is one sentence that names the fix.

    The command line prints it without a traceback (``kd.cli``); library users catch it
    as a ``ValueError``.
    """
