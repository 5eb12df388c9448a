"""What "exactly the same model" means in these tests, on any x86-64 CPU.

What the product keeps exact is state: unloading trained weights restores the base weights, switching A -> B -> A
leaves exactly A's tensors active, and tokenizers lose the new tokens again. :func:`effective_state` digests that
state bit for bit, and tests compare digests with ``==``.

Rendered images are not bit-stable across runs even from bit-identical weights: MKL picks its kernels by CPU
(AVX-512/AMX) and by memory alignment, so two renders can differ in the last float bits (~1e-7 seen on an AVX-512
machine; ``MKL_CBWR=COMPATIBLE`` hides it). Images are therefore compared with the tolerances below.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

# Float images in [0, 1]: kernel-choice noise is ~1e-7; 1e-4 leaves a 1000x margin and is still 10x below the
# smallest change a weight change makes in these tests (they assert > 1e-3).
FLOAT_IMAGE_ATOL = 1e-4
# 8-bit images: a last-bits float difference moves a pixel across a rounding boundary at most once, so one level.
UINT8_IMAGE_LEVELS = 1


def assert_images_close(actual: np.ndarray, expected: np.ndarray, message: str = "") -> None:
    """Equal up to the kernel-choice noise above (8-bit images: one level; float images: FLOAT_IMAGE_ATOL)."""
    assert actual.shape == expected.shape, message
    if actual.dtype == np.uint8:
        worst = np.abs(actual.astype(np.int16) - expected.astype(np.int16)).max()
        assert worst <= UINT8_IMAGE_LEVELS, f"{message} (max difference {worst} levels)"
    else:
        worst = float(np.abs(actual - expected).max())
        assert worst <= FLOAT_IMAGE_ATOL, f"{message} (max difference {worst:.3g})"


def images_differ(a: np.ndarray, b: np.ndarray) -> bool:
    """More than kernel-choice noise apart: what "this changes the image" means."""
    limit = UINT8_IMAGE_LEVELS if a.dtype == np.uint8 else FLOAT_IMAGE_ATOL
    return a.shape != b.shape or np.abs(a.astype(np.float64) - b.astype(np.float64)).max() > limit


def digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().to("cpu").contiguous()
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{tensor.dtype}{list(tensor.shape)}:{hashlib.sha256(raw).hexdigest()}"


def _base_weights(module: torch.nn.Module, prefix: str) -> dict[str, str]:
    """Every tensor except LoRA ones, by its plain name (a LoRA-wrapped layer keeps its own under ``base_layer``)."""
    return {f"{prefix}.{key.replace('.base_layer.', '.')}": digest(value)
            for key, value in module.state_dict().items() if "lora_" not in key}


def _active_lora(model: torch.nn.Module, prefix: str = "unet") -> dict[str, str]:
    """What the enabled LoRA layers add: per module, each active adapter's scale, DoRA flag and tensors. Adapter
    names are left out (they are cache keys); a disabled or inactive layer adds nothing, like an unwrapped one."""
    from peft.tuners.lora.layer import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters:
            continue
        for index, adapter in enumerate(a for a in module.active_adapters if a in module.lora_A):
            key = f"{prefix}.{name}.active{index}"
            out[key + ".scaling"] = repr(float(module.scaling[adapter]))
            out[key + ".dora"] = repr(bool(module.use_dora.get(adapter, False)))
            out[key + ".A"] = digest(module.lora_A[adapter].weight)
            out[key + ".B"] = digest(module.lora_B[adapter].weight)
            if adapter in module.lora_magnitude_vector:
                out[key + ".magnitude"] = digest(module.lora_magnitude_vector[adapter].weight)
    return out


def _text_side(pipe) -> dict[str, str]:
    """Tokenizers' vocabularies, and the text encoders' weights with the embedding rows the tokenizer can reach
    (rows appended for tokens of other weights are unreachable while those tokens are not in the vocabulary)."""
    out = {}
    for tokenizer_name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
        vocab = tokenizer.get_vocab()
        out[tokenizer_name + ".vocab"] = hashlib.sha256(repr(sorted(vocab.items())).encode()).hexdigest()
        table = encoder.get_input_embeddings().weight
        reachable = max(vocab.values()) + 1
        out[encoder_name + ".reachable_embeddings"] = digest(table[:reachable])
        out.update({k: v for k, v in _base_weights(encoder, encoder_name).items()
                    if not k.endswith("token_embedding.weight")})
        out.update(_active_lora(encoder, encoder_name))
    return out


def effective_state(pipe) -> dict[str, str]:
    """Digests of everything a render of ``pipe`` depends on besides the inputs: UNet and VAE weights, the active
    LoRA (UNet and text encoders), the text encoders behind the reachable token ids, and the tokenizers. Equal digests mean the same model."""
    return {**_base_weights(pipe.unet, "unet"), **_active_lora(pipe.unet), **_base_weights(pipe.vae, "vae"),
            **_text_side(pipe)}


def assert_same_state(actual: dict[str, str], expected: dict[str, str], message: str = "") -> None:
    differing = sorted(k for k in actual.keys() | expected.keys() if actual.get(k) != expected.get(k))
    assert not differing, f"{message}: {len(differing)} tensors differ, e.g. {differing[:5]}"
