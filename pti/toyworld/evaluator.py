"""A small CNN that reads a toy-world image back (shape, colour, background), trained on the world's own renders."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pti.toyworld.paths import EVALUATOR_PATH
from pti.toyworld.world import BACKGROUND_NAMES, COLOUR_NAMES, SHAPES, Scene, render, scenes

HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOUR_NAMES, "background": BACKGROUND_NAMES}
TRAIN_SEED_OFFSET = 0
EVAL_SEED_OFFSET = 1_000_000


@dataclass(frozen=True)
class EvaluatorSettings:
    seed: int = 0
    train_images: int = 16384
    steps: int = 2500
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class Reading:
    shape: str
    colour: str
    background: str
    confidence: dict[str, float]


class Evaluator(nn.Module):
    """A full-resolution convolution, four stride-2 ones (64 → 4 pixels), global mean and max pooling, and one
    linear head per attribute."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64, 96)):
        super().__init__()
        layers: list[nn.Module] = []
        for k, (cin, cout) in enumerate(zip((3,) + widths[:-1], widths)):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if k == 0 else 2, padding=1), nn.GroupNorm(4, cout),
                       nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * widths[-1], len(words)) for name, words in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """[N, 3, 64, 64] in [-1, 1]; other sizes are resized to 64."""
    arrays = [np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR) if im.size != (64, 64)
                         else im.convert("RGB"), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def labels_for(scene_list: Sequence[Scene]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([words.index(getattr(s, name)) for s in scene_list]) for name, words in HEADS.items()}


def render_set(seed: int, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Renders of every shape (held-out ones included) and their labels."""
    scene_list = list(scenes(seed, count, shapes=SHAPES))
    return images_to_tensor([render(s) for s in scene_list]), labels_for(scene_list)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    n, c, h, w = x.shape
    flat = x.reshape(1, n * c, h, w)
    kx = kernel.repeat_interleave(c, dim=0)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kx[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kx[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What diffusion outputs look like: blur, softness (down/up-sampling), slight colour drift, noise, small shifts."""
    n = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    x = _blur(x, uniform(0.0, 1.0) * (torch.rand(n, generator=generator) < 0.7))
    soft = torch.rand(n, generator=generator) < 0.3
    if soft.any():
        low = F.interpolate(x[soft], size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        x[soft] = F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
    x = x * uniform(0.85, 1.15, 1, 1, 1) + uniform(-0.1, 0.1, 1, 1, 1)
    x = x * uniform(0.93, 1.07, 3, 1, 1) + uniform(-0.05, 0.05, 3, 1, 1)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0.0, 0.08, 1, 1, 1)
    shift = torch.randint(-3, 4, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    return x.clamp(-1.0, 1.0)


def train_evaluator(settings: EvaluatorSettings = EvaluatorSettings(), progress: bool = True) -> Evaluator:
    """Fit the evaluator on renders of every shape, deterministically from ``settings.seed``."""
    from tqdm.auto import tqdm

    torch.manual_seed(settings.seed)
    images, labels = render_set(settings.seed + TRAIN_SEED_OFFSET, settings.train_images)
    model = Evaluator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate,
                                                   total_steps=settings.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    bar = tqdm(range(settings.steps), desc="evaluator", disable=not progress)
    for _ in bar:
        index = torch.randint(0, len(images), (settings.batch_size,), generator=generator)
        logits = model(augment(images[index].clone(), generator))
        loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def save_evaluator(model: Evaluator, path: Path = EVALUATOR_PATH, settings: EvaluatorSettings | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in asdict(settings).items()} if settings is not None else {}
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)


def load_evaluator(path: Path = EVALUATOR_PATH) -> Evaluator:
    from safetensors.torch import load_file

    model = Evaluator()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


@torch.no_grad()
def read(model: Evaluator, images: Sequence[Image.Image], batch_size: int = 256) -> list[Reading]:
    """What the evaluator sees in each image."""
    readings: list[Reading] = []
    for start in range(0, len(images), batch_size):
        probs = {k: v.softmax(-1) for k, v in model(images_to_tensor(images[start:start + batch_size])).items()}
        for i in range(len(probs["shape"])):
            best = {name: int(probs[name][i].argmax()) for name in HEADS}
            readings.append(Reading(**{name: HEADS[name][best[name]] for name in HEADS},
                                    confidence={name: float(probs[name][i, best[name]]) for name in HEADS}))
    return readings


@torch.no_grad()
def accuracy_on_renders(model: Evaluator, seed: int = EVAL_SEED_OFFSET, count: int = 1000,
                        augmented: bool = False) -> dict[str, float]:
    """Per-head accuracy on fresh renders of every shape (a seed range disjoint from training)."""
    images, labels = render_set(seed, count)
    if augmented:
        images = augment(images, torch.Generator().manual_seed(seed))
    logits = model(images)
    return {name: float((logits[name].argmax(-1) == labels[name]).float().mean()) for name in HEADS}


def main() -> None:
    torch.set_num_threads(1)
    settings = EvaluatorSettings()
    model = train_evaluator(settings)
    save_evaluator(model, settings=settings)
    print("clean", accuracy_on_renders(load_evaluator()))
    print("augmented", accuracy_on_renders(load_evaluator(), augmented=True))


if __name__ == "__main__":
    main()
