"""Generation: token-for-token equal to transformers' greedy generate on every executor, static
shapes, sampling, the limits a model was loaded for, and models shared between threads."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ktjax
from ktjax.runtime import resident, shapes
from ktjax.runtime.offload import executor as offload_executor
from ktjax.runtime.sampling import sample
from reference import make_reference, reference_greedy, save_reference

ALL_HOST = {r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"}
EXECUTORS = {"resident": {}, "offloaded": dict(placement=ALL_HOST)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ref = make_reference("v3", seed=11)
    return ref, save_reference(ref, tmp_path_factory.mktemp("gen"))


def no_eos(model):
    """The model without an end-of-sentence id, so it generates every token asked for, as the
    reference does with eos_token_id=None."""
    return dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_id=None))


@pytest.fixture(scope="module")
def models(checkpoint):
    """The checkpoint on each executor, loaded once for the module (an offloaded model compiles its own
    layer programs)."""
    return {name: ktjax.load(checkpoint[1], dtype="float32", max_batch=4, max_context=256, **opts)
            for name, opts in EXECUTORS.items()}


@pytest.fixture(scope="module", params=list(EXECUTORS))
def pair(request, checkpoint, models):
    return checkpoint[0], no_eos(models[request.param])


hf_greedy = reference_greedy


@pytest.fixture
def small_chunks(monkeypatch):
    """Prefill in chunks of 8 tokens (resident: prompt buckets; offloaded: attention's query chunks), so a
    tiny prompt spans several, as an 8K prompt does at the real sizes."""
    monkeypatch.setattr(shapes, "PROMPT_BUCKETS", (4, 8))
    monkeypatch.setattr(offload_executor, "QUERY_CHUNK", 8)
    assert shapes.prefill_chunks(21) == [(0, 8), (8, 8), (16, 8)]


def test_greedy_equals_transformers(pair):
    ref, model = pair
    prompt = [5, 9, 13, 2, 7, 44, 3]
    result = ktjax.generate(model, prompt, max_new_tokens=12)
    assert result.token_ids == hf_greedy(ref, prompt, 12)
    assert result.stats.prompt_tokens == 7 and result.stats.new_tokens == 12


def test_prefill_over_several_chunks_equals_transformers(pair, small_chunks):
    ref, model = pair
    prompts = [np.random.default_rng(8).integers(0, 97, 21).tolist(), [5, 9, 13, 2, 7, 44, 3, 8, 1, 6], [4, 2]]
    results = ktjax.generate(model, prompts, max_new_tokens=6)
    assert [r.token_ids for r in results] == [hf_greedy(ref, p, 6) for p in prompts]


def test_batch_of_different_lengths_equals_each_prompt_alone(pair):
    ref, model = pair
    prompts = [[5, 9, 13, 2, 7], [3, 4], [8, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    results = ktjax.generate(model, prompts, max_new_tokens=8)
    assert len(results) == 3
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(ref, prompt, 8)


def test_eos_ends_a_row(pair):
    _, model = pair
    first = ktjax.generate(model, [5, 9, 13], max_new_tokens=6).token_ids
    assert len(set(first[:3])) == 3  # the id made eos below first appears at index 2
    eos = first[2]
    model2 = dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_id=eos))
    result = ktjax.generate(model2, [5, 9, 13], max_new_tokens=6)
    assert result.token_ids == first[: first.index(eos) + 1]
    assert result.stats.finish_reason == "eos"


class CountedDecode:
    """The model's executor, counting its decode steps."""

    def __init__(self, executor):
        self.executor, self.steps = executor, 0

    def decode(self, *args, **kwargs):
        self.steps += 1
        return self.executor.decode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.executor, name)


def test_decoding_one_step_ahead_computes_at_most_one_step_unread(pair):
    """Generation dispatches each step before it reads the previous one's tokens: a row that runs to
    max_new_tokens costs exactly max_new_tokens - 1 steps (the first token is prefill's), and one that
    ends at end-of-sequence at most one step beyond it, whose token is never shown."""
    _, model = pair
    counted = CountedDecode(model.executor)
    plain = ktjax.generate(dataclasses.replace(model, executor=counted), [5, 9, 13], max_new_tokens=7)
    assert len(plain.token_ids) == 7 and counted.steps == 6
    eos = plain.token_ids[3]
    ended = dataclasses.replace(model, executor=CountedDecode(model.executor),
                                config=dataclasses.replace(model.config, eos_token_id=eos))
    result = ktjax.generate(ended, [5, 9, 13], max_new_tokens=7)
    first_eos = plain.token_ids.index(eos)
    assert result.token_ids == plain.token_ids[:first_eos + 1]
    assert first_eos <= ended.executor.steps <= first_eos + 1


