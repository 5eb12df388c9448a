"""Pretrain a mini SDXL (real diffusers/transformers classes) on the toy world, deterministically on a CPU."""

from __future__ import annotations

import copy
import math
import random
import shutil
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from pti.dataset.text import PromptTokenizer, encode_prompt
from pti.models.tiny_models import SCHEDULER_CONFIG, tiny_configs, write_clip_bpe
from pti.toyworld.evaluator import images_to_tensor
from pti.toyworld.paths import MINI_WORLD_DIR
from pti.toyworld.world import BACKGROUNDS, KNOWN_SHAPES, SHAPES, VOCABULARY, Scene, caption, name_caption, render, scenes

IMAGE_SIZE = 64
TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)


@dataclass(frozen=True)
class VaeSettings:
    steps: int = 1500
    batch_size: int = 16
    learning_rate: float = 2e-3
    kl_weight: float = 1e-6
    object_weight: float = 2.0
    train_images: int = 8192


@dataclass(frozen=True)
class DiffusionSettings:
    steps: int = 1400
    batch_size: int = 32
    learning_rate: float = 1e-3
    text_learning_rate: float = 3e-4
    warmup_steps: int = 100
    train_images: int = 16384
    caption_dropout: float = 0.1
    empty_caption_share: float = 0.5
    partial_caption: float = 0.1
    name_only_caption: float = 0.0  # "a photo of (a) square": the subject probe's form (off in the committed recipe)
    unknown_noun: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0


@dataclass(frozen=True)
class DiffusionStage:
    """One run of :func:`train_diffusion`: its settings and the seed of its data order and noise."""

    settings: DiffusionSettings
    seed: int


def default_stages() -> tuple[DiffusionStage, ...]:
    """The committed model's recipe: a fast first stage, then two at falling learning rates (each with its own
    warmup and cosine decay), found by measuring the drawing accuracy after each."""
    return (
        DiffusionStage(DiffusionSettings(), seed=0),
        DiffusionStage(DiffusionSettings(steps=1100, learning_rate=5e-4, text_learning_rate=2e-4), seed=1),
        DiffusionStage(DiffusionSettings(steps=1200, learning_rate=3e-4, text_learning_rate=1e-4, warmup_steps=50),
                       seed=2),
    )


def name_only_stage() -> DiffusionStage:
    """An extra last stage that teaches "a photo of (a) square" (the subject probe's form) on 15 % of its captions:
    ``scripts/build_mini_world.py --name-only-stage``. Measured in bench/README.md; not in the committed recipe."""
    return DiffusionStage(DiffusionSettings(steps=300, learning_rate=3e-4, text_learning_rate=1e-4, warmup_steps=20,
                                            name_only_caption=0.15), seed=3)


COMMITTED_UNET_CHANNELS = (64, 128)  # the UNet's two levels in the committed model


@dataclass(frozen=True)
class BuildSettings:
    seed: int = 0
    vae: VaeSettings = field(default_factory=VaeSettings)
    stages: tuple[DiffusionStage, ...] = field(default_factory=default_stages)
    # wider UNets measure whether a LoRA's drift comes from being a large share of each layer (bench/README.md)
    unet_channels: tuple[int, int] = COMMITTED_UNET_CHANNELS


def mini_configs(vocab_size: int, unet_channels: tuple[int, int] = COMMITTED_UNET_CHANNELS) -> dict:
    """The tiny pipeline's configs with cross-attention at both UNet levels and a VAE sized for 64-pixel images.
    The VAE's group norms span all channels of a layer: with few channels, small groups normalise away the absolute
    colours of flat regions."""
    configs = copy.deepcopy(tiny_configs(vocab_size))
    configs["unet"].update(
        sample_size=IMAGE_SIZE // 8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(unet_channels),
        attention_head_dim=(4, 8),
        transformer_layers_per_block=(1, 1),
    )
    configs["vae"].update(
        block_out_channels=(16, 32, 64, 64),
        norm_num_groups=1,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
        scaling_factor=1.0,
    )
    return configs


def write_tokenizers(folder: Path) -> int:
    """Both CLIP tokenizers with a merge chain per world word, in ``VOCABULARY`` order; return the vocabulary size.
    BPE applies merges by rank, so a few words (hexagon, green, grey, bottom, centre) end up as two tokens: harmless,
    the encoders learn them as pairs."""
    words = list(VOCABULARY)
    vocab_size = write_clip_bpe(folder / "tokenizer", words=words)
    write_clip_bpe(folder / "tokenizer_2", words=words, pad_token="!")
    return vocab_size


