"""An OpenAI-compatible /chat/completions endpoint as a judge, standard library only.

The key ($OPENAI_API_KEY) goes to the host of --judge-api-base and nowhere else: a redirect
is refused (never followed, never sent the key), a proxy from the environment is used only
for https (a tunnel: the proxy never sees the headers), and a URL that carries credentials
itself is refused. What is shown or recorded of the URL is its scheme, host and path
(shown_url). A reply that breaks off, is not HTTP, or is not in the chat-completions format
is the endpoint failing, not the judge's opinion: it is retried, then the run stops. Only
a well-formed reply is parsed, and the parsers take time linear in its length.
"""

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


def check_api_base(api_base):
    """An http(s) URL without credentials in it; returns it without a trailing slash."""
    parts = urllib.parse.urlsplit(api_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise common.InputError(f"--judge-api-base must be an http:// or https:// URL, got {shown_url(api_base)!r}")
    if parts.username is not None or parts.password is not None:
        raise common.InputError(
            f"--judge-api-base {shown_url(api_base)}: holds credentials; give the key in $OPENAI_API_KEY instead"
        )
    return api_base.rstrip("/")


def shown_url(url):
    """The URL as messages and settings show it: scheme, host, port and path; no user or
    password, and '?...' for a query (a key may hide in either)."""
    p = urllib.parse.urlsplit(url)
    host = p.netloc.rpartition("@")[2]  # what follows any user:password@
    return f"{p.scheme}://{host}{p.path}" + ("?..." if p.query else "")


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


def reply_content(data):
    """The message content of a chat-completions reply (None counts as ''); ValueError if the
    reply is not one."""
    try:
        content = json.loads(data)["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError, RecursionError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"a reply not in the chat-completions format ({type(e).__name__})") from None
    if content is not None and not isinstance(content, str):
        raise ValueError(f"a reply whose content is of type {type(content).__name__}")
    return content or ""


def chat_completion(api_base, model, messages, timeout=60, retries=4, backoff=1.0):
    """One reply's text from the endpoint. Retries, with exponential back-off, connection
    errors, replies that break off, time-outs (`timeout`: seconds per request, in all), 429,
    5xx and malformed replies; after the last try, or at once on a redirect or another 4xx,
    an InputError names the endpoint and what went wrong."""
    url = check_api_base(api_base) + "/chat/completions"
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": 256}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', '')}"}
    last = None
    for attempt in range(retries):
        try:
            return reply_content(post(url, body, headers, timeout))
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                where = shown_url(urllib.parse.urljoin(url, e.headers.get("Location", "")))
                raise common.InputError(
                    f"judge endpoint {shown_url(url)}: HTTP {e.code}, a redirect to {where}; "
                    "redirects are not followed (the key would go along): give the final URL "
                    "as --judge-api-base"
                ) from None
            if e.code != 429 and e.code < 500:
                raise common.InputError(f"judge endpoint {shown_url(url)}: HTTP {e.code} {e.reason}") from None
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        except ValueError as e:
            last = str(e)
        time.sleep(backoff * 2**attempt)
    raise common.InputError(f"judge endpoint {shown_url(url)} failed after {retries} tries: {last}")
