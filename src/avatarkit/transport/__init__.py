"""Getting produced media out of the SDK: :mod:`avatarkit.transport.recorder` writes MP4s that
carry every AI-disclosure layer.

Nothing is imported here on purpose: the recorder pulls in PyAV, Pillow and the C2PA native
library, which ``import avatarkit`` must never load. Import the submodule you need.
"""
