"""The export room: write the trained weights as the artifact contract's files, the model card, and the tar.

Every file is written to a temporary name in its folder and renamed into place, so a crash never leaves a
half-written artifact under its final name. Key layouts come from :mod:`lora_formats`.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

import re

import safetensors.torch
import torch
from torch import Tensor
from tqdm import tqdm

from pti.formats import lora_formats, sgm_checkpoint, text_encoder_lora
from pti.formats.lora_formats import UNetLayout
from pti.formats.sgm_checkpoint import FULL_CHECKPOINT_FILE

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
TRIGGER_EMBEDDINGS_DIR = "embeddings"  # one <trigger>.safetensors per trigger word: drop into a tool's embeddings folder
KOHYA_PLAIN_SUFFIX = "_kohya"  # <name>_kohya.safetensors: the kohya-layout LoRA without bundled embeddings
SAVE_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SPECIAL_PARAMS_FILE = "special_params.json"
TRAINING_CONFIG_FILE = "training_config.json"
MODEL_CARD_FILE = "README.md"
EMBEDDING_NAMES = ("clip_l", "clip_g")
SDXL_BASE_VERSION = "sdxl_base_v1-0"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
RESERVED_NAMES = {Path(f).stem for f in (DIFFUSERS_LORA_FILE, EMBEDDINGS_FILE, FULL_CHECKPOINT_FILE)}
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


class ExportError(ValueError):
    """Artifacts that cannot be written as asked (one-line message saying what to change)."""


# ---------------------------------------------------------------- atomic file writing


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it and rename it to ``path``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        tmp.chmod(0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_value) + "\n")


def _json_value(value: object) -> object:
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if type(value).__module__.startswith("torch"):  # torch.dtype, torch.device
        return str(value)
    raise ExportError(f"training_config holds a {type(value).__name__} ({value!r}), which cannot be written as JSON")


def _write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _write_atomically(path, lambda tmp: safetensors.torch.save_file(cpu, str(tmp), metadata=metadata))


def _in_precision(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating-point weights cast to the save precision; kohya ``.alpha`` scalars stay float32 (an alpha such as
    0.1 is not exact in half precision, and they weigh nothing)."""
    return {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v for k, v in tensors.items()}


# ---------------------------------------------------------------- validation


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or any(c in name for c in '/\\:*?"<>|') or name != name.strip():
        raise ExportError(f"name {name!r} is not usable as a file name; use letters, digits, '-' or '_'")
    if name in RESERVED_NAMES or name.endswith(Path(DIFFUSERS_LORA_FILE).stem):
        raise ExportError(f"name {name!r} would clash with another artifact file; choose another name")


def _check_embeddings(embeddings: dict[str, Tensor], special_params: dict[str, str]) -> None:
    if set(embeddings) != set(EMBEDDING_NAMES):
        raise ExportError(f"embeddings must have exactly the keys clip_l and clip_g, got {sorted(embeddings)}")
    shapes = {k: tuple(v.shape) for k, v in embeddings.items()}
    if any(len(s) != 2 for s in shapes.values()) or shapes["clip_l"][0] != shapes["clip_g"][0]:
        raise ExportError(f"embeddings clip_l and clip_g must be [n, width] with the same n, got {shapes}")
    if not special_params:
        raise ExportError("special_params is empty; map each trigger word to its tokens, e.g. {'TOK': '<s0><s1>'}")
    used = []
    for trigger, tokens in special_params.items():
        if not re.fullmatch(r"\w+", trigger):
            raise ExportError(f"trigger word {trigger!r} must be one word of letters, digits or _ (it names the "
                              f"file {TRIGGER_EMBEDDINGS_DIR}/{trigger}.safetensors)")
        try:
            used += lora_formats.token_indices(tokens)
        except lora_formats.LoraFormatError as err:
            raise ExportError(f"special_params[{trigger!r}]: {err}") from None
    n_rows = shapes["clip_l"][0]
    if sorted(used) != list(range(n_rows)):
        raise ExportError(f"special_params tokens {sorted(used)} must be exactly <s0>…<s{n_rows - 1}>, "
                          f"one per embedding row ({n_rows} rows)")


