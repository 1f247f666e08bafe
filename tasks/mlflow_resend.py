"""MLflow's HTTP client, made to send a request again when the server's answer is cut off.

A server killed while it answers (the MLflow server SIGKILLed, out of memory, its host lost) can have
sent the answer's headers but not its body. MLflow's client retries a request that got no answer at all
(urllib3's retries: refused, reset, closed before the headers), but not one whose body was cut off:
requests reads the body after urllib3 has returned, and the request fails with "Connection broken:
IncompleteRead". Both are the same event to the pipeline, which already expects a request to be carried
out twice (tasks.tracking.KEY_TAG: runs and models created twice keep one copy).

The hook is installed through MLflow's public plugin interface for request auth (entry point
`mlflow.request_auth_provider`, selected by MLFLOW_TRACKING_AUTH: tasks/mlflow_env.py sets it unless the
user chose a provider of their own); it adds no credentials. It reads each answer's body (what requests
does next anyway) and, if the body is cut off, sends the request again through the same connection pool,
whose retries wait for the server to come back. Streamed downloads read their own bodies: left alone.
"""

from __future__ import annotations

import logging

import requests
from mlflow.tracking.request_auth.abstract_request_auth_provider import RequestAuthProvider
from requests.utils import rewind_body

from .mlflow_env import RESEND_PROVIDER

logger = logging.getLogger(__name__)

RESENDS = 3  # answers cut off in a row before the error stands: a server that dies on every request

# What reading a body raises when the connection ends early (ChunkedEncodingError: IncompleteRead,
# a broken chunk) or stalls (ConnectionError: a read timeout).
_CUT_OFF = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)


class ResendCutOffAnswers(requests.auth.AuthBase):
    """requests auth that adds no credentials, only the response hook read_or_resend."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.register_hook("response", read_or_resend)
        return request


def read_or_resend(response: requests.Response, **send_kwargs) -> requests.Response:
    """The response with its body read; a request whose answer was cut off is sent again (RESENDS
    times at most, then reading raises as it would have)."""
    if send_kwargs.get("stream"):
        return response
    for attempt in range(1, RESENDS + 1):
        try:
            response.content  # noqa: B018 - reads and keeps the body
            return response
        except _CUT_OFF as exc:
            request = response.request
            logger.warning(
                "the MLflow server's answer to %s %s was cut off (%s): sending it again (%d/%d)",
                request.method,
                request.path_url.split("?")[0],
                exc,
                attempt,
                RESENDS,
            )
            response.close()
            if hasattr(request.body, "read"):
                rewind_body(request)  # an uploaded file: from its start again
            response = response.connection.send(request, **send_kwargs)
    response.content  # noqa: B018 - the last cut-off raises here
    return response


class ResendCutOffAnswersProvider(RequestAuthProvider):
    """The MLflow plugin (entry point `sngp-resend-cut-answers` in pyproject.toml)."""

    def get_name(self) -> str:
        return RESEND_PROVIDER

    def get_auth(self) -> ResendCutOffAnswers:
        return ResendCutOffAnswers()
