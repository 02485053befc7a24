"""
The LLM judge over plain HTTP: a thread-pool client for any OpenAI-compatible endpoint (OpenAI,
Gemini, vLLM, llama.cpp). It sends rubric.py's prompt, parses the reply, retries what is worth
retrying, caches good replies (never a failure), counts dollars, and returns NaN with a reason,
never a made-up score; judge_url='local' is local_judge.py's heuristic stand-in. What a failure
does to a training step is at the end. The wire (one deadline a request, redirects, the byte cap)
and the disk cache are judge_http.py's.

    python judge.py serve --port=8000   # the local judge on 127.0.0.1; then, in another shell:
    python judge.py score --data=data/sample/heldout.jsonl --out=out/scores.jsonl --judge_url=http://127.0.0.1:8000/v1

Every setting, with its default: `python judge.py --help`.
"""
import collections
import concurrent.futures
import json
import os
import random
import subprocess
import sys
import threading
import time

import judge_http as http
import rubric
from configurator import redact_url
from judge_http import JudgeError, JudgeFatal

LOCAL_JUDGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "local_judge.py")

# the settings a Judge is made from (from_config), as every script names them, and the allowed
# values every script checks
SETTINGS = ("judge_url", "judge_model", "judge_key_env", "judge_workers", "judge_timeout",
            "judge_retries", "judge_reasks", "judge_backoff_max", "judge_extra", "judge_max_tokens",
            "judge_max_reply_bytes", "judge_price_in", "judge_price_out")
RANGES = dict(judge_workers=">= 1", judge_timeout="> 0", judge_retries=">= 0", judge_reasks=">= 0",
              judge_backoff_max=">= 0", judge_max_tokens=">= 0", judge_max_reply_bytes=">= 1",
              judge_max_fail_frac="[0, 1]", judge_price_in=">= 0", judge_price_out=">= 0",
              length_weight=">= 0")


class Judge:
    """Scores stories concurrently: submit() returns a Future. url is the base (…/v1; a ?key=...
    kept, shown as ?key=***), or 'local'; url_setting names it in errors; key_env names the
    variable holding the key, sent only as a header; timeout is one deadline per request
    (connecting, the headers and the body); extra: body fields passed through."""

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
        # replies are cached by the URL as configured: 'local' stays 'local', whatever its port
        self.cache, self.once = http.Cache(cache_dir, url=redact_url(url)), http.Once()
        if url == "local":  # the heuristic stand-in: a server process of its own, over HTTP
            url = self._start_local()
        base, q, query = url.partition("?")
        self.url = base.rstrip("/") + "/chat/completions" + q + query
        self.model, self.extra = model, dict(extra or {})
        if max_tokens and not {"max_tokens", "max_completion_tokens"} & set(self.extra):
            self.extra["max_completion_tokens"] = max_tokens
        self.max_reply_bytes, self.timeout = max_reply_bytes, timeout
        self.retries, self.reasks = retries, reasks
        self.backoff, self.backoff_max = backoff, backoff_max
        self.price_in, self.price_out, self.length_weight = price_in, price_out, length_weight
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="judge")
        self._cancel = threading.Event()

    def _start_local(self):
        """`python local_judge.py` on a free port, ending when this process ends; its base URL."""
        cmd = [sys.executable, LOCAL_JUDGE, "--port=0", f"--parent={os.getpid()}"]
        self.server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = next((line for line in self.server.stdout if " at http" in line), "")
        if not line:
            raise OSError("the local judge (local_judge.py) did not start: its error is above")
        return line.split(" at ")[1].split("/chat/completions")[0]

    def close(self):
        self.pool.shutdown(wait=True)
        if self.server:
            self.server.terminate()
            self.server.wait()

    def cancel(self):
        """Ctrl-C, SIGTERM: drop queued stories; requests in flight end within a second."""
        self._cancel.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, prompt, target_words, story):
        return self.pool.submit(self._score_one, prompt, target_words, story)

    def _score_one(self, prompt, target_words, story):
        out = blank()
        if rubric.is_blank(story):  # nothing to judge: the minimum reward, and no money spent
            out.update(rubric.reward({}, "", target_words, self.length_weight))
            out.update(sq=-100.0, reward=rubric.min_reward(self.length_weight), note="empty story")
            return out
        messages = rubric.judge_messages(prompt, target_words, story)
        scores, out["error"] = self.ask(messages, rubric.parse_scores, out)
        # no scores: SQ and reward are NaN (story_quality of nothing), words and ratio still count
        out.update(rubric.reward(scores or {}, story, target_words, self.length_weight))
        out["scores"] = scores
        return out

    def ask(self, messages, parse, out):
        """Ask and parse -> (parsed, None) or (None, reason); usage added to `out`. A reply that
        does not parse is shown back to the judge with the reason, at most reasks times (one cut at
        the token cap is not: the cap would cut it again)."""
        for attempt in range(self.reasks + 1):
            try:
                reply = self.chat(messages, keep=lambda r: r.get("finish_reason") != "length"
                                  and parse(r["content"])[0] is not None)
            except JudgeError as e:
                out["fatal"] = isinstance(e, JudgeFatal)
                return None, str(e)
            out["reply"] = reply["content"]  # the judge's analysis and scores, for a person
            t_in, t_out = (http.count(reply["usage"], k) for k in http.TOKENS)
            out["tokens_in"] += t_in or 0
            out["tokens_out"] += t_out or 0
            out["cached"] += reply["cached"]
            if not reply["cached"]:
                out["unpriced"] += t_in is None or t_out is None  # cost unknown, and said so
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
        """One chat completion {content, reasoning, usage, finish_reason, cached}, from the cache
        or the server; only a reply keep() accepts is cached or taken from it: a failure is asked
        again. The same request already in flight is not sent again: its answer is shared, as
        cached=1 (it cost nothing more)."""
        body = dict(self.extra, model=self.model, messages=messages)
        key = self.cache.key(body)
        good = lambda r: http.is_reply(r) and http.usage_ok(r["usage"]) and keep(r)  # noqa: E731

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
        """POST with retries: 429, 5xx, timeouts and any fault of the wire, with exponential
        backoff and jitter (or the server's Retry-After); 301-303 and 400-404 are not retried."""
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
            except Exception as e:  # refused, reset, cut off mid-body, broken chunking, not gzip...
                reason = f"connection error ({type(e).__name__})"
            else:
                if raw is None:
                    raise JudgeError(f"reply of over {self.max_reply_bytes} bytes "
                                     f"(judge_max_reply_bytes) from {redact_url(url)}")
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
                elif status in (301, 302, 303):  # re-sent as a GET (RFC 9110 allows it) it fails
                    moved = http.moved(status, url, head.get("Location"), self.url_setting)
                    raise JudgeFatal(http.redact(key, moved))
                else:  # 400, 401, 404, ...: asking again will not help; 401/403/404 fail them all
                    text = f"HTTP {status} from {url}: {raw[:300].decode(errors='replace')}"
                    fatal = status in (401, 403, 404)
                    raise (JudgeFatal if fatal else JudgeError)(http.redact(key, text))
            if attempt == self.retries:
                break
            d = min(self.backoff_max, self.backoff * 2 ** attempt)  # jitter: no retries in lockstep
            if self._cancel.wait(wait if wait is not None else random.uniform(d / 2, d)):
                raise JudgeError("cancelled")
        raise JudgeError(http.redact(key, f"{reason}; gave up after {self.retries + 1} attempts"))


