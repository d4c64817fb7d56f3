"""LoRA adapters: the forward with adapters is PEFT's (logits and gradients against transformers +
PEFT, float32), PEFT export / import round trips, merging equals applying."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ktjax
from ktjax.io.peft import peft_names, read_adapter, save_adapter
from ktjax.lora.config import DEFAULT_TARGETS, LoRAConfig, flatten, get_path, resolve_sites, sites_of
from ktjax.lora.modules import init_adapters, lora_graph
from ktjax.train.config import TrainConfig
from ktjax.train.resident import adapter_nll
from reference import make_reference, reference_logits, save_reference


def rel_err(a, ref):
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


def random_adapters(cfg, lcfg, seed=1, scale=0.05):
    """Adapters with non-zero B (fresh ones are the identity)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + scale * rng.standard_normal(x.shape)).astype(np.float32),
                        init_adapters(cfg, lcfg, seed))


# test_finetune's vocabulary (its tokenizer's): same config, so both files share compiled segments.
VOCAB = 661


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    path = save_reference(fresh_reference(), tmp_path_factory.mktemp("v3"))
    return path, ktjax.load(path, dtype="float32")


def fresh_reference():
    return make_reference("v3", seed=5, vocab_size=VOCAB)  # PEFT modifies the model it wraps: one per test


# PEFT's own notes when it converts expert targets to transformers 5's fused tensors.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning",
                                        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TOKENS = np.random.default_rng(0).integers(0, 97, (2, 9))


