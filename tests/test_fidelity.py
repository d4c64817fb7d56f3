"""Fidelity of int8/int4 routed experts (issue 12, item 7), on both paths that compute them: the
device dequantizing after the transfer (expert_compute="gpu") and the host CPU's kernels ("cpu").

Against transformers (float32, CPU) on a tiny random DeepSeek-V3:
- exactly: with every routed expert replaced by the numpy dequantization (written here from GGUF's
  Q8_0 / Q4_K definitions) of the very bytes ktjax holds, transformers gives ktjax's logits;
- within the format's error: every held weight is within half a step of the checkpoint's (plus
  the rounding of the step itself); against the original float32 weights the logits move by less
  than half a step on average and less than two steps at 90% of positions (the format's relative
  step: 1/127 of a group's largest |w| for int8, 1/15 of a group's range for int4); and greedy
  tokens, teacher-forced on transformers' own greedy continuations, mostly agree.
scripts/fidelity.py measures the same against the bf16 model, and benchmarks/fidelity.md reports it.
"""

import copy

import numpy as np
import pytest
import torch

import ktjax
from ktjax.experts.packed import PackedLayout
from reference import make_reference, reference_logits, save_reference

ALL_HOST = {r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"}
PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 6, 16
# Relative step of each format: int8 rounds to 1/127 of a group's max |w|; int4 to 1/15 of its range.
STEP = {"int8": 1 / 127, "int4": 1 / 15}
# Greedy agreement the formats must keep (a broken format agrees ~1/vocab of the time). A random
# model's logits are flat, so its top two are often near-tied and int4's step flips some of them.
AGREEMENT = {"int8": 0.93, "int4": 0.75}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The transformers model, its checkpoint, and its greedy continuations of random prompts."""
    model = make_reference("v3", seed=7)
    path = save_reference(model, tmp_path_factory.mktemp("fidelity"))
    tokens = np.random.default_rng(7).integers(2, model.config.vocab_size, (PROMPTS, PROMPT_LEN))
    for _ in range(NEW_TOKENS):  # greedy, full forward each step: no eos stop, every row full length
        tokens = np.concatenate([tokens, reference_logits(model, tokens)[:, -1:].argmax(-1)], axis=1)
    return model, path, tokens


@pytest.fixture(scope="module", params=[(f, p) for f in ("int8", "int4") for p in ("gpu", "cpu")],
                ids=lambda fp: f"{fp[0]}-{fp[1]}")
def quantized(request, reference):
    """(format, ktjax model with every routed expert in host memory on that path, its logits)."""
    fmt, compute = request.param
    _, path, tokens = reference
    model = ktjax.load(path, dtype="float32", experts=fmt, expert_compute=compute, placement=ALL_HOST,
                       max_batch=PROMPTS, max_context=tokens.shape[1], host_activations="float32")
    return fmt, model, np.asarray(ktjax.logits(model, tokens))


def dequantize(arrays: dict[str, np.ndarray], fmt: str, cols: int) -> np.ndarray:
    """float32 [rows, cols] by GGUF's definitions. Q8_0: w = d * q per group of 32 (d float16).
    Q4_K: w = (d * sc) * q - dmin * mn, q a nibble; per 32 bytes, low nibbles hold values 0..31 and
    high nibbles 32..63; d and dmin per 256 values, sc and mn per 32."""
    if fmt == "int8":
        q = arrays["q"].astype(np.float32)
        R, C = q.shape
        d = arrays["scale"].view(np.float16).astype(np.float32)
        return (q.reshape(R, C // 32, 32) * d[..., None]).reshape(R, C)[:, :cols]
    packed = arrays["q"]
    R, H = packed.shape
    runs = packed.reshape(R, H // 32, 32)
    q = np.stack([runs & 15, runs >> 4], axis=2).reshape(R, 2 * H).astype(np.float32)
    group_of = np.arange(2 * H) // 32
    super_of = np.arange(2 * H) // 256
    step = arrays["d"][:, super_of] * arrays["sc"][:, group_of].astype(np.float32)
    offset = arrays["dmin"][:, super_of] * arrays["mn"][:, group_of].astype(np.float32)
    return (q * step - offset)[:, :cols]


def with_experts_from(torch_model, loaded: ktjax.LoadedModel, fmt: str):
    """A copy of the transformers model whose routed experts are the numpy dequantization of the
    packed buffers `loaded` computes with."""
    cfg = loaded.config
    F, D = cfg.moe_intermediate_size, cfg.hidden_size
    layout = PackedLayout(fmt, F, D)
    out = copy.deepcopy(torch_model)
    with torch.no_grad():
        for i, experts in loaded.executor.store.experts.items():
            mlp = out.model.layers[i].mlp.experts
            for e, weights in enumerate(experts):
                buf = np.asarray(weights.w)
                mlp.gate_up_proj[e] = torch.from_numpy(dequantize(layout.arrays(buf, "gate_up"), fmt, D))
                mlp.down_proj[e] = torch.from_numpy(dequantize(layout.arrays(buf, "down"), fmt, F))
    return out


def relative_error(logits, ref):
    err = np.abs(logits.astype(np.float64) - ref)
    return err.max() / np.abs(ref).max(), err.mean() / np.abs(ref).max()


def test_every_routed_expert_is_held_quantized_on_the_path_asked(quantized):
    fmt, model, _ = quantized
    assert model.placement.expert_format.name == fmt
    assert len(model.placement.host_experts) == len(model.config.moe_layers) * model.config.n_routed_experts


def test_logits_are_transformers_with_the_dequantized_experts(reference, quantized):
    torch_model, _, tokens = reference
    fmt, model, logits = quantized
    ref = reference_logits(with_experts_from(torch_model, model, fmt), tokens)
    max_rel, _ = relative_error(logits, ref)
    assert max_rel < 2e-5


def test_the_held_experts_are_the_checkpoints_weights_within_half_a_step(reference, quantized):
    torch_model, _, _ = reference
    fmt, model, _ = quantized
    cfg = model.config
    layout = PackedLayout(fmt, cfg.moe_intermediate_size, cfg.hidden_size)
    for i, experts in model.executor.store.experts.items():
        mlp = torch_model.model.layers[i].mlp.experts
        for matrix, original in (("gate_up", mlp.gate_up_proj), ("down", mlp.down_proj)):
            for e, weights in enumerate(experts):
                w_RC = original[e].detach().numpy()
                held_RC = dequantize(layout.arrays(np.asarray(weights.w), matrix), fmt, w_RC.shape[1])
                w_RGL, held_RGL = (padded_groups(a, fmt) for a in (w_RC, held_RC))
                assert np.all(np.abs(held_RGL - w_RGL).max(-1) <= half_step_bound(w_RGL, fmt)), (i, e, matrix)


def padded_groups(w_RC: np.ndarray, fmt: str) -> np.ndarray:
    """[rows, groups, 32], the rows padded with zeros to whole groups (int8) or super-blocks (int4)."""
    unit = 32 if fmt == "int8" else 256
    R, C = w_RC.shape
    return np.pad(w_RC, ((0, 0), (0, -C % unit))).reshape(R, -1, 32)


def half_step_bound(w_RGL: np.ndarray, fmt: str) -> np.ndarray:
    """The largest rounding error a group [rows, groups, 32] may have: half a step, plus the rounding
    of the step itself (int8: its float16 scale; int4: its 8-bit multiple of the super-block's base,
    and the same for the minimum)."""
    if fmt == "int8":
        amax = np.abs(w_RGL).max(-1)
        return amax / 254 + amax * 2.0**-11 + 1e-7
    lo = np.minimum(w_RGL.min(-1), 0)
    step = (w_RGL.max(-1) - lo) / 15
    R, G = step.shape
    d = np.repeat(step.reshape(R, -1, 8).max(-1) / 255, 8, axis=1)
    dmin = np.repeat((-lo).reshape(R, -1, 8).max(-1) / 255, 8, axis=1)
    return step / 2 + (15 * d + dmin) / 2 + 1e-7


def test_logits_stay_within_the_formats_error_of_the_float32_model(reference, quantized):
    torch_model, _, tokens = reference
    fmt, _, logits = quantized
    ref = reference_logits(torch_model, tokens)
    scale = np.abs(ref).max()
    _, mean_rel = relative_error(logits, ref)
    per_position = np.abs(logits - ref).max(-1) / scale
    # Typical positions move by about a step of the format; a routing choice that flips on a near-tie
    # moves a token's logits by a whole expert's contribution, so the tail is not bounded here.
    assert mean_rel < STEP[fmt] / 2
    assert np.percentile(per_position, 90) < 2 * STEP[fmt]
    assert mean_rel > 0  # the experts really are quantized


def test_greedy_tokens_agree_with_the_float32_model(reference, quantized):
    torch_model, _, tokens = reference
    fmt, _, logits = quantized
    generated = np.s_[:, PROMPT_LEN - 1:-1]  # logits at t predict token t + 1
    agree = logits[generated].argmax(-1) == reference_logits(torch_model, tokens)[generated].argmax(-1)
    assert agree.mean() >= AGREEMENT[fmt]
