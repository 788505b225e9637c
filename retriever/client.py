"""``HttpRetriever``: the retriever interface over HTTP, for ``searchgym serve`` or any Search-R1 server."""

import os
import random
import threading
import time
from typing import Any

import requests

from searchgym.errors import SearchgymError
from searchgym.retriever.base import Passage
from searchgym.retriever.config import API_KEY_ENV

_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class RetrievalRequestError(SearchgymError):
    """The server refused a request (a 4xx other than 429); retrying would not help."""


class RetrieverUnavailableError(SearchgymError):
    """No good answer after the last retry: the server is down, overloaded or failing."""


class HttpRetriever:
    """Searches through a retrieval server; a drop-in for a local index.

    Each ``search`` call sends one POST per ``batch_size`` queries (so the server can batch them), with
    a timeout, and retries on 429, 5xx, timeouts and connection errors with exponential backoff and
    jitter (honouring ``Retry-After``), until ``max_retries`` or ``give_up_after_s`` runs out, whichever
    comes first. Safe to share between threads; pickles and deep-copies as its settings (a copy opens its
    own connections).

    Args:
        url: the server, as ``http://host:port`` or its full ``.../retrieve`` endpoint.
        timeout_s: per-attempt wait for the answer once connected.
        max_retries: retries after the first attempt.
        give_up_after_s: the most time one POST may take, its retries and waits included; a server that
            accepts connections and never answers costs this long, not ``timeout_s`` per attempt.
        connect_timeout_s: per-attempt wait for the connection (a dead host fails fast).
        backoff_s: first retry delay; doubles every retry, up to ``max_backoff_s``.
        max_backoff_s: longest delay between attempts.
        api_key: bearer token; defaults to the ``SEARCHGYM_API_KEY`` environment variable.
        batch_size: most queries per POST (the server's default limit is 1024).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        api_key: str | None = None,
        batch_size: int = 512,
        give_up_after_s: float = 60.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if min(timeout_s, give_up_after_s, connect_timeout_s) <= 0 or max_retries < 0:
            raise SearchgymError("HttpRetriever: the timeouts must be positive and max_retries at least 0")
        base = url.rstrip("/")
        self.url = base if base.endswith("/retrieve") else f"{base}/retrieve"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.batch_size = batch_size
        self.give_up_after_s = give_up_after_s
        self.connect_timeout_s = connect_timeout_s
        api_key = api_key or os.environ.get(API_KEY_ENV)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._local = threading.local()

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Return, for each query in order, its best ``k`` passages, best first.

        Raises:
            RetrievalRequestError: the server refused the request (bad input, wrong API key).
            RetrieverUnavailableError: still failing after the last retry.
        """
        results: list[list[Passage]] = []
        for start in range(0, len(queries), self.batch_size):
            chunk = queries[start : start + self.batch_size]
            body = self._post({"queries": chunk, "topk": k, "return_scores": True})
            results.extend(_parse_result(body, expected=len(chunk)))
        return results

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings, not the open connections (each thread or process opens its own)."""
        return {name: value for name, value in self.__dict__.items() if name != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the settings with no connection open yet."""
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _post(self, payload: dict[str, Any]) -> Any:
        failure = ""
        deadline = time.monotonic() + self.give_up_after_s
        attempts = 0
        for attempt in range(self.max_retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            attempts += 1
            retry_after = 0.0
            timeout = (min(self.connect_timeout_s, remaining), min(self.timeout_s, remaining))
            try:
                response = self._session.post(self.url, json=payload, headers=self._headers, timeout=timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                failure = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return _json_body(response)
                failure = f"HTTP {response.status_code}: {_error_message(response)}"
                if response.status_code not in _RETRYABLE_STATUS:
                    raise RetrievalRequestError(f"{self.url} refused the request: {failure}")
                retry_after = _retry_after_s(response)
            if attempt < self.max_retries:
                time.sleep(
                    max(0.0, min(max(retry_after, self._backoff(attempt)), deadline - time.monotonic()))
                )
        raise RetrieverUnavailableError(
            f"{self.url} gave no answer after {attempts} attempts in {self.give_up_after_s:g} s at most "
            f"(last: {failure}); is `searchgym serve` running there?"
        )

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter, so that many clients do not retry in lockstep."""
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)


def _json_body(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError as error:
        raise RetrievalRequestError(f"{response.url} answered 200 with a body that is not JSON") from error


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _retry_after_s(response: requests.Response) -> float:
    try:
        return float(response.headers.get("Retry-After", 0))
    except ValueError:
        return 0.0


def _parse_result(body: Any, *, expected: int) -> list[list[Passage]]:
    """Read a Search-R1 ``/retrieve`` answer, in any of the shapes Search-R1's own servers send.

    ``{"result": [hits, ...]}`` with one list of hits per query, best first, each hit one of:

    - ``{"document": {"id", "contents"}, "score": s}`` (``return_scores: true``);
    - ``{"id", "contents"}``, a bare document (``return_scores: false``);
    - ``{"document": {"contents"}}`` without id or score (Search-R1's Google / SerpAPI servers);
    - ``{"document": "text", "score": s}`` or a bare ``"text"`` (Search-R1's rerank server).

    A document may also be FlashRAG's ``{"title", "text"}``. A hit without a score gets its reciprocal rank
    ``1 / rank`` (1.0, 0.5, 0.333...), so the order is kept and scores stay positive; one without an id
    gets ``""``.
    """
    try:
        result = body["result"]
        if len(result) != expected:
            raise ValueError(f"{len(result)} result lists for {expected} queries")
        return [[_parse_hit(hit, rank) for rank, hit in enumerate(hits, 1)] for hits in result]
    except (KeyError, TypeError, ValueError) as error:
        raise RetrievalRequestError(
            f"the server's response is not Search-R1's result layout: {error!r}"
        ) from error


def _parse_hit(hit: Any, rank: int) -> Passage:
    document = hit.get("document", hit) if isinstance(hit, dict) else hit
    score = hit.get("score") if isinstance(hit, dict) else None
    if isinstance(document, str):
        doc_id, contents = "", document
    elif isinstance(document, dict):
        doc_id = str(document.get("id", ""))
        contents = _contents(document)
    else:
        raise TypeError(f"a hit must be a document object or a string, got {type(document).__name__}")
    return Passage(id=doc_id, contents=contents, score=1.0 / rank if score is None else float(score))


def _contents(document: dict[str, Any]) -> str:
    if "contents" in document:
        return str(document["contents"])
    if "text" in document:  # FlashRAG's corpus layout: DPR's "Title"\ntext
        title = document.get("title")
        return f'"{title}"\n{document["text"]}' if title else str(document["text"])
    raise KeyError(f"a document needs 'contents' (or 'title' and 'text'); it has {sorted(document)}")
