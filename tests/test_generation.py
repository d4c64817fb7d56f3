"""Generation: token-for-token equal to transformers' greedy generate, static shapes, sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ktjax
from ktjax import engine
from ktjax.sampling import sample
from reference import make_reference, save_reference


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = make_reference("v3", seed=11)
    model = ktjax.load(save_reference(ref, tmp_path_factory.mktemp("gen")), dtype="float32")
    return ref, model


def hf_greedy(ref, prompt, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers(pair):
    ref, model = pair
    prompt = [5, 9, 13, 2, 7, 44, 3]
    result = ktjax.generate(model, prompt, max_new_tokens=12)
    assert result.token_ids == hf_greedy(ref, prompt, 12)[: len(result.token_ids)]
    assert result.stats.prompt_tokens == 7 and result.stats.new_tokens == len(result.token_ids)


def test_batch_of_different_lengths_equals_each_prompt_alone(pair):
    ref, model = pair
    prompts = [[5, 9, 13, 2, 7], [3, 4], [8, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    results = ktjax.generate(model, prompts, max_new_tokens=8)
    assert len(results) == 3
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(ref, prompt, 8)[: len(result.token_ids)]


def test_eos_ends_a_row(pair):
    _, model = pair
    first = ktjax.generate(model, [5, 9, 13], max_new_tokens=6).token_ids
    eos = first[2]
    model2 = dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_id=eos))
    result = ktjax.generate(model2, [5, 9, 13], max_new_tokens=6)
    assert result.token_ids == first[: first.index(eos) + 1]
    assert result.stats.finish_reason == "eos"


def test_generating_again_in_the_same_buckets_compiles_nothing(pair):
    _, model = pair
    ktjax.generate(model, [1, 2, 3], max_new_tokens=4)
    sizes = (engine.prefill_and_sample._cache_size(), engine.decode_and_sample._cache_size())
    ktjax.generate(model, [4, 5, 6, 7, 8, 9], max_new_tokens=20, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    ktjax.generate(model, [9, 8], max_new_tokens=9, temperature=1.0, seed=4)
    assert (engine.prefill_and_sample._cache_size(), engine.decode_and_sample._cache_size()) == sizes


def test_sampling_is_reproducible_by_seed_and_varies_across_seeds(pair):
    _, model = pair
    kw = dict(max_new_tokens=10, temperature=1.5)
    a = ktjax.generate(model, [5, 9, 13], seed=1, **kw).token_ids
    assert a == ktjax.generate(model, [5, 9, 13], seed=1, **kw).token_ids
    assert any(ktjax.generate(model, [5, 9, 13], seed=s, **kw).token_ids != a for s in (2, 3, 4))


def test_max_new_tokens_and_bad_prompts(pair):
    _, model = pair
    assert len(ktjax.generate(model, [5], max_new_tokens=3).token_ids) == 3
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ktjax.generate(model, [5, 1000], max_new_tokens=3)
    with pytest.raises(ValueError, match="top_p"):
        ktjax.generate(model, [5], max_new_tokens=3, top_p=0.0)


def draw(logits, n=400, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    f = jax.jit(jax.vmap(lambda k: sample(logits, k, jnp.float32(kw.get("t", 1.0)), jnp.int32(kw.get("k", 0)),
                                          jnp.float32(kw.get("p", 1.0)))))
    return np.asarray(f(keys))[:, 0]


LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.15, 0.1]]))


def test_temperature_zero_is_argmax():
    assert set(draw(LOGITS, n=20, t=0.0)) == {1}


def test_top_k_keeps_only_the_k_most_likely():
    assert set(draw(LOGITS, k=2)) == {1, 2}
    assert set(draw(LOGITS, k=1)) == {1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    assert set(draw(LOGITS, p=0.6)) == {1, 2}  # 0.4 < 0.6 <= 0.7
    assert set(draw(LOGITS, p=0.75)) == {1, 2, 3}


def test_unfiltered_sampling_follows_the_distribution():
    counts = np.bincount(draw(LOGITS, n=4000), minlength=5) / 4000
    np.testing.assert_allclose(counts, [0.05, 0.4, 0.3, 0.15, 0.1], atol=0.03)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from tokenizer_fixtures import vocab_size, write_tokenizer
    path = tmp_path_factory.mktemp("textgen")
    save_reference(make_reference("v3", seed=12, vocab_size=vocab_size() + 3), path)
    write_tokenizer(path, template="r1")
    return ktjax.load(path, dtype="float32")


def test_stream_pieces_join_to_the_generated_text(text_model):
    kw = dict(max_new_tokens=12, temperature=0.9, seed=7)
    result = ktjax.generate(text_model, "def f(x):", **kw)
    stats = ktjax.GenerationStats(prompt_tokens=0)
    pieces = list(ktjax.stream(text_model, "def f(x):", stats=stats, **kw))
    assert "".join(pieces) == result.text
    assert stats.new_tokens == len(result.token_ids) and stats.prompt_tokens == result.stats.prompt_tokens


def test_stop_string_ends_generation_and_is_cut_from_the_text(text_model):
    full = ktjax.generate(text_model, "hello", max_new_tokens=16, temperature=1.0, seed=3)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    if len(stop) < 2 or full.text.find(stop) < 1:
        pytest.skip("sampled text too short to pick a stop string from")
    result = ktjax.generate(text_model, "hello", max_new_tokens=16, temperature=1.0, seed=3, stop=[stop])
    assert result.text == full.text[: full.text.find(stop)]
    assert result.stats.finish_reason == "stop" and len(result.token_ids) < len(full.token_ids)
    streamed = "".join(ktjax.stream(text_model, "hello", max_new_tokens=16, temperature=1.0, seed=3, stop=stop))
    assert streamed == result.text


def test_chat_renders_the_template_and_generates(text_model):
    from ktjax.generation import chat_prompt
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = chat_prompt(text_model, messages)
    expected = text_model.tokenizer.encode(text_model.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert prompt == expected
    assert ktjax.chat(text_model, messages, max_new_tokens=4).token_ids == \
        ktjax.generate(text_model, prompt, max_new_tokens=4).token_ids


def test_text_prompt_without_tokenizer_names_the_missing_file(pair):
    _, model = pair
    with pytest.raises(ValueError, match="tokenizer.json: missing"):
        ktjax.generate(model, "some text", max_new_tokens=2)
