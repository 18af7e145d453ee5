"""The bundled local lip-sync engine (imported only when used).

Modules (import them directly; this package imports nothing heavy so that ``import avatarkit``
stays light):

- ``avatarkit.local_engine.face``: per-frame face detection and 468 mediapipe landmarks, temporal
  smoothing, square crop boxes and feathered lower-face masks.
- ``avatarkit.local_engine.avatar``: ``prepare_avatar()`` turns an image or a video into a cached
  ``PreparedAvatar`` (frames, landmarks, boxes, crops, masks) for the engine.
"""
