"""The weights cache (fetch, verify, evict) and live switching of trained weights on the tiny SDXL pipeline."""

from __future__ import annotations

import base64
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pti.formats import export
from pti.inference import weights_cache as wc
import weights_manager as wm
from pti.formats import lora_formats
from pti.formats.lora_formats import UNetLayout
from exactness import assert_images_close, assert_same_state, effective_state, images_differ
from misbehaving_server import MisbehavingServer
from weights_fixtures import one_torch_thread  # noqa: F401  (autouse fixture)
from weights_fixtures import random_embeddings, random_peft_lora, tiny_unet, write_cog_sdxl_tar, \
    write_trained_tar
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tars")
    unet = tiny_unet()
    return {"a": write_trained_tar(folder, 1, unet), "b": write_trained_tar(folder, 2, unet),
            "c": write_trained_tar(folder, 3, unet), "cog": write_cog_sdxl_tar(folder, 4, unet)}


@pytest.fixture(scope="module")
def server(tars):
    with MisbehavingServer(next(iter(tars.values())).parent) as running:
        yield running


def settings(tmp_path: Path, **overrides) -> wc.WeightsSettings:
    return wc.WeightsSettings(cache_dir=tmp_path / "cache", min_free_bytes=0, **{"allow_local_paths": True, **overrides})


def leftovers(cache: wc.WeightsCache) -> list[str]:
    return sorted(p.name for p in cache.root.iterdir())


def data_uri(path: Path) -> str:
    return "data:application/x-tar;base64," + base64.b64encode(path.read_bytes()).decode()


# ---------------------------------------------------------------------------------------------- cache


def test_fetch_by_path_data_uri_and_url_gives_same_files_and_url_is_cached(tmp_path, tars, server):
    cache = wc.WeightsCache(settings(tmp_path))
    folders = [cache.ensure(str(tars["a"])), cache.ensure(data_uri(tars["a"])), cache.ensure(server.url("files/" + tars["a"].name))]
    for folder in folders:
        assert (folder / wc.OUR_LORA).read_bytes() == (folders[0] / wc.OUR_LORA).read_bytes()
        assert wm.read_special_params(folder, "x") == {"TOK": "<s0><s1>"}
    hits_before = len(server.requests)
    assert cache.ensure(server.url("files/" + tars["a"].name)) == folders[2]
    assert len(server.requests) == hits_before, "a cached URL is not downloaded again"
    assert len(cache.entries()) == 3


def test_dropped_connection_resumes_with_range(tmp_path, tars, server):
    cache = wc.WeightsCache(settings(tmp_path))
    folder = cache.ensure(server.url("drop-once/" + tars["b"].name))
    ranges = [rng for path, rng in server.requests if path == "/drop-once/" + tars["b"].name]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert wm.read_trained_weights(folder).lora is not None


def _not_a_tar(tmp: Path) -> Path:
    path = tmp / "notes.tar"
    path.write_text("just some text\n" * 100)
    return path


def _tar_without_weights(tmp: Path) -> Path:
    path = tmp / "photos.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("readme.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    return path


def _truncated_tar(tmp: Path, whole: Path) -> Path:
    path = tmp / "truncated.tar"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


BAD_SOURCE_MESSAGES = {
    "http404": "HTTP 404",
    "html": "server sent an HTML page",
    "short": "download failed after \\d+ attempts",  # the body stops early on every retry
    "redirect_loop": "more than \\d+ redirects",
    "not_a_tar": "not a valid trained-weights tar",
    "no_weight_files": "tar holds none of",
    "truncated": "not a valid trained-weights tar",
    "bad_data_uri": "payload is not valid base64",
    "missing_path": "no such file or folder",
}