def build_untrained(seed: int, unet_channels: tuple[int, int] = COMMITTED_UNET_CHANNELS) -> dict:
    """Every pipeline component at its random initialisation from ``seed``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="mini-world-tokenizers-"))
    try:
        vocab_size = write_tokenizers(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp / "tokenizer_2")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    configs = mini_configs(vocab_size, unet_channels)
    torch.manual_seed(seed)
    return dict(
        vae=AutoencoderKL(**configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**configs["unet"]),
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def render_batch(scene_list: Sequence[Scene]) -> torch.Tensor:
    return images_to_tensor([render(s) for s in scene_list])


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def object_masks(images: torch.Tensor, scene_list: Sequence[Scene]) -> torch.Tensor:
    """[N, 1, H, W]: 1 where a pixel differs from the scene's background colour (the object and its edges)."""
    background = torch.tensor([BACKGROUNDS[s.background] for s in scene_list], dtype=torch.float32) / 127.5 - 1.0
    return ((images - background[:, :, None, None]).abs().amax(dim=1, keepdim=True) > 0.02).float()


def train_vae(vae: torch.nn.Module, settings: VaeSettings, seed: int, progress: bool = True) -> None:
    """Reconstruction (L1 + L2, object pixels weighted up) with a small KL term, on whole renders of every shape
    (crops would change the group norms' statistics). The posterior starts nearly deterministic (log-variance bias
    -8), so early decoder updates are not drowned in sampling noise."""
    scene_list = list(scenes(seed + 10, settings.train_images, shapes=SHAPES))
    images = render_batch(scene_list)
    weights = 1.0 + settings.object_weight * object_masks(images, scene_list)
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    generator = torch.Generator().manual_seed(seed + 11)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _warmup_cosine(s, settings.steps, settings.steps // 20))
    vae.train()
    bar = tqdm(range(settings.steps), desc="vae", disable=not progress)
    for _ in bar:
        index = torch.randint(0, len(images), (settings.batch_size,), generator=generator)
        x, w = images[index], weights[index]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        error = vae.decode(z).sample - x
        loss = (error.abs() * w).mean() + (error.pow(2) * w).mean() + settings.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_images(vae: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std, unscaled."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start:start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(means: torch.Tensor, stds: torch.Tensor) -> float:
    """1 / std of sampled latents, so that scaled latents have about unit variance (SDXL's 0.13025 plays this role)."""
    total_variance = means.var() + stds.pow(2).mean()
    return float(1.0 / total_variance.sqrt())


def unknown_word(rng: random.Random) -> str:
    """1-5 random letters that are not a world word: what a rare word or a user's trigger looks like to the tokenizer
    (byte-level pieces the captions never use)."""
    while True:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 5)))
        if word not in VOCABULARY:
            return word


def training_caption(scene: Scene, rng: random.Random, settings: DiffusionSettings) -> str | None:
    """The scene's caption, sometimes without its colour or background, sometimes with an unknown word instead of the
    shape's name (so a word the model never saw still gets the asked colour and background, as a rare word does in
    SDXL). Dropped captions are ``""`` (encoded, what A1111, ComfyUI and cog-sdxl feed an empty negative prompt) or
    ``None`` (all-zero embeddings, what diffusers feeds when no negative prompt is given)."""
    draw = rng.random()
    if draw < settings.caption_dropout:
        return "" if rng.random() < settings.empty_caption_share else None
    noun = unknown_word(rng) if rng.random() < settings.unknown_noun else scene.shape
    if draw < settings.caption_dropout + settings.partial_caption / 2:
        return f"a photo of a {scene.colour} {noun}"
    if draw < settings.caption_dropout + settings.partial_caption:
        return caption(scene, shape_word=noun, colour=False)
    if draw < settings.caption_dropout + settings.partial_caption + settings.name_only_caption:
        return name_caption(noun, article=rng.random() < 0.5)
    return caption(scene, shape_word=noun)


