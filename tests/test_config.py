"""config.json in, a validated frozen ModelConfig out; anything unsupported names its field."""

import dataclasses
import json
import os

import pytest

from ktjax.config import ConfigError, ModelConfig

FULL = os.path.join(os.path.dirname(__file__), "..", "scripts", "deepseek_v3_671B_config.json")
PUBLISHED = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
    "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "norm_topk_prob": True, "first_k_dense_replace": 3, "moe_layer_freq": 1, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu",
    "rms_norm_eps": 1e-06, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False, "eos_token_id": 1, "bos_token_id": 0, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}


def test_published_deepseek_v3_config():
    c = ModelConfig.from_dict(PUBLISHED)
    assert c.cache_dim == 576 and c.qk_head_dim == 192
    assert c.layer_kinds[:4] == ("dense", "dense", "dense", "moe") and len(c.layer_kinds) == 61
    assert c.rope_scaling.factor == 40 and c.rope_scaling.original_max_position_embeddings == 4096
    assert c.fp8_block_size == (128, 128)
    m = 0.1 * 1.0 * __import__("math").log(40) + 1.0
    assert c.softmax_scale == pytest.approx(192**-0.5 * m * m)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.vocab_size = 3


def test_full_size_config_file_parses_like_the_published_one():
    assert ModelConfig.from_json(FULL) == ModelConfig.from_dict(PUBLISHED)


def test_transformers5_rope_parameters_spelling_equals_published_spelling():
    d = dict(PUBLISHED)
    scaling = dict(d.pop("rope_scaling"))
    scaling["rope_type"] = scaling.pop("type")
    d["rope_parameters"] = {**scaling, "rope_theta": d.pop("rope_theta")}
    assert ModelConfig.from_dict(d) == ModelConfig.from_dict(PUBLISHED)


def test_to_dict_round_trips():
    c = ModelConfig.from_dict(PUBLISHED)
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_null_q_lora_rank_means_plain_q_proj():
    assert ModelConfig.from_dict({**PUBLISHED, "q_lora_rank": None}).q_lora_rank is None


def test_v2_defaults_softmax_greedy():
    d = {k: v for k, v in PUBLISHED.items() if k not in ("topk_method", "scoring_func", "rope_scaling", "quantization_config")}
    c = ModelConfig.from_dict({**d, "model_type": "deepseek_v2"})
    assert (c.scoring_func, c.topk_method, c.rope_scaling) == ("softmax", "greedy", None)


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"topk_method": "random"}, "topk_method"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"hidden_size": None}, "hidden_size"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"n_group": 7}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling.rope_type"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config.quant_method"),
])
def test_unsupported_field_is_named(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_dict({**PUBLISHED, **change})


def test_from_json_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**PUBLISHED, "topk_method": "x"}))
    with pytest.raises(ConfigError, match=r"config\.json: field 'topk_method'"):
        ModelConfig.from_json(tmp_path)


def test_moe_layer_freq_interleaves_dense_and_moe_layers():
    c = ModelConfig.from_dict({**PUBLISHED, "num_hidden_layers": 6, "first_k_dense_replace": 1, "moe_layer_freq": 2})
    assert c.layer_kinds == ("dense", "dense", "moe", "dense", "moe", "dense")
