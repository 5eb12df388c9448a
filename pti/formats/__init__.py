"""Formats: pure converters between LoRA key layouts (PEFT/diffusers, kohya SGM, cog-sdxl) and the writer of
trained_model.tar. Imports no other room, so every consumer (training, inference, root) can use it."""
