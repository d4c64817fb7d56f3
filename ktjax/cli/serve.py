"""`ktjax serve`: the model behind an OpenAI-compatible HTTP API (uvicorn), concurrent requests
batched into the decode steps. Ctrl-C stops it: open requests end, the model's thread stops."""

from __future__ import annotations

import os
import sys

from ktjax.cli.common import check_model_args, load_model, model_args

DEFAULT_MAX_PREFILL_TOKENS = 2048  # ktjax.serve.scheduler's (not imported here: the parser needs no JAX)

EMBEDDED_MODEL_ID = "ktjax-tiny"
DEFAULT_MAX_BATCH = 8


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve the model over an OpenAI-compatible HTTP API: GET /v1/models, POST "
                       "/v1/chat/completions and /v1/completions (streamed or not), GET /health. Concurrent "
                       f"requests share the decode batch (--max-batch slots, default {DEFAULT_MAX_BATCH} here); "
                       "up to --max-queue more wait, beyond that requests get 429. Host-CPU expert kernels run on "
                       "two threads fewer than in the other commands (from 8 cores up), leaving cores to the HTTP "
                       "side. Ctrl-C stops the server.")
    model_args(s)
    s.set_defaults(max_batch=DEFAULT_MAX_BATCH)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--api-key", default=os.environ.get("KTJAX_API_KEY"), metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 requests (default: $KTJAX_API_KEY, else none)")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait for a free slot; more get HTTP 429 (default 64)")
    s.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                   help="while requests decode, one admission prefills at most N padded tokens (waiting prompts "
                        "batched together; a longer single prompt still goes alone; a model on the device runs it in "
                        "chunks of up to 1024 tokens with a decode step between two) "
                        f"(default: {DEFAULT_MAX_PREFILL_TOKENS} for a model on the device; everything that fits the "
                        "free slots for an offloaded one, whose prefill streams every host expert anyway)")
    s.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients ask for (default: the checkpoint directory's name; "
                        f"{EMBEDDED_MODEL_ID} for the embedded model)")
    s.add_argument("--reasoning", choices=("separate", "inline"), default="separate",
                   help="DeepSeek-R1's reasoning: as `reasoning_content` beside `content` (separate, the default) "
                        "or inline in `content` as <think>...</think>; a request may choose with "
                        "`separate_reasoning`")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")
    s.set_defaults(func=run)


def model_id(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return EMBEDDED_MODEL_ID
    return os.path.basename(os.path.normpath(os.path.expanduser(args.model)))


def run(args) -> int:
    check_model_args(args)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    if args.max_prefill_tokens is not None and args.max_prefill_tokens < 1:
        raise ValueError(f"--max-prefill-tokens must be at least 1, got {args.max_prefill_tokens}")
    import uvicorn  # noqa: F401  (imported first: the other commands need no web stack, this one fails early)

    model = load_model(args)
    if model.tokenizer is None:
        raise ValueError(f"--model {args.model}: no tokenizer files; the server needs them to read and write text")
    return serve(with_serving_threads(model), args)


def with_serving_threads(model):
    """The model with its host-CPU expert kernels on two threads fewer than a batch script's: a server's
    event loop and its clients need cores too, and a parallel loop waits for its slowest thread
    (benchmarks/serve.md runs 7-8: the server's step at every concurrency was faster on 12 than on 14
    of 16 cores)."""
    import dataclasses

    from ktjax.runtime.offload.host_path import default_threads
    host = getattr(model.executor, "host", None)
    if host is None or host.threads is not None or default_threads() < 8:  # few cores: keep them all
        return model
    return dataclasses.replace(model, executor=model.executor.with_host_threads(default_threads() - 2))


def serve(model, args) -> int:
    """Serve a loaded model with the options `ktjax serve` parsed (also used by scripts/bench_serve.py,
    which builds its model in memory) until Ctrl-C / SIGTERM. The model's loop runs on this thread (the
    main one, which loaded the model: see `ktjax.serve.scheduler` for why), uvicorn on another."""
    import signal
    import threading

    import uvicorn

    from ktjax.serve.app import ServeConfig, create_app
    from ktjax.serve.scheduler import Scheduler

    config = ServeConfig(model_id(args), api_key=args.api_key, separate_reasoning=args.reasoning == "separate",
                         max_queue=args.max_queue)
    print(f"ktjax serve: {config.model_id} at http://{args.host}:{args.port}/v1 "
          f"({model.placement.max_batch} slots, {min(model.placement.max_context, model.config.max_position_embeddings)}"
          f" tokens of context)", file=sys.stderr)
    print("ktjax serve: compiling the decode step for each batch size up to the slots, and each program its experts' "
          "routing can meet, before taking requests (40 s for DeepSeek-V3's layers offloaded on an H200 before the "
          "streamed form's programs joined them, less on a second start, which reads them from the compilation "
          "cache; uvicorn's 'Application startup complete' follows)", file=sys.stderr)
    scheduler = Scheduler(model, max_queue=config.max_queue, max_prefill_tokens=args.max_prefill_tokens)
    server = uvicorn.Server(uvicorn.Config(create_app(model, config, scheduler, start_scheduler=False),
                                           host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    signals: list[int] = []

    def handle_exit(sig, frame):
        # Open streams end at the next step boundary (with an error saying why) instead of holding the
        # shutdown; a second Ctrl-C makes uvicorn stop without waiting for its connections.
        signals.append(sig)
        scheduler.stop_soon()
        server.handle_exit(sig, frame)

    def http():
        try:
            server.run()  # in a thread uvicorn installs no signal handlers: this thread's are the ones above
        finally:
            scheduler.stop_soon()  # the server ended (or never started: a port in use): so does the model's loop

    on_main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = {sig: signal.signal(sig, handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)} if on_main else {}
    thread = threading.Thread(target=http, name="ktjax-serve-http")
    try:
        thread.start()
        scheduler.run()
    finally:
        server.should_exit = True
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signals:  # as uvicorn does on the main thread: the signal's own effect once shut down (Ctrl-C: exit 130)
        signal.raise_signal(signals[0])
    return 0 if server.started else 1
