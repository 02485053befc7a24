"""
The LLM judge over plain HTTP: a thread-pool client for any OpenAI-compatible endpoint (OpenAI,
Gemini, vLLM, llama.cpp). It sends rubric.py's prompt, parses the reply, retries what is worth
retrying, caches good replies (never a failure), counts dollars, and returns NaN with a reason,
never a made-up score. judge_url='local' starts local_judge.py's heuristic stand-in.

    python judge.py serve --port=8000          # the local judge on 127.0.0.1, then in another shell:
    python judge.py score --data=data/sample/heldout.jsonl --out=out/scores.jsonl --judge_url=http://127.0.0.1:8000/v1
"""
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import judge_http as http
import rubric
from configurator import redact_url
from judge_http import DEFAULTS, RANGES, JudgeError, JudgeFatal, judged, stop  # noqa: F401 -- for the scripts


class Judge:
    """Scores stories concurrently: submit() returns a Future. url is the base (…/v1; a ?key=... kept,
    shown as ?key=***), or 'local'; url_setting names it in errors; key_env names the variable
    holding the key, sent only as a header; timeout is one deadline per request (connecting, the
    headers and the body); extra: body fields passed through."""

    def __init__(self, url, model, key_env="", workers=16, timeout=300.0, retries=6, reasks=2,
                 extra=None, price_in=0.0, price_out=0.0, cache_dir=None, length_weight=25.0,
                 backoff=1.0, backoff_max=60.0, max_tokens=8192, max_reply_bytes=1_000_000,
                 url_setting="judge_url"):
        if url != "local" and not http.is_url(url):  # refused now, not after a minute of retries
            raise ValueError(f"{url_setting}={redact_url(url)!r} is not an http(s) URL "
                             "such as https://api.openai.com/v1")
        if key_env and not os.environ.get(key_env):
            raise ValueError(f"judge_key_env: the environment variable {key_env} is not set")
        self.key_env, self.url_setting, self.server = key_env, url_setting, None
        # replies are cached by the URL as configured: 'local' stays 'local', whatever port it gets
        self.cache, self.once = http.Cache(cache_dir, url=redact_url(url)), http.Once()
        if url == "local":
            from local_judge import serve_local
            self.server, url = serve_local(port=0)
        base, q, query = url.partition("?")
        self.url = base.rstrip("/") + "/chat/completions" + q + query
        self.model, self.extra = model, dict(extra or {})
        if max_tokens and not {"max_tokens", "max_completion_tokens"} & set(self.extra):
            self.extra["max_completion_tokens"] = max_tokens
        self.max_reply_bytes, self.timeout, self.retries, self.reasks = max_reply_bytes, timeout, retries, reasks
        self.backoff, self.backoff_max = backoff, backoff_max
        self.price_in, self.price_out, self.length_weight = price_in, price_out, length_weight
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="judge")
        self._cancel = threading.Event()

    def close(self):
        self.pool.shutdown(wait=True)
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def cancel(self):
        """Ctrl-C, SIGTERM: drop queued stories; requests in flight end within a second, as do waits."""
        self._cancel.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, prompt, target_words, story):
        return self.pool.submit(self._score_one, prompt, target_words, story)

    def _score_one(self, prompt, target_words, story):
        out = blank()
        if rubric.is_blank(story):  # nothing to judge: the minimum reward, and no money spent asking
            out.update(rubric.reward({}, "", target_words, self.length_weight))
            out.update(sq=-100.0, reward=rubric.min_reward(self.length_weight), note="empty story")
            return out
        scores, out["error"] = self.ask(rubric.judge_messages(prompt, target_words, story), rubric.parse_scores, out)
        # no scores: SQ and reward are NaN (story_quality of nothing), words and ratio still count
        out.update(rubric.reward(scores or {}, story, target_words, self.length_weight), scores=scores)
        return out

    def ask(self, messages, parse, out):
        """Ask and parse -> (parsed, None) or (None, reason); usage added to `out`. A reply that does
        not parse is shown back to the judge with the reason, at most reasks times (one cut at the
        token cap is not: the cap would cut it again)."""
        for attempt in range(self.reasks + 1):
            try:
                reply = self.chat(messages, keep=lambda r: r.get("finish_reason") != "length"
                                  and parse(r["content"])[0] is not None)
            except JudgeError as e:
                out["fatal"] = isinstance(e, JudgeFatal)
                return None, str(e)
            out["reply"] = reply["content"]  # the judge's analysis and scores, kept for a person to read
            t_in, t_out = (http.count(reply["usage"], k) for k in http.TOKENS)
            out["tokens_in"] += t_in or 0
            out["tokens_out"] += t_out or 0
            out["cached"] += reply["cached"]
            if not reply["cached"]:
                out["unpriced"] += t_in is None or t_out is None  # cost unknown, counted and said so
                out["cost"] += ((t_in or 0) * self.price_in + (t_out or 0) * self.price_out) / 1e6
            if reply.get("finish_reason") == "length":
                return None, "reply cut at judge_max_tokens (finish_reason length)"
            parsed, error = parse(reply["content"])
            if parsed is not None:
                return parsed, None
            messages = messages + [
                dict(role="assistant", content=reply["content"]),
                dict(role="user", content=f"Your reply could not be read ({error}). Reply again "
                     "with the analysis and then exactly one line per item in the format asked."),
            ]
        return None, f"unparseable after {self.reasks + 1} replies: {error}"

    def chat(self, messages, keep=lambda r: r["content"].strip()):
        """One chat completion {content, reasoning, usage, finish_reason, cached}, from the cache or
        the server; only a reply keep() accepts is cached or taken from it: a failure is asked again.
        The same request already in flight is not sent again: its answer is shared, as cached=1
        (it cost nothing more)."""
        body = dict(self.extra, model=self.model, messages=messages)
        key = self.cache.key(body)
        good = lambda r: http.is_reply(r) and http.usage_ok(r["usage"]) and keep(r)

        def ask():
            reply = self.cache.get(key)
            if good(reply):
                return dict(reply, cached=1)
            reply = self._post(body)
            if good(reply):
                self.cache.put(key, reply)
            return dict(reply, cached=0)
        reply, shared = self.once.run(key, ask)
        return dict(reply, cached=1) if shared else reply

    def _post(self, body):
        """POST with retries: 429, 5xx, timeouts and any fault of the wire, with exponential backoff and
        jitter (or the server's Retry-After); 301-303 and 400-404 are not retried."""
        key = os.environ.get(self.key_env) if self.key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            wait = None
            try:
                if self._cancel.is_set():
                    raise JudgeError("cancelled")
                status, head, raw, url = http.post(self.url, data, headers, cancel=self._cancel,
                                                   deadline=time.monotonic() + self.timeout,
                                                   max_bytes=self.max_reply_bytes)
            except JudgeError:
                raise
            except TimeoutError:
                reason = f"timeout after {self.timeout:g} s"
            except Exception as e:  # refused, reset, cut off mid-body, broken chunking, not gzip, ...
                reason = f"connection error ({type(e).__name__})"
            else:
                if raw is None:
                    raise JudgeError(f"reply of over {self.max_reply_bytes} bytes (judge_max_reply_bytes) "
                                     f"from {redact_url(url)}")
                if status == 200:
                    reply = http.parse_reply(raw)
                    if reply:
                        return reply
                    reason = "HTTP 200 with a body that is not a chat completion"
                elif status == 429 or status >= 500:
                    reason, wait = f"HTTP {status}", http.retry_after(head.get("Retry-After"))
                    if wait is not None and wait > self.backoff_max:
                        raise JudgeError(f"HTTP {status}: Retry-After {wait:g} s is over "
                                         f"judge_backoff_max={self.backoff_max:g}")
                elif status in (301, 302, 303):  # re-sent as a GET (RFC 9110 allows it) it would fail
                    moved = http.moved(status, url, head.get("Location"), self.url_setting)
                    raise JudgeFatal(http.redact(key, moved))
                else:  # 400, 401, 403, 404: asking again will not help; a bad key or URL fails every request
                    text = http.redact(key, f"HTTP {status} from {url}: {raw[:300].decode(errors='replace')}")
                    raise (JudgeFatal if status in (401, 403, 404) else JudgeError)(text)
            if attempt == self.retries:
                break
            d = min(self.backoff_max, self.backoff * 2 ** attempt)  # jitter: workers do not retry in lockstep
            if self._cancel.wait(wait if wait is not None else random.uniform(d / 2, d)):
                raise JudgeError("cancelled")
        raise JudgeError(http.redact(key, f"{reason}; gave up after {self.retries + 1} attempts"))


def blank():
    return dict(scores=None, error=None, fatal=False, reply=None, tokens_in=0, tokens_out=0, cost=0.0, cached=0, unpriced=0)


def judge_from_config(c, cache_dir=None):
    """Build a Judge from a config dict with the judge_* keys (train.py, eval.py, here)."""
    return Judge(c["judge_url"], c["judge_model"], key_env=c["judge_key_env"], workers=c["judge_workers"],
                 timeout=c["judge_timeout"], retries=c["judge_retries"], reasks=c["judge_reasks"],
                 extra=c["judge_extra"], price_in=c["judge_price_in"], price_out=c["judge_price_out"],
                 cache_dir=cache_dir, length_weight=c["length_weight"], backoff_max=c["judge_backoff_max"],
                 max_tokens=c["judge_max_tokens"], max_reply_bytes=c["judge_max_reply_bytes"])


if __name__ == "__main__":
    http.main()
