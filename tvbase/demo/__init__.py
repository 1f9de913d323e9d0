"""The digits zoo and ``tvbase demo``.

- :mod:`.zoo`: a tiny ViT and CNN pretrained on part of scikit-learn's digits and fully
  fine-tuned on many tasks, cached on disk (also the memory-accuracy benchmark's zoo);
- :mod:`.run`: ``tvbase demo``, the main job on that zoo end to end;
- :mod:`.text_zoo`: the pretrained MiniLM-L6 text transformer fully fine-tuned on 13 tasks over
  its own vocabulary, cached on disk (the benchmark's third zoo; needs ``tvbase[pretrained]``).

Nothing here is imported by ``import tvbase``.
"""
