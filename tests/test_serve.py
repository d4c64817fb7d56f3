"""`ktjax serve` against the official `openai` client: one real server process on the embedded model
for the module (8 slots, 8 more may wait), references from `ktjax.generate` in this process and the
tokenizer counts from transformers.

Both sides run in float32: in bfloat16, XLA's matmuls at batch 8 round differently from batch 1 (so
does `ktjax.generate` with a batch), and a near-tie can then pick another greedy token."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from transformers import AutoTokenizer

import ktjax
from ktjax.api import default_model_path
from ktjax.runtime.generation import chat_prompt
from ktjax.serve.reasoning import ReasoningSplitter
from ktjax.text.reasoning import THINK_OPEN, split_reasoning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-serve"
MODEL = "ktjax-tiny"
SLOTS, QUEUE = 8, 8
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def", "for i in range(10):", "x = [", "def main():\n",
           "# sort a list\n", "print(", "with open(path) as f:", "try:\n    import", "while True:", "return self.",
           "if __name__ ==", "raise ValueError(", "from collections import", "assert len("]
N = 10  # new tokens per request: enough to cross many token boundaries, cheap on a shared CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=10) as r:
        return json.loads(r.read())


def start_server(log, *options: str, while_starting=lambda: None) -> tuple[subprocess.Popen, str]:
    """A `ktjax serve` process on the embedded model on a free port, once its /health answers: (process, url).
    while_starting runs meanwhile."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "ktjax.cli.main", "serve", "--port", str(port), "--dtype", "float32",
           "--log-level", "warning", *options]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    while_starting()
    deadline = time.monotonic() + 120
    while True:
        try:
            get(url, "/health")
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = start_server(log, "--max-batch", str(SLOTS), "--max-queue", str(QUEUE), "--max-context", "256",
                             "--api-key", KEY,
                             while_starting=lambda: request.getfixturevalue("solo"))  # the references meanwhile
    yield proc, url, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model():
    return ktjax.load(dtype="float32")


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def solo(model):
    """Each prompt's greedy continuation from `ktjax.generate`, alone."""
    return {p: ktjax.generate(model, p, max_new_tokens=N) for p in PROMPTS}


def finish_reason(result) -> str:
    return "length" if result.stats.finish_reason == "length" else "stop"


def stream_completion(client, prompt: str, **kw) -> tuple[str, list]:
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0, stream=True,
                                            **kw))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert get(server[1], "/health")["status"] == "ok"


def test_completion_equals_generate_with_the_tokenizers_usage(client, solo, hf_tokenizer):
    prompt = PROMPTS[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0)
    ref = solo[prompt]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == finish_reason(ref)
    assert r.usage.prompt_tokens == len(hf_tokenizer(prompt).input_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_completion_equals_generate_and_ends_once(client, solo, hf_tokenizer):
    prompt = PROMPTS[1]
    text, chunks = stream_completion(client, prompt, stream_options={"include_usage": True})
    assert text == solo[prompt].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish_reason(solo[prompt])]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(solo[prompt].token_ids)
    assert chunks[-1].usage.prompt_tokens == len(hf_tokenizer(prompt).input_ids)


def test_chat_equals_generate_on_the_templates_prompt(client, model, hf_tokenizer):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    prompt_ids = list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))
    ref = ktjax.generate(model, prompt_ids, max_new_tokens=N)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=N, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(ref.token_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert "".join(d.content or "" for d in deltas) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()


def test_sixteen_concurrent_streams_each_equal_their_solo_result(server, client, solo):
    before = get(server[1], "/health")["stats"]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(lambda p: stream_completion(client, p)[0], PROMPTS))
    assert texts == [solo[p].text for p in PROMPTS]
    after = get(server[1], "/health")["stats"]
    # Admissions are batched: requests waiting at a step boundary share one prefill.
    assert after["prefilled_requests"] - before["prefilled_requests"] == len(PROMPTS)
    assert after["prefill_calls"] - before["prefill_calls"] < len(PROMPTS)


def scheduler_for(model, max_batch: int, **kw):
    from ktjax.serve.scheduler import Scheduler
    placement = dataclasses.replace(model.placement, max_batch=max_batch, max_context=256)
    return Scheduler(dataclasses.replace(model, placement=placement, lock=threading.Lock()), **kw)


