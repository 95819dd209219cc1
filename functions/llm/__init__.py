"""The LLM inference function: OpenAI-compatible serving with resumable generation.

`python -m functions.llm --model DIR` runs one instance (docs/function.md); with
`--checkpoint URI --loader ADDRESS` it leases the checkpoint from the node's loader sidecar
instead. Modules:

    __main__     entry point: start loading at once, serve meanwhile
    config       flags and environment -> ServeConfig (defaults, parse, validate)
    service      lifecycle (load thread, readiness), concurrency limiter, tokenization
    server       the public and internal uvicorn servers, signals, shutdown
    app          public routes: /v1/completions, /v1/chat/completions, /v1/models, health, metrics
    internal     internal routes: export, prefill, detach, resume (migration)
    protocol     OpenAI request validation (pure)
    responses    OpenAI response and stream-chunk bodies (pure)
    generation   engine outputs -> SSE stream or JSON body; disconnects cancel
    transport    body limits, JSON, SSE framing, disconnect detection
    errors       the exception tree and its one mapping to OpenAI error bodies
    engine       the continuous-batching loop (its own thread)
    scheduler    which rows go into the next step (pure)
    runner       the packed forward pass and the KV cache
    decoder      the lean forward for the Llama family (Llama, Mistral, Qwen2)
    numerics     batch-invariant linear layers and attention (exact) or stock kernels (fast)
    sampling     per-request sampling and generator state
    sequence     one generation inside the engine
    text         incremental detokenization and stop strings
    state        the exported generation state (format and validation)
    params       plain values shared by the HTTP layer and the engine
    weights      where the weights come from: a directory, or a lease from the loader sidecar; the cast
    dtypes       the compute dtype: bf16 on a CPU with a native bf16 multiply, else float32 (pure)
    metrics      Prometheus metrics and startup timings
"""
