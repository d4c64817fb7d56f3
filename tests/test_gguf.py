"""DeepSeek GGUF files (llama.cpp's `deepseek2`): config, tensors, quantized experts, tokenizer, errors.

The GGUF files are written here with the `gguf` package's writer from transformers-built checkpoints,
by `write_gguf`, which follows llama.cpp's converter: convert_hf_to_gguf.py's `DeepseekV2Model`
(ggml-org/llama.cpp conversion/deepseek.py at 7bca1fd9, with `TextModel.set_gguf_parameters` of
conversion/base.py at 2bbcf7fc): experts stacked [E, out, in], kv_b_proj split into k_b (transposed
per head) and v_b, e_score_correction_bias renamed to exp_probs_b.bias, MTP layers skipped, names from
gguf's TensorNameMap, and the metadata keys of `set_gguf_parameters`. `split_kv_b=False` writes the
layout of files converted before llama.cpp's MLA change (one attn_kv_b, per-head key/value lengths).

References: transformers' DeepSeek-V2/V3 on the same weights (the GGUF's, dequantized by
`gguf.quants.dequantize`), `gguf.quants.dequantize` for the expert blocks, and the checkpoint's own
tokenizer.json for the tokenizer.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import gguf
import ktjax
from ktjax.cli.main import main
from ktjax.experts.quant import dequantize as dequantize_quant
from ktjax.experts.weights import ExpertFormat
from ktjax.io import gguf_decode
from ktjax.io.checkpoint import CheckpointError
from ktjax.io.gguf import expert_arrays, expert_buffer, open_gguf
from reference import make_reference, reference_logits, save_reference
from tokenizer_fixtures import vocab_size, write_tokenizer

Q = gguf.GGMLQuantizationType
TOKENS = np.array([[5, 17, 3, 42, 8, 1, 60, 33, 9, 2, 71, 12]])


# ---- the writer: llama.cpp's converter, for the tensors and metadata a DeepSeek checkpoint has ----

def hf_tensors(path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update({k: np.asarray(v, np.float32) for k, v in safetensors.numpy.load_file(f).items()})
    return out


def write_metadata(w: gguf.GGUFWriter, h: dict, *, split_kv_b: bool) -> None:
    """`TextModel.set_gguf_parameters` then `DeepseekV2Model.set_gguf_parameters`."""
    w.add_block_count(h["num_hidden_layers"])
    w.add_context_length(h["max_position_embeddings"])
    w.add_embedding_length(h["hidden_size"])
    w.add_feed_forward_length(h["intermediate_size"])
    w.add_head_count(h["num_attention_heads"])
    w.add_head_count_kv(1)  # MLA as MQA
    rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
    w.add_rope_freq_base(rope.get("rope_theta", h.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(h["rms_norm_eps"])
    w.add_expert_count(h["n_routed_experts"])
    w.add_expert_used_count(h["num_experts_per_tok"])
    w.add_expert_group_count(h["n_group"])
    w.add_expert_group_used_count(h["topk_group"])
    if h.get("scoring_func") == "sigmoid":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    elif h.get("scoring_func") == "softmax":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    if rope.get("rope_type", rope.get("type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_leading_dense_block_count(h["first_k_dense_replace"])
    w.add_vocab_size(h["vocab_size"])
    if h.get("q_lora_rank") is not None:
        w.add_q_lora_rank(h["q_lora_rank"])
    kv, nope, rope_dim, v = h["kv_lora_rank"], h["qk_nope_head_dim"], h["qk_rope_head_dim"], h["v_head_dim"]
    w.add_kv_lora_rank(kv)
    if split_kv_b:
        w.add_key_length(kv + rope_dim)
        w.add_value_length(kv)
        w.add_key_length_mla(nope + rope_dim)
        w.add_value_length_mla(v)
    else:  # before llama.cpp's MLA change: the per-head sizes
        w.add_key_length(nope + rope_dim)
        w.add_value_length(v)
    w.add_expert_feed_forward_length(h["moe_intermediate_size"])
    w.add_expert_shared_count(h["n_shared_experts"])
    w.add_expert_weights_scale(h["routed_scaling_factor"])
    if h.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope_dim)
    if rope.get("mscale_all_dim") is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def write_vocab(w: gguf.GGUFWriter, tokenizer_dir) -> None:
    """`TextModel._set_vocab_gpt2` with gguf's SpecialVocab (merges, special ids, chat template)."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    tokens, types = [], []
    for i in range(max(reverse) + 1):
        t = reverse.get(i, f"[PAD{i}]")
        tokens.append(t)
        if i not in reverse:
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            types.append(gguf.TokenType.CONTROL if tok.added_tokens_decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-v3")  # what get_vocab_base_pre answers for DeepSeek-V3's pre-tokenizer
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True).add_to_gguf(w)


