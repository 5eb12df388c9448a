"""Trained-weights fixtures for the predictor tests: tars in this project's layout (written by export.py) and in
replicate/cog-sdxl's layout, built on the tiny model, plus a local HTTP server with Range support and faults."""

from __future__ import annotations

import http.server
import json
import re
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import export
from lora_formats import UNetLayout

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two cores shared by many processes: one torch thread per process is far faster than oversubscribing (a
    64x64 tiny image: 0.2 s instead of 6-12 s under load), and the fresh-process references use the same count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY_TEXT_WIDTHS = {"clip_l": 32, "clip_g": 64}
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_unet():
    from diffusers import UNet2DConditionModel

    from tiny_models import ensure_tiny_sdxl

    return UNet2DConditionModel.from_pretrained(ensure_tiny_sdxl(), subfolder="unet")


def random_peft_lora(unet, seed: int, rank: int = 4, alpha: float = 4.0) -> dict[str, torch.Tensor]:
    """A real PEFT LoRA on the tiny UNet's attention projections, with random (non-zero) lora_A and lora_B."""
    from peft import LoraConfig, get_peft_model_state_dict

    generator = torch.Generator().manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ATTENTION_PROJECTIONS)),
                     adapter_name=f"fixture{seed}")
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if f".fixture{seed}." in name and ("lora_A" in name or "lora_B" in name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    state = get_peft_model_state_dict(unet, adapter_name=f"fixture{seed}")
    unet.delete_adapters(f"fixture{seed}")
    return {k: v.clone() for k, v in state.items()}


def random_embeddings(seed: int, n_tokens: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1000)
    return {k: torch.randn(n_tokens, width, generator=generator) for k, width in TINY_TEXT_WIDTHS.items()}


def write_trained_tar(folder: Path, seed: int, unet=None, trigger: str = "TOK") -> Path:
    """``folder/trained_model.tar`` as train() writes it (export.write_weight_files + pack_tar)."""
    unet = unet or tiny_unet()
    out = folder / f"out{seed}"
    export.write_weight_files(
        out, unet_lora_state=random_peft_lora(unet, seed), lora_alpha=4.0, embeddings=random_embeddings(seed),
        special_params={trigger: "<s0><s1>"}, training_config={"seed": seed},
        unet_layout=UNetLayout.from_unet_config(unet.config),
    )
    return export.pack_tar(out, folder / f"trained_model_{seed}.tar")


def write_cog_sdxl_tar(folder: Path, seed: int, unet=None) -> Path:
    """A tar in replicate/cog-sdxl's layout: ``lora.safetensors`` with LoRAAttnProcessor keys (``<attention>.processor.
    to_q_lora.down.weight``; rank from ``up``), ``embeddings.pti`` (``text_encoders_0/1``), ``special_params.json``."""
    unet = unet or tiny_unet()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not re.search(r"\.attn[12]$", name):
            continue
        for projection in ATTENTION_PROJECTIONS:
            layer = module.get_submodule(projection)
            key = f"{name}.processor.{projection.removesuffix('.0')}_lora"
            tensors[f"{key}.down.weight"] = torch.randn(4, layer.in_features, generator=generator) * 0.3
            tensors[f"{key}.up.weight"] = torch.randn(layer.out_features, 4, generator=generator) * 0.3
    out = folder / f"cog{seed}"
    out.mkdir(parents=True)
    save_file(tensors, out / "lora.safetensors")
    embeddings = random_embeddings(seed)
    save_file({"text_encoders_0": embeddings["clip_l"], "text_encoders_1": embeddings["clip_g"]}, out / "embeddings.pti")
    (out / "special_params.json").write_text(json.dumps({"TOK": "<s0><s1>"}))
    tar_path = folder / f"cog_sdxl_{seed}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for path in sorted(out.iterdir()):
            tar.add(path, arcname=path.name)
    return tar_path


class WeightsServer:
    """A local HTTP server for tars: ``/files/<name>`` honours Range; ``/drop/<name>`` cuts the connection half-way
    on the first request of each file (then serves ranges normally); ``/html`` is an error page; ``/short/<name>``
    announces more bytes than it sends without accepting ranges; ``/loop`` redirects to itself."""

    def __init__(self, folder: Path):
        server = self
        self.folder = folder
        self.requests: list[tuple[str, str | None]] = []
        self._dropped: set[str] = set()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                kind, _, name = self.path.lstrip("/").partition("/")
                if kind == "html":
                    return self._send(200, b"<html>Access denied</html>", "text/html")
                if kind == "loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                path = server.folder / name
                if not path.is_file():
                    return self._send(404, b"not found", "text/plain")
                data = path.read_bytes()
                if kind == "short":
                    return self._send(200, data[: len(data) // 2], "application/x-tar", length=len(data), ranges=False)
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                if kind == "drop" and name not in server._dropped:
                    server._dropped.add(name)
                    return self._send(200, data[: len(data) // 2], "application/x-tar", length=len(data))
                if match:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.send_header("Content-Length", str(len(data) - start))
                    self.send_header("Accept-Ranges", "bytes")
                    self.send_header("Content-Type", "application/x-tar")
                    self.end_headers()
                    self.wfile.write(data[start:])
                    return None
                return self._send(200, data, "application/x-tar")

            def _send(self, status: int, body: bytes, content_type: str, length: int | None = None,
                      ranges: bool = True) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                if ranges:
                    self.send_header("Accept-Ranges", "bytes")
                if length is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                if length is not None:
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> WeightsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"
