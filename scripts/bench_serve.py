"""Serving benchmark: `ktjax serve`'s HTTP API under concurrent streaming clients, beside the engine's
own batched decode at the same batch sizes, in one run.

    python3 scripts/bench_serve.py --out $OUT                      # the GPU machine (about 9 minutes)
    python scripts/bench_serve.py --smoke --out /tmp/bench_serve    # a CPU check, end to end

The model (a child process): DeepSeek-V3's full-size layers with random weights (1 dense + 4 MoE
layers, 256 experts each) built on the device as `scripts/fullsize.py` builds them, routed experts in
--experts format, placed under a --gpu-memory budget that the allocator enforces (the rest of the
experts in pinned host memory, computed on the host CPU or streamed, per step), max batch 32. The
vocabulary is the embedded tokenizer's 4096 tokens (the server reads and writes text), not
DeepSeek's 129280: the LM head is then ~0.8 ms cheaper per step, on both sides alike.
--smoke: the embedded tiny model, experts in host memory, on whatever device is there.

The child first times the engine's decode step (the executor directly, as bench_offload.py does) at
each batch size, and at each of them the server's own step without the HTTP side (`DecodeBatch.decode`
in the max-batch slots, the other rows free, on the main thread as `ktjax serve` runs it), both after B
prompts of random ids like the requests' were prefilled (routing, hence the experts a step moves,
depends on the tokens; experts per step are printed for all three), then serves the model with
`ktjax serve`'s own code (ktjax.cli.serve.serve) until told to stop, then times the engine's batch-1 step
once more (this machine drifts by more than the ratio's margin within a run). The driver (this process, no
JAX) waits for /health, then for each concurrency fires that many streaming /v1/completions at once (a
warm-up round first, which compiles the prefill shapes), each a fixed prompt of --prompt-tokens token ids
and --max-tokens new tokens with `ignore_eos`, and measures:

  server tok/s   aggregate decode rate: the sum over requests of (tokens - 1) / (last - first token
                 time); all requests of a level decode together, so this is tokens per step / step time
  wall tok/s     all tokens / (last response end - first request sent): includes the prefills
  TTFT           request sent -> first token's chunk (p50, p99)
  ITL            gaps between a request's successive chunks (p50, p99); a chunk is a token, unless its
                 text was held back (an incomplete UTF-8 sequence), then two tokens arrive together
  ratio          server tok/s / engine tok/s at that batch size (the target: >= 85%)

Last, --stagger requests arrive one every --stagger-gap seconds while the earlier ones decode: their ITL
max shows what an admission costs the decoding requests (an offloaded model admits in the same layer pass
as a decode step: `DecodeBatch.admit_while_stepping`).

The HTTP client is asyncio's own streams (HTTP/1.1, chunked transfer, server-sent events), so the
driver needs nothing beyond the standard library. Writes bench_serve.json, bench_serve.md,
bench_serve.log and server.log under --out; every step has a timeout, and the whole run a --deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
T_START = time.perf_counter()
TARGET_RATIO = 0.85
TARGET_TTFT_P50_S = 2.0  # at concurrency 16
MODEL_ID = "bench"
# Prompts' random token ids: the embedded tokenizer's ordinary tokens (4096 with the specials at 0-4, 4094-4095).
PROMPT_IDS = (10, 4000)
_log_file = None


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - T_START:6.1f} s] {msg}"
    print(line, flush=True)
    if _log_file is not None:
        _log_file.write(line + "\n")
        _log_file.flush()


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------
# The child: build the model, time the engine, serve.
# ---------------------------------------------------------------------------------------------

def build_model(args):
    """A LoadedModel: the embedded model (--smoke) or full-size random layers under the budget."""
    import dataclasses

    import jax.numpy as jnp

    import ktjax
    from ktjax.api import default_model_path
    from ktjax.runtime.model import LoadedModel
    from ktjax.text import load_tokenizer

    if args.smoke:
        # Every routed expert in host memory: the offload executor runs here as on the GPU.
        model = ktjax.load(None, dtype="float32", placement={r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"},
                           expert_compute="gpu", max_batch=args.max_batch, max_context=args.max_context)
        return model
    sys.path.insert(0, HERE)
    from fullsize import fullsize_config, plan_for, random_offloaded_model

    tokenizer = load_tokenizer(default_model_path())
    rules = None
    if args.small_layers:  # a CPU check of this path: small shapes, the odd experts in host memory
        from bench_offload import TINY_HOST_RULES, tiny_config
        cfg = tiny_config(args.moe_layers)
        rules = TINY_HOST_RULES
    else:
        cfg = fullsize_config(args.moe_layers)
    cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)  # ids the tokenizer can write as text
    plan = plan_for(cfg, jnp.bfloat16, experts=args.experts, gpu_memory=args.gpu_memory, max_batch=args.max_batch,
                    max_context=args.max_context, rules=rules)
    print(plan.table(), flush=True)
    executor = random_offloaded_model(cfg, plan, jnp.bfloat16, progress=lambda m: log(f"child: {m}"))
    executor = executor.with_host_activations(args.host_activations)
    if executor.host is not None:
        rates = executor.measure_rates()  # what ktjax.load measures: both paths into host experts at once
        log(f"child: measured rates: host CPU {rates.cpu_gbps:.1f} GB/s + link {rates.link_gbps:.1f} GB/s")
        executor = executor.with_rates(rates)
    if args.host_threads and executor.host is not None:
        # After the rates: the split keeps the default's, so a run at fewer threads differs by that alone.
        executor = executor.with_host_threads(args.host_threads)
        log(f"child: host kernels on {args.host_threads} threads (engine and server)")
    executor = executor.with_decode_form(args.decode_form)
    return LoadedModel(cfg, executor, plan, tokenizer=tokenizer, generation_defaults={"temperature": 0.0},
                       path=None)


def engine_decode(model, batches: list[int], steps: int, prompt_tokens: int, deadline: float, warm: int,
                  slots_rows: bool = True) -> dict:
    """The executor's decode step timed directly at each batch size (a cache of B rows), then (slots_rows) the
    server's own step at each (`DecodeBatch.decode` in the max_batch slots, B of them in use), each after B
    prompts of random ids were prefilled, as the driver's requests bring: median step, tokens/s, experts per
    step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ktjax.runtime.model import Sampling
    from ktjax.runtime.shapes import cache_length

    cfg, slots = model.config, model.placement.max_batch
    max_len = cache_length(min(model.placement.max_context, cfg.max_position_embeddings), 0)  # the server's
    sampling = Sampling.of(0.0, 0, 1.0)
    key = jax.random.key(0)
    out = {}
    for B in batches:
        name = f"engine_b{B}"
        if time.perf_counter() > deadline:
            log(f"child: {name} skipped (engine deadline)")
            continue
        out[name] = row = _engine_row(model, B, max_len, prompt_tokens, warm, steps, sampling, key)
        log(f"child: {name}: {row['step_s'] * 1e3:.1f} ms/step (host CPU {row['host_cpu_s_per_step'] * 1e3:.1f}), "
            f"{B / row['step_s']:.1f} tok/s, experts/step {row['experts_per_step']}; each segment waited for (ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in row["segments_ms"].items()))
    # The server's own step without the HTTP side: its DecodeBatch in the max_batch slots, B of them in use,
    # stepped on this (the main) thread, as `ktjax serve` runs its scheduler's loop.
    if slots_rows and slots > 1 and time.perf_counter() < deadline:
        out.update(_slots_rows(model, [B for B in batches if B <= slots], max_len, prompt_tokens, warm, steps,
                               deadline))
    return out


def host_kernels_by_thread(model, calls: int = 40, per_call: int = 2) -> dict:
    """The host kernels on `per_call` experts per call (distinct experts call after call, 1 ms apart as a
    step's GPU work spaces them) from the main thread (where the engine rows and, since 5d7d9fe, the server's
    loop call them) and from a thread of its own (where the server's loop called them until then, and numba's
    OpenMP keeps a second pool of threads: `ktjax.serve.scheduler`): median ms per call. Empty where no expert
    is computed on the host."""
    import numpy as np
    ex = model.executor
    if getattr(ex, "host", None) is None:
        return {}
    by_layer: dict[int, list[int]] = {}
    for i, e in sorted(model.placement.host_experts):
        by_layer.setdefault(i, []).append(e)
    layer, hosted = max(by_layer.items(), key=lambda kv: len(kv[1]))
    h = np.random.default_rng(0).standard_normal((1, model.config.hidden_size)).astype(np.float32)
    weights = np.full((1, per_call), 1.0 / per_call, np.float32)

    def timed() -> float:
        times = []
        for c in range(calls):
            ids = [hosted[(c * per_call + j) % len(hosted)] for j in range(per_call)]
            t = time.perf_counter()
            ex.host.compute(layer, ids, np.asarray([ids], np.int64), weights, h)
            times.append(time.perf_counter() - t)
            time.sleep(0.001)
        return float(np.median(times[2:])) * 1e3

    out = {"main_thread_ms": timed()}
    result = []
    th = threading.Thread(target=lambda: result.append(timed()))
    th.start()
    th.join()
    out["own_thread_ms"] = result[0]
    out["main_thread_again_ms"] = timed()
    return out


def prompted_batch(model, rows: int, B: int, max_len: int, prompt_tokens: int, warm_up: bool = False):
    """A DecodeBatch of `rows` slots with B prompts of random ids (drawn as the driver draws its requests')
    prefilled into slots 0..B-1: the workload the server's requests bring (their routing decides how many
    distinct experts a step moves)."""
    import numpy as np

    from ktjax.runtime.generation import SamplingOptions
    from ktjax.serve.batch import DecodeBatch
    batch = DecodeBatch(model, rows, max_len)
    if warm_up:
        batch.warm_up()
    rng = np.random.default_rng(B)
    prompts = [list(map(int, rng.integers(*PROMPT_IDS, prompt_tokens))) for _ in range(B)]
    batch.prefill_into(list(range(B)), prompts, [SamplingOptions(max_new_tokens=1)] * B)
    return batch


class TimedExecutor:
    """An executor whose decode calls are timed (the rest of a DecodeBatch step is the batch's own work)."""

    def __init__(self, ex):
        self._ex, self.seconds = ex, []

    def __getattr__(self, name):
        return getattr(self._ex, name)

    def decode(self, *args, **kw):
        t = time.perf_counter()
        out = self._ex.decode(*args, **kw)
        self.seconds.append(time.perf_counter() - t)
        return out


def _experts(stats: list) -> dict:
    import numpy as np
    return {k: float(np.mean([getattr(s, f) for s in stats])) for k, f in
            (("device", "experts_on_device"), ("link", "experts_fetched"), ("host_cpu", "experts_on_host_cpu"))}


def _slots_rows(model, batches, max_len, prompt_tokens, warm, steps, deadline) -> dict:
    """`DecodeBatch.decode` in the slots with B prompted rows in use: median step, the executor's part of it,
    host-CPU seconds and experts per step."""
    import numpy as np

    slots = model.placement.max_batch
    out = {}
    for k, B in enumerate(batches):
        if time.perf_counter() > deadline:
            log(f"child: slots_b{B} skipped (engine deadline)")
            continue
        t = time.perf_counter()
        batch = prompted_batch(model, slots, B, max_len, prompt_tokens, warm_up=k == 0)
        if k == 0:
            log(f"child: the slots' decode step compiled at every size in {time.perf_counter() - t:.1f} s")
        batch.executor = timed = TimedExecutor(batch.executor)
        active = np.arange(slots) < B
        times, stats = [], []
        for s in range(warm + steps):
            t = time.perf_counter()
            batch.decode(active)
            if s >= warm:
                times.append(time.perf_counter() - t)
                stats.append(batch.last_stats)
        step, inner = float(np.median(times)), float(np.median(timed.seconds[warm:]))
        out[f"slots_b{B}"] = row = {"batch": B, "step_s": step, "executor_s": inner, "tokens_per_s": B / step,
                                    "steps_ms": [round(t * 1e3, 2) for t in times],
                                    "host_cpu_s_per_step": float(np.median([sum(s.host_cpu_seconds) for s in stats])),
                                    "experts_per_step": _experts(stats)}
        log(f"child: slots_b{B} (DecodeBatch.decode in {slots} slots, on the main thread): {step * 1e3:.1f} ms/step, of "
            f"which the executor {inner * 1e3:.1f} (host CPU {row['host_cpu_s_per_step'] * 1e3:.1f}), {B / step:.1f} "
            f"tok/s, experts/step {row['experts_per_step']}")
        del batch
    return out


def _engine_row(model, B, max_len, prompt_tokens, warm, steps, sampling, key) -> dict:
    """Decode steps of the executor on a cache of B rows after B prompts' prefill: the median step and its stats."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    ex = model.executor
    batch = prompted_batch(model, B, B, max_len, prompt_tokens)
    cache, tok, pos_B = batch.cache_B, jnp.asarray(batch.token_B), batch.pos_B.copy()
    del batch
    times, stats = [], []
    t0 = time.perf_counter()
    for s in range(warm + steps):
        pos = jnp.asarray(pos_B + s)
        t = time.perf_counter()
        tok, cache, st = ex.decode(cache, tok, pos, key, sampling)
        jax.block_until_ready(tok)
        if s >= warm:
            times.append(time.perf_counter() - t)
            stats.append(st)
    step = float(np.median(times))
    # Then a few steps with each segment waited for in turn: which program grows with the cache's rows.
    segments = []
    for s in range(warm + steps, warm + steps + 4):
        pos = jnp.asarray(pos_B + s)
        tok, cache, st = ex.decode(cache, tok, pos, key, sampling, profile=True)
        segments.append(st.segment_seconds)
    row_segments = {k: round(float(np.median([d.get(k, 0.0) for d in segments[1:]]) * 1e3), 3) for k in segments[0]}
    row = {"batch": B, "step_s": step, "tokens_per_s": B / step, "segments_ms": row_segments,
           "steps_ms": [round(t * 1e3, 2) for t in times], "seconds_with_compile": time.perf_counter() - t0,
           "experts_per_step": _experts(stats),
           "host_bytes_per_step": float(np.mean([s.bytes_from_host for s in stats])),
           "host_cpu_s_per_step": float(np.median([sum(s.host_cpu_seconds) for s in stats]))}
    del cache, tok
    return row


def precompile_server_shapes(model, prompt_tokens: int, levels: list[int], deadline: float, rounds: int = 3) -> dict:
    """Compile what the server's admissions run, through its own code (DecodeBatch): a prefill of
    each batch bucket (1, 2, 4, ... max_batch rows) at the benchmark's prompt length, and the decode
    step of the slots. A server pays these compiles on first use (10-30 s each on the GPU); which
    buckets a burst of requests lands in depends on arrival timing, so a warm-up round of requests
    alone would not cover them. Last, prompts admitted while 1-3 rows decode (`admit_while_stepping`), as
    the staggered arrivals are."""
    import numpy as np

    from ktjax.runtime.generation import SamplingOptions
    from ktjax.runtime.shapes import cache_length
    from ktjax.serve.batch import DecodeBatch

    from ktjax.runtime.shapes import batch_bucket

    slots = model.placement.max_batch
    # A burst of c requests is admitted as one or two alone, then the rest: those buckets first.
    # `slots` rows pad to their bucket. Then requests arriving while others decode, admitted in a decode
    # step's pass (`admit_while_stepping`: the slots x the prompt's padded length), then the other buckets.
    bursts = list(dict.fromkeys(min(b, slots) for b in [1] + [batch_bucket(n) for c in levels for n in (c, c - 1)
                                                               if n > 0]))
    others = [1 << i for i in range(slots.bit_length()) if 1 << i <= slots and 1 << i not in bursts]
    buckets = bursts + ["admit while stepping"] + others
    context = min(model.placement.max_context, model.config.max_position_embeddings)
    batch = DecodeBatch(model, slots, cache_length(context, 0))
    batch.warm_up()  # as the scheduler starts: later arrays are a step's outputs (they may compile apart)
    rng = np.random.default_rng(1)
    opts = SamplingOptions(max_new_tokens=8, temperature=0.0)
    done = {}
    for k in buckets:
        if time.perf_counter() > deadline:
            log(f"child: prefills of {[b for b in buckets if b not in done]} rows not compiled ahead (startup "
                f"deadline): the first such admission will compile them")
            break
        t = time.perf_counter()
        if k == "admit while stepping":
            for r in range(rounds):  # 1, 2, 3 rows decoding, one prompt admitted beside them
                prompts = [list(map(int, rng.integers(*PROMPT_IDS, prompt_tokens))) for _ in range(r + 2)]
                for j in range(r + 1):  # one at a time: the 1-row prefill is compiled
                    batch.prefill_into([j], prompts[j:j + 1], [opts])
                active = np.arange(slots) < r + 1
                batch.admit_while_stepping([r + 1], prompts[r + 1:], [opts], active)
                active[r + 1] = True
                batch.decode(active)
            done[k] = time.perf_counter() - t
            log(f"child: a prompt of {prompt_tokens} tokens admitted while 1-{rounds} rows decode, compiled and run "
                f"in {done[k]:.1f} s")
            continue
        for _ in range(rounds):  # later rounds: the routing-dependent variants (experts' capacity) of more data
            prompts = [list(map(int, rng.integers(*PROMPT_IDS, prompt_tokens))) for _ in range(k)]
            batch.prefill_into(list(range(k)), prompts, [opts] * k)
            batch.decode(np.arange(slots) < k)
        done[k] = time.perf_counter() - t
        log(f"child: server prefill of {k} rows x {prompt_tokens} tokens compiled and run {rounds} times in "
            f"{done[k]:.1f} s")
    del batch
    return done


def child(args) -> int:
    import jax

    from ktjax.cli import serve as serve_cli
    from ktjax.runtime.compilation_cache import enable_compilation_cache

    # Never outlive the driver, nor the run's deadline.
    parent, hard_stop = os.getppid(), time.monotonic() + args.child_timeout

    def watchdog():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent or time.monotonic() > hard_stop:
                print("child: driver gone or past its deadline; exiting", flush=True)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(15)
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    enable_compilation_cache()
    log(f"child: JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    t = time.perf_counter()
    model = build_model(args)
    log(f"child: model built in {time.perf_counter() - t:.1f} s: {model!r}")
    serve_by = T_START + args.serve_by  # the driver waits this long for /health (less a margin)
    # Whether a second calling thread makes the host kernels slower (serve.md, runs 13-14): timed at the start
    # and again just before serving.
    probe_start = host_kernels_by_thread(model)
    log(f"child: host kernels, 2 experts per call, by calling thread (ms per call): {probe_start}")
    t = time.perf_counter()
    engine = engine_decode(model, args.concurrency, args.engine_steps, args.prompt_tokens,
                           min(time.perf_counter() + args.engine_budget, serve_by - 90), 3 if args.smoke else 5)
    engine["engine_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    engine["server_precompile_s"] = precompile_server_shapes(model, args.prompt_tokens, args.concurrency, serve_by - 35)
    engine["server_precompile_seconds"] = time.perf_counter() - t
    engine["host_kernels_by_thread"] = {"at_start": probe_start, "before_serving": host_kernels_by_thread(model)}
    log(f"child: host kernels by calling thread, before serving (ms per call): "
        f"{engine['host_kernels_by_thread']['before_serving']}")
    mem = jax.devices()[0].memory_stats() or {}
    engine["device"] = jax.devices()[0].device_kind
    engine["peak_device_bytes"], engine["device_bytes_limit"] = mem.get("peak_bytes_in_use"), mem.get("bytes_limit")
    engine["placement"] = {"host_experts": len(model.placement.host_experts),
                           "device_experts": len(model.placement.device_experts),
                           "expert_format": model.placement.expert_format.name,
                           "expert_bytes": model.placement.expert_bytes}
    with open(args.engine_json, "w") as f:
        json.dump(engine, f, indent=1)
    print("ENGINE_DONE", flush=True)
    # `ktjax serve`'s own options and code, on the model built here.
    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers())
    sargs = parser.parse_args(["serve", "--port", str(args.port), "--max-batch", str(args.max_batch),
                               "--max-queue", "64", "--served-model-name", MODEL_ID, "--log-level", "warning"])
    try:
        serve_cli.serve(model, sargs)
    except KeyboardInterrupt:  # the server re-raises the Ctrl-C it handled
        pass
    print("child: server stopped", flush=True)
    # The engine's batch-1 step again, after serving: this machine drifts by more than the ratio's margin within a
    # run (serve.md, runs 11-14), and the engine rows above ran minutes before the server's.
    after = engine_decode(model, [1], args.engine_steps, args.prompt_tokens, time.perf_counter() + 30,
                          3 if args.smoke else 5, slots_rows=False)
    with open(args.engine_json + ".after", "w") as f:
        json.dump(after, f, indent=1)
    if "engine_b1" in after:
        log(f"child: engine_b1 after serving: {after['engine_b1']['step_s'] * 1e3:.1f} ms/step")
    return 0


# ---------------------------------------------------------------------------------------------
# The driver: HTTP clients (asyncio streams only) and the report.
# ---------------------------------------------------------------------------------------------

class HTTPError(Exception):
    pass


async def sse_request(host: str, port: int, path: str, body: dict, on_event) -> None:
    """POST body as JSON; call on_event(payload, t) for each server-sent event's data as it arrives.
    HTTP/1.1 with Connection: close; chunked or length-delimited bodies."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = json.dumps(body).encode()
        writer.write((f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                      f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                      ).encode() + payload)
        await writer.drain()
        status = (await reader.readline()).decode("latin-1").split()
        if len(status) < 2:
            raise HTTPError("no HTTP status line")
        headers = {}
        while (line := (await reader.readline()).decode("latin-1").strip()):
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = int(headers["content-length"]) if "content-length" in headers else None

        async def pieces():
            if chunked:
                while True:
                    size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        return
                    data = await reader.readexactly(size)
                    await reader.readline()
                    yield data
            elif length is not None:
                yield await reader.readexactly(length)
            else:
                while (data := await reader.read(65536)):
                    yield data

        if status[1] != "200":
            body_text = b"".join([p async for p in pieces()]).decode(errors="replace")
            raise HTTPError(f"HTTP {status[1]}: {body_text[:300]}")
        buf = b""
        async for data in pieces():
            t = time.perf_counter()
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    on_event(line[5:].strip().decode(), t)
    finally:
        writer.close()


async def one_request(host, port, prompt_ids: list[int], max_tokens: int) -> dict:
    r = {"sent": time.perf_counter(), "chunks": [], "tokens": None, "finish_reason": None, "error": None,
         "done": False}

    def on_event(data: str, t: float):
        if data == "[DONE]":
            r["done"] = True
            return
        obj = json.loads(data)
        if "error" in obj:
            r["error"] = obj["error"].get("message", str(obj["error"]))
            return
        if obj.get("usage"):
            r["tokens"] = obj["usage"]["completion_tokens"]
        for c in obj.get("choices") or []:
            if c.get("text"):
                r["chunks"].append(t)
            if c.get("finish_reason"):
                r["finish_reason"] = c["finish_reason"]

    body = {"model": MODEL_ID, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    try:
        await sse_request(host, port, "/v1/completions", body, on_event)
    except Exception as e:  # reported per request; the level still counts what finished
        r["error"] = f"{type(e).__name__}: {e}"
    r["end"] = time.perf_counter()
    return r


async def fire(host, port, prompts: list[list[int]], max_tokens: int, timeout: float, gap: float = 0.0) -> list[dict]:
    """The prompts' streaming requests, all at once, or one every `gap` seconds."""
    async def send(i, p):
        await asyncio.sleep(i * gap)
        return await one_request(host, port, p, max_tokens)

    tasks = [asyncio.ensure_future(send(i, p)) for i, p in enumerate(prompts)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    out = []
    for t in tasks:
        if t in done:
            out.append(t.result())
        else:
            out.append({"error": f"timeout after {timeout:.0f} s", "chunks": [], "tokens": None, "done": False})
    return out


def level_metrics(results: list[dict], max_tokens: int) -> dict:
    ok = [r for r in results if not r.get("error") and r["done"] and r["chunks"]]
    ttft = [r["chunks"][0] - r["sent"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = [r["tokens"] if r["tokens"] is not None else len(r["chunks"]) for r in ok]
    rates = [(n - 1) / (r["chunks"][-1] - r["chunks"][0]) for r, n in zip(ok, tokens)
             if n > 1 and r["chunks"][-1] > r["chunks"][0]]
    span = (max(r["end"] for r in ok) - min(r["sent"] for r in ok)) if ok else 0.0
    m = {"requests": len(results), "ok": len(ok), "errors": sorted({r["error"] for r in results if r.get("error")}),
         "tokens": sum(tokens), "tokens_per_request_min": min(tokens, default=0),
         "all_tokens_streamed": all(n == max_tokens for n in tokens) and len(ok) == len(results),
         "server_tok_s": sum(rates) if rates else None, "wall_tok_s": sum(tokens) / span if span else None,
         "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99), "ttft_max_s": max(ttft, default=None),
         "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99), "itl_max_s": max(itl, default=None),
         "chunks_per_token": (sum(len(r["chunks"]) for r in ok) / sum(tokens)) if sum(tokens) else None,
         "span_s": span}
    return m


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_total_bytes() -> int | None:
    """The GPU's memory from nvidia-smi (the driver never starts JAX, so it holds no GPU memory)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return int(out[0]) << 20 if out else None
    except Exception:
        return None


def fmt(v, scale=1.0, digits=1, unit=""):
    return "-" if v is None else f"{v * scale:.{digits}f}{unit}"


def step_split(m: dict) -> str:
    """The server's mean decode step as its scheduler timed it: the model call, and handing the tokens
    to the requests (an ITL above their sum is the loop's own time, or the stream's)."""
    st = m.get("scheduler", {})
    n = st.get("decode_steps") or 0
    if not n or "decode_seconds" not in st:
        return "-"
    cpu = st.get("decode_host_cpu_seconds")
    moved = [st.get(f"decode_experts_{k}") for k in ("on_device", "fetched", "on_host_cpu")]
    return (f"{st['decode_seconds'] / n * 1e3:.1f} + {st['emit_seconds'] / n * 1e3:.1f} ms"
            + (f" (host CPU {cpu / n * 1e3:.1f})" if cpu else "")
            + (" experts/step " + " / ".join(f"{v / n:.1f}" for v in moved) if None not in moved else ""))


def table(levels: dict, engine: dict, slots: int) -> str:
    lines = ["| concurrency | server tok/s | wall tok/s | engine tok/s | ratio | server's step without HTTP "
             f"({slots} slots) tok/s | TTFT p50 / p99 | ITL p50 / p99 | server step: model + emit "
             "(experts/step device / link / CPU) | tokens ok |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for c, m in levels.items():
        e = engine.get(f"engine_b{c}", {}).get("tokens_per_s")
        ep = engine.get(f"slots_b{c}", {}).get("tokens_per_s")
        ratio = m["server_tok_s"] / e if m.get("server_tok_s") and e else None
        m["engine_tok_s"], m["ratio"] = e, ratio
        lines.append(f"| {c} | {fmt(m.get('server_tok_s'))} | {fmt(m.get('wall_tok_s'))} | {fmt(e)} | "
                     f"{fmt(ratio, 100, 0, '%')} | {fmt(ep)} | {fmt(m.get('ttft_p50_s'), 1, 2)} / "
                     f"{fmt(m.get('ttft_p99_s'), 1, 2)} s | {fmt(m.get('itl_p50_s'), 1e3)} / "
                     f"{fmt(m.get('itl_p99_s'), 1e3)} ms | {step_split(m)} | {m.get('ok', 0)}/{m.get('requests', 0)}"
                     f"{'' if m.get('all_tokens_streamed') else ' (short)'} |")
    return "\n".join(lines)


def driver(args) -> int:
    global _log_file
    os.makedirs(args.out, exist_ok=True)
    _log_file = open(os.path.join(args.out, "bench_serve.log"), "w")
    deadline = T_START + args.deadline
    port = args.port or free_port()
    host = "127.0.0.1"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not args.smoke and not args.small_layers:
        env.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "110")  # XLA's pinned-host pool is capped at 64 GiB
        total = gpu_total_bytes()
        if total and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
            from_size = parse_size_plain(args.gpu_memory)
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(from_size / total, 0.95):.4f}"  # the budget, enforced
            log(f"GPU: {total / 2**30:.1f} GiB; allocator limited to {args.gpu_memory} "
                f"(XLA_PYTHON_CLIENT_MEM_FRACTION={env['XLA_PYTHON_CLIENT_MEM_FRACTION']})")
        elif not total:
            log("nvidia-smi gave no GPU size: the budget is the placement plan's only, not the allocator's")
    engine_json = os.path.join(args.out, "engine.json")
    for stale in (engine_json, engine_json + ".after"):
        if os.path.exists(stale):
            os.remove(stale)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--port", str(port), "--engine-json", engine_json,
           "--child-timeout", str(int(args.deadline + 60)), "--engine-budget", str(args.engine_budget),
           "--serve-by", str(int(args.startup_timeout - 30)),
           "--experts", args.experts, "--gpu-memory", args.gpu_memory, "--moe-layers", str(args.moe_layers),
           "--max-batch", str(args.max_batch), "--max-context", str(args.max_context), "--prompt-tokens",
           str(args.prompt_tokens), "--engine-steps", str(args.engine_steps), "--concurrency",
           *map(str, args.concurrency)] + (["--smoke"] if args.smoke else []) + (
        ["--small-layers"] if args.small_layers else []) + (
        ["--host-threads", str(args.host_threads)] if args.host_threads else []) + [
        "--host-activations", args.host_activations, "--decode-form", args.decode_form]
    log(f"starting the server: {' '.join(cmd)}")
    server_log = open(os.path.join(args.out, "server.log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)

    def pump():
        for line in proc.stdout:
            server_log.write(line)
            server_log.flush()
            if line.startswith("[") or "Error" in line or "Traceback" in line or "ENGINE_DONE" in line:
                print("  | " + line.rstrip(), flush=True)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    result = {"args": vars(args), "levels": {}, "engine": {}, "ok": False}
    levels: dict[int, dict] = {}
    try:
        url = f"http://{host}:{port}"
        start_by = min(deadline - 30, time.perf_counter() + args.startup_timeout)
        while True:
            try:
                health = get_json(url + "/health")
                break
            except (OSError, ValueError):
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({proc.returncode}) before answering; see server.log")
                if time.perf_counter() > start_by:
                    raise RuntimeError("the server did not answer /health in time; see server.log")
                time.sleep(0.5)
        log(f"server up: {health}")
        rng = random.Random(0)
        for c in args.concurrency:
            left = deadline - time.perf_counter() - 20
            if left < 15:
                log(f"concurrency {c}: skipped (deadline)")
                continue
            prompts = [[rng.randrange(*PROMPT_IDS) for _ in range(args.prompt_tokens)] for _ in range(c)]
            for w in range(args.warm_rounds):  # compiles what a burst of c needs (routing-dependent variants)
                t = time.perf_counter()
                warm = asyncio.run(fire(host, port, prompts, args.warm_tokens, min(left, args.level_timeout)))
                wm = level_metrics(warm, args.warm_tokens)
                log(f"concurrency {c}: warm-up {w + 1}: {wm['ok']}/{c} ok in {time.perf_counter() - t:.1f} s (TTFT max "
                    f"{fmt(wm['ttft_max_s'], 1, 2)} s){' errors: ' + str(wm['errors']) if wm['errors'] else ''}")
                prompts = [[rng.randrange(*PROMPT_IDS) for _ in range(args.prompt_tokens)] for _ in range(c)]
                left = deadline - time.perf_counter() - 20
                if left < 15:
                    break
            left = deadline - time.perf_counter() - 20
            if left < 10:
                log(f"concurrency {c}: measurement skipped (deadline)")
                continue
            before = get_json(url + "/health").get("stats", {})
            prompts = [[rng.randrange(*PROMPT_IDS) for _ in range(args.prompt_tokens)] for _ in range(c)]
            t = time.perf_counter()
            res = asyncio.run(fire(host, port, prompts, args.max_tokens, min(left, args.level_timeout)))
            m = level_metrics(res, args.max_tokens)
            after = get_json(url + "/health").get("stats", {})
            m["scheduler"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            m["seconds"] = time.perf_counter() - t
            levels[c] = m
            log(f"concurrency {c}: {m['ok']}/{c} ok, {m['tokens']} tokens in {m['seconds']:.1f} s: server "
                f"{fmt(m['server_tok_s'])} tok/s (wall {fmt(m['wall_tok_s'])}), TTFT p50/p99 "
                f"{fmt(m['ttft_p50_s'], 1, 2)}/{fmt(m['ttft_p99_s'], 1, 2)} s, ITL p50/p99 "
                f"{fmt(m['itl_p50_s'], 1e3)}/{fmt(m['itl_p99_s'], 1e3)} ms, server step {step_split(m)}, prefill calls "
                f"{m['scheduler'].get('prefill_calls')}{' errors: ' + str(m['errors']) if m['errors'] else ''}")
        left = deadline - time.perf_counter() - 20
        if args.stagger and left > 15:
            # Requests arriving one by one while others decode: each admission's cost to the decoding ones.
            for _ in range(2):  # a warm-up round (compiles the admissions beside decoding rows), then the measured one
                prompts = [[rng.randrange(*PROMPT_IDS) for _ in range(args.prompt_tokens)] for _ in range(args.stagger)]
                before = get_json(url + "/health").get("stats", {})
                res = asyncio.run(fire(host, port, prompts, args.max_tokens, min(left, args.level_timeout),
                                       args.stagger_gap))
            m = level_metrics(res, args.max_tokens)
            after = get_json(url + "/health").get("stats", {})
            m["scheduler"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            m["gap_s"] = args.stagger_gap
            result["staggered"] = m
            log(f"staggered: {m['ok']}/{args.stagger} ok, one every {args.stagger_gap:.2f} s: ITL p50/p99/max "
                f"{fmt(m['itl_p50_s'], 1e3)}/{fmt(m['itl_p99_s'], 1e3)}/{fmt(m['itl_max_s'], 1e3)} ms, TTFT p50 "
                f"{fmt(m['ttft_p50_s'], 1, 2)} s, admissions {m['scheduler'].get('prefill_calls')} (in a decode "
                f"pass: {m['scheduler'].get('prefills_with_decode')})")
        result["ok"] = bool(levels) and all(m["ok"] == m["requests"] for m in levels.values())
    except Exception as e:
        log(f"FAILED: {type(e).__name__}: {e}")
        result["error"] = f"{type(e).__name__}: {e}"
        server_log.flush()
        with open(os.path.join(args.out, "server.log")) as f:
            print("server.log, last lines:\n" + "".join(f.readlines()[-40:]), flush=True)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the server's own clean shutdown, then the engine once more
            try:
                proc.wait(timeout=75)
            except subprocess.TimeoutExpired:
                log("the child did not end in 75 s: killed")
                proc.kill()
                proc.wait(timeout=10)
        pumper.join(timeout=5)
        server_log.close()
    if os.path.exists(engine_json):
        with open(engine_json) as f:
            result["engine"] = json.load(f)
    else:
        log("no engine measurement (the child failed before it finished; see server.log)")
    if os.path.exists(engine_json + ".after"):
        with open(engine_json + ".after") as f:
            result["engine_after_serving"] = json.load(f)
    engine = result["engine"]
    md = table(levels, engine, args.max_batch)
    result["levels"] = {str(c): m for c, m in levels.items()}
    checks = []
    for c, m in levels.items():
        if m.get("ratio") is not None:
            checks.append((f"server >= {TARGET_RATIO:.0%} of engine at concurrency {c}", m["ratio"] >= TARGET_RATIO))
        if c == 16 and m.get("ttft_p50_s") is not None:
            checks.append((f"TTFT p50 < {TARGET_TTFT_P50_S:.0f} s at concurrency 16",
                           m["ttft_p50_s"] < TARGET_TTFT_P50_S))
        checks.append((f"every request at concurrency {c} streamed all {args.max_tokens} tokens",
                       m["all_tokens_streamed"]))
    result["checks"] = {name: passed for name, passed in checks}
    what = ("embedded tiny model (--smoke)" if args.smoke else "small layers (--small-layers)" if args.small_layers else
            f"DeepSeek-V3 full-size layers (1 dense + {args.moe_layers} MoE), random weights, {args.experts} experts, "
            f"{args.gpu_memory} budget, host activations {args.host_activations}"
            + (f", {args.host_threads} host threads" if args.host_threads else "")
            + (f", decode form {args.decode_form}" if args.decode_form != "auto" else ""))
    place = engine.get("placement", {})
    header = (f"ktjax serve benchmark: {what}; {place.get('device_experts', '?')} experts on the device, "
              f"{place.get('host_experts', '?')} in host memory; device {engine.get('device', '?')}; max batch "
              f"{args.max_batch}; prompts {args.prompt_tokens} tokens, {args.max_tokens} new tokens each (ignore_eos).")
    lines = [header, "", md, ""] + [f"- {'PASS' if p else 'FAIL'}: {n}" for n, p in checks]
    probe = engine.get("host_kernels_by_thread", {})
    if probe.get("at_start") and probe.get("before_serving"):
        lines.append("- the host kernels on 2 experts per call, ms per call from the main thread / a thread of its own "
                     "(the server's loop calls them from the main thread): at the start " + " / ".join(
                         f"{probe['at_start'][k]:.2f}" for k in ("main_thread_ms", "own_thread_ms")) +
                     ", before serving " + " / ".join(f"{probe['before_serving'][k]:.2f}"
                                                      for k in ("main_thread_ms", "own_thread_ms")))
    before, after = engine.get("engine_b1", {}), result.get("engine_after_serving", {}).get("engine_b1", {})
    if before.get("step_s") and after.get("step_s"):
        lines.append(f"- the engine's batch-1 step before / after serving: {before['step_s'] * 1e3:.1f} / "
                     f"{after['step_s'] * 1e3:.1f} ms (host CPU {before['host_cpu_s_per_step'] * 1e3:.1f} / "
                     f"{after['host_cpu_s_per_step'] * 1e3:.1f} ms): the machine's drift over the run")
    st = result.get("staggered")
    if st:
        lines.append(f"- staggered arrivals ({st['requests']} requests, one every {st['gap_s']:.2f} s): ITL p50 / p99 / "
                     f"max {fmt(st['itl_p50_s'], 1e3)} / {fmt(st['itl_p99_s'], 1e3)} / {fmt(st['itl_max_s'], 1e3)} ms, "
                     f"TTFT p50 {fmt(st['ttft_p50_s'], 1, 2)} s; admissions {st['scheduler'].get('prefill_calls')}, "
                     f"{st['scheduler'].get('prefills_with_decode')} of them in a decode step's pass")
    report = "\n".join(lines)
    with open(os.path.join(args.out, "bench_serve.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "bench_serve.md"), "w") as f:
        f.write(report + "\n")
    log(f"done in {time.perf_counter() - T_START:.0f} s; results in {args.out}")
    print("\n" + report, flush=True)
    return 0 if result["ok"] else 1


def parse_size_plain(s: str) -> int:
    """'24GiB' -> bytes, without importing ktjax (and JAX) into the driver."""
    s = s.strip()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for u, f in units.items():
        if s.upper().endswith(u):
            return int(float(s[:-len(u)].strip()) * f)
    return int(float(s))


def probe_threads(args) -> int:
    """--probe-threads: the host kernels by calling thread on this model, in this process, as JSON."""
    os.environ.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "110")
    args.max_batch, args.max_context = args.max_batch or 32, args.max_context or 512
    model = build_model(args)
    out = {str(k): host_kernels_by_thread(model, per_call=k) for k in (1, 2, 4)}
    print(json.dumps({"threads_probe_ms_per_call": out}), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the embedded tiny model, concurrency 1 and 4, a few tokens")
    p.add_argument("--experts", default="int4", choices=("int4", "int8", "fp8", "bf16"),
                   help="routed experts' format (default int4)")
    p.add_argument("--gpu-memory", default="24GiB", help="the GPU budget, enforced through the allocator")
    p.add_argument("--moe-layers", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=None, help="the server's slots (default 32; --smoke 4)")
    p.add_argument("--max-context", type=int, default=None, help="the server's context (default 512; --smoke 256)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 4 16 32 (--smoke: 1 4)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (default 32; --smoke 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 64; --smoke 8)")
    p.add_argument("--warm-tokens", type=int, default=4, help="new tokens per request of a level's warm-up rounds")
    p.add_argument("--warm-rounds", type=int, default=2, help="warm-up rounds of requests before each level")
    p.add_argument("--engine-steps", type=int, default=None, help="timed engine decode steps (default 10; --smoke 3)")
    p.add_argument("--engine-budget", type=float, default=240.0, help="seconds for the engine measurements")
    p.add_argument("--startup-timeout", type=float, default=420.0,
                   help="seconds for the child to build the model, time the engine, compile the server's "
                        "shapes and answer /health (it skips compiles to be up 30 s before)")
    p.add_argument("--level-timeout", type=float, default=120.0, help="seconds for each round of requests")
    p.add_argument("--stagger", type=int, default=None,
                   help="a last round of this many requests arriving one by one (default 8; --smoke 3; 0: none)")
    p.add_argument("--stagger-gap", type=float, default=None,
                   help="seconds between their arrivals (default 0.5; --smoke 0.05)")
    p.add_argument("--deadline", type=float, default=570.0, help="seconds for the whole run (the device allows 600)")
    p.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_serve_out"))
    # The child's own options.
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    p.add_argument("--serve-by", type=float, default=300.0, help=argparse.SUPPRESS)
    p.add_argument("--host-threads", type=int, default=0,
                   help="the host CPU kernels' threads, for the engine and the server alike (default: all cores but "
                        "two); fewer leave cores to the server's event loop and the benchmark's client")
    p.add_argument("--host-activations", choices=("float32", "int8"), default="int8",
                   help="what the host CPU multiplies int8/int4 experts by, engine and server alike "
                        "(ktjax.load's host_activations, default int8 as there)")
    p.add_argument("--decode-form", choices=("auto", "fused", "streamed", "handoff"), default="auto",
                   help="how the full-size path's decode steps run (OffloadedExecutor's decode_form): 'handoff' "
                        "launches steps of up to 4 rows whole, each MoE layer's stream waiting for the host CPU")
    p.add_argument("--small-layers", action="store_true",
                   help="with the full-size path (no --smoke): small layer shapes instead, the odd experts in host "
                        "memory (a CPU check of that path)")
    p.add_argument("--probe-threads", action="store_true",
                   help="only build the model and time its host kernels from the main thread and from a thread of "
                        "their own (1, 2 and 4 experts per call), then exit: about a minute on the GPU machine")
    args = p.parse_args()
    if args.probe_threads:
        return probe_threads(args)
    smoke = args.smoke
    defaults = dict(max_batch=4 if smoke else 32, max_context=256 if smoke else 512,
                    concurrency=[1, 4] if smoke else [1, 4, 16, 32], prompt_tokens=16 if smoke else 32,
                    max_tokens=8 if smoke else 64, engine_steps=3 if smoke else 10, stagger=3 if smoke else 8,
                    stagger_gap=0.05 if smoke else 0.5)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if max(args.concurrency) > args.max_batch:
        p.error(f"--concurrency {max(args.concurrency)} exceeds --max-batch {args.max_batch}")
    if args.prompt_tokens + args.max_tokens > args.max_context:
        p.error("--prompt-tokens plus --max-tokens exceed --max-context")
    return child(args) if args.child else driver(args)


if __name__ == "__main__":
    sys.exit(main())
