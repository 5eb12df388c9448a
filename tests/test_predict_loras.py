"""The predictor as SDXL API users call it, on the tiny model: long and weighted prompts in every mode, extra LoRAs
with their own scales (any kind: our tar, a bare diffusers or kohya .safetensors by URL), two trained tars with
the same trigger word at once, embedding files (A1111/ComfyUI's, a tar's embeddings/TOK.safetensors) beside a bare
LoRA, and local paths refused unless the operator allows them."""

from __future__ import annotations

import base64
import dataclasses
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from exactness import assert_images_close, assert_same_state, effective_state, images_differ
from misbehaving_server import MisbehavingServer
from predict import Predictor, default_inputs
from pti.formats import lora_formats
from pti.inference.prompts import parse_prompt
from weights_fixtures import one_torch_thread  # noqa: F401  (autouse fixture)
from weights_fixtures import predictor_with_own_cache, random_embeddings, tiny_unet, write_trained_tar

PREDICT_DEFAULTS = default_inputs()
FAST = dict(width=64, height=64, num_inference_steps=2, seed=11, output_format="png", prompt="a photo of a dog",
            apply_watermark=False)


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tars")
    unet = tiny_unet()
    return {"a": write_trained_tar(folder, 1, unet), "b": write_trained_tar(folder, 2, unet),
            "a_embeddings_only": write_trained_tar(folder, 1, unet, zero_lora=True),
            "b_embeddings_only": write_trained_tar(folder, 2, unet, zero_lora=True)}


@pytest.fixture(scope="module")
def files(tars, tmp_path_factory):
    """The tars and the LoRA files below served over HTTP (as a hosted predictor gets them)."""
    with MisbehavingServer(next(iter(tars.values())).parent) as server:
        yield server


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    yield from predictor_with_own_cache(tmp_path_factory)


def one_image(predictor: Predictor, **inputs) -> np.ndarray:
    (path,) = predictor.predict(**{**PREDICT_DEFAULTS, **FAST, **inputs})
    return np.array(Image.open(path))


def state(predictor: Predictor) -> dict[str, str]:
    return effective_state(predictor.models.txt2img)


def long_prompt(predictor: Predictor, tokens: int) -> str:
    """A prompt of ``tokens`` tokens in the tiny tokenizer (words that are one token each), and the same words cut
    to the first 75 tokens."""
    tokenizer = predictor.models.txt2img.tokenizer
    vocabulary = sorted(t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha())
    single = [w for w in vocabulary if len(tokenizer(w, add_special_tokens=False).input_ids) == 1][:50]
    return " ".join(single[i % len(single)] for i in range(tokens))


# ---------------------------------------------------------------------------------------------- long prompts


def test_a_200_token_prompt_acts_beyond_its_first_75_tokens_in_every_mode(predictor, tmp_path):
    prompt = long_prompt(predictor, 200)
    first_75 = " ".join(prompt.split()[:75])
    image = tmp_path / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(64)[None, :].repeat(64, 0) < 32, 0, 255).astype(np.uint8)).save(mask)
    modes = {"txt2img": {}, "img2img": dict(image=image), "inpaint": dict(image=image, mask=mask),
             "expert_ensemble_refiner": dict(refine="expert_ensemble_refiner", num_inference_steps=10,
                                             guidance_scale=1.0),
             "base_image_refiner": dict(refine="base_image_refiner", num_inference_steps=4, guidance_scale=1.0)}
    for mode, inputs in modes.items():
        assert images_differ(one_image(predictor, prompt=prompt, **inputs),
                             one_image(predictor, prompt=first_75, **inputs)), mode
    negative = long_prompt(predictor, 160)
    assert images_differ(one_image(predictor, negative_prompt=negative),
                         one_image(predictor, negative_prompt=" ".join(negative.split()[:75]))), "negative prompt"


def test_the_refiner_sees_every_chunk_of_the_prompt(predictor):
    """guidance_scale=1 and a base_image_refiner whose base pass is the same: a difference comes from the refiner."""
    prompt = long_prompt(predictor, 200)
    captured = []
    refiner = predictor.models.refiner()
    hook = refiner.unet.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["encoder_hidden_states"].shape), with_kwargs=True)
    try:
        one_image(predictor, prompt=prompt, refine="base_image_refiner", num_inference_steps=4)
    finally:
        hook.remove()
    assert captured and all(shape[1] == 3 * 77 for shape in captured), captured


# ---------------------------------------------------------------------------------------------- weighted prompts


