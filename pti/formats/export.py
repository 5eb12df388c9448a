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

import safetensors.torch
from torch import Tensor
from tqdm import tqdm

from pti.formats import lora_formats, sgm_checkpoint
from pti.formats.lora_formats import UNetLayout
from pti.formats.sgm_checkpoint import FULL_CHECKPOINT_FILE

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
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


def kohya_metadata(lora: lora_formats.PeftLora, *, name: str, special_params: dict[str, str]) -> dict[str, str]:
    """safetensors metadata read by A1111/Forge (``ss_*``), ComfyUI and model hubs (``modelspec.*``)."""
    adapter = lora_formats.peft_adapter_metadata(lora)
    triggers = list(special_params)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter["r"]),
        "ss_network_alpha": str(adapter["lora_alpha"]),
        "ss_base_model_version": SDXL_BASE_VERSION,
        "ss_v2": "False",
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
    if lora.use_dora:
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True"})
    return meta


def kohya_state(lora: lora_formats.PeftLora, embeddings: dict[str, Tensor], special_params: dict[str, str],
                layout: UNetLayout) -> dict[str, Tensor]:
    """The tensors of ``<name>.safetensors``: kohya UNet LoRA keys plus ``bundle_emb.<trigger>.clip_l/clip_g``."""
    return {**lora_formats.peft_to_kohya(lora, layout),
            **lora_formats.split_embeddings_by_trigger(embeddings, special_params)}


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
                       full_checkpoint_state: dict[str, Tensor] | None = None) -> None:
    """Write the weight files of the artifact contract into ``out_dir`` (created if missing).

    LoRA run: ``pytorch_lora_weights.safetensors`` and ``<name>.safetensors``; full fine-tune
    (``full_checkpoint_state``, the tensors of :func:`sgm_checkpoint.sgm_state`): ``sdxl_checkpoint.safetensors``,
    a single-file SDXL checkpoint in the SGM layout. Always ``embeddings.safetensors``, ``special_params.json`` and
    ``training_config.json`` (with library versions added). ``unet_layout`` is the trained UNet's block structure,
    ``UNetLayout.from_unet_config(unet.config)``, which names the kohya keys.
    """
    if (unet_lora_state is None) == (full_checkpoint_state is None):
        raise ExportError("give exactly one of unet_lora_state (LoRA run) and full_checkpoint_state (full fine-tune)")
    _check_name(name)
    _check_embeddings(embeddings, special_params)
    if unet_lora_state is not None:
        unet_files = _lora_files(unet_lora_state, lora_alpha, embeddings, special_params, name, unet_layout)
        kohya_tensors, kohya_meta = unet_files[f"{name}.safetensors"]
        unet_files[f"{name}.safetensors"] = (kohya_tensors, {**kohya_meta, **base_model_metadata(training_config)})
    else:
        metadata = sgm_checkpoint.checkpoint_metadata(name, list(special_params))
        unet_files = {FULL_CHECKPOINT_FILE: (full_checkpoint_state, metadata)}
    config = {**training_config, "library_versions": library_versions()}
    json.dumps(config, default=_json_value)  # refuse an unwritable config before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    for filename, (tensors, metadata) in unet_files.items():
        _write_safetensors(out_dir / filename, tensors, metadata)
    _write_safetensors(out_dir / EMBEDDINGS_FILE, embeddings)
    _write_json(out_dir / SPECIAL_PARAMS_FILE, special_params)
    _write_json(out_dir / TRAINING_CONFIG_FILE, config)


SafetensorsFile = tuple[dict[str, Tensor], dict[str, str] | None]


def _lora_files(state: dict[str, Tensor], lora_alpha: float | None, embeddings: dict[str, Tensor],
                special_params: dict[str, str], name: str, layout: UNetLayout) -> dict[str, SafetensorsFile]:
    """The diffusers file and the one-file kohya LoRA, by file name."""
    if lora_alpha is None:
        raise ExportError("lora_alpha is required with unet_lora_state (the LoraConfig's lora_alpha)")
    try:
        lora = lora_formats.peft_lora(state, lora_alpha)
        kohya = kohya_state(lora, embeddings, special_params, layout)
    except lora_formats.LoraFormatError as err:
        raise ExportError(f"cannot export the UNet LoRA: {err}") from None
    return {
        DIFFUSERS_LORA_FILE: lora_formats.peft_to_diffusers_file(lora),
        f"{name}.safetensors": (kohya, kohya_metadata(lora, name=name, special_params=special_params)),
    }


