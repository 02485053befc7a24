"""
The LLM judge, reached over plain HTTP, and a local stand-in for it.

Judge is a thread-pool client for any OpenAI-compatible /v1/chat/completions endpoint: OpenAI
(GPT-5.4, the paper's evaluation judge), Gemini's OpenAI-compatible endpoint (Gemini 3 Flash,
the paper's training judge), or a local vLLM / llama.cpp server. It sends rubric.py's prompts,
parses the replies with rubric.py's parsers, retries what is worth retrying, caches every reply
on disk, counts tokens and dollars, and returns NaN with a reason, never a made-up score, for
a story it could not get scored.

The local judge (serve_local, or judge_url='local') answers the same API on 127.0.0.1 with a
deterministic heuristic built from text statistics. It exists so that tests and CPU teaching
runs work offline. It is NOT a judge of quality: it rewards fluent, varied, non-repetitive
text that looks like the project's sample stories, and nothing deeper.

    python judge.py serve --port=8000
    python judge.py score --data=data/sample/heldout.jsonl --out=out/scores.jsonl
    python judge.py score --data=IN.jsonl --out=OUT.jsonl --judge_url=https://api.openai.com/v1 \\
        --judge_model=gpt-5.4 --judge_key_env=OPENAI_API_KEY --judge_price_in=1.25 --judge_price_out=10
"""
import email.utils
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

import rubric


class JudgeError(Exception):
    pass

# -----------------------------------------------------------------------------
# the client


class Judge:
    """Scores stories concurrently. submit() returns a Future, so the trainer can hand a
    group's stories over as soon as they exist and keep generating; score() is the batch form.

    url: base URL ending in /v1 (https://api.openai.com/v1,
         https://generativelanguage.googleapis.com/v1beta/openai, http://127.0.0.1:8000/v1),
         or 'local' to start the heuristic judge in this process.
    key_env: the NAME of the environment variable holding the API key ('' for none). The key
         goes into the Authorization header and nowhere else.
    extra: body fields passed through unchanged (temperature, reasoning_effort, service_tier,
         max_completion_tokens, ...); they are part of the cache key.
    price_in, price_out: dollars per million prompt / completion tokens.
    """

    def __init__(self, url, model, key_env="", workers=16, timeout=300.0, retries=6, reasks=2,
                 extra=None, price_in=0.0, price_out=0.0, cache_dir=None, length_weight=25.0,
                 backoff=1.0, backoff_max=60.0):
        if key_env and not os.environ.get(key_env):
            raise ValueError(f"judge_key_env: the environment variable {key_env} is not set")
        self.key_env = key_env  # the key itself is read at each request and kept nowhere
        self.server = None
        if url == "local":
            self.server, url = serve_local(port=0)
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.extra = model, dict(extra or {})
        self.timeout, self.retries, self.reasks = timeout, retries, reasks
        self.backoff, self.backoff_max = backoff, backoff_max
        self.price_in, self.price_out = price_in, price_out
        self.cache_dir, self.length_weight = cache_dir, length_weight
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="judge")
        self._local = threading.local()  # one requests.Session per worker thread

    def close(self):
        self.pool.shutdown(wait=True)
        if self.server:
            self.server.shutdown()
            self.server.server_close()

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
        out = dict(scores=None, error=None, tokens_in=0, tokens_out=0, cost=0.0, cached=0)
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
        out = dict(verdict=None, error=None, tokens_in=0, tokens_out=0, cost=0.0, cached=0)
        out["verdict"], out["error"] = self._ask(rubric.pairwise_messages(prompt, story_a, story_b),
                                                 rubric.parse_pairwise, out)
        return out

    def _ask(self, messages, parse, out):
        """Ask, parse; on a reply that does not parse, show the judge its reply and the reason
        and ask again, at most self.reasks times. Returns (parsed, None) or (None, reason)."""
        for attempt in range(self.reasks + 1):
            try:
                content, used, cached = self._chat(messages)
            except JudgeError as e:
                return None, str(e)
            out["tokens_in"] += used.get("prompt_tokens") or 0
            out["tokens_out"] += used.get("completion_tokens") or 0
            out["cached"] += cached
            if not cached:
                out["cost"] += ((used.get("prompt_tokens") or 0) * self.price_in
                                + (used.get("completion_tokens") or 0) * self.price_out) / 1e6
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

    def _chat(self, messages):
        """-> (content, usage, 1 if from the cache else 0). Raises JudgeError."""
        body = dict(self.extra, model=self.model, messages=messages)
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        path = os.path.join(self.cache_dir, key[:2], key + ".json") if self.cache_dir else None
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    hit = json.load(f)
                return hit["content"], hit["usage"], 1
            except (OSError, ValueError, KeyError):
                pass  # unreadable entry: ask again and overwrite it
        content, used = self._post(body)
        if path:
            # write to a temporary file in the same folder, then rename: a crash leaves either
            # no entry or a whole one, and concurrent writers of one key cannot interleave
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(dict(content=content, usage=used), f)
            os.replace(tmp, path)
        return content, used, 0

    def _session(self):
        if not hasattr(self._local, "s"):
            self._local.s = requests.Session()
        return self._local.s

    def _post(self, body):
        key = os.environ.get(self.key_env) if self.key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for attempt in range(self.retries + 1):
            wait = None
            try:
                r = self._session().post(self.url, json=body, headers=headers, timeout=self.timeout)
            except requests.Timeout:
                reason = f"timeout after {self.timeout:g} s"
            except requests.ConnectionError as e:
                reason = f"connection error ({type(e).__name__})"
            else:
                if r.status_code == 200:
                    try:
                        data = r.json()
                        content = data["choices"][0]["message"]["content"]
                        if not isinstance(content, str):
                            raise TypeError
                        return content, data.get("usage") or {}
                    except (ValueError, KeyError, IndexError, TypeError):
                        reason = "HTTP 200 with a body that is not a chat completion"
                elif r.status_code == 429 or r.status_code >= 500:
                    reason = f"HTTP {r.status_code}"
                    wait = _retry_after(r.headers.get("Retry-After"))
                    if wait is not None and wait > self.backoff_max:
                        raise JudgeError(_redact(key, f"HTTP {r.status_code}: Retry-After {wait:g} s "
                                                      f"is over judge_backoff_max={self.backoff_max:g}"))
                else:  # 400, 401, 403, 404: asking again will not help
                    raise JudgeError(_redact(key, f"HTTP {r.status_code}: {r.text[:300]}"))
            if attempt == self.retries:
                break
            # exponential backoff with jitter (so many workers do not retry in lockstep),
            # unless the server said how long to wait
            d = min(self.backoff_max, self.backoff * 2 ** attempt)
            time.sleep(wait if wait is not None else random.uniform(d / 2, d))
        raise JudgeError(f"{reason}; gave up after {self.retries + 1} attempts")



