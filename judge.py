"""
The LLM judge, reached over plain HTTP.

Judge is a thread-pool client for any OpenAI-compatible /v1/chat/completions endpoint: OpenAI
(GPT-5.4, the paper's evaluation judge), Gemini's OpenAI-compatible endpoint (Gemini 3 Flash,
the paper's training judge), or a local vLLM / llama.cpp server. It sends rubric.py's prompts,
parses the replies with rubric.py's parsers, retries what is worth retrying, caches good replies
(never a failure) on disk, counts tokens and dollars, and returns NaN with a reason, never a
made-up score, for a story it could not get scored. judge_url='local' starts local_judge.py's
offline heuristic stand-in in this process (not a quality judge).

    python judge.py serve --port=8000          # the local judge on 127.0.0.1
    python judge.py score --data=data/sample/heldout.jsonl --out=out/scores.jsonl
    python judge.py score --data=IN.jsonl --out=OUT.jsonl --judge_url=https://api.openai.com/v1 \\
        --judge_model=gpt-5.4 --judge_key_env=OPENAI_API_KEY --judge_price_in=2.50 --judge_price_out=15
"""
import collections
import email.utils
import hashlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import urllib3

import rubric
from configurator import redact_url


class JudgeError(Exception):
    pass


class JudgeFatal(JudgeError):
    """A failure no retry can fix (key rejected, model or URL not found): the run must stop."""

# -----------------------------------------------------------------------------
# the client