def write_model_card(out_dir: Path, *, special_params: dict[str, str], base_model: str, name: str,
                     sample_images: list[Path], training_config: dict) -> Path:
    """Write ``README.md`` (after :func:`write_weight_files`): trigger words, loading code for diffusers,
    ComfyUI and A1111/Forge, sample images (which must lie inside ``out_dir``)."""
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
    card = ModelCard(special_params, base_model, name, links, training_config, is_lora)
    path = out_dir / MODEL_CARD_FILE
    _write_text(path, card.text())
    return path


@dataclass(frozen=True)
class ModelCard:
    special_params: dict[str, str]
    base_model: str
    name: str
    sample_links: list[str]
    training_config: dict
    is_lora: bool

    def text(self) -> str:
        return "\n\n".join([self._front_matter(), self._intro(), self._files(), self._diffusers(), self._comfyui(),
                             self._a1111(), self._samples(), self._training()]) + "\n"

    @property
    def _tokens(self) -> list[str]:
        return all_tokens(self.special_params)

    @property
    def _first(self) -> tuple[str, str]:
        return next(iter(self.special_params.items()))

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

With this repository's predictor and in A1111/Forge write the trigger word in the prompt; in diffusers write its
tokens; in ComfyUI see below.

| trigger word | tokens |
| --- | --- |
{rows}"""

    def _files(self) -> str:
        rows = [f"| `{DIFFUSERS_LORA_FILE}` | UNet weights for diffusers |" if self.is_lora else
                f"| `{FULL_CHECKPOINT_FILE}` | the whole SDXL model, single-file SGM layout, fp16 (A1111/Forge, "
                "ComfyUI, diffusers `from_single_file`) |",
                f"| `{EMBEDDINGS_FILE}` | new-token embeddings: `clip_l` (first text encoder), `clip_g` (second), "
                f"one row per token `{''.join(self._tokens)}` |"]
        if self.is_lora:
            rows.append(f"| `{self.name}.safetensors` | one-file LoRA for A1111/Forge, ComfyUI and kohya tools, "
                        "embeddings bundled |")
        rows += [f"| `{SPECIAL_PARAMS_FILE}` | trigger word → tokens |",
                 f"| `{TRAINING_CONFIG_FILE}` | every training setting and library versions |"]
        return "## Files\n\n| file | what |\n| --- | --- |\n" + "\n".join(rows)

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

    def _comfyui(self) -> str:
        lora = (f"Copy `{self.name}.safetensors` to `ComfyUI/models/loras/` and add a *Load LoRA* node after the "
                "checkpoint loader. " if self.is_lora else
                f"Copy `{FULL_CHECKPOINT_FILE}` to `ComfyUI/models/checkpoints/` and pick it in *Load Checkpoint*. ")
        return f"""## ComfyUI

{lora}Copy `{EMBEDDINGS_FILE}` to `ComfyUI/models/embeddings/{self.name}.safetensors` and write `embedding:{self.name}`
in the prompt where the trigger word goes; it inserts all tokens, `{''.join(self._tokens)}`."""

    def _a1111(self) -> str:
        if not self.is_lora:
            return (f"## AUTOMATIC1111 / Forge\n\nCopy `{FULL_CHECKPOINT_FILE}` to `models/Stable-diffusion/` and "
                    f"`{EMBEDDINGS_FILE}` to `embeddings/{self.name}.safetensors`; write `{self.name}` in the prompt "
                    "where the trigger word goes.")
        trigger = self._first[0]
        return f"""## AUTOMATIC1111 / Forge

Copy `{self.name}.safetensors` to `models/Lora/`. The embeddings are bundled in it under the trigger words, so
write the LoRA tag and the trigger word in the prompt, e.g. `a photo of {trigger} <lora:{self.name}:1>`."""

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
