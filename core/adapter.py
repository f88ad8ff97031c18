"""The adapter contract: what every adapter is, how it is found, saved and loaded.

An adapter is an ``nn.Module`` that owns its new weights and attaches to a :class:`SamModel`. It
says what it does (:attr:`Adapter.capabilities`), declares its trainable parameters structurally
(its own parameters, plus whole core parts it unfreezes by role), simulates the prompts it trains
with and computes its loss. It saves adapter-only checkpoints (``adapter.safetensors`` with
``adapter.json``) that reload onto the same base checkpoint only.

Adapter types are found by name in a registry filled by :func:`register_adapter` and by the
entry-point group ``samadapt.adapters`` (how samadapt's own adapters and third-party packages
register), so the core never imports an adapter module by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from samadapt.errors import SamadaptError
from samadapt.modeling import PromptBatch, SamModel

ENTRY_POINT_GROUP = "samadapt.adapters"
CORE_ROLES = ("image_encoder", "prompt_encoder", "mask_decoder")
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
FORMAT = "samadapt-adapter"
FORMAT_VERSION = 1

# What an adapter does to the core (several may apply).
WRAPS_ENCODER = "wraps_encoder"  # LoRA, bottleneck adapters, 3D blocks
GENERATES_PROMPTS = "generates_prompts"  # AutoSAM (dense), RsPrompter (sparse), grid points
REPLACES_DECODER = "replaces_decoder"  # DeSAM, 3D decoder, class heads
FINE_TUNES_CORE = "fine_tunes_core"  # MedSAM-style training of core parts, no new modules
CAPABILITIES = (WRAPS_ENCODER, GENERATES_PROMPTS, REPLACES_DECODER, FINE_TUNES_CORE)


class AdapterError(SamadaptError):
    """An adapter file, type or base checkpoint that cannot be used as given."""


class Adapter(nn.Module):
    """Base class of every adapter.

    Subclasses pass their JSON-serialisable constructor arguments to ``super().__init__`` (they are
    stored in ``adapter.json`` and used to rebuild the adapter), create or wire their modules in
    :meth:`install`, and implement :meth:`simulate_prompts` and :meth:`loss`.

    Args:
        unfreeze: core parts trained along with the adapter's own weights, by role
            (``image_encoder``, ``prompt_encoder``, ``mask_decoder``).
        init_args: the subclass's own constructor arguments, exactly as ``cls(**init_args)`` takes them.
    """

    adapter_type: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *, unfreeze: Sequence[str] = (), init_args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        unknown = [role for role in unfreeze if role not in CORE_ROLES]
        if unknown:
            raise AdapterError(f"unknown core role(s) {unknown}; choose from {', '.join(CORE_ROLES)}")
        self.unfreeze = tuple(dict.fromkeys(unfreeze))
        self.init_args: dict[str, Any] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in (init_args or {}).items()
        }
        self.attached = False

    def attach(self, model: SamModel) -> None:
        """Wire this adapter into ``model``: an explicit, in-place change of that model, done once."""
        if self.attached:
            raise AdapterError(f"this {self.adapter_type} adapter is already attached to a model")
        self.install(model)
        self.attached = True

    # ------------------------------------------------------------------ to implement
    def install(self, model: SamModel) -> None:
        """Create this adapter's modules for ``model`` (registered as this module's children) and wire
        them into it: wrap encoder parts, set ``model.prompt_generator``, replace the decoder."""
        raise NotImplementedError

    def simulate_prompts(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> PromptBatch:
        """Training prompts for (P, 1, S, S) {0, 1} target masks in the encoder frame, one per mask."""
        raise NotImplementedError

    def training_inputs(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, PromptBatch]:
        """(images (B, 3, S, S), targets (P, 1, S, S), prompts for P objects) of one data batch.

        The default is one simulated prompt per sample (:meth:`simulate_prompts` on ``batch["mask"]``);
        adapters that need the samples' metadata (AutoSAM: the label value of each object) override it.
        """
        masks = batch["mask"]
        return batch["image"], masks, self.simulate_prompts(masks, generator)

    def training_forward(
        self, model: SamModel, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (P, 1, h, w), IoU predictions (P, 1), targets (P, 1, S, S)) of one data batch.

        The default encodes the images and decodes the prompts of :meth:`training_inputs`. Adapters
        whose targets depend on the prediction (RsPrompter: Hungarian matching of queries to objects)
        override it; :meth:`loss` then receives the matched rows.
        """
        images, masks, prompts = self.training_inputs(batch, generator)
        logits, iou = model.forward_batch(images, prompts, multimask_output=False)
        return logits, iou, masks

    def evaluation_update(self, batch: Mapping[str, Any]) -> None:
        """Called after each validation/test forward: adapters with metrics of their own (RsPrompter:
        mask AP over instances) accumulate them here. Default: nothing."""

    def evaluation_compute(self) -> dict[str, torch.Tensor]:
        """Named scalar metrics accumulated since the last call (then reset); default none."""
        return {}

    def loss(
        self, logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms for (P, 1, h, w) logits, (P, 1) IoU predictions and (P, 1, S, S) targets.

        Returns:
            named scalar terms; ``loss`` is the one optimised.
        """
        raise NotImplementedError

    def merge(self, model: SamModel) -> bool:
        """Fold the adapter into the base weights for faster inference, where the method allows.

        Returns:
            True if merged (the model then no longer needs this adapter's modules).
        """
        return False

    # ------------------------------------------------------------------ structure
    def own_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters of the modules this adapter created, keyed ``adapter.<name>``."""
        return {f"adapter.{name}": p for name, p in self.named_parameters()}

    def core_parameters(self, model: SamModel) -> dict[str, nn.Parameter]:
        """Parameters of the unfrozen core roles, keyed ``core.<role>.<name>`` (adapter's excluded)."""
        owned = {id(p) for p in self.parameters()}
        found: dict[str, nn.Parameter] = {}
        for role in self.unfreeze:
            for name, p in getattr(model, role).named_parameters():
                if id(p) not in owned:
                    found[f"core.{role}.{name}"] = p
        return found

    def trainable_parameters(self, model: SamModel) -> dict[str, nn.Parameter]:
        """Everything training updates: own parameters and the unfrozen core roles."""
        return {**self.own_parameters(), **self.core_parameters(model)}

    def freeze_base(self, model: SamModel) -> None:
        """requires_grad on exactly :meth:`trainable_parameters`, off everywhere else in ``model``."""
        model.requires_grad_(False)
        for p in self.trainable_parameters(model).values():
            p.requires_grad_(True)

    def state_for_saving(self, model: SamModel) -> dict[str, torch.Tensor]:
        """What an adapter-only checkpoint holds: trainable parameters and the buffers of unfrozen
        core roles (e.g. BatchNorm statistics), detached, contiguous, on the CPU."""
        state = {k: v.detach() for k, v in self.trainable_parameters(model).items()}
        state.update({f"adapter.{k}": v for k, v in self.named_buffers() if v is not None})
        for role in self.unfreeze:
            for name, buffer in getattr(model, role).named_buffers():
                state.setdefault(f"core.{role}.{name}", buffer)
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_saved_state(self, model: SamModel, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Copy a :meth:`state_for_saving` dict back in; keys and shapes must match exactly."""
        expected = {k: v for k, v in self._tensors(model)}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise AdapterError(
                f"{source} does not match a {self.adapter_type} adapter built from its config ({detail})"
            )
        with torch.no_grad():
            for key, target in expected.items():
                value = state[key]
                if value.shape != target.shape:
                    raise AdapterError(
                        f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(value.to(target.dtype))

    def _tensors(self, model: SamModel) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.trainable_parameters(model).items()
        yield from ((f"adapter.{k}", v) for k, v in self.named_buffers() if v is not None)
        for role in self.unfreeze:
            for name, buffer in getattr(model, role).named_buffers():
                yield f"core.{role}.{name}", buffer

    def parameter_counts(self, model: SamModel) -> dict[str, int]:
        """Trainable counts per group (``adapter`` and each unfrozen role) plus ``trainable``/``frozen``."""
        counts = {"adapter": sum(p.numel() for p in self.parameters())}
        for key, p in self.core_parameters(model).items():
            role = key.split(".")[1]
            counts[role] = counts.get(role, 0) + p.numel()
        trainable_ids = {id(p) for p in self.trainable_parameters(model).values()}
        every = {id(p): p for p in [*model.parameters(), *self.parameters()]}
        counts["trainable"] = sum(p.numel() for i, p in every.items() if i in trainable_ids)
        counts["frozen"] = sum(p.numel() for i, p in every.items() if i not in trainable_ids)
        return counts


A = TypeVar("A", bound=type[Adapter])
_REGISTRY: dict[str, type[Adapter]] = {}


def register_adapter(name: str) -> Callable[[A], A]:
    """Class decorator: register an :class:`Adapter` subclass under ``name`` (sets ``adapter_type``)."""

    def decorate(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise TypeError(f"{cls!r} is not an Adapter subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise AdapterError(f"adapter type {name!r} is already registered by {existing.__module__}")
        cls.adapter_type = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def adapter_types() -> dict[str, type[Adapter]]:
    """Every known adapter type: registered classes plus the ``samadapt.adapters`` entry points."""
    found = dict(_REGISTRY)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found:
            continue
        try:
            cls = entry.load()
        except Exception as exc:  # a broken plugin must not break the others
            raise AdapterError(
                f"adapter plugin {entry.name!r} ({entry.value}) failed to load: {exc}"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise AdapterError(f"adapter plugin {entry.name!r} ({entry.value}) is not an Adapter subclass")
        if not cls.adapter_type:
            cls.adapter_type = entry.name
        found[entry.name] = cls
    return found


def get_adapter_type(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    types = adapter_types()
    if name not in types:
        raise AdapterError(f"unknown adapter type {name!r}; installed: {', '.join(sorted(types)) or 'none'}")
    return types[name]


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapter(
    directory: str | Path,
    adapter: Adapter,
    model: SamModel,
    *,
    base_sha256: str,
    base_name: str = "",
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` into ``directory`` (each atomically).

    Args:
        base_sha256: sha256 of the base checkpoint file the adapter was trained on.
        base_name: the base checkpoint's file name, for people reading the JSON.
        training: a JSON-serialisable training summary (steps, metrics, data...).
    """
    from safetensors.torch import save_file

    from samadapt import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter.state_for_saving(model)
    counts = adapter.parameter_counts(model)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_type": adapter.adapter_type,
        "init_args": adapter.init_args,
        "base": {"sha256": base_sha256, "variant": model.variant, "name": base_name},
        "input_size": model.input_size,
        "samadapt_version": __version__,
        "parameters": {k: v for k, v in counts.items() if k != "frozen"},
        "training": dict(training or {}),
    }
    text = json.dumps(config, indent=2, default=_json_default)

    def write_config(tmp: Path) -> None:
        tmp.write_text(text + "\n")

    _atomic(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    _atomic(directory / CONFIG_FILE, write_config)
    return directory


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter.json`` of an adapter folder, validated."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter folder not found: {directory}")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} is not an adapter folder (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a samadapt adapter config")
    if config.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path}: unsupported adapter format version {config.get('format_version')!r}")
    for key in ("adapter_type", "init_args", "base"):
        if key not in config:
            raise AdapterError(f"{path} has no {key!r}")
    if not isinstance(config["init_args"], dict) or not isinstance(config["base"], dict):
        raise AdapterError(f"{path}: init_args and base must be objects")
    return config


def _check_base(config: Mapping[str, Any], directory: Path, model: SamModel, base_sha256: str | None) -> None:
    base = config["base"]
    if base.get("variant") != model.variant:
        raise AdapterError(
            f"adapter in {directory} was trained on a {base.get('variant')} base, not {model.variant}"
        )
    if base_sha256 is not None and base.get("sha256") != base_sha256:
        raise AdapterError(
            f"adapter in {directory} was trained on another base checkpoint "
            f"(sha256 {str(base.get('sha256'))[:12]}…, this one is {base_sha256[:12]}…)"
        )


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} is not a readable safetensors file ({exc})") from None


