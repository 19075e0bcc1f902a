"""Every error that is the user's to fix. ``imgclf`` prints these as one line (exit 2), never a traceback."""

from __future__ import annotations


class ImgclfError(Exception):
    """Base of all user-facing errors; the message names the file or key and the fix."""


class ConfigError(ImgclfError, ValueError):
    """A configuration value or key that cannot be used."""


class DataError(ImgclfError, ValueError):
    """A dataset that cannot be used as given; the message says what to fix."""


class BundleError(ImgclfError, ValueError):
    """A bundle that cannot be loaded; the message names the file and the fix."""


class TrainingError(ImgclfError, RuntimeError):
    """Training stopped for a reason the user must act on (message says which)."""


class UnknownModelError(ImgclfError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


class ImageDecodeError(ImgclfError, ValueError):
    """An input that is not a usable image; ``reason`` is a short category."""

    def __init__(self, source: str, reason: str, detail: str = "") -> None:
        self.source = source
        self.reason = reason
        self.detail = detail
        msg = f"{source}: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class ExportError(BundleError):
    """An export that cannot be done as asked; the message says what to install or change."""