def write_gguf(out, hf_dir, tensors: dict[str, np.ndarray], *, raw: dict | None = None, split_kv_b: bool = True,
               tokenizer_dir=None, hparams: dict | None = None, split_max_tensors: int = 0) -> str:
    """A deepseek2 GGUF from transformers-named float tensors; `raw` overrides a tensor with stored
    blocks (name -> (uint8 [..., bytes per row], GGML type)); split_max_tensors > 0 writes a split set
    (name-00001-of-0000N.gguf, as llama.cpp's --split-max-tensors)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        h = {**json.load(f), **(hparams or {})}
    h.setdefault("n_routed_experts", h.get("num_local_experts"))
    raw = dict(raw or {})
    n_layers = h["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, n_layers)
    w = gguf.GGUFWriter(out, "deepseek2", split_max_tensors=split_max_tensors)
    write_metadata(w, h, split_kv_b=split_kv_b)
    if tokenizer_dir is not None:
        write_vocab(w, tokenizer_dir)
        generation = os.path.join(tokenizer_dir, "generation_config.json")
        if os.path.exists(generation):  # gguf.Metadata's general.sampling.* from generation_config.json
            with open(generation) as f:
                g = json.load(f)
            for key, add in (("temperature", w.add_sampling_temp), ("top_p", w.add_sampling_top_p),
                             ("top_k", w.add_sampling_top_k)):
                if g.get(key) is not None:
                    add(g[key])

    def add(hf_name: str, data: np.ndarray, qtype=None) -> None:
        name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
        base, suffix = name.rsplit(".", 1)
        gname = names.get_name(base) + "." + suffix
        if qtype is None:
            w.add_tensor(gname, data.astype(np.float32))
        else:
            w.add_tensor(gname, data, raw_dtype=qtype)

    for name, data in tensors.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer is not None and layer >= n_layers:
            continue  # MTP
        if ".mlp.experts." in name:
            if name.endswith(".0.gate_proj.weight"):  # once per layer: merge the experts into 3-D stacks
                for proj in ("down_proj", "gate_proj", "up_proj"):
                    parts = [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in range(h["n_routed_experts"])]
                    if parts[0] in raw:
                        qtype = raw[parts[0]][1]
                        add(f"model.layers.{layer}.mlp.experts.{proj}.weight", np.stack([raw[p][0] for p in parts]), qtype)
                    else:
                        add(f"model.layers.{layer}.mlp.experts.{proj}.weight", np.stack([tensors[p] for p in parts]))
            continue
        if name.endswith("kv_b_proj.weight") and split_kv_b:
            H, nope, v = h["num_attention_heads"], h["qk_nope_head_dim"], h["v_head_dim"]
            kv_b = data.reshape(H, nope + v, data.shape[-1])
            add(name.replace("kv_b_proj", "k_b_proj"), np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1)))
            add(name.replace("kv_b_proj", "v_b_proj"), np.ascontiguousarray(kv_b[:, nope:]))
            continue
        if name in raw:
            add(name, *raw[name])
        else:
            add(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(out)


def reference_from(tensors: dict[str, np.ndarray], hf_dir, out_dir) -> transformers.PreTrainedModel:
    """transformers' model with these weights (a checkpoint directory written and loaded back)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = f.read()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(config)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cls = type(transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(out_dir)))
    return cls.from_pretrained(out_dir, dtype=torch.float32).eval()


def assert_logits_match(model, reference) -> None:
    ours = np.asarray(ktjax.logits(model, TOKENS))
    ref = reference_logits(reference, TOKENS)
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 1e-4 * scale, np.abs(ours - ref).max() / scale


# ---- quantized blocks -------------------------------------------------------------------------