def test_generating_again_in_the_same_buckets_compiles_nothing(checkpoint):
    model = ktjax.load(checkpoint[1], dtype="float32")
    ktjax.generate(model, [1, 2, 3], max_new_tokens=4)
    programs = model.executor.programs
    compiled = (programs.prefill_chunk._cache_size(), programs.decode._cache_size())
    ktjax.generate(model, [4, 5, 6, 7, 8, 9], max_new_tokens=20, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    ktjax.generate(model, [9, 8], max_new_tokens=9, temperature=1.0, seed=4)
    assert (programs.prefill_chunk._cache_size(), programs.decode._cache_size()) == compiled


def test_a_seed_samples_the_same_tokens_wherever_the_experts_live(models, small_chunks):
    # Prompts that end in different prefill chunks: each row's first token is still drawn once, with the seed.
    # (Three rows, and chunks of 8: the shapes the greedy tests above compiled.)
    prompts = [list(range(1, 22)), [5, 9, 13], [7, 2, 11, 4, 8, 30, 6, 1, 9]]
    assert [len(shapes.prefill_chunks(len(p))) for p in prompts] == [3, 1, 2]
    kw = dict(max_new_tokens=8, temperature=1.3, top_k=20, seed=5)
    runs = {name: [r.token_ids for r in ktjax.generate(model, prompts, **kw)] for name, model in models.items()}
    assert runs["resident"] == runs["offloaded"]


def test_generation_beyond_what_the_model_was_loaded_for_is_refused(checkpoint):
    model = ktjax.load(checkpoint[1], dtype="float32", max_batch=2, max_context=32)
    with pytest.raises(ValueError, match=r"exceed the batch the model was loaded for \(2\).*max_batch=3"):
        ktjax.generate(model, [[1, 2], [3, 4], [5, 6]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"exceeds the context the model was loaded for \(32\).*max_context=35"):
        ktjax.generate(model, [1, 2, 3, 4, 5], max_new_tokens=30)
    wide = ktjax.load(checkpoint[1], dtype="float32", max_context=4096)
    with pytest.raises(ValueError, match=r"exceeds the model's 256 positions \(max_position_embeddings\)"):
        ktjax.generate(wide, [1, 2, 3], max_new_tokens=300)
    assert len(ktjax.generate(no_eos(model), [1, 2], max_new_tokens=30).token_ids) == 30  # exactly at the limit: runs


def test_threads_sharing_a_model_each_get_their_own_tokens_and_stats(pair):
    _, model = pair
    prompts = [[5, 9, 13, 2], [7, 3], [11, 4, 8, 1, 6], [2]]
    alone = [ktjax.generate(model, p, max_new_tokens=6 + i) for i, p in enumerate(prompts)]
    results = [None] * len(prompts)

    def work(i):
        results[i] = ktjax.generate(model, prompts[i], max_new_tokens=6 + i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, r, p in zip(alone, results, prompts):
        assert r.token_ids == a.token_ids
        assert r.stats.prompt_tokens == len(p) and r.stats.new_tokens == len(a.token_ids)
        assert r.stats.decode_host_bytes_per_step == a.stats.decode_host_bytes_per_step


def test_sampling_is_reproducible_by_seed_and_varies_across_seeds(checkpoint):
    model = ktjax.load(checkpoint[1], dtype="float32")
    kw = dict(max_new_tokens=10, temperature=1.5)
    a = ktjax.generate(model, [5, 9, 13], seed=1, **kw).token_ids
    assert a == ktjax.generate(model, [5, 9, 13], seed=1, **kw).token_ids
    assert any(ktjax.generate(model, [5, 9, 13], seed=s, **kw).token_ids != a for s in (2, 3, 4))


def test_max_new_tokens_and_bad_prompts(checkpoint):
    model = ktjax.load(checkpoint[1], dtype="float32")
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
    from ktjax.runtime.generation import chat_prompt
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = chat_prompt(text_model, messages)
    expected = text_model.tokenizer.encode(text_model.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert prompt == expected
    assert ktjax.chat(text_model, messages, max_new_tokens=4).token_ids == \
        ktjax.generate(text_model, prompt, max_new_tokens=4).token_ids


def test_text_prompt_without_tokenizer_names_the_missing_file(checkpoint):
    model = ktjax.load(checkpoint[1], dtype="float32")
    with pytest.raises(ValueError, match="tokenizer.json: missing"):
        ktjax.generate(model, "some text", max_new_tokens=2)
