"""Inference: SDXL generation (txt2img, img2img, inpaint, refiner, schedulers, safety) and the download cache
for trained weights; root ``weights_manager.py`` hot-swaps them. Imports models and preprocessing (safe extraction)."""
