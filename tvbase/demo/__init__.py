"""The digits zoo and ``tvbase demo``.

- :mod:`.zoo`: a tiny ViT and CNN pretrained on part of scikit-learn's digits and fully
  fine-tuned on many tasks, cached on disk (also the memory-accuracy benchmark's zoo);
- :mod:`.run`: ``tvbase demo``, the main job on that zoo end to end.

Nothing here is imported by ``import tvbase``.
"""
