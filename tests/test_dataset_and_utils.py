"""Trigger words, new-token embeddings in both encoders, the dataset folder, cached latents/masks, prompt encoding."""

import random

import numpy as np
import pytest
import torch

from pti.models import base_model
from dataset_and_utils import (
    CachedDataset,
    CaptionAugmentation,
    DatasetError,
    PromptTokenizer,
    TokenEmbeddingsHandler,
    encode_prompt,
    parse_token_string,
    read_dataset_folder,
    replace_trigger_words,
    special_params,
)
from training_fixtures import SIZE, single_torch_thread, write_dataset_folder, write_plain_folder


one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


@pytest.fixture(scope="module")
def pipe():
    return base_model.load_sdxl_pipeline("tiny", base_model.pick_runtime("fp32", "cpu"))


@pytest.fixture(scope="module")
def pipe_with_tokens():
    """A second pipeline whose tokenizers/encoders get the new tokens (the base one stays untouched)."""
    pipe = base_model.load_sdxl_pipeline("tiny", base_model.pick_runtime("fp32", "cpu"))
    handler = TokenEmbeddingsHandler([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    handler.add_tokens(["<s0>", "<s1>"], generator=torch.Generator().manual_seed(0))
    return pipe, handler


# ------------------------------------------------------------------------------------------ trigger words


def test_single_trigger_gets_the_default_two_tokens():
    triggers = parse_token_string("TOK")
    assert special_params(triggers) == {"TOK": "<s0><s1>"}
    assert special_params(parse_token_string("TOK", num_new_tokens=3)) == {"TOK": "<s0><s1><s2>"}


def test_multi_concept_map_numbers_tokens_across_concepts():
    assert special_params(parse_token_string("TOK:2, STY:1,ABC")) == {"TOK": "<s0><s1>", "STY": "<s2>",
                                                                      "ABC": "<s3><s4>"}


@pytest.mark.parametrize("text, message", [("", "empty"), ("TOK:0", "at least 1"), ("TOK:x", "not an integer"),
                                           ("TOK,TOK", "twice"), ("a b", "single word")])
def test_bad_token_string_is_one_line_error(text, message):
    with pytest.raises(DatasetError, match=message) as info:
        parse_token_string(text)
    assert "\n" not in str(info.value)


def test_replacement_is_whole_word_and_case_exact():
    triggers = parse_token_string("TOK:2,STY:1")
    caption = "a photo of TOK in TOKYO, (TOK), TOK's hat, tok, xTOK, in STY style, STYLE"
    assert replace_trigger_words(caption, triggers) == (
        "a photo of <s0><s1> in TOKYO, (<s0><s1>), <s0><s1>'s hat, tok, xTOK, in <s2> style, STYLE")


# ------------------------------------------------------------------------------------------ new-token rows


def test_new_tokens_are_single_tokens_in_both_tokenizers(pipe_with_tokens):
    pipe, handler = pipe_with_tokens
    for tokenizer, ids in zip([pipe.tokenizer, pipe.tokenizer_2], handler.token_ids):
        encoded = tokenizer("a photo of <s0><s1>", add_special_tokens=False).input_ids
        assert encoded[-2:] == ids.tolist()
    widths = {key: value.shape for key, value in handler.embeddings().items()}
    assert widths == {"clip_l": (2, 32), "clip_g": (2, 64)}


def test_random_init_is_scaled_to_the_table_std(pipe_with_tokens):
    _, handler = pipe_with_tokens
    for table, ids, std in zip(handler.tables(), handler.token_ids, handler.table_stds):
        assert table[ids].std().item() == pytest.approx(std, rel=0.5)
        assert table[ids].abs().sum() > 0


def test_init_from_word_copies_that_words_embedding(pipe):
    fresh = base_model.load_sdxl_pipeline("tiny", base_model.pick_runtime("fp32", "cpu"))
    handler = TokenEmbeddingsHandler([fresh.text_encoder, fresh.text_encoder_2], [fresh.tokenizer, fresh.tokenizer_2])
    handler.add_tokens(["<s0>", "<s1>"], init_word="dog")
    for tokenizer, table, ids in zip([pipe.tokenizer, pipe.tokenizer_2], handler.tables(), handler.token_ids):
        word = tokenizer("dog", add_special_tokens=False).input_ids
        assert len(word) == 1
        assert torch.equal(table[ids[0]], table[word[0]]) and torch.equal(table[ids[1]], table[word[0]])


def test_only_the_new_rows_train_and_retract_renormalises_them(pipe):
    fresh = base_model.load_sdxl_pipeline("tiny", base_model.pick_runtime("fp32", "cpu"))
    encoders, tokenizers = [fresh.text_encoder, fresh.text_encoder_2], [fresh.tokenizer, fresh.tokenizer_2]
    handler = TokenEmbeddingsHandler(encoders, tokenizers)
    handler.add_tokens(["<s0>", "<s1>"], generator=torch.Generator().manual_seed(0))
    handler.set_trainable(True)
    embeds, pooled = encode_prompt(encoders, PromptTokenizer(tokenizers)(["a photo of <s0><s1>"]))
    (embeds.square().sum() + pooled.square().sum()).backward()
    assert all(table.grad is None for table in handler.tables())  # no dense [vocab, d] gradient
    assert all(rows.grad.abs().min() > 0 for rows in handler.rows)  # the encoders read the trainable rows
    with torch.no_grad():
        for rows in handler.rows:
            rows.add_(torch.randn_like(rows))  # an optimizer step
    moved = [rows.detach().clone() for rows in handler.rows]
    handler.retract_embeddings()
    base_tables = [pipe.text_encoder.get_input_embeddings().weight, pipe.text_encoder_2.get_input_embeddings().weight]
    for table, base, ids, rows, before, std in zip(handler.tables(), base_tables, handler.token_ids, handler.rows,
                                                   moved, handler.table_stds):
        assert torch.equal(table[: base.shape[0]], base)
        ratio = (std / before.std()) ** 0.1
        assert torch.allclose(rows, before * ratio) and torch.equal(table[ids], rows.detach())


def test_embeddings_save_and_load_round_trip(pipe_with_tokens, tmp_path):
    _, handler = pipe_with_tokens
    saved = handler.embeddings()
    handler.save(tmp_path / "embeddings.safetensors")
    handler.load_embeddings({k: torch.zeros_like(v) for k, v in saved.items()})
    assert all(v.abs().sum() == 0 for v in handler.embeddings().values())
    handler.load(tmp_path / "embeddings.safetensors")
    assert all(torch.equal(handler.embeddings()[k], saved[k]) for k in saved)


def test_adding_an_existing_token_is_refused(pipe_with_tokens):
    pipe, _ = pipe_with_tokens
    handler = TokenEmbeddingsHandler([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    with pytest.raises(DatasetError, match="already contains"):
        handler.add_tokens(["<s0>"])


# ------------------------------------------------------------------------------------------ prompts


def test_prompt_encoding_matches_the_pipelines_own(pipe):
    captions = ["a photo of a dog", "a red car on the street"]
    embeds, pooled = encode_prompt([pipe.text_encoder, pipe.text_encoder_2],
                                   PromptTokenizer([pipe.tokenizer, pipe.tokenizer_2])(captions))
    reference, _, reference_pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert embeds.shape == (2, 77, 32 + 64) and pooled.shape == (2, 64)
    assert torch.allclose(embeds, reference, atol=1e-6) and torch.allclose(pooled, reference_pooled, atol=1e-6)


def test_each_caption_is_tokenised_once(pipe):
    calls = []

    class Counting:
        def __init__(self, tokenizer):
            self.tokenizer, self.model_max_length = tokenizer, tokenizer.model_max_length

        def __call__(self, text, **kwargs):
            calls.append(text)
            return self.tokenizer(text, **kwargs)

    tokenize = PromptTokenizer([Counting(pipe.tokenizer), Counting(pipe.tokenizer_2)])
    for _ in range(3):
        ids_l, ids_g = tokenize(["a dog", "a cat", "a dog"])
    assert sorted(calls) == ["a cat", "a cat", "a dog", "a dog"]
    assert ids_l.shape == ids_g.shape == (3, 77)


def test_caption_dropout_and_shuffle_keep_the_first_tags():
    rng = random.Random(0)
    assert CaptionAugmentation(dropout=1.0).apply("a, b", rng) == ""
    shuffle = CaptionAugmentation(shuffle=True, keep_tokens=1)
    results = {shuffle.apply("photo of TOK, red, hat, beach, smiling", rng) for _ in range(30)}
    assert len(results) > 5
    assert all(r.startswith("photo of TOK, ") and sorted(r.split(", ")[1:]) == ["beach", "hat", "red", "smiling"]
               for r in results)


# ------------------------------------------------------------------------------------------ dataset


def test_dataset_folder_is_read_with_masks_and_micro_conditioning(tmp_path):
    folder = write_dataset_folder(tmp_path / "ds", ["a photo of TOK", "TOK on a table"])
    items = read_dataset_folder(folder)
    assert [i.caption for i in items] == ["a photo of TOK", "TOK on a table"]
    assert items[1].original_size == (480, 641) and items[1].crop_top_left == (3, 5)
    assert items[0].mask_path == folder / "masks/000.png"


def test_plain_folder_uses_the_caption_prefix(tmp_path):
    folder = write_plain_folder(tmp_path / "plain", 3, size=80)
    (folder / "notes.txt").write_text("not an image")
    items = read_dataset_folder(folder, "a photo of TOK, ")
    assert len(items) == 3
    assert {i.caption for i in items} == {"a photo of TOK,"}
    assert items[0].original_size == (80, 80) and items[0].mask_path is None


@pytest.mark.parametrize("problem, message", [("empty", "no images found"), ("missing", "does not exist"),
                                              ("column", "bad or missing column")])
def test_broken_dataset_is_one_line_error(tmp_path, problem, message):
    folder = tmp_path / "ds"
    folder.mkdir()
    if problem == "missing":
        write_dataset_folder(folder, ["TOK"])
        (folder / "images/000.png").unlink()
    elif problem == "column":
        (folder / "captions.csv").write_text("image_file,caption\nx.png,TOK\n")
    with pytest.raises(DatasetError, match=message) as info:
        read_dataset_folder(folder)
    assert "\n" not in str(info.value)


def test_cached_dataset_holds_latents_masks_and_time_ids_per_item(pipe, tmp_path):
    folder = write_dataset_folder(tmp_path / "ds", ["a photo of TOK", "TOK in TOKYO"])
    triggers = parse_token_string("TOK")
    cached = CachedDataset.build(read_dataset_folder(folder), pipe.vae, triggers, resize_to=None, flip=True,
                                 device=torch.device("cpu"), dtype=torch.float32, show_progress=False)
    item = cached.items[1]
    latent = SIZE // 8
    assert item.latents.shape == item.flipped_latents.shape == (4, latent, latent)
    assert not torch.allclose(item.latents, item.flipped_latents)
    assert item.caption == "<s0><s1> in TOKYO"
    assert item.time_ids.tolist() == [480, 641, 3, 5, SIZE, SIZE]
    # mask: full weight in the centre, the floor (25/255) at the border, at latent resolution
    assert item.mask.shape == (1, latent, latent)
    assert item.mask[0, latent // 2, latent // 2].item() == pytest.approx(1.0)
    assert item.mask[0, 0, 0].item() == pytest.approx(25 / 255, abs=1e-3)
    batch = cached.batch([1, 0, 1], [False, False, True])
    assert batch["latents"].shape == (3, 4, latent, latent)
    assert torch.equal(batch["latents"][2], item.flipped_latents)
    assert batch["captions"] == ["<s0><s1> in TOKYO", "a photo of <s0><s1>", "<s0><s1> in TOKYO"]


def test_plain_images_are_resized_to_the_resolution(pipe, tmp_path):
    folder = write_plain_folder(tmp_path / "plain", 1, size=96)
    cached = CachedDataset.build(read_dataset_folder(folder, "TOK"), pipe.vae, [], resize_to=SIZE, flip=False,
                                 device=torch.device("cpu"), dtype=torch.float32, show_progress=False)
    assert cached.items[0].latents.shape == (4, SIZE // 8, SIZE // 8)
    assert cached.items[0].flipped_latents is None
    assert np.allclose(cached.items[0].time_ids.tolist(), [96, 96, 0, 0, SIZE, SIZE])
