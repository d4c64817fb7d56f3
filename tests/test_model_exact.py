"""ktjax's DeepSeek model is the same function as transformers' DeepseekV3/V2ForCausalLM, on every
executor: all parameters on the device (one scanned program), and routed experts held apart in host
memory (per-layer segments, experts streamed or computed on the host CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ktjax
from ktjax import kernels
from reference import make_reference, reference_greedy, reference_logits, save_reference

ALL_HOST = {r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"}
EXECUTORS = {"resident": {}, "offloaded": dict(placement=ALL_HOST, max_context=64, max_batch=4)}

YARN = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0}

CASES = {
    "v3": ("v3", {}),
    "v3-no-q-lora": ("v3", dict(q_lora_rank=None)),
    "v3-one-group": ("v3", dict(n_group=1, topk_group=1)),
    "v3-unnormalised-topk": ("v3", dict(norm_topk_prob=False, routed_scaling_factor=1.5)),
    "v3-yarn-rotate-half": ("v3", dict(rope_parameters=YARN, rope_interleave=False)),
    "v3-yarn-interleaved": ("v3", dict(rope_parameters=YARN, rope_interleave=True)),
    "v3-no-dense-layers": ("v3", dict(first_k_dense_replace=0)),
    "v3-several-dense-layers": ("v3", dict(first_k_dense_replace=2, num_hidden_layers=4)),
    "v3-tied-embeddings-attention-bias": ("v3", dict(tie_word_embeddings=True, attention_bias=True)),
    "v2-greedy-softmax": ("v2", {}),
    "v2-group-limited-greedy": ("v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    "v2-lite-like-q-lora": ("v2", dict(q_lora_rank=20, first_k_dense_replace=0)),
}


def rel_err(a, ref):
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


def empty_cache(model, batch: int, length: int):
    """The executor's empty KV cache, committed to the device as the caches its steps return are: a
    step's program then compiles once (an uncommitted first input compiles a second variant)."""
    return jax.device_put(model.executor.init_cache(batch, length), jax.devices()[0])


@pytest.fixture(scope="module", params=list(CASES))
def reference(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    ref = make_reference(kind, seed=len(request.param), **overrides)
    path = save_reference(ref, tmp_path_factory.mktemp(request.param))
    tokens = np.random.default_rng(1).integers(0, ref.config.vocab_size, (2, 7))  # batch 2, odd length
    return ref, path, tokens, reference_logits(ref, tokens)


@pytest.fixture(scope="module", params=list(EXECUTORS))
def case(request, reference):
    ref, path, tokens, expected = reference
    model = ktjax.load(path, dtype="float32", **EXECUTORS[request.param])
    assert model.placement.offloaded == (request.param == "offloaded")
    return ref, model, tokens, expected


def test_prefill_logits_match_reference(case):
    _, model, tokens, expected = case
    got = ktjax.logits(model, tokens)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    assert rel_err(got, expected) < 1e-4


def test_token_by_token_decode_reproduces_prefill(case):
    _, model, tokens, expected = case
    B, T = tokens.shape
    cache = empty_cache(model, B, 16)  # the length the chunked test uses: the same compiled programs
    for t in range(T):
        logits, cache = model.executor.chunk_logits(cache, tokens[:, t:t + 1], np.full((B,), t))
        assert rel_err(logits[:, 0], expected[:, t]) < 1e-4, f"position {t}"


def test_chunked_prefill_then_decode_reproduces_prefill(case):
    _, model, tokens, expected = case
    B, T = tokens.shape
    cache = empty_cache(model, B, 16)
    # Two chunks of 3 (one compiled program per chunk length), the second at position 3 after the first.
    logits, cache = model.executor.chunk_logits(cache, tokens[:, :3], np.zeros((B,)))
    assert rel_err(logits, expected[:, :3]) < 1e-4
    logits, cache = model.executor.chunk_logits(cache, tokens[:, 3:6], np.full((B,), 3))
    assert rel_err(logits, expected[:, 3:6]) < 1e-4
    for t in range(6, T):
        logits, cache = model.executor.chunk_logits(cache, tokens[:, t:t + 1], np.full((B,), t))
        assert rel_err(logits[:, 0], expected[:, t]) < 1e-4, f"position {t}"


@pytest.mark.parametrize("executor", list(EXECUTORS))
def test_rows_at_different_positions_decode_independently(tmp_path, executor):
    ref = make_reference("v3", seed=3)
    model = ktjax.load(save_reference(ref, tmp_path), **EXECUTORS[executor])
    a, b = np.array([[5, 9, 13, 2, 7]]), np.array([[11, 4, 8]])
    exp_a, exp_b = reference_logits(ref, a)[0], reference_logits(ref, b)[0]
    cache = empty_cache(model, 2, 16)  # the "v3" case's shapes (same config): its compiled decode step
    for t in range(5):  # row 1 starts two steps later than row 0
        tok = [[a[0, t]], [b[0, t - 2] if t >= 2 else 0]]
        pos = [t, max(t - 2, 0)]
        logits, cache = model.executor.chunk_logits(cache, np.asarray(tok), np.asarray(pos))
        assert rel_err(logits[0, 0], exp_a[t]) < 1e-4
        if t >= 2:
            assert rel_err(logits[1, 0], exp_b[t - 2]) < 1e-4


def test_routing_is_not_degenerate(reference):
    """Guard on the fixture: different tokens must pick different experts, or the MoE test proves little."""
    from ktjax.models.moe import route
    _, path, _, _ = reference
    model = ktjax.load(path, dtype="float32")
    cfg = model.config
    x = np.random.default_rng(0).standard_normal((64, cfg.hidden_size)).astype(np.float32)
    moe = model.executor.params["moe_layers"]["mlp"]["gate"]
    bias = moe.get("e_score_correction_bias")
    _, idx = route(jnp.asarray(x), moe["weight"][...][0], None if bias is None else bias[...][0], cfg)
    idx = np.sort(np.asarray(idx), axis=1)
    assert len(np.unique(idx)) >= cfg.n_routed_experts // 2
    assert len(np.unique(idx, axis=0)) >= 4  # many distinct expert sets across tokens


def test_bfloat16_model_tracks_float32(tmp_path):
    ref = make_reference("v3", seed=5)
    path = save_reference(ref, tmp_path)
    tokens = np.random.default_rng(2).integers(0, 97, (2, 7))  # the "v3" case's shape: its compiled float32 forward
    f32 = np.asarray(ktjax.logits(ktjax.load(path, dtype="float32"), tokens))
    bf16 = ktjax.logits(ktjax.load(path, dtype="bfloat16"), tokens)
    assert bf16.dtype == jnp.float32
    assert rel_err(bf16, f32) < 5e-2


@pytest.mark.parametrize("executor", list(EXECUTORS))
def test_interleaved_dense_and_moe_layers_match_a_reference_built_that_way(tmp_path, executor):
    """moe_layer_freq > 1 (which transformers' config ignores): the reference is transformers'
    model with a dense DeepseekV3MLP put in the place of every layer the frequency skips."""
    import json

    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

    ref = make_reference("v3", seed=13, num_hidden_layers=5, first_k_dense_replace=1)
    for i in (1, 3):  # with moe_layer_freq=2 layers 1 and 3 are dense, 2 and 4 MoE
        ref.model.layers[i].mlp = DeepseekV3MLP(ref.config)
        with torch.no_grad():
            for p in ref.model.layers[i].mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) / p.shape[-1] ** 0.5)
    path = save_reference(ref, tmp_path)
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    config["moe_layer_freq"] = 2
    with open(f"{path}/config.json", "w") as f:
        json.dump(config, f)
    model = ktjax.load(path, dtype="float32", **EXECUTORS[executor])
    assert model.config.layer_kinds == ("dense", "dense", "moe", "dense", "moe")
    tokens = np.random.default_rng(6).integers(0, 97, (2, 7))
    assert rel_err(ktjax.logits(model, tokens), reference_logits(ref, tokens)) < 1e-4


