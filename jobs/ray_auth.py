"""Talking to Ray clusters with token authentication the way Ray's own tools do.

Ray 2.60 turns token auth on for `ray start --head` whenever a token exists (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, which any local `ray.init()` creates), but its clients
send the token only when their own process has RAY_AUTH_MODE=token, so `ray job list` and a plain
JobSubmissionClient fail with "Missing authentication token". qwen-batch looks the token up in the
same places, in the same order, and sends it: HTTP clients (the Jobs API) get it as a header; a
driver joining through the GCS switches its process to token mode first.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwen_worker.errors import UserError

HOW_TO_SET = (
    "set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in "
    "~/.ray/auth_token; `ray get-auth-token` prints it on the head node)"
)


def find_token() -> str | None:
    """The Ray auth token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (Ray's order)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError:
            raise UserError(f"RAY_AUTH_TOKEN_PATH is {path!r}, which cannot be read") from None
        if not token:
            raise UserError(f"RAY_AUTH_TOKEN_PATH is {path!r}, which is empty")
        return token
    try:
        return (Path.home() / ".ray" / "auth_token").read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict:
    """HTTP headers that authenticate to a token-auth dashboard (none without a token); harmless to
    a dashboard without auth."""
    token = find_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def enable_token_auth_for_driver() -> None:
    """Before `ray.init(address=...)`: put this process in token mode when a token exists, as
    `ray start` and `ray.init("auto")` do (a GCS with auth refuses drivers without it; one without
    auth accepts them)."""
    import sys

    if os.environ.get("RAY_AUTH_MODE") or not find_token():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:  # Ray caches its config: refresh it, as Ray's own _enable_token_auth does
        try:
            from ray._raylet import Config

            Config.initialize("")
        except Exception:
            pass


def auth_problem(exc: BaseException, address: str) -> UserError | None:
    """A one-line UserError for Ray's authentication failures, or None for other errors."""
    text = str(exc)
    if type(exc).__name__ != "AuthenticationError" and "authentication token" not in text.lower():
        return None
    try:
        have_token = find_token() is not None
    except UserError as error:
        return error
    if have_token:
        return UserError(f"the Ray cluster at {address} refused the authentication token in use: {HOW_TO_SET}")
    return UserError(f"the Ray cluster at {address} uses token authentication and no token was found here: {HOW_TO_SET}")
