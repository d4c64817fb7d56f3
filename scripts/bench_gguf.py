"""GGUF loading benchmark: DeepSeek-V3 full-size layers (random weights) written as a llama.cpp-style
GGUF with Q4_K or Q8_0 experts, loaded by ktjax (blocks copied into int4/int8), against the same
shapes as a bf16 safetensors checkpoint quantized on load (experts="int4"/"int8"): load time, and
decode step time (batch 1, the host-CPU / link paths) under a GPU budget.

    python3 scripts/bench_gguf.py --moe-layers 2 --experts 64 --gpu-memory 24GiB   # on the GPU machine
    python scripts/bench_gguf.py --tiny                                            # a laptop check

Writes under --dir (default /tmp/bench_gguf) and prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random blocks of a usable size (float16 scales ~ 1/sqrt(cols) per value), uint8 [rows, bytes]."""
    import gguf
    Q = gguf.GGMLQuantizationType
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    unit = {Q.Q8_0: 1 / 127, Q.Q4_K: 1 / 15 / 32, Q.Q6_K: 1 / 32 / 128}[qtype]
    for lo in {Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[qtype]:
        d = np.full((rows, cols // block), unit / np.sqrt(cols), np.float16)
        b[..., lo:lo + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return b.reshape(rows, -1)


def expert_types(type_name: str) -> dict:
    """GGML type of each routed-expert projection. "Q4_K_M": llama.cpp's Q4_K_M mix at its heaviest
    (Q4_K gate and up, Q6_K down in every layer, where llama.cpp gives half the layers' down Q6_K)."""
    import gguf
    Q = gguf.GGMLQuantizationType
    if type_name == "Q4_K_M":
        return {"gate_proj": Q.Q4_K, "up_proj": Q.Q4_K, "down_proj": Q.Q6_K}
    return dict.fromkeys(("gate_proj", "up_proj", "down_proj"), Q[type_name])


def write_gguf(path: str, cfg, types: dict, rng) -> None:
    """The converter's deepseek2 layout (see tests/test_gguf.py): core matrices Q8_0, norms F32,
    routed experts in `types` (projection -> GGML type)."""
    import gguf
    from flax import nnx

    from ktjax.io.checkpoint import tensor_names
    from ktjax.io.load import abstract_params
    Q = gguf.GGMLQuantizationType
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if cfg.rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
        w.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.original_max_position_embeddings)
        w.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope_scaling.mscale_all_dim)
    _, abstract = abstract_params(cfg, np.float32)
    tensors = []  # (gguf name, stored shape, dtype, GGML type, data maker): data made while writing
    f32 = np.dtype(np.float32)

    def row_bytes(qtype, cols: int) -> int:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return cols // block * size

    for leaf_path, var in nnx.to_flat_state(abstract):
        if leaf_path[1:3] == ("mlp", "experts"):
            for layer in cfg.layer_groups["moe"]:
                rows, cols = var.shape[2:]
                expert_type = types[leaf_path[3]]
                name = names.get_name(f"model.layers.{layer}.mlp.experts.{leaf_path[3]}") + ".weight"
                shape = (cfg.n_routed_experts, rows, row_bytes(expert_type, cols))
                tensors.append((name, shape, np.dtype(np.uint8), expert_type, lambda rows=rows, cols=cols, t=expert_type: np.stack(
                    [random_blocks(t, rows, cols, rng) for _ in range(cfg.n_routed_experts)])))
            continue
        for hf, index in tensor_names(cfg, leaf_path):
            shape = tuple(var.shape[len(index):])
            base, suffix = hf.replace("e_score_correction_bias", "e_score_correction.bias").rsplit(".", 1)
            name = names.get_name(base) + "." + suffix
            if len(shape) == 1:
                tensors.append((name, shape, f32, None,
                                lambda shape=shape: (1.0 + 0.01 * rng.standard_normal(shape)).astype(np.float32)))
            elif "kv_b_proj" in hf:  # split as the MLA converter does: k_b transposed per head, v_b
                H, nope, v, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
                for part, s_ in (("attn_k_b", (H, C, nope)), ("attn_v_b", (H, v, C))):
                    tensors.append((name.replace("attn_kv_b", part), s_, f32, None, lambda s_=s_, C=C: (
                        rng.standard_normal(s_) / np.sqrt(C)).astype(np.float32)))
            else:
                tensors.append((name, (shape[0], row_bytes(Q.Q8_0, shape[1])), np.dtype(np.uint8), Q.Q8_0,
                                lambda shape=shape: random_blocks(Q.Q8_0, *shape, rng)))
    for name, shape, dtype, qtype, _ in tensors:  # the header first, then the data, one tensor at a time
        w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for *_, make in tensors:
        w.write_tensor_data(make())
    w.close()


def write_safetensors(path: str, cfg) -> None:
    """A bf16 checkpoint directory of the same shapes (random weights), for quantizing on load."""
    import jax
    import ml_dtypes
    import safetensors.numpy
    from flax import nnx

    from ktjax.io.checkpoint import tensor_names
    from ktjax.io.load import abstract_params
    os.makedirs(path, exist_ok=True)
    _, abstract = abstract_params(cfg, np.float32)
    key = jax.random.key(0)
    tensors, k = {}, 0
    for leaf_path, var in nnx.to_flat_state(abstract):
        for hf, index in tensor_names(cfg, leaf_path):
            shape = tuple(var.shape[len(index):])
            k += 1
            x = jax.random.normal(jax.random.fold_in(key, k), shape, jax.numpy.float32) * shape[-1] ** -0.5
            if len(shape) == 1:
                x = x * 0.01 + 1.0
            tensors[hf] = np.asarray(x.astype(jax.numpy.bfloat16)).view(ml_dtypes.bfloat16)
    safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    d["torch_dtype"] = "bfloat16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)


def measure(label: str, path: str, args, experts: str | None) -> dict:
    import ktjax
    from bench_offload import decode_steps
    from ktjax.runtime.model import Sampling
    import resource
    t, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    model = ktjax.load(path, gpu_memory=args.gpu_memory, max_context=2048, experts=experts, progress=False)
    load_s = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)  # is a load bound by its work or by faulting in new memory?
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) \
        else os.path.getsize(path)
    row = {"run": label, "experts": model.placement.expert_format.name, "load_s": load_s, "file_gb": size / 1e9,
           "load_user_s": after.ru_utime - usage.ru_utime, "load_system_s": after.ru_stime - usage.ru_stime,
           "load_minor_faults": after.ru_minflt - usage.ru_minflt,
           "host_experts": len(model.placement.host_experts), "device_experts": len(model.placement.device_experts)}
    log(f"{label}: loaded in {load_s:.1f} s ({size / 1e9:.2f} GB, {size / 1e9 / load_s:.2f} GB/s), "
        f"{row['host_experts']} experts in host memory; user {row['load_user_s']:.1f} s, system "
        f"{row['load_system_s']:.1f} s, {row['load_minor_faults']} minor page faults")
    sampling = Sampling.of(0.0, 0, 1.0)
    for mode in args.modes:
        times, _, _ = decode_steps(model.executor.with_expert_compute(mode), 1, 256, args.steps, sampling)
        row[f"decode_b1_{mode}_ms"] = float(np.median(times)) * 1e3
        log(f"{label}: decode B=1 ({mode}): {row[f'decode_b1_{mode}_ms']:.2f} ms/step")
    print("ROW " + json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe-layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=64, help="routed experts per layer")
    p.add_argument("--types", nargs="+", default=["Q4_K", "Q8_0"], help="expert types: Q4_K, Q8_0, or Q4_K_M "
                   "(Q4_K gate/up, Q6_K down: requantized into int4 while loading)")
    p.add_argument("--gpu-memory", default="24GiB")
    p.add_argument("--modes", nargs="+", default=["auto", "gpu", "cpu"])
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--baseline", action="store_true", help="also a bf16 safetensors checkpoint quantized on load")
    p.add_argument("--baseline-only", action="store_true", help="only the safetensors checkpoint (a separate run)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--dir", default="/tmp/bench_gguf")
    p.add_argument("--out", help="also write the rows as JSON to this file")
    args = p.parse_args()

    from fullsize import fullsize_config
    from ktjax.config import ModelConfig
    if args.tiny:
        from bench_offload import tiny_config
        d = tiny_config(args.moe_layers).to_dict()
        d.update(moe_intermediate_size=256)  # whole Q4_K super-blocks
        cfg = ModelConfig.from_dict(d)
        args.gpu_memory = None
    else:
        cfg = fullsize_config(args.moe_layers, n_routed_experts=args.experts)
    os.makedirs(args.dir, exist_ok=True)
    rows = []
    for type_name in ([] if args.baseline_only else args.types):
        path = os.path.join(args.dir, f"model-{type_name}.gguf")
        t = time.perf_counter()
        write_gguf(path, cfg, expert_types(type_name), np.random.default_rng(0))
        log(f"wrote {path}: {os.path.getsize(path) / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")
        rows.append(measure(f"gguf {type_name}", path, args, None))
        os.remove(path)
    if args.baseline or args.baseline_only:
        path = os.path.join(args.dir, "bf16")
        t = time.perf_counter()
        write_safetensors(path, cfg)
        log(f"wrote {path} in {time.perf_counter() - t:.1f} s")
        for type_name in args.types:
            fmt = {"Q4_K": "int4", "Q4_K_M": "int4", "Q8_0": "int8"}[type_name]
            rows.append(measure(f"safetensors bf16 -> {fmt} on load", path, args, fmt))
    print("RESULTS " + json.dumps(rows), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv, "rows": rows}, f, indent=1)
    print_table(rows, args.modes)


def print_table(rows: list[dict], modes: list[str]) -> None:
    head = ["run", "experts", "file GB", "load s", "load GB/s", "host/device experts"] + [f"B=1 {m} ms" for m in modes]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in rows:
        cells = [r["run"], r["experts"], f"{r['file_gb']:.2f}", f"{r['load_s']:.1f}", f"{r['file_gb'] / r['load_s']:.2f}",
                 f"{r['host_experts']}/{r['device_experts']}"] + [f"{r[f'decode_b1_{m}_ms']:.2f}" for m in modes]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