def test_target_names_resolve_like_peft(v3):
    cfg = v3[1].config
    names = lambda t: sorted((s.group, s.name) for s in resolve_sites(cfg, t))  # noqa: E731
    assert names(DEFAULT_TARGETS) == sorted((g, f"self_attn.{p}") for g in ("dense", "moe") for p in
                                              ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"))
    assert names(["shared_experts"]) == [("moe", f"mlp.shared_experts.{p}") for p in ("down_proj", "gate_proj",
                                                                                       "up_proj")]
    assert names(["dense_mlp"]) == [("dense", f"mlp.{p}") for p in ("down_proj", "gate_proj", "up_proj")]
    # A bare projection name selects every module of that name, as PEFT does.
    assert names(["gate_proj"]) == [("dense", "mlp.gate_proj"), ("moe", "mlp.experts.gate_proj"),
                                    ("moe", "mlp.shared_experts.gate_proj")]
    assert len(resolve_sites(cfg, ["all"])) == 5 + 3 + 5 + 3 + 3
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        resolve_sites(cfg, ["qkv"])
    with pytest.raises(ValueError, match="select no module"):
        resolve_sites(cfg, ["q_proj"])  # this model has q LoRA


def test_zero_adapter_leaves_the_forward_unchanged(v3):
    _, model = v3
    lcfg = LoRAConfig(rank=4, targets=("all",))
    adapted = ktjax.apply_adapter(model, init_adapters(model.config, lcfg, jax.random.key(0)), lcfg)
    np.testing.assert_allclose(ktjax.logits(adapted, TOKENS), ktjax.logits(model, TOKENS), rtol=0, atol=1e-6)


def test_exported_adapter_loaded_by_peft_gives_the_same_logits(v3, tmp_path, targets=("all",)):
    from peft import PeftModel

    path, model = v3
    ref = fresh_reference()
    lcfg = LoRAConfig(rank=4, alpha=8, targets=targets)
    adapters = random_adapters(model.config, lcfg)
    adapted = ktjax.apply_adapter(model, adapters, lcfg)
    got = np.asarray(ktjax.logits(adapted, TOKENS))

    save_adapter(tmp_path, model.config, adapters, lcfg, base_model_name_or_path=path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["r"] == 4
    assert conf["lora_alpha"] == 8 and conf["base_model_name_or_path"] == path
    from safetensors.numpy import load_file
    names = load_file(tmp_path / "adapter_model.safetensors")
    assert names["base_model.model.model.layers.1.self_attn.q_a_proj.lora_A.weight"].shape == (4, 64)
    assert names["base_model.model.model.layers.1.self_attn.q_a_proj.lora_B.weight"].shape == (24, 4)

    peft_model = PeftModel.from_pretrained(ref, str(tmp_path)).eval()
    expected = reference_logits(peft_model, TOKENS)
    base = np.asarray(ktjax.logits(model, TOKENS))
    assert rel_err(base, expected) > 1e-2  # the adapter matters
    assert rel_err(got, expected) < 1e-4

    # Token-by-token decoding (kv_b_proj absorbed into query and output) runs the adapter too.
    # (The empty cache committed to the device as the steps' caches are: one compiled step, not two.)
    cache = jax.device_put(adapted.executor.init_cache(*TOKENS.shape), jax.devices()[0])
    for t in range(TOKENS.shape[1]):
        step, cache = adapted.executor.chunk_logits(cache, TOKENS[:, t:t + 1], np.full((TOKENS.shape[0],), t))
        assert rel_err(step[:, 0], expected[:, t]) < 1e-4, f"position {t}"

    # Read back: same tensors, and merging gives the same function as applying.
    again, lcfg2 = read_adapter(tmp_path, model.config)
    assert lcfg2.rank == 4 and lcfg2.alpha == 8
    for (p, a), (_, b) in zip(sorted(flatten(adapters).items()), sorted(flatten(again).items())):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=str(p))
    loaded = ktjax.load_adapter(model, tmp_path)
    np.testing.assert_allclose(ktjax.logits(loaded, TOKENS), got, rtol=0, atol=1e-5)
    merged = ktjax.load_adapter(model, tmp_path, merge=True)
    assert merged.executor.graphdef == model.executor.graphdef
    assert rel_err(ktjax.logits(merged, TOKENS), got) < 1e-5


def test_adapter_written_by_peft_loads_into_ktjax(v3, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, model = v3
    ref = fresh_reference()
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=["q_b_proj", "kv_b_proj", "o_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    torch.manual_seed(0)
    peft_model = get_peft_model(ref, cfg).eval()
    expected = reference_logits(peft_model, TOKENS)
    peft_model.save_pretrained(tmp_path)
    loaded = ktjax.load_adapter(model, tmp_path)
    assert loaded.adapter[1].scale == 2.5
    assert rel_err(ktjax.logits(loaded, TOKENS), expected) < 1e-4


# Shared with test_finetune's offloaded run, so the per-layer segments compile once.
GRAD_LORA = LoRAConfig(rank=3, alpha=6, targets=("attention", "shared_experts", "dense_mlp"))
GRAD_SHAPE = (2, 32)


def test_adapter_gradients_match_peft_in_torch(v3, tmp_path):
    """d loss / d (lora_A, lora_B) for every module-style target, masked loss, against PEFT's autograd;
    and the offloaded model's (experts in host memory, streamed forward and backward) against both."""
    from peft import PeftModel

    path, model = v3
    ref = fresh_reference()
    lcfg = GRAD_LORA
    adapters = random_adapters(model.config, lcfg, seed=7)
    save_adapter(tmp_path, model.config, adapters, lcfg)
    tokens = np.random.default_rng(3).integers(0, 97, GRAD_SHAPE)
    mask = np.zeros(GRAD_SHAPE, bool)
    mask[0, 4:] = True
    mask[1, 2:17] = True

    peft_model = PeftModel.from_pretrained(ref, str(tmp_path), is_trainable=True).eval()
    logits = peft_model(torch.as_tensor(tokens)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, torch.as_tensor(tokens[:, 1:, None])).squeeze(-1)
    w = torch.as_tensor(mask[:, 1:], dtype=torch.float32)
    ((nll * w).sum() / w.sum()).backward()
    torch_grads = {n.replace(".default", ""): p.grad.numpy() for n, p in peft_model.named_parameters()
                   if "lora_" in n}

    graphdef, _ = lora_graph(model.config, model.dtype, lcfg)

    def loss(ad):
        s, n = adapter_nll(graphdef, model.executor.base_params, ad, jnp.asarray(tokens), jnp.asarray(mask), remat=True,
                           loss_chunk=7)
        return s / n

    grads = jax.jit(jax.grad(loss))(adapters)

    offloaded = ktjax.load(path, dtype="float32", placement={r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"},
                           max_context=64)
    trainer = offloaded.executor.trainer(lcfg, resolve_sites(model.config, lcfg.targets), TrainConfig())
    s, n, off_grads, stats = trainer.micro_loss_and_grads(jax.tree.map(jnp.asarray, adapters), tokens[None],
                                                          mask[None], None)
    # Both MoE layers' experts crossed from host memory twice (forward, backward).
    E, F, D = 8, 32, 64
    assert stats.bytes_from_host == 2 * 2 * E * 3 * F * D * 4
    off_grads = jax.tree.map(lambda g: np.asarray(g) / float(n), off_grads)

    compared = 0
    for site in sites_of(grads):
        for which, path_ in (("A", site.a_path), ("B", site.b_path)):
            g, go = np.asarray(get_path(grads, path_)), np.asarray(get_path(off_grads, path_))
            assert rel_err(go, g) < 1e-5, f"offloaded {site}"
            for name, idx in peft_names(model.config, site):
                t = torch_grads[f"{name}.lora_{which}.weight"]
                assert rel_err(g[idx], t) < 1e-4, f"{name}.lora_{which}"
                compared += 1
    assert compared == 2 * (5 * 3 + 3 * 1 + 3 * 2)


def test_v2_q_proj_adapter_matches_peft(tmp_path):
    from peft import PeftModel

    ref = make_reference("v2", seed=2)
    path = save_reference(ref, tmp_path / "m")
    model = ktjax.load(path, dtype="float32")
    lcfg = LoRAConfig(rank=2, alpha=4)
    assert {s.name for s in resolve_sites(model.config, lcfg.targets)} == {
        "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj"}
    adapters = random_adapters(model.config, lcfg, seed=3)
    save_adapter(tmp_path / "a", model.config, adapters, lcfg)
    tokens = TOKENS % 89
    expected = reference_logits(PeftModel.from_pretrained(ref, str(tmp_path / "a")).eval(), tokens)
    assert rel_err(ktjax.logits(ktjax.apply_adapter(model, adapters, lcfg), tokens), expected) < 1e-4


def test_bad_adapter_directories_name_the_file(v3, tmp_path):
    _, model = v3
    with pytest.raises(ValueError, match="adapter_config.json: not found"):
        read_adapter(tmp_path, model.config)
    lcfg = LoRAConfig(rank=2)
    save_adapter(tmp_path, model.config, init_adapters(model.config, lcfg, jax.random.key(0)), lcfg)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf | {"r": 3}))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: self_attn.\w+ lora_A has shape \(2, \d+\), "
                                         r"expected \(3, \d+\)"):
        read_adapter(tmp_path, model.config)
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=true is not supported"):
        read_adapter(tmp_path, model.config)