def test_a_weighted_trigger_word_expands_to_weighted_new_tokens(predictor, tars):
    one_image(predictor, replicate_weights=str(tars["a"]))
    expanded = predictor.weights.expand_prompt("a photo of (TOK:1.2), [TOK] and \\(TOK\\)")
    fragments = [(f.text, round(f.weight, 6)) for f in parse_prompt(expanded)]
    assert fragments == [("a photo of ", 1.0), ("<s0><s1>", 1.2), (", ", 1.0), ("<s0><s1>", round(1 / 1.1, 6)),
                         (" and (<s0><s1>)", 1.0)]
    plain = one_image(predictor, replicate_weights=str(tars["a"]), prompt="a photo of TOK dog")
    weighted = one_image(predictor, replicate_weights=str(tars["a"]), prompt="a photo of (TOK:1.5) dog")
    assert images_differ(weighted, plain)
    assert_images_close(one_image(predictor, replicate_weights=str(tars["a"]), prompt="a photo of (TOK:1) dog"),
                        plain, "weight 1 is no weight")


# ---------------------------------------------------------------------------------------------- several LoRAs


def lora_of(tar: Path) -> dict[str, torch.Tensor]:
    with tarfile.open(tar) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("pytorch_lora_weights.safetensors"))
        from safetensors.torch import load

        return load(archive.extractfile(member).read())


def weighted_sum_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], scale_a: float,
                      scale_b: float) -> dict[str, torch.Tensor]:
    """One diffusers LoRA (scale 1: no adapter metadata) whose delta is ``scale_a`` A + ``scale_b`` B: the ranks
    side by side, each up matrix times its scale (the fixtures have alpha = rank, scale 1)."""
    merged = {}
    for key in a:
        if key.endswith("lora_A.weight"):
            merged[key] = torch.cat([a[key], b[key]], dim=0)
        else:
            merged[key] = torch.cat([scale_a * a[key], scale_b * b[key]], dim=1)
    return merged


@pytest.fixture(scope="module")
def merged_files(tars, files):
    """A bare diffusers .safetensors and a bare kohya .safetensors of 0.7 A + 0.5 B, by URL."""
    folder = tars["a"].parent
    merged = weighted_sum_lora(lora_of(tars["a"]), lora_of(tars["b"]), 0.7, 0.5)
    save_file(merged, folder / "merged_diffusers.safetensors")
    peft = lora_formats.diffusers_file_to_peft(merged, None)
    layout = lora_formats.UNetLayout.from_unet_config(tiny_unet().config)
    save_file(lora_formats.peft_to_kohya(peft, layout), folder / "merged_kohya.safetensors")
    return {name: files.url(f"files/merged_{name}.safetensors") for name in ("diffusers", "kohya")}


def test_two_loras_at_their_scales_equal_one_file_of_the_weighted_sum_and_unload_exactly(predictor, tars, files,
                                                                                       merged_files):
    base, base_state = one_image(predictor), state(predictor)
    a_alone, a_state = one_image(predictor, replicate_weights=str(tars["a"]), lora_scale=0.7), state(predictor)
    both = one_image(predictor, replicate_weights=str(tars["a"]), lora_scale=0.7,
                     extra_lora=files.url("files/" + tars["b"].name), extra_lora_scale=0.5)
    assert images_differ(both, a_alone) and images_differ(both, base)
    for kind, url in merged_files.items():
        assert_images_close(one_image(predictor, replicate_weights=url, lora_scale=1.0), both,
                            f"a bare {kind} file of 0.7 A + 0.5 B")
    assert_images_close(one_image(predictor, extra_lora=[str(tars["a"]), files.url("files/" + tars["b"].name)],
                                  extra_lora_scale=[0.7, 0.5]), both, "both as extra_lora, scales as a list")
    again = one_image(predictor, replicate_weights=str(tars["a"]), lora_scale=0.7)
    assert_same_state(state(predictor), a_state, "removing B restores A alone")
    assert_images_close(again, a_alone)
    assert_images_close(one_image(predictor), base)
    assert_same_state(state(predictor), base_state, "none after both")


def test_lora_scale_above_one_scales_the_delta(predictor, tars):
    one_image(predictor, replicate_weights=str(tars["a"]), lora_scale=1.5)
    module = next(m for name, m in predictor.models.txt2img.unet.named_modules() if name.endswith("attn1.to_q"))
    (adapter,) = module.active_adapters
    assert module.scaling[adapter] == pytest.approx(1.5), "alpha/rank 1 times lora_scale 1.5"


