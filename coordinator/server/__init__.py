"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of one Engine. Knows nothing
about tensors: it parses requests, queues them, streams what the engine makes, and counts.

    app.py            routes           schemas.py        request bodies, validated
    jobs.py           one generation   scheduler.py      the bounded queue, one at a time
    streaming.py      SSE / JSON out   openai_format.py  reply and error bodies
    chat_template.py  chat -> prompt   metrics.py        GET /metrics
    api_key.py        bearer key       api_errors.py     errors -> HTTP status
    http_server.py    uvicorn          serve.py          serve(): what `python -m coordinator serve` runs
    body_limit.py     413, memory      prompt_tokens.py  prompt -> token ids, off the event loop
"""

from .app import build_app
from .http_server import BackgroundServer
from .serve import serve

__all__ = ["BackgroundServer", "build_app", "serve"]