def no_eos(model):
    """The model without an end-of-sentence id: it generates every token asked for, as the reference does."""
    return dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_id=None))


@pytest.mark.slow
@pytest.mark.parametrize("executor", list(EXECUTORS))
def test_yarn_positions_beyond_the_original_context_match_transformers(tmp_path, executor):
    """YaRN stretches an original context of 16 positions by 4: prefill and decode past position 16."""
    ref = make_reference("v3", seed=17, rope_parameters={**YARN, "original_max_position_embeddings": 16})
    model = no_eos(ktjax.load(save_reference(ref, tmp_path), dtype="float32", **EXECUTORS[executor]))
    tokens = np.random.default_rng(7).integers(0, 97, (2, 40))
    assert rel_err(ktjax.logits(model, tokens), reference_logits(ref, tokens)) < 1e-4
    prompt = tokens[0, :10].tolist()
    assert ktjax.generate(model, prompt, max_new_tokens=20).token_ids == reference_greedy(ref, prompt, 20)


# Head sizes the kernels' tiles cover (powers of two, at least 16 wide), so the Pallas kernels run.
KERNEL_SHAPES = dict(kv_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)


@pytest.mark.slow
@pytest.mark.parametrize("executor", list(EXECUTORS))
def test_the_pallas_kernels_inside_the_model_give_transformers_logits(tmp_path, executor, monkeypatch):
    """attention="interpret": the MLA prefill and decode kernels, run by the Pallas interpreter, in the model."""
    ran = []
    for name in ("mla_prefill_pallas", "mla_decode_pallas"):  # record each kernel the model traces, then run it
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **kw: ran.append(_name) or _real(*a, **kw))
    ref = make_reference("v3", seed=19, **KERNEL_SHAPES)
    model = no_eos(ktjax.load(save_reference(ref, tmp_path), dtype="float32", attention="interpret",
                              **EXECUTORS[executor]))
    tokens = np.random.default_rng(9).integers(0, 97, (2, 20))  # a cache of 20 keys: one whole key tile and more
    assert rel_err(ktjax.logits(model, tokens), reference_logits(ref, tokens)) < 1e-4
    assert "mla_prefill_pallas" in ran
    prompt = tokens[1, :17].tolist()
    assert ktjax.generate(model, prompt, max_new_tokens=5).token_ids == reference_greedy(ref, prompt, 5)
    assert "mla_decode_pallas" in ran
