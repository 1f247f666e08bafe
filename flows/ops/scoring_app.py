"""The ASGI app of `sngp serve-model`'s child process: MLflow's scoring server
(`mlflow.pyfunc.scoring_server.init`, the app `mlflow models serve` runs: /invocations, /ping, /health,
/version) for the model at $SNGP_SERVE_MODEL_URI, with one change: an error answer carries no
`stack_trace`. MLflow adds the server's traceback to some 4xx answers (a CSV body whose value is not a
number, an unexpected error while predicting); the message, which names the problem, stays.

    SNGP_SERVE_MODEL_URI=models:/NAME/VERSION python -m uvicorn flows.ops.scoring_app:app --port 5001
"""

from __future__ import annotations

import json
import os

import mlflow.pyfunc
from fastapi import Request
from fastapi.responses import Response
from mlflow.pyfunc import scoring_server

from flows.ops.model_server import MODEL_URI_ENV

HIDDEN_FIELDS = ("stack_trace",)


def without_stack_trace(body: bytes) -> bytes | None:
    """A JSON error body without its HIDDEN_FIELDS, or None if there is nothing to remove."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    if not isinstance(answer, dict) or not any(field in answer for field in HIDDEN_FIELDS):
        return None
    return json.dumps({k: v for k, v in answer.items() if k not in HIDDEN_FIELDS}).encode()


def create_app(model_uri: str):
    app = scoring_server.init(mlflow.pyfunc.load_model(model_uri))

    @app.middleware("http")
    async def hide_stack_traces(request: Request, call_next):
        response = await call_next(request)
        if response.status_code < 400:
            return response
        body = b"".join([chunk async for chunk in response.body_iterator])
        cleaned = without_stack_trace(body)
        return Response(
            content=body if cleaned is None else cleaned,
            status_code=response.status_code,
            media_type=response.media_type or response.headers.get("content-type"),
        )

    return app


app = create_app(os.environ[MODEL_URI_ENV])
