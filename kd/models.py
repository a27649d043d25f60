"""Teacher and student models: small built-in architectures, freezing, weights on disk.

Every model config of the ``teacher/`` and ``student/`` groups names a factory with
``_target_`` that returns an ``nn.Module``. This module holds the built-in ones (tiny
classifiers for the bundled digits task) and the helpers every recipe shares:

* :func:`freeze` puts a teacher in eval mode without gradients;
* :func:`load_weights` reads trained weights into a module from a plain state dict
  (``.pt``/``.pth``/``.bin``), a ``.safetensors`` file, a Lightning ``.ckpt`` written by a
  kd run (the ``student.`` entries), or a directory holding one of those;
* :func:`save_model` writes a model in its native format: ``save_pretrained`` for
  transformers models, ``model.safetensors`` (via safetensors) for plain modules;
* :func:`count_parameters`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kd import ConfigError

WEIGHT_FILES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin")


class MLPClassifier(nn.Module):
    """A multilayer perceptron over flat feature vectors.

    Args:
        in_features: size of one input vector (64 for 8x8 digits).
        hidden: widths of the hidden layers (ReLU between layers).
        num_classes: number of output logits.
        dropout: dropout probability after each hidden layer.

    Shapes: inputs ``(B, in_features)`` (or any ``(B, ...)`` that flattens to it) ->
    logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (32,),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)


class DigitsCNN(nn.Module):
    """A small convolutional classifier for square single-channel images.

    Args:
        image_size: side of the square image (8 for scikit-learn's digits).
        channels: output channels of the 3x3 convolutions; one 2x2 max-pool at the end.
        hidden: width of the fully connected layer.
        num_classes: number of output logits.
        dropout: dropout probability before the last layer.

    Shapes: inputs ``(B, image_size**2)`` or ``(B, 1, image_size, image_size)`` -> logits
    ``(B, num_classes)``.
    """

    def __init__(
        self,
        image_size: int = 8,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        num_classes: int = 10,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        convs: list[nn.Module] = []
        c_in = 1
        for c in channels:
            convs += [nn.Conv2d(c_in, c, kernel_size=3, padding=1), nn.ReLU()]
            c_in = c
        convs.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*convs)
        flat = c_in * (image_size // 2) ** 2
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.reshape(inputs.shape[0], 1, self.image_size, self.image_size)
        return self.head(self.features(x))


def count_parameters(model: nn.Module | None, trainable_only: bool = False) -> int:
    """Number of parameters (0 for ``None``)."""
    if model is None:
        return 0
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout), ``requires_grad=False`` on every parameter; returns ``model``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def _resolve_weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        ckpts = sorted(path.glob("*.ckpt"))
        if ckpts:
            return ckpts[-1]
        raise ConfigError(
            f"no weights found in directory '{path}' (looked for {', '.join(WEIGHT_FILES)} or a .ckpt); "
            "point the checkpoint option at a weights file or at a kd run's student/ directory"
        )
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict stored at ``path`` (file or directory; see the module docstring)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            f"checkpoint '{p}' does not exist; pass the path of a trained model (a kd run's student/ "
            "directory, a .safetensors/.pt file or a Lightning .ckpt) or set it to null to train one"
        )
    file = _resolve_weights_file(p)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: one sentence, not a library traceback
        raise ConfigError(f"'{file}' is not a readable weights file ({e}); re-save it or point to another checkpoint") from e
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint of a kd run
        state = {k[len("student.") :]: v for k, v in state["state_dict"].items() if k.startswith("student.")}
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"'{file}' holds no model weights; pass a state dict, safetensors or kd .ckpt file")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights stored at ``path`` into ``model`` (strict: every key must match)."""
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(
            f"the weights in '{path}' do not fit the configured model ({first}); "
            "pick the model config the checkpoint was trained with"
        ) from e
    return model


def save_model(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save ``model`` in its native format into ``directory`` and return the directory.

    transformers models use ``save_pretrained`` (loadable by plain transformers); other
    modules write ``model.safetensors`` with their state dict (contiguous CPU copies).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if _is_hf(model):
        model.save_pretrained(out)
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
    return out
