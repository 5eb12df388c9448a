"""Artifacts written by export.py, read back with the public consumer API of diffusers on the tiny SDXL."""

from __future__ import annotations

import json
import os
import tarfile

import diffusers
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from threads import TORCH_THREADS
from exactness import assert_images_close, assert_same_state, effective_state
from weights_fixtures import cog_sdxl_lora_by_hand
from pti.formats import export
from pti.formats import lora_formats
from pti.models.base_model import load_sdxl_pipeline, pick_runtime

SPECIAL = {"TOK": "<s0><s1>", "STY": "<s2>"}
TOKENS = ["<s0>", "<s1>", "<s2>"]
PROMPT = "a photo of <s0><s1> in <s2> style"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONFIG = {"max_train_steps": 10, "rank": 4, "lora_alpha": 8, "base_model": "tiny", "seed": 1}


def render(pipe, prompt: str = PROMPT) -> np.ndarray:
    return pipe(prompt, num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def render_with_lora(pipe, source) -> np.ndarray:
    """The image with ``source`` loaded through ``load_lora_weights``; the LoRA is unloaded again afterwards."""
    pipe.load_lora_weights(source)
    try:
        return render(pipe)
    finally:
        pipe.unload_lora_weights()


def assert_back_to_base(pipe, exported) -> None:
    """Unloading restored the base model: its state bit for bit, its image up to kernel-choice noise."""
    assert_same_state(effective_state(pipe), exported["base_state"], "after unloading")
    assert_images_close(render(pipe), exported["base"])


def train_fake_adapter(pipe, name: str, use_dora: bool) -> dict[str, torch.Tensor]:
    """A real PEFT adapter on the UNet with random non-zero lora_B (what training leaves)."""
    with torch.random.fork_rng(devices=[]):  # lora_A's gaussian init draws from the global RNG: the same each run
        torch.manual_seed(0)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian",
                                         use_dora=use_dora), adapter_name=name)
    pipe.unet.set_adapter(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in pipe.unet.named_parameters():
            if "lora_B" in param_name and f".{name}." in param_name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return get_peft_model_state_dict(pipe.unet, adapter_name=name)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine thread contention makes each small op
    several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return load_sdxl_pipeline("tiny", pick_runtime("fp32", "cpu"))


@pytest.fixture(scope="module")
def embeddings(pipe):
    g = torch.Generator().manual_seed(2)
    widths = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    return {name: torch.randn(3, w, generator=g) for name, w in zip(("clip_l", "clip_g"), widths)}


@pytest.fixture(scope="module")
def exported(pipe, embeddings, tmp_path_factory):
    """Base image, the image with the trained adapter in memory, and the written artifact folder."""
    base, base_state = render(pipe), effective_state(pipe)
    state = train_fake_adapter(pipe, "trained", use_dora=False)
    trained = render(pipe)
    pipe.unet.delete_adapters("trained")
    assert_back_to_base(pipe, {"base": base, "base_state": base_state})
    out = tmp_path_factory.mktemp("export") / "my_lora"
    layout = lora_formats.UNetLayout.from_unet_config(pipe.unet.config)
    export.write_weight_files(out, unet_lora_state=state, lora_alpha=8, embeddings=embeddings,
                              special_params=SPECIAL, training_config=CONFIG, unet_layout=layout, name="my_lora",
                              save_precision="fp32")  # exact round trips; test_save_precision covers fp16/bf16
    (out / "samples").mkdir()
    Image.fromarray((trained * 255).astype(np.uint8)).save(out / "samples" / "0.png")
    export.write_model_card(out, special_params=SPECIAL, base_model="stabilityai/stable-diffusion-xl-base-1.0",
                            name="my_lora", sample_images=[out / "samples" / "0.png"], training_config=CONFIG)
    return {"base": base, "base_state": base_state, "trained": trained, "out": out, "state": state, "layout": layout}


def test_all_contract_files_are_written(exported):
    out = exported["out"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "embeddings.safetensors", "embeddings/STY.safetensors", "embeddings/TOK.safetensors",
        "my_lora.safetensors", "my_lora_kohya.safetensors", "pytorch_lora_weights.safetensors",
        "samples/0.png", "special_params.json", "training_config.json"]
    assert json.loads((out / "special_params.json").read_text()) == SPECIAL
    config = json.loads((out / "training_config.json").read_text())
    assert config["max_train_steps"] == 10
    assert config["library_versions"]["diffusers"] == diffusers.__version__
    assert config["library_versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_diffusers_file_loads_and_unloads_exactly(pipe, exported):
    loaded = render_with_lora(pipe, exported["out"])
    assert not np.allclose(loaded, exported["base"], atol=1e-2)
    np.testing.assert_allclose(loaded, exported["trained"], atol=1e-5)  # alpha 8 / rank 4 kept via metadata
    assert_back_to_base(pipe, exported)


def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(pipe, exported):
    kohya = load_file(exported["out"] / "my_lora.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)  # SGM names, as A1111/ComfyUI expect
    loaded = render_with_lora(pipe, lora_formats.kohya_file_for_diffusers(kohya, exported["layout"]))
    np.testing.assert_allclose(loaded, exported["trained"], atol=1e-5)
    assert_back_to_base(pipe, exported)


def test_kohya_file_holds_exactly_the_trained_tensors_and_bundled_embeddings(exported, embeddings):
    kohya = load_file(exported["out"] / "my_lora.safetensors")
    back = lora_formats.kohya_to_peft(kohya, exported["layout"])
    assert back.state.keys() == exported["state"].keys()
    assert all(torch.equal(back.state[k], v) for k, v in exported["state"].items())
    assert set(back.alphas.values()) == {8.0}
    assert torch.equal(kohya["bundle_emb.TOK.clip_l"], embeddings["clip_l"][:2])
    assert torch.equal(kohya["bundle_emb.TOK.clip_g"], embeddings["clip_g"][:2])
    assert torch.equal(kohya["bundle_emb.STY.clip_g"], embeddings["clip_g"][2:])


def test_plain_kohya_file_is_the_bundle_without_its_embeddings(exported):
    bundle = load_file(exported["out"] / "my_lora.safetensors")
    plain = load_file(exported["out"] / "my_lora_kohya.safetensors")
    assert set(bundle) - set(plain) == {f"bundle_emb.{t}.{n}" for t in SPECIAL for n in ("clip_l", "clip_g")}
    assert all(torch.equal(plain[k], bundle[k]) for k in plain)
    with safe_open(exported["out"] / "my_lora_kohya.safetensors", "pt") as f:
        assert f.metadata()["ss_output_name"] == "my_lora_kohya"


def test_per_trigger_embedding_files_hold_that_triggers_rows_only(exported, embeddings):
    for trigger, rows in (("TOK", slice(0, 2)), ("STY", slice(2, 3))):
        tables = load_file(exported["out"] / "embeddings" / f"{trigger}.safetensors")
        assert set(tables) == {"clip_l", "clip_g"}
        assert all(torch.equal(tables[k], embeddings[k][rows]) for k in tables)


def test_per_trigger_embedding_loads_alone_in_diffusers_and_matches_the_full_file(pipe, exported):
    """STY's file alone, loaded as the token <s2>, renders as the full embeddings file does for a prompt with <s2>
    only: one trigger can be used without the others."""
    prompt = "a photo in <s2> style"

    def render_with(tables: dict[str, torch.Tensor], tokens: list[str]) -> np.ndarray:
        encoders = ((pipe.text_encoder, pipe.tokenizer, "clip_l"), (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g"))
        for encoder, tokenizer, key in encoders:
            pipe.load_textual_inversion(tables[key], token=tokens, text_encoder=encoder, tokenizer=tokenizer)
        try:
            return render(pipe, prompt)
        finally:
            for encoder, tokenizer, _ in encoders:
                pipe.unload_textual_inversion(tokens=tokens, text_encoder=encoder, tokenizer=tokenizer)

    alone = render_with(load_file(exported["out"] / "embeddings" / "STY.safetensors"), ["<s2>"])
    full = render_with(load_file(exported["out"] / "embeddings.safetensors"), TOKENS)
    assert_images_close(alone, full)
    assert not np.allclose(alone, render(pipe, prompt), atol=1e-2)
    assert_back_to_base(pipe, exported)


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision_writes_half_size_weights_that_still_load(pipe, exported, embeddings, tmp_path, precision,
                                                                 dtype):
    export.write_weight_files(tmp_path, unet_lora_state=exported["state"], lora_alpha=8, embeddings=embeddings,
                              special_params=SPECIAL, training_config=CONFIG, unet_layout=exported["layout"],
                              name="my_lora", save_precision=precision)
    for path in tmp_path.rglob("*.safetensors"):
        for key, value in load_file(path).items():
            assert value.dtype == (torch.float32 if key.endswith(".alpha") else dtype), (path.name, key)
    fp32_bytes = (exported["out"] / "pytorch_lora_weights.safetensors").stat().st_size
    assert (tmp_path / "pytorch_lora_weights.safetensors").stat().st_size < 0.6 * fp32_bytes
    written = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(written["unet." + k], v.to(dtype)) for k, v in exported["state"].items())  # a cast
    loaded = render_with_lora(pipe, tmp_path)  # the fp32 pipeline upcasts the half-precision LoRA
    # Against the trained image itself no tolerance holds: this fake LoRA moves pixels by up to 0.8, and 2 denoising
    # steps of the tiny UNet turn bf16's rounding into image errors from 0.005 to 0.1 depending on the draw
    # (measured over 12 seeds). What must hold is that the file applies exactly the rounded weights.
    rounded = tmp_path / "rounded"
    export.write_weight_files(rounded, unet_lora_state={k: v.to(dtype).float() for k, v in exported["state"].items()},
                              lora_alpha=8, embeddings=embeddings, special_params=SPECIAL, training_config=CONFIG,
                              unet_layout=exported["layout"], name="my_lora", save_precision="fp32")
    assert_images_close(loaded, render_with_lora(pipe, rounded), "the half-precision file is its weights")
    assert not np.allclose(loaded, exported["base"], atol=1e-2)
    assert_back_to_base(pipe, exported)


def test_kohya_file_metadata(exported):
    with safe_open(exported["out"] / "my_lora.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8.0")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_output_name"] == "my_lora"
    assert set(json.loads(meta["ss_tag_frequency"])["my_lora"]) == {"TOK", "STY"}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.title"] == "my_lora"
    assert meta["modelspec.trigger_phrase"] == "TOK, STY"


def test_embeddings_load_with_textual_inversion_together_with_the_lora(pipe, exported, embeddings):
    emb = load_file(exported["out"] / "embeddings.safetensors")
    assert all(torch.equal(emb[k], embeddings[k]) for k in ("clip_l", "clip_g"))
    encoders = ((emb["clip_l"], pipe.text_encoder, pipe.tokenizer),
                (emb["clip_g"], pipe.text_encoder_2, pipe.tokenizer_2))
    for table, encoder, tokenizer in encoders:
        pipe.load_textual_inversion(table, token=TOKENS, text_encoder=encoder, tokenizer=tokenizer)
    try:
        ids = pipe.tokenizer_2.convert_tokens_to_ids(TOKENS)
        assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids].detach(), emb["clip_g"])
        tokens_only = render(pipe)
        pipe.load_lora_weights(exported["out"])
        both = render(pipe)
        pipe.unload_lora_weights()
    finally:
        for _, encoder, tokenizer in encoders:
            pipe.unload_textual_inversion(tokens=TOKENS, text_encoder=encoder, tokenizer=tokenizer)
    assert not np.allclose(tokens_only, exported["base"], atol=1e-2)
    assert not np.allclose(both, tokens_only, atol=1e-2)
    assert_back_to_base(pipe, exported)


def test_model_card_names_triggers_loading_code_and_samples(exported):
    card = (exported["out"] / "README.md").read_text()
    for needed in ("TOK", "<s0><s1>", "STY", "<s2>", "load_lora_weights", "load_textual_inversion",
                   "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2", "['<s0>', '<s1>', '<s2>']",
                   "samples/0.png", "ComfyUI/models/loras/", "<lora:my_lora:1>", 'instance_prompt: "<s0><s1>"',
                   "`embedding:TOK`", "<lora:my_lora_kohya:1>", "embeddings/TOK.safetensors",
                   "embeddings/STY.safetensors", "--models my_lora_kohya.safetensors", "`<TOK>`"):
        assert needed in card, needed


def test_model_card_diffusers_code_runs_as_written(pipe, exported, monkeypatch):
    """The card's snippet, minus the base-model download, run on the live tiny pipeline."""
    card = (exported["out"] / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    assert "from_pretrained(" in code
    code = "\n".join(line for line in code.splitlines() if "from_pretrained(" not in line)
    code = code.replace("num_inference_steps=30", "num_inference_steps=2, height=32, width=32, guidance_scale=5.0, "
                        "generator=torch.Generator().manual_seed(0)")
    monkeypatch.chdir(exported["out"].parent)
    namespace = {"pipe": pipe}
    try:
        exec(code, namespace)
    finally:
        pipe.unload_lora_weights()
        for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
            if "<s0>" in tokenizer.get_vocab():
                pipe.unload_textual_inversion(tokens=TOKENS, text_encoder=encoder, tokenizer=tokenizer)
    with_weights = np.asarray(Image.open("out.png"), dtype=np.float32) / 255
    assert np.abs(with_weights - render(pipe, "a photo of <s0><s1>")).max() > 0.05
    assert_back_to_base(pipe, exported)


def test_model_card_refuses_samples_outside_the_artifact(exported, tmp_path):
    with pytest.raises(export.ExportError, match="not inside"):
        export.write_model_card(exported["out"], special_params=SPECIAL, base_model="x", name="my_lora",
                                sample_images=[tmp_path / "elsewhere.png"], training_config=CONFIG)


def test_dora_is_exported_for_diffusers_only_and_the_card_says_why(pipe, exported, embeddings, tmp_path):
    state = train_fake_adapter(pipe, "dora", use_dora=True)
    try:
        trained = render(pipe)
    finally:
        pipe.unet.delete_adapters("dora")
    assert any(k.endswith("lora_magnitude_vector") for k in state)
    export.write_weight_files(tmp_path, unet_lora_state=state, lora_alpha=8, embeddings=embeddings,
                              special_params=SPECIAL, training_config=CONFIG, unet_layout=exported["layout"],
                              save_precision="fp32")
    assert not list(tmp_path.glob("trained_model*.safetensors")), "no kohya-layout file for a DoRA"
    np.testing.assert_allclose(render_with_lora(pipe, tmp_path), trained, atol=1e-5)
    assert_back_to_base(pipe, exported)
    card = export.write_model_card(tmp_path, special_params=SPECIAL, base_model="b", name="trained_model",
                                   sample_images=[], training_config=CONFIG).read_text()
    assert "This is a DoRA" in card and "<lora:" not in card and "embeddings/TOK.safetensors" in card


@pytest.mark.parametrize(("save_precision", "stored"), [(None, "F16"), ("bf16", "BF16"), ("fp32", "F32")])
def test_full_fine_tune_writes_a_single_file_sgm_checkpoint(pipe, embeddings, tmp_path, save_precision, stored):
    from pti.formats.sgm_checkpoint import SdxlShape, sgm_state

    unet_state = {k: v for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    state = sgm_state(unet=unet_state, vae=pipe.vae.state_dict(), text_encoder=pipe.text_encoder.state_dict(),
                      text_encoder_2=pipe.text_encoder_2.state_dict(),
                      shape=SdxlShape.from_configs(pipe.unet.config, pipe.vae.config),
                      vocab_rows=(len(pipe.tokenizer), len(pipe.tokenizer_2)), dtype=torch.float32)
    precision = {} if save_precision is None else {"save_precision": save_precision}
    export.write_weight_files(tmp_path, unet_lora_state=None, lora_alpha=None, embeddings=embeddings,
                              special_params=SPECIAL, training_config=CONFIG, full_checkpoint_state=state,
                              unet_layout=lora_formats.SDXL_UNET_LAYOUT, **precision)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "embeddings.safetensors", "embeddings/STY.safetensors", "embeddings/TOK.safetensors",
        "sdxl_checkpoint.safetensors", "special_params.json", "training_config.json"]
    with safe_open(tmp_path / "sdxl_checkpoint.safetensors", "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {stored}
    written = load_file(tmp_path / "sdxl_checkpoint.safetensors")
    dtype = export.SAVE_PRECISIONS[save_precision or "fp16"]
    assert all(torch.equal(written[k], v.to(dtype)) for k, v in state.items())  # a cast, the same on both sides
    card = export.write_model_card(tmp_path, special_params=SPECIAL, base_model="b", name="full",
                                   sample_images=[], training_config=CONFIG).read_text()
    assert "from_single_file" in card and "sdxl_checkpoint.safetensors" in card and "load_lora_weights" not in card


@pytest.mark.parametrize(("change", "message"), [
    ({"embeddings": {"clip_l": torch.zeros(3, 32)}}, "exactly the keys clip_l and clip_g"),
    ({"embeddings": {"clip_l": torch.zeros(3, 32), "clip_g": torch.zeros(2, 64)}}, "the same n"),
    ({"special_params": {"TOK": "<s0><s1>"}}, "one per embedding row"),
    ({"special_params": {"TOK": "s0 s1 s2"}}, "not of the form"),
    ({"name": "../evil"}, "not usable as a file name"),
    ({"name": "embeddings"}, "clash"),
    ({"special_params": {"TO/K": "<s0><s1><s2>"}}, "one word"),
    ({"save_precision": "int8"}, "save_precision 'int8'"),
    ({"lora_alpha": None}, "lora_alpha is required"),
    ({"full_checkpoint_state": {"w": torch.zeros(1)}}, "exactly one of"),
])
def test_bad_export_input_fails_before_writing(exported, tmp_path, change, message):
    kwargs = dict(unet_lora_state=exported["state"], lora_alpha=8,
                  embeddings={"clip_l": torch.zeros(3, 32), "clip_g": torch.zeros(3, 64)}, special_params=SPECIAL,
                  training_config=CONFIG, unet_layout=exported["layout"], name="ok")
    kwargs.update(change)
    with pytest.raises(export.ExportError, match=message) as err:
        export.write_weight_files(tmp_path / "out", **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_pack_tar_holds_every_file_at_the_root(exported, tmp_path):
    tar_path = export.pack_tar(exported["out"], tmp_path / "trained_model.tar")
    with tarfile.open(tar_path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {p.relative_to(exported["out"]).as_posix()
                                for p in exported["out"].rglob("*") if p.is_file()}
        assert all(m.isfile() for m in members.values())
        packed = tar.extractfile("pytorch_lora_weights.safetensors").read()
    assert packed == (exported["out"] / "pytorch_lora_weights.safetensors").read_bytes()
    assert os.listdir(tmp_path) == ["trained_model.tar"]


def test_pack_tar_inside_the_folder_it_packs_skips_itself(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    export.pack_tar(tmp_path, tmp_path / "out.tar")
    export.pack_tar(tmp_path, tmp_path / "out.tar")  # a second run must not pack the first tar
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert tar.getnames() == ["a.txt"]


def test_failed_pack_tar_leaves_nothing_and_keeps_an_older_tar(exported, tmp_path, monkeypatch):
    tar_path = tmp_path / "trained_model.tar"
    tar_path.write_bytes(b"previous run")
    calls = []

    def add_then_fail(self, name, arcname=None, recursive=True, **kwargs):
        calls.append(arcname)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return original_add(self, name, arcname=arcname, recursive=recursive, **kwargs)

    original_add = tarfile.TarFile.add
    monkeypatch.setattr(tarfile.TarFile, "add", add_then_fail)
    with pytest.raises(OSError, match="simulated"):
        export.pack_tar(exported["out"], tar_path)
    assert os.listdir(tmp_path) == ["trained_model.tar"]
    assert tar_path.read_bytes() == b"previous run"


def test_pack_tar_into_a_missing_folder_is_a_clear_error(exported, tmp_path):
    with pytest.raises(export.ExportError, match="folder does not exist"):
        export.pack_tar(exported["out"], tmp_path / "missing" / "trained_model.tar")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_pack_tar_into_an_unwritable_folder_leaves_nothing(exported, tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    try:
        with pytest.raises(export.ExportError, match="permission denied"):
            export.pack_tar(exported["out"], target / "trained_model.tar")
        assert os.listdir(target) == []
    finally:
        target.chmod(0o700)


def test_training_config_that_is_not_json_is_refused_before_writing(exported, tmp_path):
    with pytest.raises(export.ExportError, match="object"):
        export.write_weight_files(tmp_path / "out", unet_lora_state=exported["state"], lora_alpha=8,
                                  embeddings={"clip_l": torch.zeros(3, 32), "clip_g": torch.zeros(3, 64)},
                                  special_params=SPECIAL, training_config={"callback": object()},
                                  unet_layout=exported["layout"])
    assert not (tmp_path / "out").exists()


def test_cog_sdxl_legacy_weights_convert_and_load_like_ours(pipe, exported, embeddings):
    """A replicate/cog-sdxl tar's lora.safetensors + embeddings.pti, converted, give the trained image. The adapter
    has alpha 8 and rank 4, so a converter that dropped or inverted the folded scale would change the image."""
    cog_lora = cog_sdxl_lora_by_hand(exported["state"], alpha=8.0)
    assert "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight" in cog_lora
    cog_embeddings = {"text_encoders_0": embeddings["clip_l"], "text_encoders_1": embeddings["clip_g"]}
    converted = lora_formats.cog_sdxl_embeddings(cog_embeddings)
    assert all(torch.equal(converted[k], embeddings[k]) for k in ("clip_l", "clip_g"))
    loaded = render_with_lora(pipe, lora_formats.peft_to_diffusers_dict(lora_formats.cog_sdxl_lora_to_peft(cog_lora)))
    np.testing.assert_allclose(loaded, exported["trained"], atol=1e-5)
    assert_back_to_base(pipe, exported)