def all_tokens(special_params: dict[str, str]) -> list[str]:
    """Every new token, in ``<s0>…<sN>`` order (the row order of ``embeddings.safetensors``)."""
    indices = sorted(i for tokens in special_params.values() for i in lora_formats.token_indices(tokens))
    return [f"<s{i}>" for i in indices]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for library in LIBRARIES:
        try:
            versions[library] = importlib_metadata.version(library)
        except importlib_metadata.PackageNotFoundError:
            versions[library] = "not installed"
    return versions


# ---------------------------------------------------------------- the one-file kohya LoRA


def kohya_metadata(lora: lora_formats.PeftLora, *, name: str, special_params: dict[str, str],
                   trains_text_encoder: bool = False) -> dict[str, str]:
    """safetensors metadata read by A1111/Forge (``ss_*``), ComfyUI and model hubs (``modelspec.*``)."""
    adapter = lora_formats.peft_adapter_metadata(lora)
    triggers = list(special_params)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter["r"]),
        "ss_network_alpha": str(adapter["lora_alpha"]),
        "ss_base_model_version": SDXL_BASE_VERSION,
        "ss_v2": "False",
        "ss_network_train_unet_only": str(not trains_text_encoder),
        "ss_output_name": name,
        "ss_tag_frequency": json.dumps({name: {trigger: 1 for trigger in triggers}}),
        "ss_training_finished_at": str(int(datetime.now(timezone.utc).timestamp())),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
        "modelspec.trigger_phrase": ", ".join(triggers),
        "modelspec.date": datetime.now(timezone.utc).date().isoformat(),
    }
    return meta


def base_model_metadata(training_config: dict) -> dict[str, str]:
    """kohya's base-model fields from ``training_config["base_model_source"]`` (name, url, sha256): the model name
    A1111 shows and the SHA-256 of a single-file base (``ss_new_sd_model_hash``, as kohya writes it)."""
    source = training_config.get("base_model_source") or {}
    meta = {}
    if source.get("name"):
        meta["ss_sd_model_name"] = str(source["name"])
    if source.get("sha256"):
        meta["ss_new_sd_model_hash"] = str(source["sha256"])
    return meta


# ---------------------------------------------------------------- public API