def _redact(key, text):
    """An error body may echo the request; make sure it cannot carry the key into a log."""
    return text.replace(key, "<key>") if key else text


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
                cost=sum(r["cost"] for r in results), cached=sum(r["cached"] for r in results))

# -----------------------------------------------------------------------------
# the local heuristic judge


def _load_vocab():
    """Words and word pairs of the project's own stories: the yardstick for 'real words' and
    'fluent word order' in the heuristic."""
    words, pairs = set(), set()
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".jsonl"):
            for line in open(os.path.join(folder, name), encoding="utf-8"):
                w = _words(json.loads(line)["story"])
                words.update(w)
                pairs.update(zip(w, w[1:]))
    return words, pairs


def _words(text):
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


_VOCAB = None
_SENSORY = set("light dark shadow cold warm wet dry smell smelled scent salt smoke sound quiet "
               "silence loud rain wind snow frost sun moon stone iron wood glass dust mud ash "
               "bitter sweet rough smooth red blue green grey gray white black gold bright".split())
_TELLING = re.compile(r"\b(?:felt|feel|feels|feeling) (?:very |so )?(?:sad|happy|angry|afraid|scared|lonely)\b|"
                      r"\b(?:was|were|is) (?:very |so )?(?:sad|happy|angry|afraid|scared|lonely)\b")
_CLICHES = ["dark and stormy", "little did", "heart of gold", "time stood still", "in the nick of time",
            "all hope was lost", "calm before the storm", "only time would tell", "a chill ran down",
            "happily ever after", "suddenly", "it was all a dream", "tears streamed"]
_META = re.compile(r"\b(?:this story|the story above|the prompt|as an ai|language model|the judge|"
                   r"the rubric|dear reader|word count|score this|rate this|ignore (?:the|all|previous)|"
                   r"the end\b|title:|note:|(?:prompt adherence|coherence|originality|repetition)\s*:\s*\d)", re.I)


def _clip(x):
    return round(min(10.0, max(0.0, x)), 1)


def heuristic_scores(premise, story):
    """Text statistics mapped onto the 16 dimensions. Deterministic, crude, and cheap."""
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = _load_vocab()
    vocab, known_pairs = _VOCAB
    w = _words(story)
    if len(w) < 2:
        return {n: (None if n == "Weak Dialogue" else (0.0 if n in rubric.POSITIVE else 10.0)) for n in rubric.NAMES}
    n = len(w)
    real = sum(t in vocab for t in w) / n  # share of words the project's stories use
    fluent = sum(p in known_pairs for p in zip(w, w[1:])) / (n - 1)  # share of attested word pairs
    grams = list(zip(w, w[1:], w[2:], w[3:]))
    rep = 1.0 - len(set(grams)) / max(1, len(grams))  # share of repeated 4-grams
    window = min(50, n)
    mattr = sum(len(set(w[i:i + window])) for i in range(0, n - window + 1, 10)) / \
        (len(range(0, n - window + 1, 10)) * window)  # moving-average type/token ratio
    toks = story.split()
    ends = [i for i, t in enumerate(toks[:-1]) if t.rstrip("\"'”’)").endswith((".", "!", "?"))]
    caps = sum(toks[i + 1].lstrip("\"'“‘(")[:1].isupper() for i in ends) / max(1, len(ends))
    sent_lens = [len(s.split()) for s in re.split(r"[.!?]+", story) if s.strip()]
    shape = sum(4 <= k <= 35 for k in sent_lens) / max(1, len(sent_lens))  # plausible sentences
    paras = [p for p in re.split(r"\n\s*\n", story) if p.strip()]
    dialogue = len(re.findall(r"[\"“]", story))
    meta = len(_META.findall(story))
    content = [t for t in _words(premise) if len(t) > 4]
    adherence = sum(any(v.startswith(t[:5]) for v in set(w)) for t in content) / max(1, len(content))
    sensory = sum(t in _SENSORY for t in w) / n * 100  # per 100 words
    low = story.lower()
    cliche = sum(low.count(c) for c in _CLICHES)
    adverbs = sum(t.endswith("ly") and len(t) > 5 for t in w) / n
    long_words = sum(len(t) >= 11 for t in w) / n
    q = real * (0.5 + 0.5 * fluent) * (1 - rep)  # base quality: real, ordered, unrepeated
    form = 0.5 * caps + 0.5 * shape  # sentence form
    s = {
        "Prompt Adherence": 10 * q * (0.4 + 0.6 * adherence),
        "Coherence": 10 * q * (0.5 + 0.5 * form),
        "Structure and Pacing": 10 * q * min(1.0, len(paras) / 4) * (0.5 + 0.5 * form),
        "Characterisation": 10 * q * (0.6 + 0.4 * min(1.0, dialogue / 6)),
        "Prose and Voice": 10 * q * form,
        "Imagery and Setting": 10 * q * min(1.0, 0.3 + sensory / 3),
        "Originality": 10 * q * min(1.0, mattr / 0.8),
        "Emotional Engagement": 10 * q * (0.5 + 0.5 * form) * min(1.0, 0.5 + n / 400),
        "Repetition": 10 * min(1.0, 3 * rep + 0.1),
        "Padding": 10 * min(1.0, max(0.0, 0.8 - mattr) * 2 + (1 - real)),
        "Purple Prose": 10 * min(1.0, 5 * adverbs + 5 * long_words),
        "Telling Not Showing": 2 + 2 * len(_TELLING.findall(low)),
        "Cliche": 1 + 2 * cliche,
        "Weak Dialogue": None if dialogue == 0 else 10 * (1 - q),
        "Unearned Resolution": 10 * (1 - q) * 0.8 + 1,
        "Meta Text": 3 * meta + 10 * (1 - form) * 0.3,
    }
    return {k: (None if v is None else _clip(v)) for k, v in s.items()}


_STORY = re.compile(r"<<<STORY( [AB]|) (\w+)>>>\n(.*?)\n<<<END STORY\1 \2>>>", re.S)


