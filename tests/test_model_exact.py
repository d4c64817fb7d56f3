"""ktjax's DeepSeek model is the same function as transformers' DeepseekV3/V2ForCausalLM."""

import jax.numpy as jnp
import numpy as np
import pytest

import ktjax
from ktjax import engine
from reference import make_reference, reference_logits, save_reference

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


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    ref = make_reference(kind, seed=len(request.param), **overrides)
    path = save_reference(ref, tmp_path_factory.mktemp(request.param))
    model = ktjax.load(path, dtype="float32")
    tokens = np.random.default_rng(1).integers(0, ref.config.vocab_size, (2, 7))  # batch 2, odd length
    return ref, model, tokens, reference_logits(ref, tokens)


def test_prefill_logits_match_reference(case):
    _, model, tokens, expected = case
    got = ktjax.logits(model, tokens)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    assert rel_err(got, expected) < 1e-4


def test_token_by_token_decode_reproduces_prefill(case):
    _, model, tokens, expected = case
    B, T = tokens.shape
    cache = model.module.init_cache(B, T + 3)
    for t in range(T):
        logits, cache = engine.decode_step(model.graphdef, model.params, cache, jnp.asarray(tokens[:, t], jnp.int32),
                                           jnp.full((B,), t, jnp.int32))
        assert rel_err(logits, expected[:, t]) < 1e-4, f"position {t}"


def test_chunked_prefill_then_decode_reproduces_prefill(case):
    _, model, tokens, expected = case
    B, T = tokens.shape
    cache = model.module.init_cache(B, 16)
    logits, cache = engine.prefill(model.graphdef, model.params, cache, jnp.asarray(tokens[:, :3], jnp.int32),
                                   jnp.zeros((B,), jnp.int32), jnp.full((B,), 2, jnp.int32))
    assert rel_err(logits, expected[:, 2]) < 1e-4
    logits, cache = engine.prefill(model.graphdef, model.params, cache, jnp.asarray(tokens[:, 3:5], jnp.int32),
                                   jnp.full((B,), 3, jnp.int32), jnp.full((B,), 1, jnp.int32))
    assert rel_err(logits, expected[:, 4]) < 1e-4
    for t in range(5, T):
        logits, cache = engine.decode_step(model.graphdef, model.params, cache, jnp.asarray(tokens[:, t], jnp.int32),
                                           jnp.full((B,), t, jnp.int32))
        assert rel_err(logits, expected[:, t]) < 1e-4, f"position {t}"


def test_rows_at_different_positions_decode_independently(tmp_path):
    ref = make_reference("v3", seed=3)
    model = ktjax.load(save_reference(ref, tmp_path))
    a, b = np.array([[5, 9, 13, 2, 7]]), np.array([[11, 4, 8]])
    exp_a, exp_b = reference_logits(ref, a)[0], reference_logits(ref, b)[0]
    cache = model.module.init_cache(2, 8)
    for t in range(5):  # row 1 starts two steps later than row 0
        tok = [a[0, t], b[0, t - 2] if t >= 2 else 0]
        pos = [t, max(t - 2, 0)]
        logits, cache = engine.decode_step(model.graphdef, model.params, cache, jnp.asarray(tok, jnp.int32),
                                           jnp.asarray(pos, jnp.int32))
        assert rel_err(logits[0], exp_a[t]) < 1e-4
        if t >= 2:
            assert rel_err(logits[1], exp_b[t - 2]) < 1e-4


def test_routing_is_not_degenerate(case):
    """Guard on the fixture: different tokens must pick different experts, or the MoE test proves little."""
    from ktjax.models.moe import route
    ref, model, tokens, _ = case
    cfg = model.config
    x = np.random.default_rng(0).standard_normal((64, cfg.hidden_size)).astype(np.float32)
    moe = model.params["moe_layers"]["mlp"]["gate"]
    bias = moe.get("e_score_correction_bias")
    _, idx = route(jnp.asarray(x), moe["weight"][...][0], None if bias is None else bias[...][0], cfg)
    idx = np.sort(np.asarray(idx), axis=1)
    assert len(np.unique(idx)) >= cfg.n_routed_experts // 2
    assert len(np.unique(idx, axis=0)) >= 4  # many distinct expert sets across tokens


def test_bfloat16_model_tracks_float32(tmp_path):
    ref = make_reference("v3", seed=5)
    path = save_reference(ref, tmp_path)
    tokens = np.random.default_rng(2).integers(0, 97, (1, 9))
    f32 = np.asarray(ktjax.logits(ktjax.load(path, dtype="float32"), tokens))
    bf16 = ktjax.logits(ktjax.load(path, dtype="bfloat16"), tokens)
    assert bf16.dtype == jnp.float32
    assert rel_err(bf16, f32) < 5e-2
