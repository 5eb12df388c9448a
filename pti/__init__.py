"""cog-sdxl-pti's work, one room per subpackage; the Cog adapters at the repo root (train.py, predict.py) call it.

Rooms and what each may import (besides itself; nothing here imports Cog or a module of the repo root):
  models         → nothing                      base weights, device/dtype, tiny and random-full builders
  preprocessing  → nothing                      archives, images, masks, crops, captions
  dataset        → nothing                      trigger words, new-token rows, cached training tensors
  formats        → nothing                      LoRA key layouts and the trained_model.tar export
  training       → models, dataset, formats     the trainer and its parts
  inference      → models, preprocessing        generation and the trained-weights download cache
  toyworld       → models, dataset              a procedural world and a mini SDXL pretrained on it
tests/test_layout.py checks these arrows.
"""