def local_reply(text):
    """The local judge's answer to one user message, in the format a real judge is asked for."""
    premise = (re.search(r"asked: (.*)", text) or re.search(r"(.*)", text)).group(1)
    stories = {label.strip() or "S": body for label, _, body in _STORY.findall(text)}
    if "A" in stories and "B" in stories:
        a, b = (heuristic_scores(premise, stories[k]) for k in "AB")
        pick = {n: "A" if a[n] >= b[n] else "B" for n in rubric.POSITIVE}
        pick["Overall"] = "A" if rubric.story_quality(a) >= rubric.story_quality(b) else "B"
        return "Analysis: compared by text statistics (polaris local judge).\n\n" + \
            "\n".join(f"{n}: {pick[n]}" for n in rubric.PAIR_CRITERIA)
    # a plain chat request without markers is scored as if the whole message were the story
    s = heuristic_scores(premise, stories.get("S", text))
    fmt = lambda v: "N/A" if v is None else f"{v:g}"
    return "Analysis: scored by text statistics (polaris local judge).\n\n" + \
        "\n".join(f"{n}: {fmt(s[n])}" for n in rubric.NAMES)


class _LocalHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            text = body["messages"][-1]["content"]
            assert isinstance(text, str)
        except Exception:
            return self._send(400, {"error": {"message": "expected a chat completion request"}})
        reply = local_reply(text)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        self._send(200, {
            "id": "local-" + hashlib.sha1(text.encode()).hexdigest()[:12], "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", "local"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(reply.split()),
                      "total_tokens": prompt_tokens + len(reply.split())}})

    def do_GET(self):
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            return self._send(200, {"object": "list", "data": [{"id": "polaris-local", "object": "model"}]})
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass  # quiet: one line per request would drown the training log


def serve_local(port=0, host="127.0.0.1"):
    """Start the local judge in a daemon thread; return (server, base_url). port=0: any free."""
    server = ThreadingHTTPServer((host, port), _LocalHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/v1"

# -----------------------------------------------------------------------------
# command line


def judge_from_config(c, cache_dir=None):
    """Build a Judge from a config dict with the judge_* keys (train.py, eval.py, here)."""
    return Judge(c["judge_url"], c["judge_model"], key_env=c["judge_key_env"], workers=c["judge_workers"],
                 timeout=c["judge_timeout"], retries=c["judge_retries"], reasks=c["judge_reasks"],
                 extra=c["judge_extra"], price_in=c["judge_price_in"], price_out=c["judge_price_out"],
                 cache_dir=cache_dir, length_weight=c["length_weight"], backoff_max=c["judge_backoff_max"])


if __name__ == "__main__":
    from configurator import configure
    if len(sys.argv) < 2 or sys.argv[1] not in ("serve", "score"):
        sys.exit(__doc__)
    command = sys.argv[1]
    c = dict(
        port=8000,  # serve: port on 127.0.0.1
        data="data/sample/heldout.jsonl",  # score: JSONL rows {id, prompt, target_words, story}
        out="out/scores.jsonl",  # score: rows with scores, SQ, length ratio, reward, error
        judge_url="local",  # base URL ending in /v1, or 'local' for the built-in heuristic judge
        judge_model="polaris-local",
        judge_key_env="",  # name of the environment variable holding the API key
        judge_workers=16, judge_timeout=300.0, judge_retries=6, judge_reasks=2, judge_backoff_max=60.0,
        judge_extra={},  # passed through: {'temperature': 0, 'reasoning_effort': 'low', ...}
        judge_price_in=0.0, judge_price_out=0.0,  # dollars per million tokens
        judge_cache="out/judge_cache",  # '' to disable
        length_weight=25.0,  # reward = SQ - length_weight * (1 - length score)
    )
    configure(c, sys.argv[2:])
    if command == "serve":
        server, url = serve_local(c["port"])
        print(f"polaris local judge at {url}/chat/completions (a heuristic stand-in, not a quality judge)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            server.shutdown()
        sys.exit(0)
    try:
        rows = rubric.load_rows(c["data"], max_words=None, allow_empty=True)
        judge = judge_from_config(c, cache_dir=c["judge_cache"] or None)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    results, used = judge.score(rows, progress=True)
    judge.close()
    os.makedirs(os.path.dirname(os.path.abspath(c["out"])), exist_ok=True)
    tmp = c["out"] + ".tmp"
    with open(tmp, "w") as f:
        for row, res in zip(rows, results):
            f.write(json.dumps(dict(row, **res)) + "\n")
    os.replace(tmp, c["out"])  # never a half-written output file
    sqs = [r["sq"] for r in results if not math.isnan(r["sq"])]
    print(f"{used['n']} stories | mean SQ {sum(sqs) / max(1, len(sqs)):.1f} | failures {used['failures']} | "
          f"tokens {used['tokens_in']} in, {used['tokens_out']} out | cost ${used['cost']:.4f} | "
          f"cache hits {used['cached']} | wrote {c['out']}")