def test_two_tars_with_the_same_trigger_word_each_bring_their_own_embeddings(predictor, tars):
    a, b = str(tars["a_embeddings_only"]), str(tars["b_embeddings_only"])
    prompt = "a photo of TOK dog"
    only_a = one_image(predictor, replicate_weights=a, prompt=prompt)
    only_b = one_image(predictor, replicate_weights=b, prompt=prompt)
    both = one_image(predictor, replicate_weights=a, extra_lora=b, prompt=prompt)
    assert predictor.weights.expand_prompt(prompt) == "a photo of <s0><s1><x0s0><x0s1> dog"
    assert "TOK -> <s0><s1> (replicate_weights" in predictor.weights.describe_triggers()
    assert "TOK -> <x0s0><x0s1> (extra_lora[0]" in predictor.weights.describe_triggers()
    pipe = predictor.models.txt2img
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        table = encoder.get_input_embeddings().weight
        ids = tokenizer.convert_tokens_to_ids(["<s0>", "<s1>", "<x0s0>", "<x0s1>"])
        assert len(set(ids)) == 4, "the two tars' tokens do not collide"
        # the tars hold the embeddings in the default save_precision fp16; widening them to the table's dtype is exact
        assert torch.equal(table[ids[:2]], random_embeddings(1)[key].half().to(table.dtype)), "A's rows, A's tokens"
        assert torch.equal(table[ids[2:]], random_embeddings(2)[key].half().to(table.dtype)), "B's rows, B's tokens"
    assert images_differ(both, only_a) and images_differ(both, only_b)
    assert_images_close(one_image(predictor, replicate_weights=a, prompt=prompt), only_a, "B's tokens are gone")


@pytest.mark.parametrize("inputs, message", [
    (dict(extra_lora=["x", "y"], extra_lora_scale=[0.5, 0.5, 0.5]), r"^extra_lora_scale has 3 scales for 2"),
    (dict(extra_lora="x", extra_lora_scale=2.5), r"^extra_lora_scale=2.5 is outside 0..2"),
    (dict(extra_lora=["x", "y"], extra_lora_scale=[0.5, 2.5]), r"^extra_lora_scale\[1\]=2.5 is outside 0..2"),
    (dict(extra_lora=["SAME", "SAME"]), r"^extra_lora\[1\]: the same weights as extra_lora\[0\]"),
    (dict(extra_lora=["SAME", "http://127.0.0.1:9/none.safetensors"]), r"^extra_lora\[1\]: .*download failed"),
    (dict(extra_lora=["a", "b", "a_embeddings_only", "b_embeddings_only", "SAME"]), r"^extra_lora\[4\]: 5 sets"),
])
def test_bad_extra_lora_inputs_are_one_line_naming_the_field_and_change_nothing(predictor, tars, inputs, message):
    base, base_state = one_image(predictor), state(predictor)
    names = {"SAME": str(tars["a"]), **{name: str(path) for name, path in tars.items()}}
    extra = inputs["extra_lora"]
    inputs = {**inputs, "extra_lora": [names.get(e, e) for e in extra] if isinstance(extra, list) else extra}
    with pytest.raises(ValueError, match=message) as error:
        one_image(predictor, **inputs)
    assert "\n" not in str(error.value)
    assert_images_close(one_image(predictor), base)
    assert_same_state(state(predictor), base_state, "after the refusal")


# ---------------------------------------------------------------------------------------------- embedding files


def tar_member(tar: Path, suffix: str) -> bytes:
    with tarfile.open(tar) as archive:
        return archive.extractfile(next(m for m in archive.getmembers() if m.name.endswith(suffix))).read()


@pytest.fixture(scope="module")
def from_elsewhere(tars, files) -> dict[str, str]:
    """What a user brings from elsewhere, by URL: tar A's kohya LoRA without bundled embeddings
    (``trained_model_kohya.safetensors``, what civitai serves) and its ``embeddings/TOK.safetensors`` (an
    A1111/ComfyUI embedding file), and broken embedding files."""
    folder = tars["a"].parent / "elsewhere"
    (folder / "bad").mkdir(parents=True)
    (folder / "trained_model_kohya.safetensors").write_bytes(tar_member(tars["a"], "trained_model_kohya.safetensors"))
    (folder / "TOK.safetensors").write_bytes(tar_member(tars["a"], "embeddings/TOK.safetensors"))
    save_file({"clip_l": torch.randn(2, 32)}, folder / "bad" / "NOG.safetensors")
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, folder / "bad" / "REAL.safetensors")
    save_file(random_embeddings(5), folder / "bad" / "two-words.safetensors")
    torch.save(random_embeddings(5), folder / "bad" / "PICKLED.pt")
    (folder / "bad" / "PICKLED.safetensors").write_bytes((folder / "bad" / "PICKLED.pt").read_bytes())
    return {"kohya": files.url("files/elsewhere/trained_model_kohya.safetensors"),
            "TOK": files.url("files/elsewhere/TOK.safetensors"),
            "data": "data:application/octet-stream;base64," + base64.b64encode(
                (folder / "TOK.safetensors").read_bytes()).decode(),
            **{name: files.url(f"files/elsewhere/bad/{name}") for name in
               ("NOG.safetensors", "REAL.safetensors", "two-words.safetensors", "PICKLED.pt", "PICKLED.safetensors")},
            "tar": files.url("files/" + tars["a"].name)}


