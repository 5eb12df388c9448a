"""Prompts as A1111 reads them (pti/inference/prompts.py), on the tiny SDXL's real tokenizers and text encoders:
the emphasis syntax, chunks of 75 tokens for both encoders, and equality with diffusers for a plain short prompt."""

from __future__ import annotations

import pytest
import torch

from pti.inference.prompts import Fragment, encode_pair, encode_prompt, parse_prompt, token_chunks
from weights_fixtures import one_torch_thread  # noqa: F401  (autouse fixture)

# Float32 on one thread: the same kernels on the same data give the same bits, but a chunk encoded inside a longer
# prompt and alone runs through differently shaped matmuls only when batching differs; it does not here, so the
# comparisons below are exact except where weights rescale (one multiply and a mean: float32 rounding, 1e-6).
RESCALE_RTOL = 1e-5


@pytest.mark.parametrize("prompt, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
    ("a ((cat))", [("a ", 1.0), ("cat", 1.1 * 1.1)]),
    ("a [cat]", [("a ", 1.0), ("cat", 1 / 1.1)]),
    ("a (cat:1.5) dog", [("a ", 1.0), ("cat", 1.5), (" dog", 1.0)]),
    ("(a (cat:0.5))", [("a ", 1.1), ("cat", 0.5 * 1.1)]),
    ("a (cat: 1.3 )", [("a ", 1.0), ("cat", 1.3)]),
    (r"a \(cat\) \[x\] \\", [(r"a (cat) [x] \ ".rstrip(), 1.0)]),
    ("a (cat", [("a ", 1.0), ("cat", 1.1)]),
    ("a cat) and]", [("a cat) and]", 1.0)]),
    ("time: 5 (x:y)", [("time: 5 ", 1.0), ("x:y", 1.1)]),
    ("Blue BREAK red", [("Blue ", 1.0), ("", 1.0), (" red", 1.0)]),
    ("", [("", 1.0)]),
])
def test_a1111_emphasis_syntax(prompt, expected):
    parsed = [(f.text, f.weight) for f in parse_prompt(prompt)]
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])
    assert [f.chunk_break for f in parse_prompt("a BREAK b")] == [False, True, False]


@pytest.fixture(scope="module")
def pipe():
    from pti.models.base_model import load_sdxl_pipeline, pick_runtime

    return load_sdxl_pipeline("tiny", pick_runtime("fp32", "cpu"))


def encoders(pipe):
    return [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]


def words(count: int, offset: int = 0) -> str:
    """``count`` words that are one token each in the tiny tokenizers' vocabulary."""
    return " ".join(SINGLE_TOKEN_WORDS[(offset + i) % len(SINGLE_TOKEN_WORDS)] for i in range(count))


def _single_token_words() -> list[str]:
    from pti.models.base_model import resolve_source  # noqa: F401  (the tiny model is built by the pipe fixture)
    from transformers import CLIPTokenizer

    from pti.models.tiny_models import ensure_tiny_sdxl

    tokenizer = CLIPTokenizer.from_pretrained(ensure_tiny_sdxl(), subfolder="tokenizer")
    vocabulary = sorted(t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha())
    return [w for w in vocabulary if len(tokenizer(w, add_special_tokens=False).input_ids) == 1][:40]


SINGLE_TOKEN_WORDS = _single_token_words()


def test_a_plain_short_prompt_encodes_exactly_as_diffusers(pipe):
    prompt, negative = "a photo of a red car", "blurry"
    ours = encode_pair(prompt, negative, *encoders(pipe), zeros_for_empty_negative=True)
    with torch.no_grad():
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative)
    assert torch.equal(ours.prompt_embeds, embeds) and torch.equal(ours.pooled_prompt_embeds, pooled)
    assert torch.equal(ours.negative_prompt_embeds, negative_embeds)
    assert torch.equal(ours.negative_pooled_prompt_embeds, negative_pooled)
    empty = encode_pair(prompt, "", *encoders(pipe), zeros_for_empty_negative=True)
    assert not empty.negative_prompt_embeds.any() and not empty.negative_pooled_prompt_embeds.any(), \
        "an empty negative prompt is zeros, as diffusers gives SDXL"


