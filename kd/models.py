"""Teacher and student models: loading, tiny configs, tokenizers, freezing, weights on disk.

Every model config of the ``teacher/`` and ``student/`` groups names a factory with
``_target_`` that returns an ``nn.Module``. This module holds the built-in ones:

* :func:`load_hf_model`: a transformers model by hub name or local directory (causal or
  masked LM), with dtype, attention implementation and an optional GGUF file;
* :func:`tiny_causal_lm`: a randomly initialised Llama or GPT-2 from a small config (tests,
  embedded tasks, from-scratch students);
* :class:`MLPClassifier`, :class:`DigitsCNN`: tiny classifiers for the digits task;

tokenizer helpers (:func:`load_tokenizer`, :func:`check_same_tokenizer`, which refuses
tokenizers that map some id to different strings) and the helpers every recipe shares:

* :func:`freeze` puts a teacher in eval mode without gradients;
* :func:`load_weights` reads trained weights into a module from a plain state dict
  (``.pt``/``.pth``/``.bin``), a ``.safetensors`` file, a Lightning ``.ckpt`` written by a
  kd run (the ``student.`` entries), or a directory holding one of those;
* :func:`save_model` writes a model in its native format: ``save_pretrained`` for
  transformers models, ``model.safetensors`` (via safetensors) for plain modules;
* :func:`count_parameters`;

and depth pruning (:func:`shallower_copy`, :func:`init_from_teacher`): a student that is the
teacher with a subset of its layers, the subset from :func:`layer_map` (``even``, a list,
DistilBERT's map) or measured on data (:func:`layer_distances` then
:func:`calibrated_layer_map`: ``block``, ``importance``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd import ConfigError

#: what a model (or a datamodule) is for: kd checks that data, teacher and student agree
#: before building anything (``kd.build``). A factory declares its kind with :func:`builds`.
KINDS = ("classifier", "causal_lm", "masked_lm")


def builds(kind: str | Callable[[Mapping[str, Any]], str | None]):
    """Declare what a model factory (or datamodule class) builds: one of :data:`KINDS`, or a
    function of its config node (e.g. ``load_hf_model``'s ``task``). Unknown factories are
    not checked."""

    def mark(obj: Any) -> Any:
        obj.kd_kind = kind
        return obj

    return mark


def kind_of(node: Any) -> str | None:
    """What the factory or class a config node names (``_target_``) builds (:func:`builds`),
    or None when it does not say (or cannot be imported)."""
    import importlib

    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not isinstance(target, str) or "." not in target:
        return None
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    kind = getattr(obj, "kd_kind", None)
    try:
        return kind(node) if callable(kind) else kind
    except Exception:  # a node that refers to keys it cannot see (a yaml read on its own)
        return None


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

WEIGHT_FILES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin")


@builds("classifier")
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


@builds("classifier")
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


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", "./", "../", "~")) or os.sep in name_or_path and Path(name_or_path).parent.exists()


@builds(lambda node: str(node.get("task", "causal_lm")))
def load_hf_model(
    name_or_path: str,
    task: str = "causal_lm",
    dtype: str | None = "float32",
    attn_implementation: str | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A transformers model by hub name or local directory.

    Args:
        name_or_path: hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``; downloads unless
            cached) or a local directory written by ``save_pretrained``.
        task: ``"causal_lm"`` (AutoModelForCausalLM) or ``"masked_lm"`` (AutoModelForMaskedLM).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the checkpoint's).
        attn_implementation: e.g. ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``; None = default.
        gguf_file: a GGUF file inside ``name_or_path`` to load and dequantize (needs ``gguf``).
        revision: hub revision.
        trust_remote_code: allow custom modelling code from the hub.
    """
    import transformers

    auto = {"causal_lm": transformers.AutoModelForCausalLM, "masked_lm": transformers.AutoModelForMaskedLM}
    if task not in auto:
        raise ConfigError(f"model task must be one of {sorted(auto)} (got {task!r})")
    if dtype is not None and dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"model dtype must be one of {sorted(DTYPES)} or 'auto' (got {dtype!r})")
    path = Path(name_or_path).expanduser()
    if _looks_local(str(name_or_path)) and not path.exists():
        raise ConfigError(
            f"model directory '{path}' does not exist; pass a directory written by save_pretrained or a hub name"
        )
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype if dtype == "auto" else DTYPES[dtype]
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if revision:
        kwargs["revision"] = revision
    return auto[task].from_pretrained(str(path) if path.exists() else name_or_path, **kwargs)


