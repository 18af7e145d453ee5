"""The MuseTalk lip-sync engine (needs ``avatarkit[local]`` and MuseTalk's released weights).

Modules:

- ``configs``: the networks' configurations (official and tiny);
- ``networks``: the UNet, VAE and Whisper encoder, and the inference modules built on them;
- ``weights``: loading a weights folder in the official layout, with typed errors;
- ``audio``: Whisper log-mel, encoder features, per-frame audio windows, streaming;
- ``prepare``: MuseTalk's crop, latents and blend masks for a prepared avatar (cached);
- ``engine``: :class:`MuseTalkEngine`, the runner's engine;
- ``onnx``: the ONNX Runtime backend.

This package imports torch; ``import avatarkit`` never imports it.
"""