@pytest.mark.parametrize("case", BAD_SOURCE_MESSAGES)
def test_bad_sources_are_one_line_errors_and_leave_nothing(tmp_path, tars, server, case):
    served = tmp_path / "served"
    served.mkdir()
    sources = {
        "http404": lambda: server.url("files/nothing.tar"),
        "html": lambda: server.url("html"),
        "short": lambda: server.url("short/" + tars["a"].name),
        "redirect_loop": lambda: server.url("loop"),
        "not_a_tar": lambda: str(_not_a_tar(served)),
        "no_weight_files": lambda: str(_tar_without_weights(served)),
        "truncated": lambda: str(_truncated_tar(served, tars["a"])),
        "bad_data_uri": lambda: "data:application/x-tar;base64,@@@not base64@@@",
        "missing_path": lambda: str(tmp_path / "missing.tar"),
    }
    cache = wc.WeightsCache(settings(tmp_path))
    with pytest.raises(wc.WeightsError, match=BAD_SOURCE_MESSAGES[case]) as error:
        cache.ensure(sources[case]())
    message = str(error.value)
    assert "\n" not in message and len(message) < 300, message
    assert cache.entries() == [] and leftovers(cache) == []


def test_lru_eviction_keeps_budget_and_never_evicts_pinned(tmp_path, tars):
    entry_bytes = wc._folder_bytes(wc.WeightsCache(settings(tmp_path / "probe")).ensure(str(tars["a"])))
    cache = wc.WeightsCache(settings(tmp_path, max_cache_bytes=int(entry_bytes * 2.5)))
    a, b = cache.ensure(str(tars["a"])), cache.ensure(str(tars["b"]))
    cache.ensure(str(tars["a"]))  # a is now the most recently used
    cache.ensure(str(tars["c"]))
    assert a.is_dir() and not b.is_dir(), "the least recently used entry (b) is evicted"
    assert cache.total_bytes() <= cache.settings.max_cache_bytes
    cache.pinned.add(wc.cache_key(str(tars["a"])))  # a in use, and least recently used now
    cache.ensure(str(tars["b"]))
    assert a.is_dir(), "the pinned entry survives"
    assert cache.total_bytes() <= cache.settings.max_cache_bytes


def test_free_disk_floor_refuses_with_one_line(tmp_path, tars):
    cache = wc.WeightsCache(settings(tmp_path))
    cache.settings = wc.WeightsSettings(cache_dir=cache.root, min_free_bytes=2**62, allow_local_paths=True)
    with pytest.raises(wc.WeightsError, match="no room"):
        cache.ensure(str(tars["a"]))
    assert leftovers(cache) == []


def test_reads_cog_sdxl_layout(tmp_path, tars):
    folder = wc.WeightsCache(settings(tmp_path)).ensure(str(tars["cog"]))
    weights = wm.read_trained_weights(folder)
    assert weights.tokens == ["<s0>", "<s1>"] and weights.special_params == {"TOK": "<s0><s1>"}
    assert any(m.endswith("attn1.to_out.0") for m in weights.lora.modules)
    assert set(weights.lora.ranks.values()) == {4}


def test_trigger_words_are_replaced_whole_word_only():
    params = {"TOK": "<s0><s1>"}
    assert wm.expand_triggers("a photo of TOK, TOK.", params) == ("a photo of <s0><s1>, <s0><s1>.", True)
    assert wm.expand_triggers("TOKEN of STOK", params) == ("TOKEN of STOK", False)


# ---------------------------------------------------------------------------------------------- live switching


@pytest.fixture(scope="module")
def pipe():
    from pti.models.base_model import load_sdxl_pipeline, pick_runtime

    return load_sdxl_pipeline("tiny", pick_runtime("fp32", "cpu"))


def render(pipe, prompt: str = "a photo of <s0><s1> dog") -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(7)
    return pipe(prompt, width=64, height=64, num_inference_steps=2, generator=generator, output_type="np").images[0]


@pytest.fixture
def manager(tmp_path, pipe):
    manager = wm.WeightsManager([pipe], settings(tmp_path, max_loaded_adapters=2))
    yield manager
    manager.use(None, 1.0)
    for entry in list(manager.live.loaded.values()):
        if entry.adapter:
            pipe.unet.delete_adapters(entry.adapter)