def test_a_bare_kohya_lora_with_its_embedding_file_draws_what_the_tar_draws_and_unloads_exactly(
        predictor, tars, files, from_elsewhere):
    prompt = "a photo of TOK dog"
    base, base_state = one_image(predictor, prompt=prompt), state(predictor)
    tar = one_image(predictor, replicate_weights=from_elsewhere["tar"], prompt=prompt)
    lora_alone = one_image(predictor, replicate_weights=from_elsewhere["kohya"], prompt=prompt)
    both = one_image(predictor, replicate_weights=from_elsewhere["kohya"], embeddings=from_elsewhere["TOK"],
                     prompt=prompt)
    assert predictor.weights.expand_prompt(prompt) == "a photo of <e0s0><e0s1> dog"
    assert images_differ(tar, base) and images_differ(lora_alone, tar), "the embeddings are part of the tar's image"
    assert_images_close(both, tar, "the bare LoRA and the embedding file are the tar")
    assert_images_close(one_image(predictor, replicate_weights=from_elsewhere["kohya"],
                                  embeddings=[from_elsewhere["data"] + "#trigger=TOK"], prompt=prompt), tar,
                        "the same file as a data: URI in a list, its trigger word named")
    assert_images_close(one_image(predictor, prompt=prompt), base)
    assert_same_state(state(predictor), base_state, "after the LoRA and the embeddings")


def test_an_embedding_file_alone_changes_the_image_only_where_the_prompt_has_its_trigger(predictor, files,
                                                                                         from_elsewhere):
    with_trigger, without = "a photo of TOK dog", "a photo of a dog"
    base_with, base_without = one_image(predictor, prompt=with_trigger), one_image(predictor, prompt=without)
    base_state = state(predictor)
    url = from_elsewhere["TOK"]
    downloads = len(files.requests)
    assert images_differ(one_image(predictor, embeddings=url, prompt=with_trigger), base_with)
    assert_images_close(one_image(predictor, embeddings=url, prompt=without), base_without, "no trigger, no change")
    renamed = one_image(predictor, embeddings=url + "#trigger=ZQX", prompt="a photo of ZQX dog")
    assert_images_close(renamed, one_image(predictor, embeddings=url, prompt=with_trigger), "#trigger= renames it")
    assert_images_close(one_image(predictor, embeddings=url + "#trigger=ZQX", prompt=with_trigger), base_with,
                        "renamed, TOK is a plain word again")
    assert len(files.requests) - downloads <= 1, "one download for every use of the file (cached, either name)"
    assert_images_close(one_image(predictor, prompt=with_trigger), base_with)
    assert_same_state(state(predictor), base_state, "after the embeddings")


def test_an_embedding_files_trigger_in_the_negative_prompt_expands_there_and_changes_the_image(
        predictor, from_elsewhere, caplog):
    """A negative embedding (A1111/ComfyUI style): its trigger word, weighted, in ``negative_prompt`` only."""
    negative = "(TOK:1.2), blurry"
    plain_word = one_image(predictor, negative_prompt=negative)
    caplog.set_level(logging.INFO, logger="weights_manager")
    with_embedding = one_image(predictor, embeddings=from_elsewhere["TOK"], negative_prompt=negative)
    assert images_differ(with_embedding, plain_word), "the embedding's rows in the negative prompt change the image"
    expanded, expanded_negative = predictor.weights.expand_prompts("a photo of a dog", negative)
    assert expanded == "a photo of a dog"
    assert [(f.text, round(f.weight, 6)) for f in parse_prompt(expanded_negative)] == [
        ("<e0s0><e0s1>", 1.2), (", blurry", 1.0)]
    logged = [r.getMessage() for r in caplog.records if r.name == "weights_manager"]
    assert any(m.startswith("trigger words: TOK -> <e0s0><e0s1> (embeddings[0]") for m in logged), logged
    assert not any("none of the trigger words" in m for m in logged), "a trigger in the negative prompt counts"
    assert_images_close(one_image(predictor, negative_prompt=negative), plain_word, "unloaded, TOK is a word again")


