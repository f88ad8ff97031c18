"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""


class SamadaptError(Exception):
    """Base class for every error caused by user input (files, prompts, checkpoints, flags)."""


class InputError(SamadaptError):
    """An image, volume, prompt or flag that cannot be used as given."""


class CheckpointError(SamadaptError):
    """A checkpoint that is missing, corrupt, not a state dict, or of another variant."""


class UnknownVariantError(SamadaptError):
    """A model variant name that is not registered (see ``samadapt.variants()``)."""


class MissingDependencyError(SamadaptError):
    """An optional dependency is not installed; the message carries the install hint."""