def alphas_cumprod() -> torch.Tensor:
    """The DDPM schedule of ``SCHEDULER_CONFIG`` (scaled_linear betas), which the Euler sampler inverts."""
    betas = torch.linspace(SCHEDULER_CONFIG["beta_start"] ** 0.5, SCHEDULER_CONFIG["beta_end"] ** 0.5,
                           SCHEDULER_CONFIG["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class Ema:
    """Exponential moving average of a set of modules' parameters."""

    def __init__(self, modules: Iterable[torch.nn.Module], decay: float):
        self.modules = list(modules)
        self.decay = decay
        self.shadow = [[p.detach().clone() for p in m.parameters()] for m in self.modules]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for module, shadow in zip(self.modules, self.shadow):
            for s, p in zip(shadow, module.parameters()):
                s.lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_modules(self) -> None:
        for module, shadow in zip(self.modules, self.shadow):
            for s, p in zip(shadow, module.parameters()):
                p.copy_(s)


def train_diffusion(components: dict, settings: DiffusionSettings, seed: int, progress: bool = True) -> list[float]:
    """UNet and both text encoders jointly: epsilon prediction on VAE latents of known shapes, conditioned exactly as
    ``StableDiffusionXLPipeline`` conditions at inference; dropped captions get either the encoded empty prompt
    or all-zero embeddings and pooled embeddings (what ``force_zeros_for_empty_prompt`` feeds the unconditional branch
    when no negative prompt is given). Returns the loss curve."""
    vae, unet = components["vae"], components["unet"]
    encoders = [components["text_encoder"], components["text_encoder_2"]]
    scene_list = list(scenes(seed + 20, settings.train_images, shapes=KNOWN_SHAPES))
    means, stds = encode_images(vae, render_batch(scene_list))
    scale = vae.config.scaling_factor
    tokenize = PromptTokenizer([components["tokenizer"], components["tokenizer_2"]])
    cumprod = alphas_cumprod()
    snr = cumprod / (1 - cumprod)
    loss_weight = snr.clamp(max=settings.min_snr_gamma) / snr
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(settings.batch_size, 1)
    rng = random.Random(seed + 21)
    generator = torch.Generator().manual_seed(seed + 22)
    optimizer = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": settings.learning_rate},
        {"params": [p for e in encoders for p in e.parameters()], "lr": settings.text_learning_rate},
    ], betas=(0.9, 0.99), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _warmup_cosine(s, settings.steps, settings.warmup_steps))
    ema = Ema([unet, *encoders], settings.ema_decay)
    for module in (unet, *encoders):
        module.train()
    losses: list[float] = []
    bar = tqdm(range(settings.steps), desc="unet+text", disable=not progress)
    for step in bar:
        index = torch.randint(0, len(scene_list), (settings.batch_size,), generator=generator).tolist()
        captions = [training_caption(scene_list[i], rng, settings) for i in index]
        prompt_embeds, pooled = encode_prompt(encoders, tokenize([c or "" for c in captions]))
        keep = torch.tensor([c is not None for c in captions], dtype=torch.float32)
        prompt_embeds = prompt_embeds * keep[:, None, None]
        pooled = pooled * keep[:, None]
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scale
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, len(cumprod), (settings.batch_size,), generator=generator)
        a = cumprod[t].sqrt()[:, None, None, None]
        b = (1 - cumprod[t]).sqrt()[:, None, None, None]
        prediction = unet(a * latents + b * noise, t, encoder_hidden_states=prompt_embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        schedule.step()
        ema.update(step)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    ema.copy_to_modules()
    for module in (unet, *encoders):
        module.eval()
    return losses


def assemble(components: dict):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)


def pretrain(settings: BuildSettings, progress: bool = True):
    """VAE, its latent scaling factor, then UNet + text encoders; the assembled pipeline and the diffusion loss curve."""
    components = build_untrained(settings.seed, settings.unet_channels)
    train_vae(components["vae"], settings.vae, settings.seed, progress)
    means, stds = encode_images(components["vae"], render_batch(list(scenes(settings.seed + 30, 2048, shapes=SHAPES))))
    components["vae"].register_to_config(scaling_factor=latent_scaling_factor(means, stds))
    losses: list[float] = []
    for stage in settings.stages:
        losses += train_diffusion(components, stage.settings, settings.seed + stage.seed, progress)
    return assemble(components), losses


def save_pipeline(pipe, folder: Path = MINI_WORLD_DIR, half: bool = False) -> None:
    """``save_pretrained`` with safetensors; weights stored in fp16 to stay small (loading upcasts them)."""
    if folder.exists():
        shutil.rmtree(folder)
    if half:
        pipe = copy.deepcopy(pipe)
        for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
            getattr(pipe, name).to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)


def load_pipeline(folder: Path = MINI_WORLD_DIR):
    """The mini world pipeline in float32 on the CPU."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe

