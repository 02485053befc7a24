"""
The LLM judge, reached over plain HTTP.

Judge is a thread-pool client for any OpenAI-compatible /v1/chat/completions endpoint (OpenAI,
Gemini's OpenAI-compatible endpoint, vLLM, llama.cpp). It sends rubric.py's prompts, parses the
replies with rubric.py's parsers, retries what is worth retrying, caches good replies on disk
(never a failure), counts tokens and dollars, and returns NaN with a reason, never a made-up
score. judge_url='local' starts local_judge.py's offline heuristic stand-in (not a quality judge).

    python judge.py serve --port=8000          # the local judge on 127.0.0.1
    python judge.py score --data=data/sample/heldout.jsonl --out=out/scores.jsonl
    python judge.py score --data=IN.jsonl --out=OUT.jsonl --judge_url=https://api.openai.com/v1 \\
        --judge_model=gpt-5.4 --judge_key_env=OPENAI_API_KEY --judge_price_in=2.50 --judge_price_out=15
"""
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import urllib3

import judge_http as http
import rubric
from configurator import redact_url
from judge_http import JudgeError, JudgeFatal, stop  # noqa: F401 -- stop: for the scripts


class Judge:
    """Scores stories concurrently: submit() returns a Future, so the trainer hands stories over
    as they end and keeps generating. url ends in /v1 (a query string such as ?key=... is kept,
    and shown as ?key=*** everywhere), or 'local'. key_env names the variable holding the key,
    read at each request and sent only as a header. timeout is one deadline per request, the whole
    body included. extra: body fields passed through (part of the cache key); max_tokens is sent
    as max_completion_tokens unless extra names a cap. Prices are dollars per million tokens."""

    def __init__(self, url, model, key_env="", workers=16, timeout=300.0, retries=6, reasks=2,
                 extra=None, price_in=0.0, price_out=0.0, cache_dir=None, length_weight=25.0,
                 backoff=1.0, backoff_max=60.0, max_tokens=8192, max_reply_bytes=1_000_000):
        if key_env and not os.environ.get(key_env):
            raise ValueError(f"judge_key_env: the environment variable {key_env} is not set")
        self.key_env, self.server = key_env, None
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
        self.cache = http.Cache(cache_dir)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="judge")
        self._local = threading.local()  # one requests.Session per worker thread
        self._cancel = threading.Event()

    def close(self):
        self.pool.shutdown(wait=True)
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def cancel(self):
        """Ctrl-C, SIGTERM: queued stories are dropped; requests in flight end as 'cancelled' at
        their next read or backoff wait."""
        self._cancel.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, prompt, target_words, story):
        return self.pool.submit(self._score_one, prompt, target_words, story)

    def submit_ask(self, messages, parse):
        """Any rubric-style question (eval.py's pairwise): a Future of dict(parsed, error, usage...)."""
        return self.pool.submit(self._ask_one, messages, parse)

    def score(self, rows, progress=False):
        """[{prompt, target_words, story}, ...] -> (results in order, usage of this batch)."""
        futures = [self.submit(r["prompt"], r["target_words"], r["story"]) for r in rows]
        if progress:
            from concurrent.futures import as_completed
            from tqdm import tqdm
            for _ in tqdm(as_completed(futures), total=len(futures), desc="judging"):
                pass
        results = [f.result() for f in futures]
        return results, usage(results)

    def _score_one(self, prompt, target_words, story):
        out = blank()
        if not story or not story.strip():  # nothing to judge: the minimum reward, and no money spent asking
            out.update(rubric.reward({}, "", target_words, self.length_weight))
            out.update(sq=-100.0, reward=rubric.min_reward(self.length_weight), note="empty story")
            return out
        scores, out["error"] = self.ask(rubric.judge_messages(prompt, target_words, story), rubric.parse_scores, out)
        # no scores: SQ and reward are NaN (story_quality of nothing), words and ratio still count
        out.update(rubric.reward(scores or {}, story, target_words, self.length_weight), scores=scores)
        return out

    def _ask_one(self, messages, parse):
        out = blank()
        out["parsed"], out["error"] = self.ask(messages, parse, out)
        return out

    def ask(self, messages, parse, out):
        """Ask, parse; a reply that does not parse is shown back to the judge with the reason, at
        most self.reasks times. Returns (parsed, None) or (None, reason); adds usage to `out` and
        sets out['fatal'] when no retry can help. A reply cut at the token cap is not re-asked."""
        for attempt in range(self.reasks + 1):
            try:
                reply = self.chat(messages, keep=lambda r: r.get("finish_reason") != "length"
                                  and parse(r["content"])[0] is not None)
            except JudgeError as e:
                out["fatal"] = isinstance(e, JudgeFatal)
                return None, str(e)
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
        """One chat completion {content, reasoning, usage, finish_reason, cached}, from the disk
        cache or the server. Only a reply keep() accepts and with well-formed usage is cached (or
        taken from the cache): a failure is asked again by a later run. Raises JudgeError."""
        body = dict(self.extra, model=self.model, messages=messages)
        good = lambda r: http.is_reply(r) and http.usage_ok(r["usage"]) and keep(r)
        reply = self.cache.get(body)
        if good(reply):
            return dict(reply, cached=1)
        reply = self._post(body)
        if good(reply):
            self.cache.put(body, reply)
        return dict(reply, cached=0)


    def _post(self, body):
        """judge's POST of `body`, with retries: 429, 5xx, timeouts and any fault of the wire are retried
        with exponential backoff and jitter (or the server's Retry-After); 400-404 are not."""
        key = os.environ.get(self.key_env) if self.key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if not hasattr(self._local, "s"):
            self._local.s = requests.Session()
        for attempt in range(self.retries + 1):
            wait, deadline = None, time.monotonic() + self.timeout
            try:
                if self._cancel.is_set():
                    raise JudgeError("cancelled")
                r = self._local.s.post(self.url, json=body, headers=headers, timeout=self.timeout, stream=True)
                raw = http.read_body(r, deadline, self.max_reply_bytes, self._cancel)
            except JudgeError:
                raise
            except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
                reason = f"timeout after {self.timeout:g} s"
            except Exception as e:  # refused, reset, cut off mid-body, broken chunking, not gzip, ...
                reason = f"connection error ({type(e).__name__})"
            else:
                if raw is None:
                    raise JudgeError(f"reply of over {self.max_reply_bytes} bytes (judge_max_reply_bytes) "
                                     f"from {redact_url(self.url)}")
                if r.status_code == 200:
                    reply = http.parse_reply(raw)
                    if reply:
                        return reply
                    reason = "HTTP 200 with a body that is not a chat completion"
                elif r.status_code == 429 or r.status_code >= 500:
                    reason, wait = f"HTTP {r.status_code}", http.retry_after(r.headers.get("Retry-After"))
                    if wait is not None and wait > self.backoff_max:
                        raise JudgeError(f"HTTP {r.status_code}: Retry-After {wait:g} s is over "
                                         f"judge_backoff_max={self.backoff_max:g}")
                else:  # 400, 401, 403, 404: asking again will not help; a bad key or URL fails every request
                    text = http.redact(key, f"HTTP {r.status_code} from {self.url}: {raw[:300].decode(errors='replace')}")
                    raise (JudgeFatal if r.status_code in (401, 403, 404) else JudgeError)(text)
            if attempt == self.retries:
                break
            d = min(self.backoff_max, self.backoff * 2 ** attempt)  # jitter: workers do not retry in lockstep
            if self._cancel.wait(wait if wait is not None else random.uniform(d / 2, d)):
                raise JudgeError("cancelled")
        raise JudgeError(http.redact(key, f"{reason}; gave up after {self.retries + 1} attempts"))


