"""What the Hub answers a release with, as one line a person can act on. The token never appears: messages are built
from the status, the repository and the file, never from the request."""

from __future__ import annotations

from requant import settings
from requant.errors import RequantError, printable
from requant.io.hf import hub_failure

RESUME = "run the same release again to resume: files the Hub already holds are not sent again"


def _http_cause(exc: BaseException) -> BaseException:
    """The Hub's HTTP error behind ``exc``: the client wraps a failed upload in a RuntimeError whose cause it is."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = exc
    while seen is not None and not isinstance(seen, HfHubHTTPError):
        seen = seen.__cause__
    return seen if seen is not None else exc


def release_failure(exc: BaseException, where: str, endpoint: str, file: str | None = None) -> RequantError:
    """A one-line error for what the Hub client raised while releasing to ``where`` (uploading ``file``)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, RequantError):
        return exc
    exc = _http_cause(exc)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    what = f"{where} ({file})" if file else where
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return RequantError(f"{where}: the Hub at {endpoint} wants a token with write access (HTTP 401): set HF_TOKEN "
                            "(or `hf auth login`)")
    if isinstance(exc, HfHubHTTPError) and status == 403:
        return RequantError(f"{where}: the token in HF_TOKEN may not write here (HTTP 403): a read-only token, or "
                            "an account without write access to this repository")
    if isinstance(exc, HfHubHTTPError) and status == 412:
        return RequantError(f"{where}: the branch moved while releasing (HTTP 412, another commit landed first); "
                            "refused rather than rebased: run the release again to release on top of the new head")
    if isinstance(exc, HfHubHTTPError) and status == 413:
        return RequantError(f"{what}: the Hub refused the upload as too large (HTTP 413); nothing was committed; "
                            f"{RESUME}")
    if isinstance(exc, HfHubHTTPError) and status is not None and (status == 429 or status >= 500):
        return RequantError(f"{what}: the Hub answered HTTP {status} after {settings.HF_RETRIES.get()} retries; "
                            f"nothing was committed; {RESUME}")
    failure = hub_failure(exc, what, endpoint)
    return RequantError(f"{printable(str(failure), 400)}; nothing was committed")