@pytest.mark.parametrize("name, message", [
    ("kohya", r"^embeddings\[0\] http://[^ ]+/trained_model_kohya.safetensors: not an SDXL embedding: it lacks "
              r"clip_l and clip_g \(has lora_unet_"),
    ("NOG.safetensors", r"^embeddings\[0\] .*NOG.safetensors: not an SDXL embedding: it lacks clip_g \(has clip_l\)$"),
    ("REAL.safetensors", r"^embeddings\[0\] .*: clip_l embeddings have shape \[2, 768\] but this base model's text "
                         r"encoder has width 32"),
    ("PICKLED.pt", r"^embeddings\[0\]: http://[^ ]+/PICKLED.pt: not a .safetensors file$"),
    ("PICKLED.safetensors", r"^embeddings\[0\]: http://[^ ]+/PICKLED.safetensors: not a .safetensors file$"),
    ("tar", r"^embeddings\[0\]:? http://[^ ]+\.tar: not a .safetensors file$"),  # fetched, or cached as a tar
    ("two-words.safetensors", r"^embeddings\[0\]: the file name 'two-words' is not one word \(letters, digits, _\) "
                              r"to use as the trigger word; add #trigger=WORD to name it$"),
    ("data", r"^embeddings\[0\]: a data: URI has no file name to take the trigger word from; add #trigger=WORD$"),
])
def test_bad_embedding_files_are_one_line_naming_the_input_and_change_nothing(predictor, from_elsewhere, name,
                                                                               message):
    base, base_state = one_image(predictor), state(predictor)
    with pytest.raises(ValueError, match=message) as error:
        one_image(predictor, extra_lora=from_elsewhere["kohya"], embeddings=from_elsewhere[name])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^embeddings\[1\]: #trigger= 'two words' is not one word"):
        one_image(predictor, embeddings=[from_elsewhere["TOK"], from_elsewhere["TOK"] + "#trigger=two words"])
    assert_images_close(one_image(predictor), base)
    assert_same_state(state(predictor), base_state, "after the refusal")


# ---------------------------------------------------------------------------------------------- local paths


def test_local_paths_are_refused_unless_enabled_and_the_refusal_tells_nothing(predictor, tars, files, monkeypatch):
    hosted = dataclasses.replace(predictor.weights.settings, allow_local_paths=False)
    monkeypatch.setattr(predictor.weights, "settings", hosted)
    monkeypatch.setattr(predictor.weights.cache, "settings", hosted)
    messages = set()
    for field, path in (("replicate_weights", str(tars["a"])), ("replicate_weights", "/no/such/file.tar"),
                        ("replicate_weights", str(predictor.weights.cache.root)), ("extra_lora", str(tars["b"])),
                        ("replicate_weights", f"{tars['a']}#step=2"), ("extra_lora", f"{tars['b']}#step=2")):
        with pytest.raises(ValueError) as error:
            one_image(predictor, **{field: path})
        messages.add(str(error.value).replace("[0]", ""))
    assert messages == {"replicate_weights: local paths are not accepted here; give an http(s) URL or a data: URI",
                        "extra_lora: local paths are not accepted here; give an http(s) URL or a data: URI"}
    by_url = one_image(predictor, replicate_weights=files.url("files/" + tars["a"].name))
    data = "data:application/x-tar;base64," + base64.b64encode(tars["a"].read_bytes()).decode()
    assert_images_close(one_image(predictor, replicate_weights=data), by_url, "data: URIs keep working")


def test_cog_local_turns_repeated_inputs_into_lists_and_single_ones_into_values():
    import cog_local

    fields = cog_local.input_fields("predict")
    typed = cog_local.typed_values({"extra_lora": ["https://x/a.safetensors", "https://x/b.tar"],
                                    "extra_lora_scale": ["0.7", "0.5"]}, fields)
    assert typed == {"extra_lora": ["https://x/a.safetensors", "https://x/b.tar"], "extra_lora_scale": [0.7, 0.5]}
    typed = cog_local.typed_values({"extra_lora": ["https://x/a.tar"], "extra_lora_scale": ["1.2"]}, fields)
    assert typed == {"extra_lora": "https://x/a.tar", "extra_lora_scale": 1.2}
    checked = cog_local.validated_inputs({"extra_lora": ["https://x/a.tar"], "extra_lora_scale": ["1.2"]}, fields)
    assert checked["extra_lora"] == "https://x/a.tar" and checked["extra_lora_scale"] == 1.2
