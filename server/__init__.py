"""The front door: an OpenAI-compatible HTTP API over the scheduler's `Engine`, and the CLI.

    cli.py ─┬─ runner.py (uvicorn, signals) ── app.py (create_app, lifespan opens the engine)
            └─ launcher.py (local agent processes for `potluck up`)
    app.py ── routes.py (thin handlers, auth) ── serving.py (prompt -> Generation -> reply)
    serving.py ── schemas.py (request bodies) · text.py (tokenizer, chat template)
               ── generation.py (TokenEvents -> Deltas; detokenize.py: text, stop strings)
               ── responses.py (OpenAI objects and chunks) · streaming.py (SSE)
    errors.py  the one mapping of exceptions to OpenAI-shaped HTTP errors
    metrics.py Prometheus registry per app; inventory.py, units.py: deploy-side configuration
"""