def write_weight_files(out_dir: Path, *, unet_lora_state: dict[str, Tensor] | None, lora_alpha: float | None,
                       embeddings: dict[str, Tensor], special_params: dict[str, str], training_config: dict,
                       unet_layout: UNetLayout, name: str = "trained_model",
                       full_checkpoint_state: dict[str, Tensor] | None = None,
                       save_precision: str = "fp16",
                       text_encoder_loras: text_encoder_lora.TextEncoderLoras | None = None) -> None:
    """Write the weight files of the artifact contract into ``out_dir`` (created if missing).

    LoRA run: ``pytorch_lora_weights.safetensors`` and, unless it is a DoRA (which only diffusers applies as
    trained), ``<name>.safetensors`` (kohya layout with ``bundle_emb``, for A1111) and ``<name>_kohya.safetensors``
    (the same without ``bundle_emb``: Forge, ComfyUI, kohya's tools, InvokeAI). Full fine-tune
    (``full_checkpoint_state``, the tensors of :func:`sgm_checkpoint.sgm_state`): ``sdxl_checkpoint.safetensors``,
    a single-file SDXL checkpoint in the SGM layout. Always ``embeddings.safetensors``, one
    ``embeddings/<trigger>.safetensors`` per trigger word, ``special_params.json`` and ``training_config.json``
    (with library versions added). ``unet_layout`` is the trained UNet's block structure,
    ``UNetLayout.from_unet_config(unet.config)``, which names the kohya keys. Weights are written in
    ``save_precision`` (``fp16``, ``bf16`` or ``fp32``). ``text_encoder_loras`` (a LoRA run with
    ``train_text_encoder``, by component name in canonical module names) joins every LoRA file: ``text_encoder.`` /
    ``text_encoder_2.`` keys in the diffusers file, ``lora_te1_`` / ``lora_te2_`` in the kohya files.
    """
    if (unet_lora_state is None) == (full_checkpoint_state is None):
        raise ExportError("give exactly one of unet_lora_state (LoRA run) and full_checkpoint_state (full fine-tune)")
    if text_encoder_loras and unet_lora_state is None:
        raise ExportError("text_encoder_loras go into the LoRA files; a full fine-tune has none")
    if save_precision not in SAVE_PRECISIONS:
        raise ExportError(f"save_precision {save_precision!r} is not one of {', '.join(SAVE_PRECISIONS)}")
    dtype = SAVE_PRECISIONS[save_precision]
    _check_name(name)
    _check_embeddings(embeddings, special_params)
    if unet_lora_state is not None:
        unet_files = _lora_files(unet_lora_state, lora_alpha, embeddings, special_params, name, unet_layout,
                                 base_model_metadata(training_config), text_encoder_loras or {})
    else:
        metadata = sgm_checkpoint.checkpoint_metadata(name, list(special_params))
        unet_files = {FULL_CHECKPOINT_FILE: (full_checkpoint_state, metadata)}
    per_trigger = lora_formats.embeddings_by_trigger(embeddings, special_params)
    config = {**training_config, "library_versions": library_versions()}
    json.dumps(config, default=_json_value)  # refuse an unwritable config before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    for filename, (tensors, metadata) in unet_files.items():
        _write_safetensors(out_dir / filename, _in_precision(tensors, dtype), metadata)
    _write_safetensors(out_dir / EMBEDDINGS_FILE, _in_precision(embeddings, dtype))
    (out_dir / TRIGGER_EMBEDDINGS_DIR).mkdir(exist_ok=True)
    for trigger, tables in per_trigger.items():
        _write_safetensors(out_dir / TRIGGER_EMBEDDINGS_DIR / f"{trigger}.safetensors", _in_precision(tables, dtype))
    _write_json(out_dir / SPECIAL_PARAMS_FILE, special_params)
    _write_json(out_dir / TRAINING_CONFIG_FILE, config)


SafetensorsFile = tuple[dict[str, Tensor], dict[str, str] | None]


def _lora_files(state: dict[str, Tensor], lora_alpha: float | None, embeddings: dict[str, Tensor],
                special_params: dict[str, str], name: str, layout: UNetLayout,
                base_metadata: dict[str, str],
                text_encoder_loras: text_encoder_lora.TextEncoderLoras) -> dict[str, SafetensorsFile]:
    """The diffusers file and (plain LoRA only) the kohya files with and without bundled embeddings, by file name;
    ``base_metadata`` (:func:`base_model_metadata`) joins the kohya files' metadata. The text encoders' LoRAs (if
    any) join each file."""
    if lora_alpha is None:
        raise ExportError("lora_alpha is required with unet_lora_state (the LoraConfig's lora_alpha)")
    try:
        lora = lora_formats.peft_lora(state, lora_alpha)
        files = {DIFFUSERS_LORA_FILE: _diffusers_file(lora, text_encoder_loras)}
        if lora.use_dora:
            return files
        kohya = {**lora_formats.peft_to_kohya(lora, layout), **text_encoder_lora.to_kohya(text_encoder_loras)}
        bundle = {**kohya, **lora_formats.split_embeddings_by_trigger(embeddings, special_params)}
    except lora_formats.LoraFormatError as err:
        raise ExportError(f"cannot export the LoRA: {err}") from None
    metadata = {**kohya_metadata(lora, name=name, special_params=special_params,
                                 trains_text_encoder=bool(text_encoder_loras)), **base_metadata}
    files[f"{name}.safetensors"] = (bundle, metadata)
    files[f"{name}{KOHYA_PLAIN_SUFFIX}.safetensors"] = (kohya, {**metadata, "ss_output_name": name + KOHYA_PLAIN_SUFFIX,
                                                                 "modelspec.title": name + KOHYA_PLAIN_SUFFIX})
    return files