def test_base_after_weights_is_exactly_base_and_tokens_are_gone(manager, pipe, tars):
    base, base_state = render(pipe), effective_state(pipe)
    base_ids = pipe.tokenizer("<s0>").input_ids
    manager.use(str(tars["a"]), 0.6)
    assert pipe.tokenizer("<s0>").input_ids != base_ids, "the new token is known while the weights are active"
    assert effective_state(pipe) != base_state
    with_a = render(pipe)
    manager.use(None, 0.6)
    assert pipe.tokenizer("<s0>").input_ids == base_ids
    assert_same_state(effective_state(pipe), base_state, "base after weights")
    assert images_differ(with_a, base)
    assert_images_close(render(pipe), base)


def test_switching_between_loaded_adapters_does_not_touch_disk(manager, pipe, tars, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for name in ("a", "b"):
        shutil.copy(tars[name], served / tars[name].name)
    with MisbehavingServer(served) as source:
        urls = {name: source.url("files/" + tars[name].name) for name in ("a", "b")}
        manager.use(urls["a"], 0.6)
        first_a, first_a_state = render(pipe), effective_state(pipe)
        manager.use(urls["b"], 0.6)
        downloads = len(source.requests)
        shutil.rmtree(served)  # neither the source ...
        shutil.rmtree(manager.cache.root)
        manager.cache.root.write_text("not a folder")  # ... nor the cache can be read, even by root
        try:
            manager.use(urls["a"], 0.6)
            assert len(source.requests) == downloads
        finally:
            manager.cache.root.unlink()
    assert_same_state(effective_state(pipe), first_a_state, "A after B")
    assert_images_close(render(pipe), first_a)


def test_loaded_adapters_are_bounded(manager, pipe, tars):
    for name in ("a", "b", "c"):
        manager.use(str(tars[name]), 0.6)
    assert len(pipe.unet.peft_config) == 2 and len(manager.live.loaded) == 2


def test_lora_for_another_base_model_is_refused_and_base_kept(manager, pipe, tmp_path):
    base, base_state = render(pipe), effective_state(pipe)
    unet = tiny_unet()
    state = random_peft_lora(unet, 9)
    wrong = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v) for k, v in state.items()}
    out = tmp_path / "wrong"
    export.write_weight_files(out, unet_lora_state=wrong, lora_alpha=4.0, embeddings=random_embeddings(9),
                              special_params={"TOK": "<s0><s1>"}, training_config={},
                              unet_layout=UNetLayout.from_unet_config(unet.config))
    with pytest.raises(wc.WeightsError, match="another base model") as error:
        manager.use(str(out), 0.6)
    assert "\n" not in str(error.value)
    assert_same_state(effective_state(pipe), base_state, "base after a refused LoRA")
    assert_images_close(render(pipe), base)
    assert not getattr(pipe.unet, "peft_config", {})


def test_cancelled_load_rolls_back_to_base_and_retry_works(manager, pipe, tars, monkeypatch):
    base, base_state = render(pipe), effective_state(pipe)
    real_load = wm.LiveWeights._load_adapter

    def load_then_cancel(self, adapter, lora, label):
        real_load(self, adapter, lora, label)  # the adapter is in the UNet, not yet registered
        raise KeyboardInterrupt("cancelled")

    monkeypatch.setattr(wm.LiveWeights, "_load_adapter", load_then_cancel)
    with pytest.raises(KeyboardInterrupt):
        manager.use(str(tars["a"]), 0.6)
    assert manager.active is None and not getattr(pipe.unet, "peft_config", {})
    assert_same_state(effective_state(pipe), base_state, "base after a cancelled load")
    assert_images_close(render(pipe), base)
    monkeypatch.setattr(wm.LiveWeights, "_load_adapter", real_load)
    manager.use(str(tars["a"]), 0.6)
    assert images_differ(render(pipe), base)


