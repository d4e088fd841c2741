"""An OpenAI-compatible /chat/completions endpoint (vLLM, SGLang, llama.cpp's server, a hosted
API), standard library only: the judge of --judge-api-base and the served model of --api-base.

The key ($OPENAI_API_KEY) goes to the configured URL's host and nowhere else: a redirect
is refused (never followed, never sent the key), a proxy from the environment is used only
for https (a tunnel: the proxy never sees the headers), and a URL that carries credentials
itself is refused. The URL is parsed once (api_url): scheme, host, port, path and query; the
query goes with every request, after the path; a fragment or a port out of range is refused.
What is shown or recorded of it is its scheme, host, port and path, and a hash of its query
(shown_url: a key may hide there, and another query is another deployment). A reply that
breaks off, is not HTTP, or is not in the chat-completions format is the endpoint failing,
not the judge's opinion: it is retried, then the run stops. A well-formed reply counts only
when it is complete (finish_reason "stop") and has text: one cut at max_tokens, filtered
(content null) or holding only tool calls is no answer (None).
"""

import functools
import hashlib
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import common

MAX_REPLY_BYTES = 4 << 20  # a chat completion of 256 tokens is a few kB


class Redirected(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: urllib raises the 3xx as an HTTPError instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def split_url(url, flag="--judge-api-base"):
    """urllib's parts of a URL, or an InputError naming its flag (a bracket left open, a bad port)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises on a port out of range or not a number)
    except ValueError as e:
        raise common.InputError(f"{flag}: not a URL that can be used ({e})") from None
    return parts


def check_api_base(api_base, flag="--judge-api-base"):
    """An http(s) URL without credentials, fragment or bad port (errors name `flag`); returns it as given."""
    parts = split_url(api_base, flag)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise common.InputError(f"{flag} must be an http:// or https:// URL, got {shown_url(api_base)!r}")
    if parts.username is not None or parts.password is not None:
        raise common.InputError(
            f"{flag} {shown_url(api_base)}: holds credentials; give the key in $OPENAI_API_KEY instead"
        )
    if parts.fragment or api_base.endswith("#"):
        raise common.InputError(f"{flag} {shown_url(api_base)}: has a fragment (#...), which is never sent")
    if parts.port == 0:
        raise common.InputError(f"{flag} {shown_url(api_base)}: port 0")
    return api_base


@functools.lru_cache(maxsize=None)
def api_url(api_base, endpoint):
    """The URL of `endpoint` (e.g. "chat/completions") under the API base: its path after the
    base's path, the base's query kept after it (Azure's ?api-version=...). Parsed once per
    base, not once per request."""
    p = split_url(check_api_base(api_base))
    return urllib.parse.urlunsplit((p.scheme, p.netloc, p.path.rstrip("/") + "/" + endpoint, p.query, ""))


def shown_url(url):
    """The URL as messages and settings show it: scheme, host, port and path; no user or
    password, and for a query '?' and 8 hex digits of its hash (a key may hide in a query, and
    two queries, two deployments, must differ in what is recorded)."""
    p = urllib.parse.urlsplit(url)
    host = p.netloc.rpartition("@")[2]  # what follows any user:password@
    query = "?" + hashlib.sha256(p.query.encode()).hexdigest()[:8] if p.query else ""
    return f"{p.scheme}://{host}{p.path}{query}"


def opener(url):
    """urllib's opener for the judge: redirects refused; environment proxies only for https."""
    handlers = [Redirected()]
    if urllib.parse.urlsplit(url).scheme != "https":
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def post(url, body, headers, deadline):
    """POST and read the whole reply within `deadline` seconds in all (urllib's timeout bounds
    each socket read only, so a server that trickles bytes could hold us forever): the
    request runs in a daemon thread, abandoned when the deadline passes."""
    box = {}

    def worker():
        try:
            with opener(url).open(urllib.request.Request(url, body, headers), timeout=deadline) as r:
                box["data"] = r.read(MAX_REPLY_BYTES + 1)
                if len(box["data"]) <= MAX_REPLY_BYTES and r.length:  # the server closed before its Content-Length
                    raise http.client.IncompleteRead(box["data"], r.length)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    t.join(deadline)
    if t.is_alive():
        raise TimeoutError(f"no complete reply within {deadline} s")
    if "error" in box:
        raise box["error"]
    if len(box["data"]) > MAX_REPLY_BYTES:
        raise ValueError(f"a reply over {MAX_REPLY_BYTES >> 20} MiB")
    return box["data"]


def reply_choice(data):
    """The first choice of a chat-completions reply, checked for form: a dict whose message's
    content is a string or null; ValueError if the reply is not a chat completion at all."""
    try:
        choice = json.loads(data)["choices"][0]
        content = choice["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError, RecursionError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"a reply not in the chat-completions format ({type(e).__name__})") from None
    if content is not None and not isinstance(content, str):
        raise ValueError(f"a reply whose content is of type {type(content).__name__}")
    return choice


def reply_text(choice, finished=("stop",)):
    """A choice's text when it finished as asked (a judge's reply: "stop" only; an answer written
    to a token budget: "stop" or "length") and has text; None when it holds no usable answer
    (cut off, filtered to null, tool calls only)."""
    content = choice["message"].get("content")
    return content if choice.get("finish_reason") in finished and content else None


class Refused(common.InputError):
    """The endpoint refused the request itself (HTTP 4xx other than 429): `code` says how."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def chat_choice(api_base, model, messages, timeout=60, retries=4, backoff=1.0, **params):
    """One reply's first choice from the endpoint (reply_choice), for `messages` and request
    parameters `params` (max_tokens, temperature, top_p, seed, logprobs, ...; temperature 0 unless
    given). Retries, with exponential back-off, connection errors, replies that break off,
    time-outs (`timeout`: seconds per request, in all), 429, 5xx and malformed replies; after
    the last try, or at once on a redirect or another 4xx (Refused), an InputError names the
    endpoint and what went wrong."""
    url = api_url(api_base, "chat/completions")
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, **params}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', '')}"}
    last = None
    for attempt in range(retries):
        try:
            return reply_choice(post(url, body, headers, timeout))
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                where = shown_url(urllib.parse.urljoin(url, e.headers.get("Location", "")))
                raise common.InputError(
                    f"endpoint {shown_url(url)}: HTTP {e.code}, a redirect to {where}; redirects are not "
                    "followed (the key would go along): give the final URL"
                ) from None
            if e.code != 429 and e.code < 500:
                raise Refused(f"endpoint {shown_url(url)}: HTTP {e.code} {e.reason}", e.code) from None
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        except ValueError as e:
            last = str(e)
        time.sleep(backoff * 2**attempt)
    raise common.InputError(f"endpoint {shown_url(url)} failed after {retries} tries: {last}")


def chat_completion(api_base, model, messages, timeout=60, retries=4, backoff=1.0, max_tokens=256):
    """A judge's reply: its text when complete (finish_reason "stop", with text), else None."""
    choice = chat_choice(api_base, model, messages, timeout, retries, backoff, max_tokens=max_tokens)
    return reply_text(choice)