def _diffusers_file(lora: lora_formats.PeftLora,
                    text_encoder_loras: text_encoder_lora.TextEncoderLoras) -> SafetensorsFile:
    """``pytorch_lora_weights.safetensors``: the UNet's keys and adapter config, and the text encoders' beside them
    (one ``lora_adapter_metadata`` JSON with ``unet.``/``text_encoder.``/``text_encoder_2.`` keys)."""
    tensors, metadata = lora_formats.peft_to_diffusers_file(lora)
    if not text_encoder_loras:
        return tensors, metadata
    text_tensors, text_config = text_encoder_lora.to_diffusers(text_encoder_loras)
    packed = {**json.loads(metadata[lora_formats.LORA_ADAPTER_METADATA_KEY]), **text_config}
    return ({**tensors, **text_tensors},
            {**metadata, lora_formats.LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)})


def write_model_card(out_dir: Path, *, special_params: dict[str, str], base_model: str, name: str,
                     sample_images: list[Path], training_config: dict) -> Path:
    """Write ``README.md`` (after :func:`write_weight_files`): trigger words, the files and how to use them in
    diffusers, ComfyUI, A1111, Forge, kohya's scripts and InvokeAI, sample images (which must lie inside
    ``out_dir``)."""
    _check_name(name)
    out_dir = out_dir.resolve()
    links = []
    for image in sample_images:
        image = image.resolve()
        if not image.is_relative_to(out_dir):
            raise ExportError(f"sample image {image} is not inside {out_dir}; the card links images in the artifact")
        links.append(image.relative_to(out_dir).as_posix())
    is_lora = (out_dir / DIFFUSERS_LORA_FILE).is_file()
    if not is_lora and not (out_dir / FULL_CHECKPOINT_FILE).is_file():
        raise ExportError(f"{out_dir} holds no UNet weights; call write_weight_files before write_model_card")
    has_kohya_files = (out_dir / f"{name}{KOHYA_PLAIN_SUFFIX}.safetensors").is_file()
    card = ModelCard(special_params, base_model, name, links, training_config, is_lora, has_kohya_files,
                     is_lora and _has_text_encoder_keys(out_dir / DIFFUSERS_LORA_FILE))
    path = out_dir / MODEL_CARD_FILE
    _write_text(path, card.text())
    return path


def _has_text_encoder_keys(path: Path) -> bool:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return any(text_encoder_lora.is_diffusers_key(key) for key in handle.keys())