class Judge:
    """Scores stories concurrently. submit() returns a Future, so the trainer can hand a
    group's stories over as soon as they exist and keep generating; score() is the batch form.

    url: base URL ending in /v1 (https://api.openai.com/v1,
         https://generativelanguage.googleapis.com/v1beta/openai, http://127.0.0.1:8000/v1),
         or 'local' to start the heuristic judge in this process. A query string (?key=..., as
         some providers take the key) is kept, and shown as ?key=*** in every message.
    key_env: the NAME of the environment variable holding the API key ('' for none). The key
         goes into the Authorization header and nowhere else.
    extra: body fields passed through unchanged (temperature, reasoning_effort, service_tier,
         ...); they are part of the cache key.
    max_tokens: the reply's token cap, sent as max_completion_tokens (OpenAI's name, which vLLM
         and `transformers serve` take too) unless extra names its own cap; 0 sends none. Without
         it a local server generates up to its own default maximum for every request.
    timeout: seconds for one request: connecting and the wait for the reply's headers each take
         at most this, and the whole reply must have arrived by then, so that a server trickling
         its body a byte at a time cannot hold a worker past it.
    max_reply_bytes: a reply body larger than this is a failure: never parsed, re-asked or cached.
    price_in, price_out: dollars per million prompt / completion tokens.
    """

    def __init__(self, url, model, key_env="", workers=16, timeout=300.0, retries=6, reasks=2,
                 extra=None, price_in=0.0, price_out=0.0, cache_dir=None, length_weight=25.0,
                 backoff=1.0, backoff_max=60.0, max_tokens=8192, max_reply_bytes=1_000_000):
        if key_env and not os.environ.get(key_env):
            raise ValueError(f"judge_key_env: the environment variable {key_env} is not set")
        self.key_env = key_env  # the key itself is read at each request and kept nowhere
        self.server = None
        if url == "local":
            from local_judge import serve_local
            self.server, url = serve_local(port=0)
        base, q, query = url.partition("?")
        self.url = base.rstrip("/") + "/chat/completions" + q + query
        self.model, self.extra = model, dict(extra or {})
        if max_tokens and not {"max_tokens", "max_completion_tokens"} & set(self.extra):
            self.extra["max_completion_tokens"] = max_tokens
        self.max_reply_bytes = max_reply_bytes
        self.timeout, self.retries, self.reasks = timeout, retries, reasks
        self.backoff, self.backoff_max = backoff, backoff_max
        self.price_in, self.price_out = price_in, price_out
        self.cache_dir, self.length_weight = cache_dir, length_weight
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="judge")
        self._local = threading.local()  # one requests.Session per worker thread
        self._cache_warned = False
        self._cancel = threading.Event()

    def close(self):
        self.pool.shutdown(wait=True)
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def cancel(self):
        """Ctrl-C, SIGTERM: queued stories are dropped (futures cancelled); requests in flight end as
        'cancelled' at their next read or backoff wait (one awaiting its headers cannot: see stop())."""
        self._cancel.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- public API

    def submit(self, prompt, target_words, story):
        return self.pool.submit(self._score_one, prompt, target_words, story)

    def submit_pair(self, prompt, story_a, story_b):
        return self.pool.submit(self._pair_one, prompt, story_a, story_b)

    def score(self, rows, progress=False):
        """[{prompt, target_words, story}, ...] -> (results in order, usage of this batch)."""
        futures = [self.submit(r["prompt"], r["target_words"], r["story"]) for r in rows]
        if progress:
            from tqdm import tqdm
            from concurrent.futures import as_completed
            for _ in tqdm(as_completed(futures), total=len(futures), desc="judging"):
                pass
        results = [f.result() for f in futures]
        return results, usage(results)

    # --- one story, one pair

    def _score_one(self, prompt, target_words, story):
        out = dict(scores=None, error=None, fatal=False, tokens_in=0, tokens_out=0, cost=0.0, cached=0, unpriced=0)
        if not story or not story.strip():
            # nothing to judge: the minimum reward, and no money spent on asking
            out.update(rubric.reward({}, "", target_words, self.length_weight))
            out.update(sq=-100.0, reward=rubric.min_reward(self.length_weight), note="empty story")
            return out
        scores, out["error"] = self._ask(rubric.judge_messages(prompt, target_words, story),
                                         rubric.parse_scores, out)
        # no scores: SQ and reward are NaN (story_quality of nothing), words and ratio still count
        out.update(rubric.reward(scores or {}, story, target_words, self.length_weight), scores=scores)
        return out

    def _pair_one(self, prompt, story_a, story_b):
        out = dict(verdict=None, error=None, fatal=False, tokens_in=0, tokens_out=0, cost=0.0, cached=0, unpriced=0)
        out["verdict"], out["error"] = self._ask(rubric.pairwise_messages(prompt, story_a, story_b),
                                                 rubric.parse_pairwise, out)
        return out

    def _ask(self, messages, parse, out):
        """Ask, parse; on a reply that does not parse, show the judge its reply and the reason
        and ask again, at most self.reasks times. Returns (parsed, None) or (None, reason);
        out['fatal'] is set when the failure is one no retry can fix (the trainer stops).
        A reply cut at the token cap is a failure, not re-asked: the same cap would cut it again."""
        for attempt in range(self.reasks + 1):
            try:
                reply = self.chat(messages, keep=lambda r: r.get("finish_reason") != "length" and parse(r["content"])[0] is not None)
            except JudgeError as e:
                out["fatal"] = isinstance(e, JudgeFatal)
                return None, str(e)
            content, (t_in, t_out) = reply["content"], (_count(reply["usage"], k) for k in _TOKENS)
            out["tokens_in"] += t_in or 0
            out["tokens_out"] += t_out or 0
            out["cached"] += reply["cached"]
            if not reply["cached"]:
                out["unpriced"] += t_in is None or t_out is None  # cost unknown, counted and said so
                out["cost"] += ((t_in or 0) * self.price_in + (t_out or 0) * self.price_out) / 1e6
            if reply.get("finish_reason") == "length":
                return None, "reply cut at judge_max_tokens (finish_reason length)"
            parsed, error = parse(content)
            if parsed is not None:
                return parsed, None
            messages = messages + [
                dict(role="assistant", content=content),
                dict(role="user", content=f"Your reply could not be read ({error}). Reply again "
                     "with the analysis and then exactly one line per item in the format asked."),
            ]
        return None, f"unparseable after {self.reasks + 1} replies: {error}"

    # --- HTTP with retries, behind a disk cache

    def chat(self, messages, keep=lambda r: r["content"].strip()):
        """One chat completion: {content, reasoning, usage, finish_reason, cached: 1 if from the
        disk cache else 0}. Raises JudgeError. Also generates from API models (eval.py). Only a
        reply that keep() accepts (by default: any content) and whose usage is well formed is
        cached, or taken from the cache: a failure is asked again by a later run."""
        body = dict(self.extra, model=self.model, messages=messages)
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        path = os.path.join(self.cache_dir, key[:2], key + ".json") if self.cache_dir else None
        good = lambda r: _is_reply(r) and _usage_ok(r["usage"]) and keep(r)
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    reply = json.load(f)
                if good(reply):
                    return dict(reply, cached=1)
            except (OSError, ValueError):
                pass  # an unreadable or wrongly shaped entry is asked again and overwritten
        reply = self._post(body)
        if path and good(reply):
            # write to a temporary file in the same folder, then rename: a crash leaves either
            # no entry or a whole one, and concurrent writers of one key cannot interleave
            tmp = None
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(reply, f)
                os.replace(tmp, path)
            except OSError as e:  # a full disk costs the cache, not the run
                if tmp and os.path.exists(tmp):
                    os.remove(tmp)
                if not self._cache_warned:
                    self._cache_warned = True
                    print(f"warning: the judge cache cannot be written ({e.strerror}): {path}", file=sys.stderr)
        return dict(reply, cached=0)

    def _session(self):
        if not hasattr(self._local, "s"):
            self._local.s = requests.Session()
        return self._local.s

    def _read(self, r, deadline):
        """The response body, read with a cap (a 60 MB reply must not reach memory whole, the
        judge's re-ask, or the cache) and by the request's deadline. read1 returns what one
        socket read brings, and the socket waits no longer than the time left, so a trickle
        ends on time; a cut body or bad encoding raises here and is retried by the caller."""
        body, sock = b"", getattr(getattr(r.raw, "_connection", None), "sock", None)
        while len(body) <= self.max_reply_bytes:
            if self._cancel.is_set():
                raise JudgeError("cancelled")
            if time.monotonic() >= deadline:
                raise TimeoutError
            if sock:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
            piece = r.raw.read1(min(65536, self.max_reply_bytes + 1 - len(body)), decode_content=True)
            if not piece:
                break
            body += piece
        if len(body) > self.max_reply_bytes:
            r.close()
            raise JudgeError(f"reply of over {self.max_reply_bytes} bytes (judge_max_reply_bytes) from {redact_url(self.url)}")
        return body

    def _post(self, body):
        key = os.environ.get(self.key_env) if self.key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for attempt in range(self.retries + 1):
            wait, deadline = None, time.monotonic() + self.timeout
            try:
                if self._cancel.is_set():
                    raise JudgeError("cancelled")
                r = self._session().post(self.url, json=body, headers=headers, timeout=self.timeout, stream=True)
                raw = self._read(r, deadline)
            except JudgeError:
                raise
            except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
                reason = f"timeout after {self.timeout:g} s"
            except Exception as e:  # refused, reset, cut off mid-body, broken chunking, not gzip, ...
                reason = f"connection error ({type(e).__name__})"
            else:
                if r.status_code == 200:
                    try:
                        data = json.loads(raw)
                        message = data["choices"][0]["message"]
                        # servers that apply a thinking template split the thinking out of
                        # the answer: vLLM and transformers serve as reasoning_content, others as reasoning
                        reply = dict(content=message.get("content") or "",
                                     reasoning=message.get("reasoning_content") or message.get("reasoning") or "",
                                     usage=data.get("usage") or {}, finish_reason=data["choices"][0].get("finish_reason"))
                        if _is_reply(reply):
                            return reply
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
                        pass  # RecursionError: JSON nested too deep
                    reason = "HTTP 200 with a body that is not a chat completion"
                elif r.status_code == 429 or r.status_code >= 500:
                    reason = f"HTTP {r.status_code}"
                    wait = _retry_after(r.headers.get("Retry-After"))
                    if wait is not None and wait > self.backoff_max:
                        raise JudgeError(_redact(key, f"HTTP {r.status_code}: Retry-After {wait:g} s "
                                                      f"is over judge_backoff_max={self.backoff_max:g}"))
                else:  # 400, 401, 403, 404: asking again will not help
                    text = _redact(key, f"HTTP {r.status_code} from {self.url}: {raw[:300].decode(errors='replace')}")
                    # a rejected key or an unknown model or URL fails every request alike
                    raise (JudgeFatal if r.status_code in (401, 403, 404) else JudgeError)(text)
            if attempt == self.retries:
                break
            # exponential backoff with jitter (so many workers do not retry in lockstep),
            # unless the server said how long to wait
            d = min(self.backoff_max, self.backoff * 2 ** attempt)
            if self._cancel.wait(wait if wait is not None else random.uniform(d / 2, d)):
                raise JudgeError("cancelled")
        raise JudgeError(f"{reason}; gave up after {self.retries + 1} attempts")