def test_prompt_without_trigger_word_works_and_warns_once(manager, pipe, tars, caplog):
    manager.use(str(tars["a"]), 0.6)
    with caplog.at_level("WARNING", logger="weights_manager"):
        assert manager.expand_prompt("a photo of a dog") == "a photo of a dog"
        assert manager.expand_prompt("a photo of a cat") == "a photo of a cat"
        assert manager.expand_prompt("a photo of TOK") == "a photo of <s0><s1>"
    assert len([r for r in caplog.records if "trigger words" in r.message]) == 1


def test_embeddings_for_another_base_model_are_refused(manager, pipe, tmp_path):
    unet = tiny_unet()
    out = tmp_path / "wide"
    export.write_weight_files(out, unet_lora_state=random_peft_lora(unet, 5), lora_alpha=4.0,
                              embeddings={"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)},
                              special_params={"TOK": "<s0><s1>"}, training_config={},
                              unet_layout=UNetLayout.from_unet_config(unet.config))
    with pytest.raises(wc.WeightsError, match="clip_l embeddings have shape"):
        manager.use(str(out), 0.6)
    assert manager.active is None and not getattr(pipe.unet, "peft_config", {})


def test_full_unet_weights_apply_and_restore_exactly(manager, pipe, tars, tmp_path):
    base, base_state = render(pipe), effective_state(pipe)
    from diffusers import StableDiffusionXLPipeline

    from pti.formats.sgm_checkpoint import SdxlShape, sgm_state
    from pti.models.tiny_models import ensure_tiny_sdxl

    fresh = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_sdxl())
    generator = torch.Generator().manual_seed(3)
    full = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if ".attn2." in k and k.endswith("weight") else v
            for k, v in fresh.unet.state_dict().items()}
    checkpoint = sgm_state(unet=full, vae=fresh.vae.state_dict(), text_encoder=fresh.text_encoder.state_dict(),
                           text_encoder_2=fresh.text_encoder_2.state_dict(),
                           shape=SdxlShape.from_configs(fresh.unet.config, fresh.vae.config),
                           vocab_rows=(len(fresh.tokenizer), len(fresh.tokenizer_2)))
    out = tmp_path / "full"
    export.write_weight_files(out, unet_lora_state=None, lora_alpha=None, embeddings=random_embeddings(3),
                              special_params={"TOK": "<s0><s1>"}, training_config={},
                              unet_layout=UNetLayout.from_unet_config(fresh.unet.config),
                              full_checkpoint_state=checkpoint)
    manager.use(str(tars["a"]), 0.6)
    with_a, a_state = render(pipe), effective_state(pipe)
    manager.use(str(out), 0.6)
    with_full = render(pipe)
    assert images_differ(with_full, base) and images_differ(with_full, with_a)
    manager.use(str(tars["a"]), 0.6)
    assert_same_state(effective_state(pipe), a_state, "LoRA weights after full weights: the full weights are undone")
    assert_images_close(render(pipe), with_a)
    manager.use(None, 0.6)
    assert_same_state(effective_state(pipe), base_state, "base after full weights")
    assert_images_close(render(pipe), base)


# ---------------------------------------------------------------------------------------------- bare LoRA files