USAGE = ("tokens_in", "tokens_out", "cost", "cached", "unpriced")  # what a judgement costs


def blank():
    return dict(dict.fromkeys(USAGE, 0), cost=0.0, scores=None, error=None, fatal=False, reply=None)


def from_config(c, cache_dir=None, url_setting="judge_url"):
    """A Judge from a dict with the SETTINGS and length_weight (train.py's, eval.py's, ...)."""
    return Judge(c["judge_url"], c["judge_model"], key_env=c["judge_key_env"],
                 workers=c["judge_workers"], timeout=c["judge_timeout"], retries=c["judge_retries"],
                 reasks=c["judge_reasks"], backoff_max=c["judge_backoff_max"],
                 extra=c["judge_extra"],
                 max_tokens=c["judge_max_tokens"], max_reply_bytes=c["judge_max_reply_bytes"],
                 price_in=c["judge_price_in"], price_out=c["judge_price_out"], cache_dir=cache_dir,
                 length_weight=c["length_weight"], url_setting=url_setting)


def score(judge, rows, progress=False):
    """[{prompt, target_words, story}, ...] -> (results in order, the batch's usage summed)."""
    futures = [judge.submit(r["prompt"], r["target_words"], r["story"]) for r in rows]
    if progress:
        from tqdm import tqdm
        for _ in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="judging"):
            pass
    results = [f.result() for f in futures]
    used = {k: sum(r.get(k, 0) for r in results) for k in USAGE}
    failures = sum(r["error"] is not None for r in results)
    return results, dict(used, n=len(results), failures=failures)

# -----------------------------------------------------------------------------
# what a failure does to a training step: train.py gathers each rank's health, asks stop_reason


def wait(futures, signals):
    """Wait for every future, woken twice a second to see a stop signal: False if one came."""
    while not signals and concurrent.futures.wait(futures, timeout=0.5).not_done:
        pass
    return not signals


