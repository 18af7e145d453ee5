"""AI disclosure: the metadata every session and output carries (EU AI Act Art. 50)."""

from .metadata import DisclosureMetadata

__all__ = ["DisclosureMetadata"]