@builds("causal_lm")
def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    dropout: float = 0.0,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> nn.Module:
    """A randomly initialised small causal LM (``"llama"`` or ``"gpt2"``) from a config.

    ``vocab_size`` may exceed the tokenizer's (the extra rows are padding, sliced away
    by the recipes). ``intermediate_size`` defaults to 4x (GPT-2) or 8/3x rounded up to
    a multiple of 16 (Llama) the hidden size.
    """
    import transformers

    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    special = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if arch == "llama":
        inter = intermediate_size or 16 * math.ceil(hidden_size * 8 / 3 / 16)
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inter, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
            attention_dropout=dropout, **special,
        )
        return transformers.LlamaForCausalLM(config)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            n_inner=intermediate_size, n_positions=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **special,
        )
        return transformers.GPT2LMHeadModel(config)
    raise ConfigError(f"tiny_causal_lm arch must be 'llama' or 'gpt2' (got {arch!r})")


@builds("masked_lm")
def tiny_masked_lm(
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    dropout: float = 0.1,
    pad_token_id: int = 0,
) -> nn.Module:
    """A randomly initialised small BERT masked LM (``BertForMaskedLM``) from a config;
    ``intermediate_size`` defaults to 4x the hidden size."""
    import transformers

    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size, max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=pad_token_id,
    )
    return transformers.BertForMaskedLM(config)


#: DistilBERT's published 12 -> 6 layer map (HF research_projects/distillation)
DISTILBERT_LAYERS = (0, 2, 4, 7, 9, 11)


def layer_map(teacher_layers: int, student_layers: int, scheme: str | Sequence[int] = "even") -> list[int]:
    """Which teacher layer initialises each student layer.

    ``"distilbert"``: the published map ``[0, 2, 4, 7, 9, 11]`` (12 -> 6 only); ``"even"``:
    ``round(linspace(0, T - 1, S))``, first and last layer kept, evenly spread between
    (for 12 -> 6 it equals the published map); or an explicit list of teacher indices.
    ``"block"`` and ``"importance"`` are chosen from data (:func:`calibrated_layer_map`;
    the run measures them on training batches before it copies the layers).
    """
    if isinstance(scheme, str):
        if scheme == "distilbert":
            if (teacher_layers, student_layers) != (12, 6):
                raise ConfigError(f"layer_map=distilbert is the 12 -> 6 map; for {teacher_layers} -> "
                                  f"{student_layers} layers use layer_map=even or a list")
            return list(DISTILBERT_LAYERS)
        if scheme in CALIBRATED:
            raise ConfigError(f"layer_map={scheme} is measured on data: the run chooses it (kd.subruns), or call "
                              "calibrated_layer_map with layer_distances")
        if scheme != "even":
            raise ConfigError(f"layer_map must be 'distilbert', 'even', 'block', 'importance' or a list of teacher "
                              f"layers (got {scheme!r})")
        if student_layers == 1:
            return [0]
        step = (teacher_layers - 1) / (student_layers - 1)
        return [int(math.floor(i * step + 0.5)) for i in range(student_layers)]
    mapping = [int(i) for i in scheme]
    if len(mapping) != student_layers or not all(0 <= i < teacher_layers for i in mapping):
        raise ConfigError(f"layer_map {mapping} must list {student_layers} teacher layers in [0, {teacher_layers})")
    return mapping


#: layer_map schemes chosen from the teacher's hidden states on data (:func:`calibrated_layer_map`)
CALIBRATED = ("block", "importance")


