"""
The judge's wire and cache, kept out of judge.py so that it shows the request, the parse and the
retry: the POST under one deadline and a byte cap (redirects, gzip, proxies), the checks a reply
must pass, the disk cache (never a failure in it), identical requests sent once, keys kept out of
messages.
"""
import concurrent.futures
import email.utils
import functools
import hashlib
import http.client
import io
import json
import math
import os
import ssl
import sys
import threading
import time
import urllib.parse
import urllib.request
import zlib

import jsonl
from configurator import redact_url

TOKENS = ("prompt_tokens", "completion_tokens")


class JudgeError(Exception):
    pass


class JudgeFatal(JudgeError):
    """A failure no retry can fix (key rejected, model or URL not found): the run must stop."""


class ProtocolError(Exception):
    """A reply that breaks HTTP: cut short, bad chunking, a bad status line, not the gzip it says."""


class TooManyRedirects(Exception):
    pass


def post(url, data, headers, deadline, max_bytes, cancel, hops=5):
    """POST data (JSON bytes) -> (status, headers, body, the URL that answered); body is None when
    over max_bytes. One deadline covers everything: connecting, sending, the status line, the
    headers, the body, and any 307/308 followed (the method and body kept; the Authorization header
    only to the same host). 301-303 come back to the caller: a POST re-sent as a GET would fail."""
    for _ in range(hops + 1):
        status, head, body = _exchange(url, data, headers, deadline, max_bytes, cancel)
        if status not in (307, 308) or not head.get("Location"):
            return status, head, body, url
        to = urllib.parse.urljoin(url, head["Location"])
        if urllib.parse.urlsplit(to)[:2] != urllib.parse.urlsplit(url)[:2]:  # another scheme or host: no key
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = to
    raise TooManyRedirects(f"more than {hops} redirects")


def _exchange(url, data, headers, deadline, max_bytes, cancel):
    """One request on a new connection, closed after it (a judge's reply takes seconds; setting up
    a connection does not matter). http.client bounds each socket read by the socket's timeout,
    not the whole reply, so every read here waits only for the time left (_Reader)."""
    if not is_url(url):  # a redirect's Location may name anything
        raise ProtocolError(f"not an http(s) URL: {redact_url(url)}")
    u = urllib.parse.urlsplit(url)
    host, target = u.netloc.rpartition("@")[2], urllib.parse.urlunsplit(("", "", u.path or "/", u.query, ""))
    proxy = _proxy(u)
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(proxy or host, timeout=_left(deadline), context=_tls())
        if proxy:
            conn.set_tunnel(host)  # CONNECT: the proxy sees neither the request nor the key
    else:
        conn = http.client.HTTPConnection(proxy or host, timeout=_left(deadline))
        target = url if proxy else target  # a plain HTTP proxy takes the whole URL
    try:
        conn.connect()
        conn.sock.settimeout(_left(deadline))  # sendall: the whole request within the time left
        conn.request("POST", target, body=data, headers=dict(headers, **{"Content-Type": "application/json",
                     "Accept-Encoding": "gzip", "Connection": "close", "User-Agent": "polaris"}))
        r = http.client.HTTPResponse(_Reader(conn.sock, deadline, cancel), method="POST")
        r.begin()
        return r.status, r.headers, _read_body(r, max_bytes)
    except OSError:  # refused, reset, timed out, a certificate refused: each named by its own type
        raise
    except (http.client.HTTPException, ValueError, zlib.error) as e:  # ValueError: a bad chunk size
        raise ProtocolError(f"{type(e).__name__}: {e}") from e
    finally:
        conn.close()


def _proxy(u):
    """host:port of the proxy that the environment names for this URL (HTTPS_PROXY, HTTP_PROXY,
    NO_PROXY), as requests would use it, or None."""
    proxy = urllib.request.getproxies().get(u.scheme)
    if not proxy or urllib.request.proxy_bypass(u.hostname):
        return None
    return urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy).netloc.rpartition("@")[2]


