"""
The local judge: an offline stand-in for the LLM judge, for tests and CPU teaching runs.

It answers the OpenAI-compatible /v1/chat/completions API on 127.0.0.1 (stdlib threaded HTTP
server) with a deterministic heuristic "model": text statistics (real words and word pairs
against the project's own stories, repeated 4-grams, lexical variety, sentence shape,
dialogue, sensory words, cliches, meta-text addressed to a reader or judge) mapped onto the 16
rubric dimensions and written in exactly the format a real judge is asked for, so the real
parser runs. Pairwise prompts get a pairwise verdict.

It is NOT a judge of quality: it rewards fluent, varied, non-repetitive text that looks like
the sample stories, and nothing deeper. It runs as a server of its own, reached over HTTP like any
judge: `python judge.py serve --port=8000` (which runs this file), or judge_url='local', which
starts one for the client's process and ends it with that process.
"""
import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import rubric

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


def _story(text, label=""):
    """The text between the story markers that carry the request's own token, or None. The token
    is read from the last end marker: every prompt puts its fixed instructions after the story,
    and no story can contain the token (rubric.boundary_token), so whatever a story says, even
    fake markers, stays inside it."""
    ends = re.findall(r"<<<END STORY(?: [AB])? (\w+)>>>", text)
    if not ends:
        return None
    start, end = f"<<<STORY{label} {ends[-1]}>>>\n", f"\n<<<END STORY{label} {ends[-1]}>>>"
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    return text[i + len(start): j] if j >= 0 else None


def local_reply(text):
    """The local judge's answer to the first user message of a request, in the format a real
    judge is asked for. The kind of answer follows the request's structure, never the story's
    words: two stories A and B -> a pairwise verdict; rubric.judge_messages' opening -> scores;
    one story otherwise (data/prepare.py) -> a premise; no markers -> the whole message scored."""
    premise = (re.search(r"asked: (.*)", text) or re.search(r"(.*)", text)).group(1)
    a, b, one = _story(text, " A"), _story(text, " B"), _story(text)
    fmt = lambda v: "N/A" if v is None else f"{v:g}"
    if a is not None and b is not None:
        sa, sb = heuristic_scores(premise, a), heuristic_scores(premise, b)
        pick = {n: "A" if sa[n] >= sb[n] else "B" for n in rubric.POSITIVE}
        pick["Overall"] = "A" if rubric.story_quality(sa) >= rubric.story_quality(sb) else "B"
        return "Analysis: compared by text statistics (polaris local judge).\n\n" + \
            "\n".join(f"{n}: {pick[n]}" for n in rubric.POSITIVE + ["Overall"])
    if one is not None and not text.startswith(rubric.JUDGE_OPENING):
        # data/prepare.py's premise request: the story's opening words stand in for a premise
        opening = " ".join(one.split()[:12]).rstrip(".,;:")
        return f"Premise: the events that follow the opening words {opening}"
    s = heuristic_scores(premise, text if one is None else one)
    return "Analysis: scored by text statistics (polaris local judge).\n\n" + \
        "\n".join(f"{n}: {fmt(s[n])}" for n in rubric.NAMES)


class _LocalHandler(BaseHTTPRequestHandler):
    latency = 0.0

    def do_POST(self):
        time.sleep(self.latency)
        if self.path.split("?")[0].rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            # the first user message holds the story: a re-ask appended after it is answered
            # for the original story, never scored as if it were one
            text = next(m["content"] for m in body["messages"] if m["role"] == "user")
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # the stdlib default backlog of 5 drops the connections of a 16-worker burst, and the
    # client's TCP then waits a second to retry: bench.py measured 0.29 efficiency with it
    request_queue_size = 128


def serve_local(port=0, host="127.0.0.1", latency=0.0):
    """Start the local judge in a daemon thread; return (server, base_url). port=0: any free.
    latency: seconds added to every reply, to stand in for a remote API's round trip."""
    server = _Server((host, port), type("Handler", (_LocalHandler,), dict(latency=latency)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/v1"


if __name__ == "__main__":
    from configurator import configure
    port = 8000  # on 127.0.0.1; 0: any free one
    latency = 0.0  # seconds added to each reply, standing in for a remote API's round trip
    parent = 0  # a process id: the server ends when that process does (judge_url='local' sets it)
    configure(globals())
    server, url = serve_local(port, latency=latency)
    print(f"polaris local judge at {url}/chat/completions (a heuristic stand-in, not a quality "
          "judge)", flush=True)
    try:
        while not parent or os.getppid() == parent:  # a parent that died leaves this to init
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    server.shutdown()