def random_blocks(qtype, rows: int, cols: int, rng, *, tame: bool = True) -> np.ndarray:
    """uint8 [rows, bytes per row] of random blocks; `tame` keeps the float16 scales small and finite
    (weights of a usable size), else every byte is random."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if tame:
        scale_bytes = {Q.Q8_0: [(0, 2)], Q.Q4_0: [(0, 2)], Q.Q5_0: [(0, 2)], Q.Q4_K: [(0, 2), (2, 4)],
                       Q.Q3_K: [(108, 110)]}[qtype]
        unit = {Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 8, Q.Q5_0: 1 / 16, Q.Q4_K: 1 / 15 / 32, Q.Q3_K: 1 / 4 / 32}[qtype]
        for lo, hi in scale_bytes:
            d = (rng.uniform(0.5, 1.0, (rows, cols // block)) * unit / np.sqrt(cols)).astype(np.float16)
            b[..., lo:hi] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return b.reshape(rows, -1)


def dequantized(raw: np.ndarray, qtype, shape) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(shape)


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3")
    # hidden and expert sizes of whole Q4_K super-blocks (256); YaRN on, as DeepSeek-V3's config.
    model = make_reference("v3", seed=3, vocab_size=vocab_size() + 7, hidden_size=256, moe_intermediate_size=256,
                           intermediate_size=256, rope_scaling=dict(rope_type="yarn", factor=4.0,
                           original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                           mscale_all_dim=1.0))
    save_reference(model, path)
    write_tokenizer(path, template="r1")
    return str(path)


@pytest.fixture(scope="module")
def v3_gguf(v3_dir, tmp_path_factory):
    """The V3 checkpoint as a float GGUF with its tokenizer and chat template, alone in its directory."""
    return write_gguf(tmp_path_factory.mktemp("v3_gguf") / "model.gguf", v3_dir, hf_tensors(v3_dir),
                      tokenizer_dir=v3_dir, hparams={"scoring_func": "sigmoid"})


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("v2")
    save_reference(make_reference("v2", seed=4), path)
    return str(path)


# ---- float files: every name, layout and metadata key ---------------------------------------------

def test_v3_logits_equal_transformers(v3_dir, v3_gguf, tmp_path):
    tensors = hf_tensors(v3_dir)
    model = ktjax.load(v3_gguf, dtype="float32")
    assert model.config.model_type == "deepseek_v3" and model.config.rope_scaling.factor == 4.0
    assert_logits_match(model, reference_from(tensors, v3_dir, tmp_path / "ref"))


def test_v2_with_whole_kv_b_logits_equal_transformers(v2_dir, tmp_path):
    tensors = hf_tensors(v2_dir)
    file = write_gguf(tmp_path / "v2.gguf", v2_dir, tensors, split_kv_b=False)
    model = ktjax.load(file, dtype="float32")
    assert model.config.model_type == "deepseek_v2" and model.config.q_lora_rank is None
    assert_logits_match(model, reference_from(tensors, v2_dir, tmp_path / "ref"))


def test_a_split_set_loads_from_its_first_file_or_its_directory(v2_dir, tmp_path):
    tensors = hf_tensors(v2_dir)
    write_gguf(tmp_path / "v2.gguf", v2_dir, tensors, split_kv_b=False, split_max_tensors=10)
    files = sorted(os.listdir(tmp_path))
    assert len(files) > 2 and files[0] == f"v2-00001-of-{len(files):05d}.gguf"
    reference = reference_from(tensors, v2_dir, tmp_path.parent / "ref_split")
    assert_logits_match(ktjax.load(tmp_path / files[0], dtype="float32"), reference)
    assert_logits_match(ktjax.load(tmp_path, dtype="float32"), reference)
    os.remove(tmp_path / files[-1])
    with pytest.raises(CheckpointError, match=f"{files[-1]}: missing"):
        ktjax.load(tmp_path / files[0])


# ---- quantized experts: copied, not requantized ----------------------------------------------------

def quantize_checkpoint(tensors: dict[str, np.ndarray], expert_type, rng, *, others=None):
    """(the dequantized weights transformers computes with, the stored blocks): experts as random
    `expert_type` blocks; with `others`, every other matrix whose rows are whole blocks quantized by gguf."""
    tensors, raw = dict(tensors), {}
    for name, w in tensors.items():
        if ".mlp.experts." in name:
            b = random_blocks(expert_type, *w.shape, rng)
        elif others is not None and w.ndim == 2 and w.shape[1] % 32 == 0 and "kv_b_proj" not in name:
            b = gguf.quants.quantize(w, others)
        else:
            continue
        raw[name] = (b, expert_type if ".mlp.experts." in name else others)
        tensors[name] = dequantized(b, raw[name][1], w.shape)
    return tensors, raw


@pytest.mark.parametrize("qtype, fmt", [(Q.Q8_0, "int8"), (Q.Q4_K, "int4")], ids=["Q8_0", "Q4_K"])
def test_quantized_experts_are_kept_bit_exact_and_logits_equal_transformers(v3_dir, tmp_path, qtype, fmt, monkeypatch):
    monkeypatch.setattr("ktjax.io.gguf_file.DEQUANTIZE_CHUNK", 4096)  # large tensors' path: dequantized in runs of rows
    rng = np.random.default_rng(int(qtype))
    tensors, raw = quantize_checkpoint(hf_tensors(v3_dir), qtype, rng, others=Q.Q8_0)
    file = write_gguf(tmp_path / f"{qtype.name}.gguf", v3_dir, tensors, raw=raw, hparams={"scoring_func": "sigmoid"})
    model = ktjax.load(file, dtype="float32", expert_compute="gpu")
    assert model.placement.expert_format.name == fmt
    # Every expert's buffer decodes to the GGUF blocks' values, bit for bit.
    cfg = model.config
    for layer in cfg.moe_layers:
        for e in (0, cfg.n_routed_experts - 1):
            ex = model.executor.store.experts[layer][e]
            gate_up, down = ex.fmt.packed.dequantize(np.asarray(ex.w))
            names = [f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
            want_gate_up = np.concatenate([tensors[names[0]], tensors[names[1]]])
            assert np.array_equal(gate_up, want_gate_up) and np.array_equal(down, tensors[names[2]])
    reference = reference_from(tensors, v3_dir, tmp_path / "ref")
    assert_logits_match(model, reference)
    # The odd experts in host memory, computed there by the host-CPU kernels on the copied blocks (exactly:
    # float32 activations).
    on_host = ktjax.load(file, dtype="float32", placement={r"model\.layers\.\d+\.mlp\.experts\.\d*[13579]": "host"},
                         expert_compute="cpu", max_context=64, host_activations="float32")
    assert on_host.placement.host_experts
    assert_logits_match(on_host, reference)


def test_quantized_core_tensors_cross_as_blocks_and_dequantize_on_the_device_as_gguf_does(v3_dir, tmp_path):
    tensors, raw = quantize_checkpoint(hf_tensors(v3_dir), Q.Q4_K, np.random.default_rng(5), others=Q.Q8_0)
    file = write_gguf(tmp_path / "core.gguf", v3_dir, tensors, raw=raw)
    ckpt = open_gguf(file)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    fmt, arrays = ckpt.read_blocks(name)
    assert fmt == "int8" and arrays["q"].dtype == np.int8  # one byte per value crosses, not four
    on_device = jax.jit(dequantize_quant, static_argnums=(1, 2))(arrays, fmt, tensors[name].shape[1])
    np.testing.assert_array_equal(np.asarray(on_device), tensors[name])
    assert ckpt.read_blocks("model.norm.weight") is None  # float tensors are read as they are
    assert ckpt.read_blocks("model.layers.1.mlp.experts.0.gate_proj.weight") is None  # experts: `read_expert`


def test_info_shows_the_stored_types_per_group_and_what_they_become(v3_dir, tmp_path, capsys):
    tensors, raw = quantize_checkpoint(hf_tensors(v3_dir), Q.Q4_K, np.random.default_rng(8), others=Q.Q8_0)
    file = write_gguf(tmp_path / "info.gguf", v3_dir, tensors, raw=raw, hparams={"scoring_func": "sigmoid"})
    assert main(["info", "--model", file]) == 0
    rows = {line.split()[0] + (" " + line.split()[1] if line.split()[1] in ("MLP", "experts") else ""): line
            for line in capsys.readouterr().out.splitlines()[-9:] if line.strip()}
    assert "Q4_K x6" in rows["routed experts"] and rows["routed experts"].endswith("int4 (blocks copied)")
    assert "F32 x" in rows["attention"] and "Q8_0 x" in rows["attention"] and rows["attention"].endswith("(dequantized)")
    assert rows["norms"].split()[-1] in ("bfloat16", "float32") and "Q8_0" not in rows["norms"]


def test_types_without_an_exact_format_become_bf16_saying_so(v3_dir, tmp_path, capsys):
    rng = np.random.default_rng(6)
    tensors, raw = hf_tensors(v3_dir), {}
    for name, w in tensors.items():
        if ".mlp.experts." in name:
            b = rng.integers(0, 256, (w.shape[0], w.shape[1] // 256, 210), dtype=np.uint8)
            d = (rng.uniform(0.5, 1, b.shape[:2]) / 32 / 128 / np.sqrt(w.shape[1])).astype(np.float16)
            b[..., 208:210] = d.view(np.uint8).reshape(*b.shape[:2], 2)
            raw[name] = (b.reshape(w.shape[0], -1), Q.Q6_K)
            # bf16 experts in a float32 model: the values transformers must use are rounded to bf16 too
            tensors[name] = torch.from_numpy(dequantized(raw[name][0], Q.Q6_K, w.shape)).bfloat16().float().numpy()
    file = write_gguf(tmp_path / "q6k.gguf", v3_dir, tensors, raw=raw, hparams={"scoring_func": "sigmoid"})
    model = ktjax.load(file, dtype="float32", expert_compute="gpu")
    err = capsys.readouterr().err
    assert model.placement.expert_format.name == "bf16"
    assert "routed experts stored in Q6_K" in err and "dequantized to bf16 (no expert format holds it exactly)" in err
    assert_logits_match(model, reference_from(tensors, v3_dir, tmp_path / "ref"))


def test_a_q4_k_m_file_keeps_q4_k_blocks_and_requantizes_the_rest_saying_so(v3_dir, tmp_path, capsys):
    # Q4_K_M: gate and up in Q4_K, down in Q6_K (in some layers): int4 holds most bytes exactly.
    rng = np.random.default_rng(7)
    tensors, raw = quantize_checkpoint(hf_tensors(v3_dir), Q.Q4_K, rng)
    for name, w in tensors.items():
        if name.endswith("down_proj.weight") and ".mlp.experts." in name:
            b = rng.integers(0, 256, (w.shape[0], w.shape[1] // 256, 210), dtype=np.uint8)
            d = (rng.uniform(0.5, 1, b.shape[:2]) / 32 / 128 / np.sqrt(w.shape[1])).astype(np.float16)
            b[..., 208:210] = d.view(np.uint8).reshape(*b.shape[:2], 2)
            raw[name] = (b.reshape(w.shape[0], -1), Q.Q6_K)
            tensors[name] = dequantized(raw[name][0], Q.Q6_K, w.shape)
    file = write_gguf(tmp_path / "q4_k_m.gguf", v3_dir, tensors, raw=raw, hparams={"scoring_func": "sigmoid"})
    model = ktjax.load(file, dtype="float32", expert_compute="gpu")
    err = capsys.readouterr().err
    assert model.placement.expert_format.name == "int4"
    assert "routed experts stored in Q6_K" in err and "requantized (not exact) to int4" in err
    layer = model.config.moe_layers[0]
    ex = model.executor.store.experts[layer][3]
    gate_up, down = ex.fmt.packed.dequantize(np.asarray(ex.w))
    names = [f"model.layers.{layer}.mlp.experts.3.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    assert np.array_equal(gate_up, np.concatenate([tensors[names[0]], tensors[names[1]]]))
    want = tensors[names[2]]
    step = np.abs(want).max() / 15  # within a 4-bit step of the Q6_K values, not equal to them
    assert np.abs(down - want).max() <= step and not np.array_equal(down, want)


def test_experts_that_would_not_fit_dequantized_are_refused_in_one_line(v3_dir, tmp_path, monkeypatch):
    rng = np.random.default_rng(9)
    tensors, raw = hf_tensors(v3_dir), {}
    for name, w in tensors.items():
        if ".mlp.experts." in name:  # Q6_K: no integer format holds it exactly, so bf16
            raw[name] = (rng.integers(0, 256, (w.shape[0], w.shape[1] // 256 * 210), dtype=np.uint8), Q.Q6_K)
    file = write_gguf(tmp_path / "big.gguf", v3_dir, tensors, raw=raw, hparams={"scoring_func": "sigmoid"})
    monkeypatch.setattr("ktjax.io.gguf.host_memory_bytes", lambda: 1_000_000)  # a machine of 1 MB
    with pytest.raises(CheckpointError, match="big.gguf: routed experts stored in Q6_K have no integer format") as e:
        ktjax.load(file)
    assert len(str(e.value).splitlines()) == 1 and "more than this machine's 0 GB of memory" in str(e.value)


EXACT_TYPES = [(Q.Q8_0, "int8"), (Q.Q4_0, "int8"), (Q.Q5_0, "int8"), (Q.Q3_K, "int8"), (Q.Q4_K, "int4")]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """float32 arrays equal bit for bit, NaNs where NaNs are and a zero's sign aside."""
    a, b = np.asarray(a, np.float32) + 0.0, np.asarray(b, np.float32) + 0.0
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