def load_adapter(
    directory: str | Path, model: SamModel, *, base_sha256: str | None, merge: bool = False
) -> Adapter:
    """Rebuild the adapter saved in ``directory``, check the base, attach it to ``model`` and load it.

    Args:
        model: the base model, loaded from the checkpoint the adapter was trained on.
        base_sha256: sha256 of that checkpoint file; None skips the check (only for models built
            in memory, e.g. in tests).
        merge: fold the adapter into the base weights after loading when the method allows (LoRA).

    Raises:
        AdapterError: missing or corrupt files, unknown type, another base, or mismatched weights.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    _check_base(config, directory, model, base_sha256)
    adapter = _build_saved(config, directory)
    state = _read_weights(directory)
    if "input_size" in config and int(config["input_size"]) != model.input_size:
        model.set_input_size(int(config["input_size"]))
    adapter.attach(model)
    adapter.to(next(model.parameters()).device)
    adapter.load_saved_state(model, state, str(directory / WEIGHTS_FILE))
    if merge:
        adapter.merge(model)
    return adapter


def _build_saved(config: Mapping[str, Any], directory: Path) -> Adapter:
    """A new, unattached adapter of the type and init_args in ``config`` (``directory``'s)."""
    cls = get_adapter_type(str(config["adapter_type"]))
    try:
        return cls(**config["init_args"])
    except (TypeError, ValueError) as exc:
        raise AdapterError(
            f"{directory / CONFIG_FILE}: bad init_args for {cls.adapter_type} ({exc})"
        ) from None


def saved_adapter(directory: str | Path) -> Adapter:
    """The adapter saved in ``directory``, rebuilt as it was trained (type and init_args) but not
    attached and without its weights: for :class:`~samadapt.training.SamTask` ``init_from``."""
    directory = Path(directory)
    return _build_saved(read_adapter_config(directory), directory)


def load_adapter_weights(
    directory: str | Path, adapter: Adapter, model: SamModel, *, base_sha256: str | None
) -> None:
    """Copy the weights saved in ``directory`` into an ``adapter`` already attached to ``model``
    (same type and shapes, same base), e.g. to validate or continue training a trained adapter."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    _check_base(config, directory, model, base_sha256)
    if config["adapter_type"] != adapter.adapter_type:
        raise AdapterError(
            f"{directory} holds a {config['adapter_type']} adapter, not {adapter.adapter_type}"
        )
    adapter.load_saved_state(model, _read_weights(directory), str(directory / WEIGHTS_FILE))