def _left(deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


class _Reader(io.RawIOBase):
    """A socket's reads, each waiting no longer than the time left before the deadline, so that
    a server sending the status line, the headers or the body a byte at a time ends on time; a
    wait is cut into seconds so that Ctrl-C (cancel) ends a silent request within one.
    makefile: what http.client asks a socket for."""

    def __init__(self, sock, deadline, cancel):
        self.sock, self.deadline, self.cancel = sock, deadline, cancel

    def makefile(self, mode):
        return io.BufferedReader(self)

    def readable(self):
        return True

    def readinto(self, b):
        while True:
            if self.cancel.is_set():
                raise JudgeError("cancelled")
            self.sock.settimeout(min(1.0, _left(self.deadline)))
            try:
                return self.sock.recv_into(b)
            except TimeoutError:
                pass  # nothing yet: look at the deadline and for a cancel again


def _read_body(r, max_bytes):
    """The body, gzip decoded, or None once over max_bytes (a 60 MB reply, or a gzip bomb, must
    not reach memory whole, the re-ask, or the cache)."""
    gz = zlib.decompressobj(wbits=31) if r.getheader("Content-Encoding", "").lower() == "gzip" else None
    body = b""
    while len(body) <= max_bytes:
        piece = r.read1(65536)
        if not piece:
            if r.length or (gz and not gz.eof):  # http.client's read1 ends a body cut short without a word
                raise ProtocolError("body cut short")
            return body
        body += gz.decompress(piece, max_bytes + 1 - len(body)) if gz else piece
    return None


@functools.cache
def _tls():
    """Certificates as requests checks them: the system's, and certifi's bundle where installed."""
    context = ssl.create_default_context()
    try:
        import certifi
        context.load_verify_locations(certifi.where())
    except ImportError:
        pass
    return context


def moved(status, url, location, setting):
    """The error for a 301, 302 or 303 from the judge: what to set the URL to."""
    if not location:
        return redact_url(f"HTTP {status} without a Location from {url}")
    to = urllib.parse.urljoin(url, location)
    path, q, query = to.partition("?")
    if not path.endswith("/chat/completions"):
        return redact_url(f"HTTP {status} to {to}: set {setting} to it")
    return redact_url(f"HTTP {status} to {to}: set {setting}={path.removesuffix('/chat/completions')}{q}{query}")


def is_url(url):
    """An http:// or https:// URL with a host, no space (a pasted newline) and, if any, a valid port."""
    try:
        u = urllib.parse.urlsplit(url)
        return u.scheme in ("http", "https") and bool(u.hostname) and (u.port or 0) >= 0 \
            and not any(c.isspace() for c in url)
    except ValueError:  # .port: not a number in 0-65535
        return False


def parse_reply(raw):
    """A chat completion's body -> {content, reasoning, usage, finish_reason}, or None. Servers
    that apply a thinking template split the thinking out: vLLM and transformers serve as
    reasoning_content, others as reasoning."""
    try:
        data = json.loads(raw)
        message = data["choices"][0]["message"]
        reply = dict(content=message.get("content") or "",
                     reasoning=message.get("reasoning_content") or message.get("reasoning") or "",
                     usage=data.get("usage") or {}, finish_reason=data["choices"][0].get("finish_reason"))
        return reply if is_reply(reply) else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return None  # RecursionError: JSON nested too deep


def is_reply(x):
    """The shape chat() returns and caches; anything else is asked again."""
    return isinstance(x, dict) and isinstance(x.get("content"), str) and isinstance(x.get("reasoning", ""), str)


def count(usage, k):
    """A token count, or None where absent or not a finite number >= 0 (servers have sent strings, NaN, -1)."""
    v = usage.get(k) if isinstance(usage, dict) else None
    return v if type(v) in (int, float) and math.isfinite(v) and v >= 0 else None


def usage_ok(usage):
    return isinstance(usage, dict) and all(usage.get(k) is None or count(usage, k) is not None for k in TOKENS)


def redact(key, text):
    """An error body may echo the request: neither the key nor a URL's query string reaches a log."""
    return redact_url(text.replace(key, "<key>") if key else text)


def retry_after(value):
    """Retry-After is either seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class Cache:
    """Replies on disk, by the hash of the judge's URL and the request body (the model is in the
    body): another judge given the same model name and folder is never answered from this one's
    replies. Written to a temporary file and renamed, so a crash leaves no entry or a whole one;
    a write that fails (a full disk) is a warning. An entry keyed the older way is a miss."""

    def __init__(self, folder, url):
        self.folder, self.url, self.warned = folder, url, False

    def key(self, body):
        return hashlib.sha256(json.dumps(dict(url=self.url, body=body), sort_keys=True).encode()).hexdigest()

    def _path(self, key):
        return os.path.join(self.folder, key[:2], key + ".json") if self.folder else None

    def get(self, key):
        try:
            with open(self._path(key)) as f:
                return json.load(f)
        except (TypeError, OSError, ValueError):
            return None  # no cache, no entry, or an unreadable one: asked again and overwritten

    def put(self, key, reply):
        path = self._path(key)
        try:
            if path:
                jsonl.write_json(path, reply)
        except OSError as e:
            if not self.warned:
                self.warned = True
                print(f"warning: the judge cache cannot be written ({e.strerror}): {path}", file=sys.stderr)


class Once:
    """Identical requests in flight at once are sent once (a group's two identical samples, one
    story submitted twice): the first caller asks, the others wait for its answer (or its error)."""

    def __init__(self):
        self.lock, self.asking = threading.Lock(), {}

    def run(self, key, ask):
        """-> (ask()'s result, shared): shared is True for a caller given another's answer."""
        with self.lock:
            future = self.asking.get(key)
            mine = future is None
            if mine:
                future = self.asking[key] = concurrent.futures.Future()
        if not mine:
            return future.result(), True
        try:
            future.set_result(ask())
        except BaseException as e:
            future.set_exception(e)
        finally:
            with self.lock:
                del self.asking[key]
        return future.result(), False