def _is_reply(x):
    """The shape chat() returns and caches; anything else is asked again."""
    return isinstance(x, dict) and isinstance(x.get("content"), str) and isinstance(x.get("reasoning", ""), str)


_TOKENS = ("prompt_tokens", "completion_tokens")


def _count(usage, k):
    """A token count, or None where absent or not a finite number >= 0 (servers have sent strings, NaN, -1)."""
    v = usage.get(k) if isinstance(usage, dict) else None
    return v if type(v) in (int, float) and math.isfinite(v) and v >= 0 else None


def _usage_ok(usage):
    return isinstance(usage, dict) and all(usage.get(k) is None or _count(usage, k) is not None for k in _TOKENS)


def _redact(key, text):
    """An error body may echo the request; make sure it cannot carry the key into a log."""
    return redact_url(text.replace(key, "<key>") if key else text)


def _retry_after(value):
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


def usage(results):
    """Sum the judge usage of a list of results."""
    return dict(n=len(results), failures=sum(r["error"] is not None for r in results),
                tokens_in=sum(r["tokens_in"] for r in results),
                tokens_out=sum(r["tokens_out"] for r in results),
                cost=sum(r["cost"] for r in results), cached=sum(r["cached"] for r in results),
                unpriced=sum(r.get("unpriced", 0) for r in results))