@pytest.mark.parametrize("qtype, fmt", EXACT_TYPES, ids=[t.name for t, _ in EXACT_TYPES])
def test_random_blocks_decode_bit_exactly_as_gguf_decodes_them(qtype, fmt):
    rng = np.random.default_rng(int(qtype))
    R, C = 8, 512
    raw = random_blocks(qtype, R, C, rng, tame=False)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, qtype)
        ours = dequantize_quant(expert_arrays(raw, qtype.name, C), fmt, C)
    assert same_bits(ours, ref)


@pytest.mark.parametrize("type_name", gguf_decode.DECODED)
def test_every_type_with_a_kernel_decodes_bit_exactly_as_gguf_decodes_it(type_name):
    """Every byte random (NaN, infinite and subnormal scales included), as a stack of experts'
    rows, against gguf's numpy decoder."""
    rng = np.random.default_rng(len(type_name) * 31 + ord(type_name[-1]))
    block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    raw = rng.integers(0, 256, (3, 4, 4 * size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, Q[type_name])
    ours = gguf_decode.dequantize(raw, type_name)
    assert ours.shape == ref.shape == (3, 4, 4 * block) and same_bits(ours, ref)


def test_decoding_into_a_wrong_array_or_from_partial_blocks_is_refused():
    raw = np.zeros((2, 34 * 2), np.uint8)  # two Q8_0 blocks per row
    with pytest.raises(ValueError, match="Q8_0: out must be C-contiguous float32 \\(2, 64\\)"):
        gguf_decode.dequantize(raw, "Q8_0", np.empty((2, 32), np.float32))
    with pytest.raises(ValueError, match="Q8_0: rows of 67 bytes are not whole blocks of 34"):
        gguf_decode.dequantize(raw[:, :67], "Q8_0")
    assert gguf_decode.dequantize(raw, "IQ3_S") is None  # no kernel: the caller takes gguf's


@pytest.mark.parametrize("qtype, fmt", EXACT_TYPES, ids=[t.name for t, _ in EXACT_TYPES])
def test_a_packed_expert_from_blocks_decodes_as_gguf_on_the_device_too(qtype, fmt):
    rng = np.random.default_rng(100 + int(qtype))
    F, D = 256, 512
    layout = ExpertFormat(fmt, F, D).packed
    gate, up, down = (random_blocks(qtype, r, c, rng) for r, c in ((F, D), (F, D), (D, F)))
    buf = expert_buffer(ExpertFormat(fmt, F, D), [(gate, qtype.name), (up, qtype.name), (down, qtype.name)])
    want_gate_up = np.concatenate([dequantized(gate, qtype, (F, D)), dequantized(up, qtype, (F, D))])
    want_down = dequantized(down, qtype, (D, F))
    gate_up, d = layout.dequantize(buf)
    assert same_bits(gate_up, want_gate_up) and same_bits(d, want_down)
    import jax.numpy as jnp
    on_device = np.asarray(layout.device_matrix(jnp.asarray(buf), "gate_up", jnp.float32))
    assert np.allclose(on_device, want_gate_up, rtol=0, atol=1e-6 * np.abs(want_gate_up).max())


# ---- bad input: one line naming the file and what is wrong -----------------------------------------

@pytest.fixture(scope="module")
def small_gguf(v2_dir, tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("small") / "v2.gguf", v2_dir, hf_tensors(v2_dir), split_kv_b=False)


def one_line_error(path, capsys) -> str:
    assert main(["info", "--model", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_truncated_file_is_one_line(small_gguf, tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    data = open(small_gguf, "rb").read()
    cut.write_bytes(data[: len(data) - 1000])
    err = one_line_error(cut, capsys)
    assert str(cut) in err and "file is truncated" in err


def test_an_unknown_tensor_type_is_one_line(small_gguf, tmp_path, capsys):
    # The type field follows the tensor's name, dimension count and dimensions in its info record.
    data = bytearray(open(small_gguf, "rb").read())
    name = b"blk.1.attn_q.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    data[at:at + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "bad_type.gguf"
    bad.write_bytes(bytes(data))
    err = one_line_error(bad, capsys)
    assert str(bad) in err and "unknown GGML tensor type 99" in err


def test_an_unknown_architecture_is_one_line(tmp_path, capsys):
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    err = one_line_error(path, capsys)
    assert str(path) in err and "architecture 'llama' is not supported" in err


def test_a_missing_tensor_is_one_line_naming_it(v2_dir, tmp_path, capsys):
    tensors = hf_tensors(v2_dir)
    del tensors["model.layers.2.self_attn.o_proj.weight"]
    path = write_gguf(tmp_path / "missing.gguf", v2_dir, tensors, split_kv_b=False)
    err = one_line_error(path, capsys)
    assert path in err and "tensor blk.2.attn_output.weight (ktjax's model.layers.2.self_attn.o_proj.weight) is missing" in err


# ---- tokenizer and chat template from the file alone -------------------------------------------------

TEXTS = ["Hello, world! 1234567", "def fibonacci(n):\n    return n", "世界你好，今天天气很好。日本語のテキスト",
         "Emoji 🙂🚀 and crème brûlée", "<｜User｜>hi<｜Assistant｜><think>\nok</think>", "  spaces\n\n\tand tabs  "]


def test_tokenizer_from_the_gguf_encodes_as_the_checkpoints_own(v3_dir, v3_gguf):
    from tokenizers import Tokenizer as HFTokenizer

    from ktjax.text.gguf_vocab import gguf_tokenizer

    ours, ref = gguf_tokenizer(v3_gguf), HFTokenizer.from_file(os.path.join(v3_dir, "tokenizer.json"))
    for text in TEXTS:
        ids = ref.encode(text).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False) and ours.decode(ids[1:]) == text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_ids) == (0, (1,))


def test_sampling_defaults_come_from_the_gguf(v3_dir, v3_gguf):
    with open(os.path.join(v3_dir, "generation_config.json")) as f:
        g = json.load(f)
    model = ktjax.load(v3_gguf, dtype="float32")
    assert model.generation_defaults == {"temperature": g["temperature"], "top_p": g["top_p"]}


def test_chat_template_from_the_gguf_renders_as_transformers(v3_dir, v3_gguf):
    from ktjax.text.gguf_vocab import gguf_tokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "<think>\nadd</think>4"}, {"role": "user", "content": "And 3 + 3?"}]
    ref = transformers.AutoTokenizer.from_pretrained(v3_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert gguf_tokenizer(v3_gguf).apply_chat_template(messages) == ref


def test_cli_generate_and_chat_run_on_the_gguf_alone(v3_dir, v3_gguf, capsys, monkeypatch):
    assert os.listdir(os.path.dirname(v3_gguf)) == ["model.gguf"]
    args = ["--prompt", "def fibonacci(n):", "--max-new-tokens", "6", "--temperature", "0", "--json"]
    assert main(["generate", "--model", v3_gguf, *args]) == 0
    from_gguf = json.loads(capsys.readouterr().out)
    assert main(["generate", "--model", v3_dir, *args]) == 0
    from_safetensors = json.loads(capsys.readouterr().out)
    assert from_gguf["token_ids"] == from_safetensors["token_ids"] and from_gguf["text"] == from_safetensors["text"]
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hi\n/quit\n"))
    assert main(["chat", "--model", v3_gguf, "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize("pre", ["deepseek-v3", "deepseek-llm", "deepseek-coder", "gpt-2"])
def test_each_deepseek_pre_tokenizer_builds(pre):
    from ktjax.text.gguf_vocab import pre_tokenizer

    words = [w for w, _ in pre_tokenizer(pre, "m.gguf").pre_tokenize_str("Hello world, 12345!")]
    assert "".join(words).replace("Ġ", " ") == "Hello world, 12345!"


def test_an_unknown_pre_tokenizer_is_one_line():
    from ktjax.text import TokenizerError
    from ktjax.text.gguf_vocab import pre_tokenizer

    with pytest.raises(TokenizerError, match="m.gguf: tokenizer.ggml.pre 'qwen2' is not supported"):
        pre_tokenizer("qwen2", "m.gguf")