@dataclass(frozen=True)
class ModelCard:
    special_params: dict[str, str]
    base_model: str
    name: str
    sample_links: list[str]
    training_config: dict
    is_lora: bool
    has_kohya_files: bool  # False for a full fine-tune and for a DoRA (see _lora_files)
    has_text_encoder_lora: bool = False  # trained with train_text_encoder: every LoRA file adapts both encoders

    def text(self) -> str:
        return "\n\n".join([self._front_matter(), self._intro(), self._files(), self._diffusers(), self._comfyui(),
                             self._a1111(), self._forge(), self._kohya(), self._invokeai(), self._samples(),
                             self._training()]) + "\n"

    @property
    def _tokens(self) -> list[str]:
        return all_tokens(self.special_params)

    @property
    def _first(self) -> tuple[str, str]:
        return next(iter(self.special_params.items()))

    @property
    def _use_dora(self) -> bool:
        return self.is_lora and not self.has_kohya_files

    @property
    def _has_kohya_files(self) -> bool:
        return self.has_kohya_files

    @property
    def _precision(self) -> str:
        """The precision the weights were written in (runs from before ``save_precision`` wrote fp32)."""
        return str(self.training_config.get("save_precision", "fp16"))

    @property
    def _plain(self) -> str:
        return f"{self.name}{KOHYA_PLAIN_SUFFIX}"

    def _front_matter(self) -> str:
        kind = "lora" if self.is_lora else "full-fine-tune"
        return "\n".join(["---", f"base_model: {json.dumps(self.base_model)}", "tags:", "- stable-diffusion-xl",
                          "- text-to-image", f"- {kind}", "- pivotal-tuning", "- textual-inversion",
                          f"instance_prompt: {json.dumps(self._first[1])}", "---"])

    def _intro(self) -> str:
        what = "a LoRA on" if self.is_lora else "a full fine-tune of"
        rows = "\n".join(f"| `{trigger}` | `{tokens}` |" for trigger, tokens in self.special_params.items())
        return f"""# {self.name}

An SDXL model trained with pivotal tuning: new tokens in both text encoders together with {what} the UNet of
`{self.base_model}`.

## Trigger words

With this repository's predictor, in A1111, Forge and ComfyUI write the trigger word in the prompt (ComfyUI:
`embedding:` before it); in diffusers write its tokens; in InvokeAI write it in angle brackets.

| trigger word | tokens |
| --- | --- |
{rows}"""

    def _files(self) -> str:
        what = "UNet and text-encoder LoRA" if self.has_text_encoder_lora else "UNet weights"
        rows = [f"| `{DIFFUSERS_LORA_FILE}` | {what} for diffusers |" if self.is_lora else
                f"| `{FULL_CHECKPOINT_FILE}` | the whole SDXL model, single-file SGM layout, {self._precision} "
                "(A1111, Forge, ComfyUI, InvokeAI, diffusers `from_single_file`) |",
                f"| `{EMBEDDINGS_FILE}` | new-token embeddings: `clip_l` (first text encoder), `clip_g` (second), "
                f"one row per token `{''.join(self._tokens)}` |"]
        rows += [f"| `{TRIGGER_EMBEDDINGS_DIR}/{trigger}.safetensors` | `{trigger}` alone (`clip_l`/`clip_g`): an "
                 f"embedding for the embeddings folder of ComfyUI, A1111, Forge, InvokeAI |"
                 for trigger in self.special_params]
        if self._has_kohya_files:
            rows.append(f"| `{self.name}.safetensors` | kohya-layout LoRA with the embeddings bundled "
                        "(`bundle_emb`): A1111 |")
            rows.append(f"| `{self._plain}.safetensors` | the same LoRA without embeddings: Forge, ComfyUI, "
                        "kohya's scripts, InvokeAI |")
        rows += [f"| `{SPECIAL_PARAMS_FILE}` | trigger word → tokens |",
                 f"| `{TRAINING_CONFIG_FILE}` | every training setting and library versions |"]
        table = "## Files\n\n| file | what |\n| --- | --- |\n" + "\n".join(rows)
        if self.has_text_encoder_lora:
            table += ("\n\nThe LoRA adapts both text encoders too (diffusers `text_encoder`/`text_encoder_2` keys, "
                      "kohya `lora_te1_`/`lora_te2_`): every tool that loads the LoRA applies them, at the LoRA's "
                      "strength.")
        if self._use_dora:
            table += ("\n\nThis is a DoRA: only diffusers (and this repository's predictor) apply it as trained, so "
                      "no kohya-layout LoRA is included. A1111 and ComfyUI normalise DoRA per input column, "
                      "PEFT per output row; ComfyUI's and Forge's output-row variant divides by the base weight's "
                      "norm; kohya's scripts ignore `dora_scale`. The embeddings work everywhere.")
        return table

    def _diffusers(self) -> str:
        if self.is_lora:
            make_pipe = (f'pipe = StableDiffusionXLPipeline.from_pretrained("{self.base_model}", '
                         f'torch_dtype=dtype).to(device)\n'
                         f'pipe.load_lora_weights(folder, weight_name="{DIFFUSERS_LORA_FILE}")')
        else:
            make_pipe = (f'pipe = StableDiffusionXLPipeline.from_single_file(f"{{folder}}/{FULL_CHECKPOINT_FILE}", '
                         f'config="{self.base_model}", torch_dtype=dtype).to(device)')
        unload_unet = " `pipe.unload_lora_weights()` for the LoRA," if self.is_lora else ""
        trigger, tokens = self._first
        return f"""## diffusers

```python
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

folder = "{self.name}"  # where the trained tar was extracted
device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
{make_pipe}
embeddings = load_file(f"{{folder}}/{EMBEDDINGS_FILE}")
tokens = {self._tokens!r}
pipe.load_textual_inversion(embeddings["clip_l"], token=tokens,
                            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion(embeddings["clip_g"], token=tokens,
                            text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)

image = pipe("a photo of {tokens}", num_inference_steps=30).images[0]
image.save("out.png")
```

`{tokens}` stands for `{trigger}`. To go back to the base model:{unload_unet}
`pipe.unload_textual_inversion(tokens=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)` and the
same with `text_encoder_2`/`tokenizer_2`."""

    def _embeddings_step(self, folder: str) -> str:
        trigger = self._first[0]
        return (f"copy `{TRIGGER_EMBEDDINGS_DIR}/{trigger}.safetensors` (and the file of every other trigger word "
                f"you use) to `{folder}`")

    def _comfyui(self) -> str:
        trigger = self._first[0]
        if self._has_kohya_files:
            lora = (f"Copy `{self._plain}.safetensors` to `ComfyUI/models/loras/` and add a *Load LoRA* node after "
                    "the checkpoint loader; ")
        elif not self.is_lora:
            lora = (f"Copy `{FULL_CHECKPOINT_FILE}` to `ComfyUI/models/checkpoints/` and pick it in *Load "
                    "Checkpoint*; ")
        else:
            lora = ""
        return f"""## ComfyUI

{lora}{self._embeddings_step("ComfyUI/models/embeddings/")} and write `embedding:{trigger}` in the prompt where
the trigger word goes. Each trigger word has its own file, so one can be used without the others. ComfyUI ignores
embeddings bundled in a LoRA."""

    def _webui_without_lora(self, heading: str, tool: str) -> str | None:
        """A1111's and Forge's recipe when there is no LoRA file for them (a full fine-tune, or a DoRA); ``None``
        when there is one."""
        trigger = self._first[0]
        if not self.is_lora:
            return f"""## {heading}

Copy `{FULL_CHECKPOINT_FILE}` to `models/Stable-diffusion/` and pick it as the checkpoint;
{self._embeddings_step("embeddings/")} and write `{trigger}` in the prompt."""
        if not self._has_kohya_files:
            return f"""## {heading}

No LoRA file for {tool} here (see Files); {self._embeddings_step("embeddings/")} and write `{trigger}` in the
prompt."""
        return None

    def _a1111(self) -> str:
        trigger = self._first[0]
        without_lora = self._webui_without_lora("AUTOMATIC1111", "A1111")
        if without_lora:
            return without_lora
        return f"""## AUTOMATIC1111

Copy `{self.name}.safetensors` to `models/Lora/`. The embeddings are bundled in it under the trigger words, so
write the LoRA tag and the trigger word in the prompt, e.g. `a photo of {trigger} <lora:{self.name}:1>`."""

    def _forge(self) -> str:
        trigger = self._first[0]
        without_lora = self._webui_without_lora("Forge", "Forge")
        if without_lora:
            return without_lora
        return f"""## Forge

Forge does not read embeddings bundled in a LoRA (and drops a LoRA with more than 12 keys it does not know), so
copy `{self._plain}.safetensors` to `models/Lora/`, {self._embeddings_step("embeddings/")}, and write e.g.
`a photo of {trigger} <lora:{self._plain}:1>`."""

    def _kohya(self) -> str:
        if not self.is_lora:
            return (f"## kohya sd-scripts\n\n`{FULL_CHECKPOINT_FILE}` is a checkpoint kohya's scripts take as "
                    f"`--pretrained_model_name_or_path`, e.g. to train a LoRA on this model.")
        if not self._has_kohya_files:
            return "## kohya sd-scripts\n\nNo kohya-layout LoRA here (see Files)."
        return f"""## kohya sd-scripts

Give `{self._plain}.safetensors` to `networks/sdxl_merge_lora.py` (`--models {self._plain}.safetensors`), to merge
it into a checkpoint or with other LoRAs. The bundled file makes that script fail, and a merge keeps no
embeddings: keep using the files in `{TRIGGER_EMBEDDINGS_DIR}/` with the merged model."""

    def _invokeai(self) -> str:
        trigger = self._first[0]
        if self._has_kohya_files:
            lora = (f"Install `{self._plain}.safetensors` as a LoRA (`{self.name}.safetensors` installs too, but "
                    "InvokeAI skips its bundled embeddings) and ")
        elif not self.is_lora:
            lora = f"Install `{FULL_CHECKPOINT_FILE}` as a main model and "
        else:
            lora = "Install "
        return f"""## InvokeAI

{lora}`{TRIGGER_EMBEDDINGS_DIR}/{trigger}.safetensors` as a textual inversion; write `<{trigger}>` in the prompt."""

    def _samples(self) -> str:
        images = "\n".join(f"![sample {i}]({link})" for i, link in enumerate(self.sample_links))
        return "## Samples\n\n" + (images or "No samples were rendered.")

    def _training(self) -> str:
        return (f"## Training\n\nEvery setting of this run, with the library versions, is in "
                f"`{TRAINING_CONFIG_FILE}`.\n\n{_settings_table(self.training_config)}").rstrip()