def test_a_200_token_prompt_is_three_chunks_each_encoded_by_both_encoders(pipe):
    tokenizers, text_encoders = encoders(pipe)
    long_prompt = words(200)
    assert all(len(t(long_prompt, add_special_tokens=False).input_ids) == 200 for t in tokenizers)
    long = encode_prompt(parse_prompt(long_prompt), tokenizers, text_encoders)
    widths = [e.config.hidden_size for e in text_encoders]
    assert long.embeds.shape == (1, 3 * 77, sum(widths)), "ceil(200 / 75) chunks of 77 positions, L and G features"
    for index, (start, count) in enumerate(((0, 75), (75, 75), (150, 50))):
        alone = encode_prompt(parse_prompt(words(count, start)), tokenizers, text_encoders)
        chunk = long.embeds[:, 77 * index: 77 * (index + 1)]
        assert torch.equal(chunk, alone.embeds), f"chunk {index} is tokens {start}..{start + count} alone"
        assert torch.equal(chunk[..., :widths[0]], alone.embeds[..., :widths[0]]), "CLIP-L saw the chunk"
        assert torch.equal(chunk[..., widths[0]:], alone.embeds[..., widths[0]:]), "CLIP-G saw the chunk"
    first = encode_prompt(parse_prompt(words(75)), tokenizers, text_encoders)
    assert torch.equal(long.pooled, first.pooled), "the pooled embedding is the first chunk's"
    assert not torch.equal(long.embeds[:, :77], long.embeds[:, 77:154])


def test_negative_and_positive_are_padded_to_the_same_chunks_with_empty_chunks(pipe):
    tokenizers, text_encoders = encoders(pipe)
    pair = encode_pair("a cat", words(100), tokenizers, text_encoders, zeros_for_empty_negative=True)
    assert pair.prompt_embeds.shape == pair.negative_prompt_embeds.shape == (1, 154, 96)
    short = encode_prompt(parse_prompt("a cat"), tokenizers, text_encoders)
    empty = encode_prompt(parse_prompt(""), tokenizers, text_encoders)
    assert torch.equal(pair.prompt_embeds[:, :77], short.embeds)
    assert torch.equal(pair.prompt_embeds[:, 77:], empty.embeds)


def test_a_weight_scales_its_tokens_hidden_states_then_the_chunk_keeps_its_mean(pipe):
    tokenizers, text_encoders = encoders(pipe)
    first, second, word, *rest = words(5).split()
    plain = encode_prompt(parse_prompt(f"{first} {second} {word} {' '.join(rest)}"), tokenizers, text_encoders)
    weighted = encode_prompt(parse_prompt(f"{first} {second} ({word}:1.5) {' '.join(rest)}"), tokenizers,
                             text_encoders)
    cat = 3  # the start token, two words, then the weighted word (one token each)
    weights = torch.where(torch.arange(77) == cat, 1.5, 1.0)[:, None]
    for start, end in ((0, 32), (32, 96)):  # CLIP-L's features, then CLIP-G's: each rescaled on its own
        p, w = plain.embeds[0, :, start:end], weighted.embeds[0, :, start:end]
        # A1111 "Original" emphasis: h' = h * weight * mean(h) / mean(h * weight)
        torch.testing.assert_close(w, p * weights * (p.mean() / (p * weights).mean()), rtol=RESCALE_RTOL, atol=1e-6)
        torch.testing.assert_close(w.mean(), p.mean(), rtol=RESCALE_RTOL, atol=1e-6)
        rescale = w[cat + 1] / p[cat + 1]  # every unweighted position moved by the same factor
        torch.testing.assert_close(w[cat] / p[cat], 1.5 * rescale, rtol=RESCALE_RTOL, atol=1e-6)
    assert torch.equal(weighted.pooled, plain.pooled), "A1111 weights the hidden states, not the pooled embedding"
    unit = encode_prompt(parse_prompt(f"{first} {second} ({word}:1) {' '.join(rest)}"), tokenizers, text_encoders)
    assert torch.equal(unit.embeds, plain.embeds), "weight 1 is no weight"


def test_a_weighted_span_of_new_tokens_weights_each_of_them(pipe):
    tokenizer = pipe.tokenizer
    fragments = [Fragment("a photo of ", 1.0), Fragment("<s0><s1>", 1.2), Fragment(" dog", 1.0)]
    (chunk,) = token_chunks(fragments, _with_tokens(tokenizer, ["<s0>", "<s1>"]))
    ids = _with_tokens(tokenizer, ["<s0>", "<s1>"]).convert_tokens_to_ids(["<s0>", "<s1>"])
    positions = [chunk.ids.index(i) for i in ids]
    assert [chunk.weights[p] for p in positions] == [1.2, 1.2]
    assert chunk.weights.count(1.2) == 2


def _with_tokens(tokenizer, tokens):
    import copy

    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(tokens, special_tokens=True)
    return extended