def layer_list(model: nn.Module) -> nn.ModuleList:
    import re

    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and re.search(r"(^|\.)(layer|layers|h)$", name) and len(module):
            return module
    raise ConfigError(f"{type(model).__name__} has no list of layers named layer, layers or h; give "
                      "init_from_teacher an explicit list of layers")


@torch.no_grad()
def layer_distances(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> Tensor:
    """``(T+1, T+1)`` mean angular distance ``arccos(cos(x_i, x_j)) / pi`` between the
    hidden states entering layer i and layer j (``x_T``: the last layer's output), over
    the real tokens of ``batches`` (``input_ids``, ``attention_mask``)."""
    layers = layer_list(model)
    states: list[Tensor] = []

    def first(module: nn.Module, args: tuple, kwargs: dict) -> None:
        states.append((args[0] if args else kwargs["hidden_states"]).detach())

    def out(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        states.append((output[0] if isinstance(output, (tuple, list)) else output).detach())

    handles = [layers[0].register_forward_pre_hook(first, with_kwargs=True)]
    handles += [layer.register_forward_hook(out, with_kwargs=True) for layer in layers]
    total = torch.zeros(len(layers) + 1, len(layers) + 1, dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            states.clear()
            mask = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            x = torch.stack([s[mask] for s in states]).double()  # (T+1, tokens, H)
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cos = torch.einsum("inh,jnh->ijn", x, x).clamp(-1, 1)
            total += (torch.arccos(cos) / math.pi).sum(-1)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ConfigError("no tokens to measure layer importance on; give the data at least one example")
    return total / count


def calibrated_layer_map(distances: Tensor, student_layers: int, scheme: str) -> list[int]:
    """The teacher layers a ``student_layers``-layer student keeps, from :func:`layer_distances`.

    ``"block"`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
    Layers"): drop the contiguous block of ``T - S`` layers whose input and output are
    closest in angle, keep the rest. ``"importance"`` (Men et al. 2024, ShortGPT's Block
    Influence ``1 - cos(x_i, x_{i+1})``, ranked by the angular distance here, which orders
    layers the same way): keep the ``S`` layers that change their input most, in order.
    """
    teacher_layers = distances.shape[0] - 1
    if not 1 <= student_layers <= teacher_layers:
        raise ConfigError(f"a student of {student_layers} layers cannot keep layers of a {teacher_layers}-layer teacher")
    if scheme == "block":
        n = teacher_layers - student_layers
        start = min(range(teacher_layers - n + 1), key=lambda l: float(distances[l, l + n]))
        return [i for i in range(teacher_layers) if not start <= i < start + n]
    if scheme == "importance":
        influence = torch.tensor([float(distances[i, i + 1]) for i in range(teacher_layers)])
        return sorted(torch.argsort(influence, descending=True, stable=True)[:student_layers].tolist())
    raise ConfigError(f"calibrated layer maps are {CALIBRATED} (got {scheme!r})")


def init_from_teacher(student: nn.Module, teacher: nn.Module, scheme: str | Sequence[int] = "even") -> list[int]:
    """Copy into ``student`` the teacher's embeddings (with their LayerNorm), output head,
    final norm and the layers :func:`layer_map` picks; return the map. Works for any
    transformers model whose layers are named ``...layer.<i>....`` (BERT, RoBERTa,
    DistilBERT), ``...layers.<i>....`` (Llama, Qwen, Gemma) or ``...h.<i>....`` (GPT-2):
    depth pruning of causal LMs (Minitron, Llama 3.2) as well as DistilBERT's
    initialisation. Shapes must agree everywhere but in depth; a model whose layers differ
    by type (Gemma's sliding and full attention) must keep the types of the mapped layers."""
    import re

    pattern = re.compile(r"(.*\b(?:layer|layers|h)\.)(\d+)(\..*)")
    t_state = teacher.state_dict()
    depth = lambda state: 1 + max((int(m.group(2)) for k in state if (m := pattern.match(k))), default=-1)  # noqa: E731
    s_state = student.state_dict()
    mapping = layer_map(depth(t_state), depth(s_state), scheme)
    t_types = getattr(getattr(teacher, "config", None), "layer_types", None)
    s_types = getattr(getattr(student, "config", None), "layer_types", None)
    if t_types is not None and s_types is not None and list(s_types) != [t_types[i] for i in mapping]:
        raise ConfigError(f"the student's layer types {list(s_types)} differ from those of the teacher layers "
                          f"{mapping} it copies; build the student with the same layer_map "
                          "(kd.models.shallower_copy keeps the types of the 'even' map)")
    new = {}
    for key, value in s_state.items():
        m = pattern.match(key)
        source = f"{m.group(1)}{mapping[int(m.group(2))]}{m.group(3)}" if m else key
        if source not in t_state or t_state[source].shape != value.shape:
            raise ConfigError(f"the student's '{key}' has no teacher counterpart of the same shape; a student "
                              "initialised from the teacher must match it in everything but depth")
        new[key] = t_state[source].detach().clone()
    student.load_state_dict(new)
    return mapping


def _shallower_kind(node: Mapping[str, Any]) -> str | None:
    return kind_of(node.get("model"))


@builds(_shallower_kind)
def shallower_copy(model: nn.Module, num_layers: int | None = None) -> nn.Module:
    """A randomly initialised transformers model like ``model`` with ``num_layers`` layers
    (default: half its depth). A run that sets ``student_init_from_teacher`` (a
    :func:`layer_map` scheme, e.g. ``student=from_teacher``) has it copy the trained
    teacher's embeddings, head and mapped layers into it once the teacher's weights are
    loaded (:func:`kd.subruns.prepare`)."""
    import copy

    config = copy.deepcopy(model.config)
    key = next((k for k in ("n_layers", "n_layer") if hasattr(config, k)), "num_hidden_layers")
    depth = getattr(config, key)
    num_layers = num_layers or max(1, depth // 2)
    setattr(config, key, num_layers)
    if getattr(config, "layer_types", None) is not None:  # Gemma: sliding / full attention per layer
        config.layer_types = [config.layer_types[i] for i in layer_map(depth, num_layers, "even")]
    return type(model)(config)


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """A transformers tokenizer by hub name or local directory; a pad token is set to the
    EOS token when the tokenizer has none (training pads; padded positions never count)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if _looks_local(str(name_or_path)) and not path.exists():
        raise ConfigError(f"tokenizer directory '{path}' does not exist; pass a directory or a hub name")
    kwargs = {"revision": revision} if revision else {}
    tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path,
                                        trust_remote_code=trust_remote_code, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _vocab_strings(tok) -> dict[int, str]:
    return {i: s for s, i in tok.get_vocab().items()}


def check_same_tokenizer(student_tok, teacher_tok, what: str = "teacher and student", hint: str | None = None) -> None:
    """Refuse two tokenizers unless every id maps to the same token string in both
    (equal sizes are not enough) and the EOS tokens agree; ``hint`` names the fix."""
    a, b = _vocab_strings(student_tok), _vocab_strings(teacher_tok)
    hint = hint or "use a cross-tokenizer recipe (recipe=byte_kd) or give both models the same tokenizer"
    if len(a) != len(b):
        raise ConfigError(f"{what} tokenizers differ ({len(a)} vs {len(b)} tokens); {hint}")
    diff = [i for i in a if a[i] != b.get(i)]
    if diff:
        i = diff[0]
        raise ConfigError(
            f"{what} tokenizers map {len(diff)} ids to different strings (id {i}: {a[i]!r} vs {b.get(i)!r}); {hint}"
        )
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        raise ConfigError(
            f"{what} tokenizers use different EOS ids ({student_tok.eos_token_id} vs {teacher_tok.eos_token_id}); {hint}"
        )


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
    """Load the weights stored at ``path`` into ``model``, strictly: every key must match,
    except entries the file omits because they share storage with one it has (tied input
    and output embeddings, as ``save_pretrained`` writes them)."""
    state = read_state_dict(path)
    own = model.state_dict(keep_vars=True)
    stored = {own[k].data_ptr() for k in state if k in own}
    omitted_ties = {k for k in own if k not in state and own[k].data_ptr() in stored}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in omitted_ties]
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
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


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear, float | None, float] | None:
    """The body and linear output head of a transformers causal LM, so that
    ``logits == softcap(scale * head(body(...).last_hidden_state))``:
    ``(body, head, softcap, scale)``, or None for models without that shape (classifiers,
    masked LMs whose head transforms the hidden states first, custom heads).

    The split is checked once per model (:func:`head_matches`) before it is trusted."""
    if not (_is_hf(model) and hasattr(model, "get_output_embeddings")):
        return None
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or body is None or body is model:
        return None
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None) or None
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere multiplies its logits
    if getattr(config, "logits_scaling", None):  # Granite divides them
        scale /= float(config.logits_scaling)
    return body, head, softcap, scale


@torch.no_grad()
def head_matches(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Whether :func:`split_head` reproduces ``model``'s logits on (the start of) a batch,
    in eval mode (the result is remembered on the model)."""
    known = getattr(model, "_kd_head_matches", None)
    if known is not None:
        return known
    parts = split_head(model)
    ok = False
    if parts is not None:
        body, head, softcap, scale = parts
        ids, mask = input_ids[:1, :16], attention_mask[:1, :16]
        was_training = model.training
        model.eval()
        try:
            want = model(input_ids=ids, attention_mask=mask).logits.float()
            got = head(body(input_ids=ids, attention_mask=mask).last_hidden_state) * scale
            if softcap:
                got = softcap * torch.tanh(got / softcap)
            ok = got.shape == want.shape and bool(torch.allclose(got.float(), want, rtol=1e-3, atol=1e-4))
        except (TypeError, AttributeError, ValueError):
            ok = False
        finally:
            model.train(was_training)
    object.__setattr__(model, "_kd_head_matches", ok)
    return ok


def split_mlm_head(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Linear] | None:
    """The body, the head transform and the linear decoder of a transformers masked LM, so
    that ``logits == decoder(transform(body(...).last_hidden_state))``: BERT's
    ``cls.predictions`` (dense, activation, LayerNorm, then the decoder tied to the input
    embeddings) and DistilBERT's ``vocab_transform``, activation, ``vocab_layer_norm`` and
    ``vocab_projector``; None for other models. Checked once per model by
    :func:`mlm_head_matches` before it is trusted."""
    if not (_is_hf(model) and hasattr(model, "get_output_embeddings")):
        return None
    decoder = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    if not isinstance(decoder, nn.Linear) or body is None or body is model:
        return None
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    transform = getattr(predictions, "transform", None)
    if isinstance(transform, nn.Module):
        return body, transform, decoder
    if all(isinstance(getattr(model, n, None), nn.Module) for n in ("vocab_transform", "activation", "vocab_layer_norm")):
        return body, nn.Sequential(model.vocab_transform, model.activation, model.vocab_layer_norm), decoder
    return None


@torch.no_grad()
def mlm_head_matches(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Whether :func:`split_mlm_head` reproduces ``model``'s logits on (the start of) a
    batch, in eval mode (the result is remembered on the model)."""
    known = getattr(model, "_kd_mlm_head_matches", None)
    if known is not None:
        return known
    parts = split_mlm_head(model)
    ok = False
    if parts is not None:
        body, transform, decoder = parts
        ids, mask = input_ids[:1, :16], attention_mask[:1, :16]
        was_training = model.training
        model.eval()
        try:
            want = model(input_ids=ids, attention_mask=mask).logits.float()
            got = decoder(transform(body(input_ids=ids, attention_mask=mask).last_hidden_state))
            ok = got.shape == want.shape and bool(torch.allclose(got.float(), want, rtol=1e-3, atol=1e-4))
        except (TypeError, AttributeError, ValueError):
            ok = False
        finally:
            model.train(was_training)
    object.__setattr__(model, "_kd_mlm_head_matches", ok)
    return ok
