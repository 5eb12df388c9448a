"""Runs InvokeAI's own model identification, LoRA loader, LoRA patcher and textual-inversion code on our files.

Started by tests/test_invokeai_loads_our_files.py in a separate Python process whose path holds InvokeAI's package
(and the few small packages it imports), never the product's code: ``python invokeai_driver.py REQUEST.json OUT``.
It writes what InvokeAI reports to ``OUT/report.json`` and the tensors it produced to ``OUT/tensors.safetensors``;
the test judges them. Nothing here re-implements InvokeAI: every result comes from one of its functions.

torchvision: InvokeAI imports it at module level for FLUX/Wan image-conditioning extensions only. The package index
has no CPU build of it for Linux (its CUDA build cannot load beside a CPU torch), so when none is importable a
stand-in is registered after transformers and diffusers have recorded that torchvision is absent; any use of the
stand-in raises, so a code path below that needed torchvision would fail the test rather than pass unnoticed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path


class _Unavailable:
    """What the torchvision stand-in hands out for a name: any call or attribute use raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        raise RuntimeError(f"torchvision stand-in: {self._name}.{attr} was used")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {self._name} was called")


def _stand_in_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)

    def placeholder(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{name}.{attr}")

    module.__getattr__ = placeholder
    return module


def register_torchvision_stand_in() -> bool:
    """Register the stand-in when no torchvision is importable; returns whether it did."""
    if importlib.util.find_spec("torchvision") is not None:
        return False
    import diffusers.utils.import_utils as diffusers_imports
    import transformers.utils.import_utils as transformers_imports

    if transformers_imports.is_torchvision_available() or diffusers_imports.is_torchvision_available():
        raise RuntimeError("transformers/diffusers see a torchvision that cannot be imported")
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    modules = {name: _stand_in_module(name) for name in names}
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    sys.modules.update(modules)
    return True


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def identify(path: Path) -> dict:
    """InvokeAI's model identification (what its model manager does when a file is installed): the config it picks,
    or None, and every candidate config class that failed with an error rather than "not a match"."""
    from invokeai.backend.model_manager.configs.factory import ModelConfigFactory
    from invokeai.backend.model_manager.configs.identification_utils import NotAMatchError

    result = ModelConfigFactory.from_model_on_disk(path, allow_unknown=False)
    errors = {name: f"{type(outcome).__name__}: {outcome}" for name, outcome in result.details.items()
              if isinstance(outcome, Exception) and not isinstance(outcome, NotAMatchError)}
    config = result.config
    if config is None:
        return {"as": None, "errors": errors, "config": None}
    return {"as": {"type": config.type.value, "format": config.format.value, "base": config.base.value},
            "errors": errors, "config": config}


def load_with_invokeai_loader(config):
    """The loader InvokeAI's registry picks for the identified config, run the way its ``load_model`` runs it
    (path resolution, then ``_load_model``) without the RAM cache around it."""
    from invokeai.app.services.config.config_default import InvokeAIAppConfig
    from invokeai.backend.model_manager.load.model_loader_registry import ModelLoaderRegistry

    loader_class, config, _ = ModelLoaderRegistry.get_implementation(config, None)
    loader = loader_class(InvokeAIAppConfig(), logging.getLogger("invokeai-driver"), None)
    if not loader._get_model_path(config).exists():
        raise FileNotFoundError(config.path)
    return loader._load_model(config)


def patch_meta_unet(unet_config: dict, patch, warnings: _Warnings) -> dict[str, list[str]]:
    """InvokeAI's LoRA patcher on the SDXL UNet (built on ``meta`` from its config, with the custom layers InvokeAI's
    model cache puts in): each module that received a patch, with the keys of the LoRA layers it received."""
    import torch
    from diffusers import UNet2DConditionModel
    from invokeai.backend.model_manager.load.model_cache.torch_module_autocast.torch_module_autocast import (
        apply_custom_layers_to_model,
    )
    from invokeai.backend.patches.layer_patcher import LayerPatcher

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    apply_custom_layers_to_model(unet)
    logging.getLogger().addHandler(warnings)
    try:
        with LayerPatcher.apply_smart_model_patches(model=unet, patches=[(patch, 1.0)], prefix="lora_unet_",
                                                    dtype=torch.float32, force_sidecar_patching=True):
            key_of = {id(layer): key for key, layer in patch.layers.items()}
            return {name: [key_of[id(layer)] for layer, _ in module._patches_and_weights]
                    for name, module in unet.named_modules()
                    if hasattr(module, "get_num_patches") and module.get_num_patches() > 0}
    finally:
        logging.getLogger().removeHandler(warnings)


def layer_delta(layer, shape: list[int]):
    """``get_parameters`` of InvokeAI's layer at strength 1: the weight change it adds (alpha/rank scale included)."""
    import torch

    return layer.get_parameters({"weight": torch.zeros(shape)}, 1.0)["weight"].float()


def report_lora(path: Path, unet_config: dict, sample_modules: dict[str, list[int]]) -> tuple[dict, dict]:
    """Identify, load and patch the LoRA as InvokeAI does; the weight change of the layers patched onto the sample
    modules (the patcher moves the layers it attaches to the model's device, ``meta``, so it gets a second load)."""
    identified = identify(path)
    config = identified.pop("config")
    if config is None:
        return {"identified": identified}, {}
    patch = load_with_invokeai_loader(config)
    warnings = _Warnings()
    patched = patch_meta_unet(unet_config, load_with_invokeai_loader(config), warnings)
    deltas = {f"{path.name}:{module}": layer_delta(patch.layers[key], shape)
              for module, shape in sample_modules.items() for key in patched.get(module, [])}
    report = {"identified": identified, "layers": sorted(patch.layers), "patched_modules": patched,
              "scales": sorted({layer.scale() for layer in patch.layers.values()}), "warnings": warnings.messages}
    return report, deltas


def report_embedding(path: Path, tokenizers: dict[str, str], widths: dict[str, int]) -> tuple[dict, dict]:
    """Identify and load the embedding as InvokeAI does, then insert it with ``ModelPatcher.apply_ti`` into a CLIP
    text encoder of each SDXL width and read back the trigger's row."""
    import torch
    from invokeai.backend.model_patcher import ModelPatcher
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    identified = identify(path)
    config = identified.pop("config")
    if config is None:
        return {"identified": identified}, {}
    ti = load_with_invokeai_loader(config)
    name = path.stem
    report = {"identified": identified, "embedding": list(ti.embedding.shape),
              "embedding_2": None if ti.embedding_2 is None else list(ti.embedding_2.shape), "prompts": {}}
    tensors = {}
    for encoder, tokenizer_path in tokenizers.items():
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path)
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=widths[encoder], intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=widths[encoder] // 64,
                                projection_dim=widths[encoder])
        model_class = CLIPTextModel if encoder == "clip_l" else CLIPTextModelWithProjection
        torch.manual_seed(0)
        text_encoder = model_class(config)
        with ModelPatcher.apply_ti(tokenizer, text_encoder, [(name, ti)]) as (ti_tokenizer, _):
            token_ids = ti_tokenizer(f"a photo of <{name}>", add_special_tokens=False).input_ids
            trigger_id = ti_tokenizer.convert_tokens_to_ids(f"<{name}>")
            report["prompts"][encoder] = {"trigger_in_prompt": trigger_id in token_ids,
                                          "trigger_is_new_token": trigger_id >= len(tokenizer)}
            tensors[f"{path.name}:{encoder}"] = text_encoder.get_input_embeddings().weight[trigger_id].detach().clone()
    return report, tensors


def main(request_path: str, out_dir: str) -> None:
    import os

    from safetensors.torch import save_file

    request = json.loads(Path(request_path).read_text())
    out = Path(out_dir)
    os.environ.setdefault("INVOKEAI_ROOT", str(out / "invokeai_root"))
    stand_in = register_torchvision_stand_in()
    # The loader registry, imported first as InvokeAI's model manager does at start-up (imported later, a FLUX config
    # class's probe meets a circular import).
    import invokeai.backend.model_manager.load as invokeai_loaders

    report: dict = {"invokeai_file": invokeai_loaders.__file__, "torchvision_stand_in": stand_in, "loras": {},
                    "embeddings": {}}
    tensors: dict = {}
    for path in request["loras"]:
        report["loras"][Path(path).name], found = report_lora(Path(path), request["unet_config"],
                                                              request["sample_modules"])
        tensors.update(found)
    for path in request["embeddings"]:
        report["embeddings"][Path(path).name], found = report_embedding(Path(path), request["tokenizers"],
                                                                        request["widths"])
        tensors.update(found)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(out / "tensors.safetensors"))
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