@pytest.fixture(scope="module")
def bare_files(tmp_path_factory) -> dict[str, Path]:
    """Bare .safetensors LoRAs as civitai and the Hugging Face hub serve them, in half precision: a kohya file with
    SGM names and bundled embeddings (our one-file LoRA), a kohya file without them, a diffusers file."""
    folder = tmp_path_factory.mktemp("bare")
    unet = tiny_unet()
    layout = UNetLayout.from_unet_config(unet.config)
    lora = lora_formats.peft_lora(random_peft_lora(unet, 11), lora_alpha=8.0)
    half = lambda tensors: {k: v.half() if not k.endswith(".alpha") else v for k, v in tensors.items()}  # noqa: E731
    kohya = lora_formats.peft_to_kohya(lora, layout)
    bundle = {**kohya, **lora_formats.split_embeddings_by_trigger(random_embeddings(11), {"TOK": "<s0><s1>"})}
    tensors, metadata = lora_formats.peft_to_diffusers_file(lora)
    save_file(half(bundle), folder / "kohya_bundle.safetensors")
    save_file(half(kohya), folder / "kohya.safetensors")
    save_file(half(tensors), folder / "diffusers.safetensors", metadata=metadata)
    generator = torch.Generator().manual_seed(12)
    text_encoder = {  # the tiny first text encoder's fc1 is 32 -> 64
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 32, generator=generator),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(64, 4, generator=generator),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}  # SD 1.x: left out
    save_file(half({**kohya, **text_encoder}), folder / "with_text_encoder.safetensors")
    return {path.stem: path for path in folder.iterdir()}


@pytest.mark.parametrize("how", ["path", "url"])
def test_bare_kohya_and_diffusers_loras_load_change_the_image_and_unload_exactly(manager, pipe, bare_files, how):
    """Each bare file as replicate_weights and as extra_lora[0] (its trigger word then expands to that set's own
    tokens): the same image either way, different from the base, and the base back exactly after."""
    base, base_state = render(pipe), effective_state(pipe)
    with MisbehavingServer(bare_files["kohya"].parent) as server:
        images = {}
        for name in ("kohya", "diffusers", "kohya_bundle"):
            source = str(bare_files[name]) if how == "path" else server.url("files/" + bare_files[name].name)
            (active,) = manager.use(source, 0.6)
            images[name] = render(pipe, manager.expand_prompt("a photo of TOK dog"))
            assert images_differ(images[name], base), name
            (extra,) = manager.use(None, 0.6, extras=[(source, 0.6)])
            assert_images_close(render(pipe, manager.expand_prompt("a photo of TOK dog")), images[name])
            manager.use(None, 0.6)
            assert_same_state(effective_state(pipe), base_state, f"base after the bare {name} file")
            assert_images_close(render(pipe), base)
    assert active.special_params == {"TOK": "<s0><s1>"}, "the bundled embeddings bring their trigger word"
    assert extra.special_params == {"TOK": "<x0s0><x0s1>"}, "as extra_lora[0], under that set's own token names"
    assert_images_close(images["kohya"], images["diffusers"])  # the same LoRA in two layouts
    assert images_differ(images["kohya_bundle"], images["kohya"]), "the bundled embeddings take part"


def test_bare_lora_with_text_encoder_layers_applies_them_too_and_unloads_exactly(manager, pipe, bare_files, caplog):
    """Many civitai SDXL LoRAs carry text-encoder layers (kohya lora_te1_/lora_te2_): the predictor applies them with
    the UNet part, so the image differs from the file without them; keys of SD 1.x's lora_te_ layout are left out
    with a one-line warning; unloading restores the base exactly."""
    base, base_state = render(pipe), effective_state(pipe)
    manager.use(str(bare_files["kohya"]), 0.6)
    unet_only = render(pipe)
    with caplog.at_level("WARNING", logger="weights_manager"):
        manager.use(str(bare_files["with_text_encoder"]), 0.6)
    warnings = [r.getMessage() for r in caplog.records if "text-encoder" in r.getMessage()]
    assert len(warnings) == 1 and "1 text-encoder LoRA keys skipped" in warnings[0] and "\n" not in warnings[0]
    with_text_encoder = render(pipe)
    assert images_differ(with_text_encoder, base) and images_differ(with_text_encoder, unet_only)
    module = pipe.text_encoder.get_submodule("encoder.layers.0.mlp.fc1")
    (adapter,) = module.active_adapters
    assert module.scaling[adapter] == pytest.approx(0.6 * 4.0 / 4), "lora_scale times alpha/rank"
    manager.use(None, 0.6)
    assert_same_state(effective_state(pipe), base_state, "base after a bare file with text-encoder layers")