def collect_events(scheduler, prompt_ids, max_new_tokens, **kw):
    from ktjax.runtime.generation import SamplingOptions
    from ktjax.serve.requests import Request
    events, done = [], threading.Event()

    def emit(e):
        events.append(e)
        if e.final:
            done.set()

    request = Request(prompt_ids, SamplingOptions(max_new_tokens), emit, **kw)
    return request, events, done


def test_seeded_sampling_matches_generate_with_that_seed(client, model):
    # top_k (an extension) given: left out, it would be the checkpoint's generation_config.json's.
    prompt, kw = PROMPTS[2], dict(max_tokens=N, temperature=1.2, top_p=0.9, seed=7, extra_body={"top_k": 5})
    ref = ktjax.generate(model, prompt, max_new_tokens=N, temperature=1.2, top_p=0.9, top_k=5, seed=7)
    assert client.completions.create(model=MODEL, prompt=prompt, **kw).choices[0].text == ref.text


def test_stop_strings_across_token_boundaries(client, model, solo):
    prompt = PROMPTS[0]
    ref = solo[prompt]
    tok = model.tokenizer
    # A stop string made of the end of one token and the start of the next.
    boundary = len(tok.decode(ref.token_ids[:3], skip_special_tokens=True))
    stop = ref.text[boundary - 2:boundary + 2]
    assert len(stop) == 4 and ref.text.find(stop) >= 0
    expected = ref.text[:ref.text.find(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0, stop=[stop, "NEVER"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    text, chunks = stream_completion(client, prompt, stop=stop)
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_reasoning_apart_or_inline(client, model):
    messages = [{"role": "user", "content": "Think about lists."}]
    ref = ktjax.generate(model, chat_prompt(model, messages, thinking=True), max_new_tokens=N).text
    kw = dict(model=MODEL, messages=messages, max_tokens=N, temperature=0,
              extra_body={"chat_template_kwargs": {"thinking": True}})
    apart = client.chat.completions.create(**kw)
    message = apart.choices[0].message.model_dump()
    # An unfinished block is all reasoning, as if it closed where the reply ends.
    reasoning, answer = split_reasoning({"content": THINK_OPEN + ref + ("" if "</think>" in ref else "\n</think>")})
    assert (message["reasoning_content"], message["content"]) == (reasoning, answer["content"])
    kw["extra_body"] = {**kw["extra_body"], "separate_reasoning": False}
    assert client.chat.completions.create(**kw).choices[0].message.content == THINK_OPEN + ref


def test_reasoning_splitter_matches_split_reasoning_at_any_piece_boundaries():
    reply = "plan: sort,\nthen merge\n</think>\n\nanswer: <b>merged</b>\n"
    reference, answer = split_reasoning({"content": THINK_OPEN + reply})
    for size in (1, 2, 3, 5, 8, len(reply)):
        splitter, parts = ReasoningSplitter(), []
        for i in range(0, len(reply), size):
            parts.append(splitter.feed(reply[i:i + size]))
        parts.append(splitter.finish())
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (reference, answer["content"])


def test_a_batch_samples_each_row_with_its_own_settings_and_key():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ktjax.runtime.sampling import sample

    logits_BV = jax.random.normal(jax.random.key(0), (4, 64)) * 3
    keys_B = jax.random.split(jax.random.key(1), 4)
    temperature_B, top_k_B, top_p_B = jnp.array([0.0, 1.0, 1.0, 0.7]), jnp.array([0, 1, 3, 0]), jnp.ones(4)
    sample_jit = jax.jit(sample)
    batch_B = np.asarray(sample_jit(logits_BV, keys_B, temperature_B, top_k_B, top_p_B))
    logits = np.asarray(logits_BV)
    assert batch_B[0] == logits[0].argmax() and batch_B[1] == logits[1].argmax()  # greedy; top-1
    assert batch_B[2] in np.argsort(-logits[2])[:3]
    # Row b samples as a batch of one would with key b.
    for b in range(4):
        alone = sample_jit(logits_BV[b:b + 1], keys_B[b], temperature_B[b], top_k_B[b], top_p_B[b])
        assert int(alone[0]) == int(batch_B[b])


def test_an_idle_batch_admits_every_waiting_request_in_one_prefill(model, solo):
    """16 requests waiting when the scheduler starts: one batched prefill (a padded batch of rows of
    different lengths), and each request's greedy text still equals its own `ktjax.generate`."""
    scheduler = scheduler_for(model, len(PROMPTS))
    jobs = [collect_events(scheduler, model.tokenizer.encode(p), N) for p in PROMPTS]
    for request, _, _ in jobs:
        scheduler.submit(request)
    scheduler.start()
    try:
        for _, _, done in jobs:
            assert done.wait(60)
    finally:
        scheduler.stop()
    assert scheduler.stats["prefill_calls"] == 1 and scheduler.stats["prefilled_requests"] == len(PROMPTS)
    assert ["".join(e.text for e in events) for _, events, _ in jobs] == [solo[p].text for p in PROMPTS]
    assert scheduler.stats["decoded_tokens"] == sum(len(solo[p].token_ids) - 1 for p in PROMPTS)


def test_rows_in_use_step_alone_in_the_smallest_batch_that_holds_them(model, solo):
    """Three requests in slots 6, 1 and 3 of 8: each decode step runs a batch of 4 (the three and free
    slot 0, their cache rows taken out and put back), so the other slots' cache rows are never written,
    and each request continues exactly as `ktjax.generate` alone."""
    import jax
    import numpy as np

    from ktjax.runtime.generation import SamplingOptions
    from ktjax.runtime.shapes import cache_length
    from ktjax.serve.batch import DecodeBatch

    batch = DecodeBatch(model, 8, cache_length(256, 0))
    batch.warm_up()  # every size compiled; the rows hold garbage from it
    slots, prompts = [6, 1, 3], PROMPTS[:3]
    tokens = [[t] for t in batch.prefill_into(slots, [model.tokenizer.encode(p) for p in prompts],
                                              [SamplingOptions(N, temperature=0.0)] * 3)]
    untouched = [2, 4, 5, 7]
    before = [np.asarray(a)[:, untouched] for a in jax.tree.leaves(batch.cache_B)]
    active = np.isin(np.arange(8), slots)
    for _ in range(N - 1):
        sampled = batch.decode(active)
        for t, slot in zip(tokens, slots):
            t.append(int(sampled[slot]))
    for a, b in zip(before, jax.tree.leaves(batch.cache_B)):
        np.testing.assert_array_equal(np.asarray(b)[:, untouched], a)
    for t, p in zip(tokens, prompts):
        assert t[:len(solo[p].token_ids)] == solo[p].token_ids


class CountingExecutor:
    """An executor that records the rows of each decode step it runs (and otherwise is the one it wraps)."""

    def __init__(self, executor):
        self.executor, self.rows = executor, []

    def decode(self, cache, token_B, *args, **kwargs):
        self.rows.append(len(token_B))
        return self.executor.decode(cache, token_B, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.executor, name)


def test_a_stop_during_the_warm_up_ends_it_at_the_next_batch_size(model):
    """Ctrl-C while a server compiles its decode steps (the signal handler's `Scheduler.stop_soon`) ends
    the warm-up before the next batch size, not after all of them: a scheduler stopped before its loop
    runs compiles nothing and returns; a warm-up told to stop after its first size steps only that."""
    from ktjax.runtime.shapes import cache_length
    from ktjax.serve.batch import DecodeBatch

    counting = CountingExecutor(model.executor)
    scheduler = scheduler_for(dataclasses.replace(model, executor=counting), 8)
    scheduler.stop_soon()
    scheduler.run()  # returns: nothing to serve
    assert counting.rows == []

    batch = DecodeBatch(model, 8, cache_length(256, 0))
    batch.executor = counting
    answers = iter([False, True])
    assert batch.warm_up(stop=lambda: next(answers)) is False
    assert counting.rows == [1, 1]
    counting.rows.clear()
    assert batch.warm_up() is True
    assert counting.rows == [1, 1, 2, 2, 4, 4, 8, 8]


def test_a_request_admitted_into_a_free_slot_that_filled_out_the_stepping_batch_keeps_its_prompt(model, solo):
    """Three requests (slots 6, 1, 3 of 8) step in a batch of 4 that free slot 0 fills out, their cache rows
    kept out of the slots' between steps; a fourth request then takes slot 0. Its prompt's cache is not
    overwritten by the stale row the batch held for slot 0, and all four continue as `ktjax.generate` alone."""
    import numpy as np

    from ktjax.runtime.generation import SamplingOptions
    from ktjax.runtime.shapes import cache_length
    from ktjax.serve.batch import DecodeBatch

    batch = DecodeBatch(model, 8, cache_length(256, 0))
    greedy = [SamplingOptions(N, temperature=0.0)]
    slots, prompts = [6, 1, 3], PROMPTS[:3]
    tokens = {s: [t] for s, t in zip(slots, batch.prefill_into(slots, [model.tokenizer.encode(p) for p in prompts],
                                                                  greedy * 3))}
    for step in range(N - 1):
        if step == 3:
            tokens[0] = batch.prefill_into([0], [model.tokenizer.encode(PROMPTS[3])], greedy)
        sampled = batch.decode(np.isin(np.arange(8), list(tokens)))
        for s, t in tokens.items():
            t.append(int(sampled[s]))
    for s, p in zip(slots + [0], prompts + [PROMPTS[3]]):
        n = min(len(tokens[s]), len(solo[p].token_ids))  # generate stops at end of sequence; the slots do not
        assert n >= 5 and tokens[s][:n] == solo[p].token_ids[:n]


def test_seeded_sampling_in_the_slots_continues_as_generate_while_the_rows_that_step_change(model):
    """A sampled request keeps its own key sequence, as `ktjax.generate` with its seed draws it, while it
    decodes alone (its rows kept out of the slots' cache between steps), beside a request admitted later
    (the rows that step change: put back, taken out again), and alone again once that one has left."""
    import numpy as np

    from ktjax.runtime.generation import SamplingOptions
    from ktjax.runtime.shapes import cache_length
    from ktjax.serve.batch import DecodeBatch

    first, second = (model.tokenizer.encode(p) for p in PROMPTS[:2])
    a, b = SamplingOptions(12, temperature=0.9, seed=7), SamplingOptions(5, temperature=0.9, seed=11)
    batch = DecodeBatch(model, 8, cache_length(256, 0))
    tokens = {5: batch.prefill_into([5], [first], [a]), 2: []}
    for steps, rows in ((3, [5]), (0, None), (4, [5, 2]), (4, [5])):
        if rows is None:  # the second request arrives
            tokens[2] = batch.prefill_into([2], [second], [b])
            continue
        for _ in range(steps):
            sampled = batch.decode(np.isin(np.arange(8), rows))
            for r in rows:
                tokens[r].append(int(sampled[r]))
    for got, ids, o in ((tokens[5], first, a), (tokens[2], second, b)):
        want = ktjax.generate(model, ids, max_new_tokens=o.max_new_tokens, temperature=0.9, seed=o.seed).token_ids
        assert len(want) > 2 and got[:len(want)] == want  # generate stops at end of sequence; the slots do not


@pytest.mark.parametrize("rows, copies, in_place", [(1, "program", False), (2, "program", False),
                                                     (3, "program", False), (2, "in_program", False),
                                                     (2, "program", True)])
def test_an_offloaded_batch_compiles_every_split_of_its_experts_before_any_request(rows, copies, in_place):
    """int4 experts in host memory decode one row (and two of the embedded model's, whose 4 experts a token fit
    the form's 8) in the fused form, whose programs vary with how many of the chosen experts the host CPU, the
    link and the device take (and with how many the device's program moves itself, where it does: `fused_copies`;
    and with its ids handed over in place, `indices_in_place`);
    more rows in the streamed form, whose programs vary with the capacity each expert needs and with rows not in
    use (3 of the 4 slots). The batch's warm-up runs them all, so steps of those rows under every split (all on the
    CPU, all over the link, the cost model's) compile nothing."""
    import jax
    import numpy as np

    from ktjax.runtime.generation import SamplingOptions
    from ktjax.runtime.shapes import cache_length
    from ktjax.serve.batch import DecodeBatch

    offloaded = ktjax.load(experts="int4", placement={r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"},
                           max_batch=4, max_context=256)
    assert offloaded.executor.fuses_decode and offloaded.executor.host is not None
    offloaded = dataclasses.replace(offloaded, executor=offloaded.executor.with_fused_copies(copies)
                                    .with_indices_in_place(in_place))
    batch = DecodeBatch(offloaded, 4, cache_length(256, 0))
    batch.warm_up()
    compiles, listening = [], [False]

    def on_event(event, seconds, **kw):
        if listening[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    executor = batch.executor
    try:
        for k, mode in enumerate(("cpu", "gpu", "auto")):
            batch.executor = executor.with_expert_compute(mode)
            prompts = [offloaded.tokenizer.encode(PROMPTS[(k + r) % len(PROMPTS)]) for r in range(rows)]
            batch.prefill_into(list(range(rows)), prompts, [SamplingOptions(4)] * rows)
            listening[0] = True
            for _ in range(3):
                batch.decode(np.arange(4) < rows)
            listening[0] = False
            moved = batch.last_stats
            if mode != "auto":  # the tiny model's experts are small: its cost model sends them over the link
                assert (moved.experts_on_host_cpu > 0, moved.experts_fetched > 0) == (mode == "cpu", mode == "gpu")
    finally:
        listening[0] = False
    assert compiles == []


def test_requests_arriving_together_share_one_prefill_within_the_admission_window(model):
    """An offloaded model's prefill streams every host expert whatever its tokens, so an idle batch waits
    up to `admission_window` after the first arrival for others; filling the free slots ends the wait."""
    import time
    ids = model.tokenizer.encode(PROMPTS[0])
    scheduler = scheduler_for(model, len(PROMPTS), admission_window=30.0).start()
    try:
        first = collect_events(scheduler, ids, 2)
        scheduler.submit(first[0])
        time.sleep(0.05)
        assert not first[1] and scheduler.stats["prefill_calls"] == 0  # waiting for company
        rest = [collect_events(scheduler, ids, 2) for _ in PROMPTS[1:]]
        for request, _, _ in rest:
            scheduler.submit(request)
        # The slots are full: no 30 s wait, one prefill for all 16.
        assert all(done.wait(20) for _, _, done in [first] + rest)
        assert scheduler.stats["prefill_calls"] == 1 and scheduler.stats["prefilled_requests"] == len(PROMPTS)
    finally:
        scheduler.stop()
    scheduler = scheduler_for(model, len(PROMPTS), admission_window=2.0).start()
    try:
        jobs = [collect_events(scheduler, ids, 2) for _ in range(2)]
        scheduler.submit(jobs[0][0])
        time.sleep(0.05)
        scheduler.submit(jobs[1][0])
        assert all(done.wait(20) for _, _, done in jobs)
        assert scheduler.stats["prefill_calls"] == 1 and scheduler.stats["prefilled_requests"] == 2
    finally:
        scheduler.stop()


def test_admission_while_decoding_is_bounded_by_the_prefill_budget(model):
    from ktjax.runtime.shapes import padded_prompt_length
    scheduler = scheduler_for(model, 8, max_prefill_tokens=4 * padded_prompt_length(5))
    for n in (3, 5, 4, 2, 3, 40):
        scheduler.submit(collect_events(scheduler, [7] * n, 1)[0])
    assert scheduler._n_admit(8, decoding=False) == 6  # idle: everything that fits the slots
    assert scheduler._n_admit(2, decoding=True) == 2  # the free slots bound it
    assert scheduler._n_admit(8, decoding=True) == 4  # 4 rows of 16 padded tokens fit; a 5th needs 8 rows
    scheduler.max_prefill_tokens = 1
    assert scheduler._n_admit(8, decoding=True) == 1  # the head of the queue always goes


def test_a_long_prompts_prefill_runs_chunk_by_chunk_between_the_others_decode_steps(model, monkeypatch):
    """A long prompt admitted while another request streams: its prefill runs in chunks (8 tokens
    here, as 1024 at the real sizes), each followed by a decode step that gives the streaming
    request its next token; both results still equal their solo `ktjax.generate`."""
    from ktjax.runtime import shapes
    from ktjax.runtime.generation import SamplingOptions
    from ktjax.serve.requests import Request
    short_ids = model.tokenizer.encode(PROMPTS[2])
    long_ids = model.tokenizer.encode(" ".join(PROMPTS))[:30]
    refs = [ktjax.generate(model, ids, max_new_tokens=n) for ids, n in ((short_ids, 24), (long_ids, N))]
    monkeypatch.setattr(shapes, "PROMPT_BUCKETS", (4, 8))
    chunks = len(shapes.prefill_chunks(len(long_ids)))
    assert chunks == 4 and len(shapes.prefill_chunks(len(short_ids))) == 1
    scheduler = scheduler_for(model, len(PROMPTS))  # the decode step the tests above compiled
    seen = [[], []]  # each request's events, with the prefill chunks run before it
    done = [threading.Event(), threading.Event()]

    def emitter(i):
        def emit(e):
            seen[i].append((scheduler.stats["prefill_chunks"], e))
            if i == 0 and len(seen[0]) == 1:  # the short request streams: the long one arrives (deterministically)
                scheduler.submit(Request(long_ids, SamplingOptions(N), emitter(1)))
            if e.final:
                done[i].set()
        return emit

    scheduler.submit(Request(short_ids, SamplingOptions(24), emitter(0)))
    scheduler.start()
    try:
        assert done[0].wait(60) and done[1].wait(60)
    finally:
        scheduler.stop()
    assert ["".join(e.text for _, e in events) for events in seen] == [r.text for r in refs]
    assert [events[-1][1].completion_tokens for events in seen] == [len(r.token_ids) for r in refs]
    # The short request's prefill was chunk 1; the long one's are chunks 2..5. The short request got
    # a token after each of the long prompt's chunks but the last (while its prefill was in progress).
    assert scheduler.stats["prefill_calls"] == 2 and scheduler.stats["prefill_chunks"] == 1 + chunks
    assert scheduler.stats["decode_steps_between_prefill_chunks"] == chunks - 1
    short_chunks = [c for c, _ in seen[0]]
    assert all(c in short_chunks for c in range(2, 1 + chunks)), short_chunks
    assert seen[1][0][0] == 1 + chunks  # the long request's first token: after its last chunk


def test_an_offloaded_admission_runs_in_the_same_layer_pass_as_the_decoding_rows_step():
    """Routed experts in host memory: every prefill streams all of them, so a request admitted while
    another decodes is prefilled in the same layer pass as the other's next decode step (one expert stream
    for both, `DecodeBatch.admit_while_stepping`); both results still equal their solo `ktjax.generate`."""
    from ktjax.runtime.generation import SamplingOptions
    from ktjax.serve.requests import Request
    offloaded = ktjax.load(dtype="float32", placement={r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"},
                           max_batch=4, max_context=256)
    assert offloaded.placement.offloaded
    first_ids, second_ids = offloaded.tokenizer.encode(PROMPTS[0]), offloaded.tokenizer.encode(PROMPTS[3])
    refs = [ktjax.generate(offloaded, ids, max_new_tokens=n) for ids, n in ((first_ids, 12), (second_ids, N))]
    scheduler = scheduler_for(offloaded, 4)
    texts, done = ["", ""], [threading.Event(), threading.Event()]

    def emitter(i):
        def emit(e):
            if i == 0 and not texts[0] and not done[1].is_set() and scheduler.stats["decode_steps"] == 0:
                scheduler.submit(Request(second_ids, SamplingOptions(N), emitter(1)))  # arrives while the first decodes
            texts[i] += e.text
            if e.final:
                done[i].set()
        return emit

    scheduler.submit(Request(first_ids, SamplingOptions(12), emitter(0)))
    scheduler.start()
    try:
        assert done[0].wait(120) and done[1].wait(120)
    finally:
        scheduler.stop()
    assert texts == [r.text for r in refs]
    assert scheduler.stats["prefill_calls"] == 2 and scheduler.stats["prefills_with_decode"] == 1
    # Every step after the first prefill advanced the first request, the admission's pass included.
    assert scheduler.stats["decoded_tokens"] == len(refs[0].token_ids) - 1 + len(refs[1].token_ids) - 1


def test_ignore_eos_generates_through_end_of_sequence(model):
    """A request with ignore_eos runs to max_tokens even where greedy decoding emits EOS."""
    eos = next(iter(model.tokenizer.eos_token_ids))
    scheduler = scheduler_for(model, len(PROMPTS))  # the shapes the test above compiled
    scheduler._stop_ids = {t for t in range(model.config.vocab_size)}  # every token ends a normal request
    plain, plain_events, plain_done = collect_events(scheduler, [eos, 5, 9], 6)
    forced, forced_events, forced_done = collect_events(scheduler, [eos, 5, 9], 6, ignore_eos=True)
    scheduler.submit(plain)
    scheduler.submit(forced)
    scheduler.start()
    try:
        assert plain_done.wait(60) and forced_done.wait(60)
    finally:
        scheduler.stop()
    assert plain_events[-1].completion_tokens == 1 and plain_events[-1].finish_reason == "stop"
    assert forced_events[-1].completion_tokens == 6 and forced_events[-1].finish_reason == "length"


def raw_post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, param", [
    (b'{"model": "ktjax-tiny", "messages": [', None),  # malformed JSON
    (b'[1, 2]', None),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": "ktjax-tiny", "messages": []}', "messages"),
    (b'{"model": "ktjax-tiny", "messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role"),
    (b'{"model": "ktjax-tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "messages.0.content.0.type"),
    (b'{"model": "ktjax-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', "max_tokens"),
    (b'{"model": "ktjax-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    (b'{"model": "ktjax-tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
    (b'{"model": "ktjax-tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
    (b'{"model": "ktjax-tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}',
     "stop"),
    (b'{"model": "ktjax-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}',
     "max_tokens"),  # prompt plus max_tokens over the context
    (b'{"model": "ktjax-tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 1e400}', "seed"),
])
def test_bad_requests_get_400_with_the_field_named(server, body, param):
    status, answer = raw_post(server[1], body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param and answer["error"]["message"]


def test_openai_client_errors(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=300)  # over the 256 of context
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[1] + "/v1", api_key="wrong", max_retries=0).models.list()
    status, answer = raw_post(server[1], b"{}", key=None)  # no key at all (the client insists on one)
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert get(server[1], "/health")["status"] == "ok"


def test_queue_bound_then_disconnects_free_every_slot_for_reuse(server, client, solo):
    streams = [client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=200, temperature=0,
                                         stream=True) for _ in range(SLOTS + QUEUE)]
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4)
    for s in streams[:SLOTS]:
        next(iter(s))  # generating: every slot is taken
    for s in streams:
        s.close()  # the clients go away mid-stream
    deadline = time.monotonic() + 30
    while (h := get(server[1], "/health"))["active"] + h["waiting"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert h["active"] == h["waiting"] == 0
    with concurrent.futures.ThreadPoolExecutor(SLOTS) as pool:
        texts = list(pool.map(lambda p: stream_completion(client, p)[0], PROMPTS[:SLOTS]))
    assert texts == [solo[p].text for p in PROMPTS[:SLOTS]]


def test_a_port_in_use_ends_the_second_server_with_an_error_instead_of_a_model_loop_serving_nobody(server):
    """The model's loop runs on the main thread and uvicorn on another: when uvicorn cannot bind, the loop
    must stop too, and the process exit with 1 and uvicorn's reason (not hang, holding the model)."""
    port = server[1].rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "ktjax.cli.main", "serve", "--port", port, "--max-batch", "1",
                           "--max-context", "64", "--dtype", "float32", "--log-level", "warning"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "address already in use" in done.stderr
    assert "Traceback" not in done.stderr
    get(server[1], "/health")  # the first server still serves


def test_ctrl_c_ends_open_streams_and_stops_the_server_cleanly(tmp_path):
    """A server of its own: the module's serves every other test, in any order."""
    log = tmp_path / "server.log"
    proc, url = start_server(log, "--max-batch", "1", "--max-context", "256")
    client = openai.OpenAI(base_url=url + "/v1", api_key="any", max_retries=0, timeout=120)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)
    proc.send_signal(signal.SIGINT)
    with pytest.raises(openai.APIError, match="shutting down"):
        for _ in chunks:
            pass
    try:
        assert proc.wait(timeout=30) in (0, 130, -signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--port", "70000"], "--port must be in 1..65535, got 70000"),
    (["serve", "--max-batch", "0"], "--max-batch must be at least 1, got 0"),
    (["serve", "--model", "/nonexistent"], "--model /nonexistent: no such checkpoint directory"),
    (["serve", "--api-key", " "], "--api-key is empty"),
])
def test_bad_serve_options_are_one_line_before_loading(argv, needle, capsys):
    from ktjax.cli.main import main
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