# -----------------------------------------------------------------------------
# command line


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


def stop(judge, message):
    """Ctrl-C or SIGTERM in a script: cancel the judge's queued work and end the process now,
    with one line and no traceback. os._exit, because a normal exit waits for every request in
    flight, and one waiting on a silent server would hold the process for up to judge_timeout."""
    if judge:
        judge.cancel()
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(130)


def judge_from_config(c, cache_dir=None):
    """Build a Judge from a config dict with the judge_* keys (train.py, eval.py, here)."""
    return Judge(c["judge_url"], c["judge_model"], key_env=c["judge_key_env"], workers=c["judge_workers"],
                 timeout=c["judge_timeout"], retries=c["judge_retries"], reasks=c["judge_reasks"],
                 extra=c["judge_extra"], price_in=c["judge_price_in"], price_out=c["judge_price_out"],
                 cache_dir=cache_dir, length_weight=c["length_weight"], backoff_max=c["judge_backoff_max"],
                 max_tokens=c["judge_max_tokens"], max_reply_bytes=c["judge_max_reply_bytes"])


if __name__ == "__main__":
    from configurator import check_ranges, configure
    if len(sys.argv) < 2 or sys.argv[1] not in ("serve", "score"):
        sys.exit(__doc__)
    command = sys.argv[1]
    c = dict(
        port=8000,  # serve: port on 127.0.0.1
        latency=0.0,  # serve: seconds added to each reply, standing in for a remote API
        data="data/sample/heldout.jsonl",  # score: JSONL rows {id, prompt, target_words, story}
        out="out/scores.jsonl",  # score: rows with scores, SQ, length ratio, reward, error
        **DEFAULTS,
    )
    configure(c, sys.argv[2:])
    check_ranges(c, RANGES)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the run like Ctrl-C
    if command == "serve":
        from local_judge import serve_local
        server, url = serve_local(c["port"], latency=c["latency"])
        print(f"polaris local judge at {url}/chat/completions (a heuristic stand-in, not a quality judge)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            server.shutdown()
        sys.exit(0)
    try:
        rows = rubric.load_rows(c["data"], max_words=None, allow_empty=True, special_tokens=())  # generations
        judge = judge_from_config(c, cache_dir=c["judge_cache"] or None)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:
        results, used = judge.score(rows, progress=True)
    except KeyboardInterrupt:
        stop(judge, f"interrupted: queued judge requests cancelled, {c['out']} not written")
    judge.close()
    os.makedirs(os.path.dirname(os.path.abspath(c["out"])), exist_ok=True)
    tmp = c["out"] + ".tmp"
    with open(tmp, "w") as f:
        for row, res in zip(rows, results):
            f.write(json.dumps(dict(row, **res)) + "\n")
    os.replace(tmp, c["out"])  # never a half-written output file
    sqs = [r["sq"] for r in results if not math.isnan(r["sq"])]
    print(f"{used['n']} stories | mean SQ {f'{sum(sqs) / len(sqs):.1f}' if sqs else 'n/a'} | failures {used['failures']} | "
          f"tokens {used['tokens_in']} in, {used['tokens_out']} out | cost ${used['cost']:.4f} | "
          f"cache hits {used['cached']} | wrote {c['out']}"
          + (f"\n{used['unpriced']} replies came without usable token counts: their cost is unknown" if used["unpriced"] else ""))
    if not sqs:  # a judge that scored nothing is an error, whatever the reasons
        reasons = collections.Counter(r["error"] for r in results if r["error"])
        sys.exit("error: no story was scored: " + "; ".join(f"{n} x {e}" for e, n in reasons.most_common(5)))
