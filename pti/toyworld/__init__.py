"""Toy world: procedural 64x64 images of one shape with captions, an evaluator that reads them back, and a mini SDXL
pretrained on them, so that "the trigger word brings a learned subject" can be measured offline on a CPU.
Nothing here imports from the repository root or from cog."""