def health(stories):
    """This rank's share of the vote after its stories were judged: how many were asked, how many
    failed in a way no retry fixes (a rejected key, a wrong model or URL), the other reasons."""
    errors = collections.Counter(s.judgement["error"] for s in stories if s.judgement["error"])
    return dict(asked=len(stories), fatal=sum(s.judgement["fatal"] for s in stories), errors=errors)


def stop_reason(healths, max_fail_frac):
    """Why no update may follow, from every rank's health (the same answer on each), or None: a
    failure no retry fixes, or more than judge_max_fail_frac of the step's stories unscored."""
    asked, fatal = sum(h["asked"] for h in healths), sum(h["fatal"] for h in healths)
    errors = sum((h["errors"] for h in healths), collections.Counter())
    if not (fatal or errors.total() > max_fail_frac * asked):
        return None
    why = ("a judge failure that no retry can fix" if fatal else f"{errors.total()} of {asked} "
           f"stories could not be scored (judge_max_fail_frac={max_fail_frac})")
    reasons = "; ".join(f"{n} x {e}" for e, n in errors.most_common(5))
    return f"{why}; stopped before its update. Reasons: {reasons}"


def exit_now(judge, message):
    """Ctrl-C or SIGTERM in a script: cancel the judge's queued work and end the process now,
    with one line and no traceback. os._exit, because a normal exit waits for every request in
    flight, and one waiting on a silent server would hold the process for up to judge_timeout."""
    if judge:
        judge.cancel()
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(130)

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    import math
    import signal

    import jsonl
    from configurator import check_ranges, configure
    from data import load_rows
    if sys.argv[1:2] == ["serve"]:  # the local judge, a program of its own: this process becomes it
        os.execv(sys.executable, [sys.executable, LOCAL_JUDGE, *sys.argv[2:]])  # --port, --latency
    if not (sys.argv[1:2] == ["score"] or {"--help", "-h"} & set(sys.argv)):
        sys.exit(__doc__)
    data = "data/sample/heldout.jsonl"  # JSONL rows {id, prompt, target_words, story}
    out = "out/scores.jsonl"  # the rows with their scores, SQ, length ratio, reward and error
    # the judge
    judge_url = "local"  # base URL ending in /v1, or 'local' for the built-in heuristic judge
    judge_model = "polaris-local"
    judge_key_env = ""  # the NAME of the environment variable holding the API key
    judge_workers = 16  # requests in flight at once
    judge_timeout = 300.0  # seconds for one request: connecting, headers and body
    judge_retries = 6  # on 429, 5xx, timeouts and bodies cut on the wire
    judge_reasks = 2  # on a reply that does not parse
    judge_backoff_max = 60.0  # the longest wait between retries
    judge_extra = {}  # passed through in the body: {'reasoning_effort': 'low', ...}
    judge_max_tokens = 8192  # the reply's cap, sent as max_completion_tokens (0: none)
    judge_max_reply_bytes = 1_000_000  # a larger reply body is a failure, never re-asked or cached
    judge_price_in = 0.0  # dollars per million tokens in
    judge_price_out = 0.0  # dollars per million tokens out
    judge_cache = "out/judge_cache"  # '' to disable
    length_weight = 25.0  # reward = SQ - length_weight * (1 - length score)
    c = configure(globals(), [a for a in sys.argv[1:] if a != "score"], about=__doc__.strip())
    check_ranges(c, RANGES)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the run like Ctrl-C
    try:
        rows = load_rows(data, max_words=None, allow_empty=True, special_tokens=())  # generations
        judge = from_config(c, cache_dir=judge_cache or None)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {redact_url(e)}")
    try:
        results, used = score(judge, rows, progress=True)
    except KeyboardInterrupt:
        exit_now(judge, f"interrupted: queued judge requests cancelled, {out} not written")
    judge.close()
    jsonl.write(out, [dict(row, **res) for row, res in zip(rows, results)])  # whole, or not at all
    sqs = [r["sq"] for r in results if not math.isnan(r["sq"])]
    mean = f"{sum(sqs) / len(sqs):.1f}" if sqs else "n/a"
    print(f"{used['n']} stories | mean SQ {mean} | failures {used['failures']} | tokens "
          f"{used['tokens_in']} in, {used['tokens_out']} out | cost ${used['cost']:.4f} | "
          f"cache hits {used['cached']} | wrote {out}")
    if used["unpriced"]:
        print(f"{used['unpriced']} replies came without usable token counts: their cost is unknown")
    if not sqs:  # a judge that scored nothing is an error, whatever the reasons
        reasons = collections.Counter(r["error"] for r in results if r["error"])
        sys.exit("error: no story was scored: "
                 + "; ".join(f"{n} x {e}" for e, n in reasons.most_common(5)))