def blank():
    return dict(scores=None, error=None, fatal=False, tokens_in=0, tokens_out=0, cost=0.0, cached=0, unpriced=0)


def fixed(reward):
    """The result for a story given a fixed reward instead of a judgement (train.py's ref_reward=60)."""
    return dict(blank(), sq=math.nan, words=0, ratio=1.0, length_score=1.0, reward=reward)


def usage(results):
    """Sum the judge usage of a list of results."""
    return dict(n=len(results), failures=sum(r["error"] is not None for r in results),
                **{k: sum(r.get(k, 0) for r in results) for k in ("tokens_in", "tokens_out", "cost", "cached", "unpriced")})


# The judge settings every script accepts (train.py spells out its own for the paper run):
DEFAULTS = dict(
    judge_url="local",  # base URL ending in /v1, or 'local' for the built-in heuristic judge
    judge_model="polaris-local",
    judge_key_env="",  # the NAME of the environment variable holding the API key
    judge_workers=16, judge_timeout=300.0, judge_retries=6, judge_reasks=2, judge_backoff_max=60.0,
    judge_extra={},  # passed through in the body: {'reasoning_effort': 'low', ...}
    judge_max_tokens=8192,  # reply cap, sent as max_completion_tokens (0: none; judge_extra may name its own)
    judge_max_reply_bytes=1_000_000,  # a larger reply body is a failure, never re-asked or cached
    judge_max_fail_frac=0.5,  # train.py stops when more of a step's stories than this could not be scored
    judge_price_in=0.0, judge_price_out=0.0,  # dollars per million tokens
    judge_cache="out/judge_cache",  # '' to disable
    length_weight=25.0,  # reward = SQ - length_weight * (1 - length score)
)
# the allowed values of the judge settings, checked by every script that takes them
RANGES = dict(judge_workers=">= 1", judge_timeout="> 0", judge_retries=">= 0", judge_reasks=">= 0",
              judge_backoff_max=">= 0", judge_max_tokens=">= 0", judge_max_reply_bytes=">= 1",
              judge_max_fail_frac="[0, 1]", judge_price_in=">= 0", judge_price_out=">= 0", length_weight=">= 0")


def judge_from_config(c, cache_dir=None):
    """Build a Judge from a config dict with the judge_* keys (train.py, eval.py, here)."""
    return Judge(c["judge_url"], c["judge_model"], key_env=c["judge_key_env"], workers=c["judge_workers"],
                 timeout=c["judge_timeout"], retries=c["judge_retries"], reasks=c["judge_reasks"],
                 extra=c["judge_extra"], price_in=c["judge_price_in"], price_out=c["judge_price_out"],
                 cache_dir=cache_dir, length_weight=c["length_weight"], backoff_max=c["judge_backoff_max"],
                 max_tokens=c["judge_max_tokens"], max_reply_bytes=c["judge_max_reply_bytes"])


if __name__ == "__main__":
    http.main()