def _table_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _settings_table(training_config: dict) -> str:
    rows = [f"| `{key}` | `{_table_cell(value)}` |" for key, value in sorted(training_config.items())
            if isinstance(value, (str, int, float, bool))]
    return "\n".join(["| setting | value |", "| --- | --- |", *rows]) if rows else ""


def pack_tar(out_dir: Path, tar_path: Path) -> Path:
    """Pack every file under ``out_dir`` (paths relative to it) into ``tar_path``, atomically.

    The tar is written to a temporary file in ``tar_path``'s folder, fsynced and renamed; on any failure neither
    the tar nor the temporary file is left. Symlinks are refused (a tar of weights must hold only regular files).
    """
    out_dir = out_dir.resolve()
    tar_path = tar_path.resolve()
    if not out_dir.is_dir():
        raise ExportError(f"cannot pack {out_dir}: not a folder")
    files = _files_to_pack(out_dir, tar_path)
    if not files:
        raise ExportError(f"cannot pack {out_dir}: it holds no files")
    total = sum(f.stat().st_size for f in files)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar, \
                tqdm(total=total, unit="B", unit_scale=True, desc="packing tar", leave=False) as bar:
            for path in files:
                tar.add(path, arcname=path.relative_to(out_dir).as_posix(), recursive=False)
                bar.update(path.stat().st_size)

    try:
        _write_atomically(tar_path, write)
    except FileNotFoundError:
        raise ExportError(f"cannot write {tar_path}: its folder does not exist") from None
    except PermissionError:
        raise ExportError(f"cannot write {tar_path}: permission denied") from None
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(tar_path.parent).free
        raise ExportError(f"cannot write {tar_path}: out of disk space (the tar needs about {total} bytes, "
                          f"{free} are free there); free some disk space") from error
    return tar_path


def _files_to_pack(out_dir: Path, tar_path: Path) -> list[Path]:
    files = []
    for path in sorted(out_dir.rglob("*")):
        if path.is_symlink():
            raise ExportError(f"cannot pack {path}: symlinks are not packed")
        if path == tar_path or (path.parent == tar_path.parent and path.name.startswith(f".{tar_path.name}.")):
            continue
        if path.is_file():
            files.append(path)
    return files
