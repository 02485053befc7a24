"""
What a person looks at: the blinded annotation page of the human study, the self-contained HTML
report, and the training run's viewer. Standard library only: a small http.server, every text
escaped by one helper (esc), inline CSS and SVG, nothing fetched from anywhere, so each page
works offline. eval.py computes the numbers and calls these; nothing here computes a statistic.

Stories are data written by models: they reach a page only through esc(), and every page is sent
with a Content-Security-Policy that allows no script but the page's own and no request but to
its own server, so even an escaping mistake could run nothing and fetch nothing.
"""
import base64
import hashlib
import hmac
import html
import http.cookies
import json
import math
import os
import re
import secrets
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import rubric
import rundir


def esc(x):
    """The one way text reaches a page: <, >, &, and both quotes become entities."""
    return html.escape(str(x), quote=True)


CSS = """
body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fbfaf7}
main{max-width:1280px;margin:0 auto;padding:.5rem 1.5rem 2rem}
h1{font-size:1.5rem;margin:.8rem 0}h2{font-size:1.15rem;margin:1.6rem 0 .5rem}h3{font-size:1rem;margin:1rem 0 .3rem}
table{border-collapse:collapse;margin:.4rem 0 1rem}th,td{padding:.25rem .7rem;border-bottom:1px solid #ddd;text-align:left;
vertical-align:top}th{background:#f0eee8}td.n{text-align:right;font-variant-numeric:tabular-nums}
.story{font:17px/1.65 Georgia,'Times New Roman',serif;white-space:pre-wrap;overflow-wrap:anywhere;max-width:42em}
.reply{font-size:14px;white-space:pre-wrap;overflow-wrap:anywhere;max-width:50em}
.prompt{background:#f0eee8;border-left:4px solid #8a7f6a;padding:.6rem 1rem;margin:.6rem 0;font-size:1.05rem}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:2.5rem}
@media (max-width:820px){.pair{grid-template-columns:1fr}main{padding:.5rem .8rem 2rem}.bar textarea{min-height:1.6rem}}
.bar{position:sticky;bottom:0;margin-top:1.5rem;background:#fff;border-top:1px solid #ccc;padding:.6rem 1rem;
display:flex;gap:.6rem;align-items:center;flex-wrap:wrap;justify-content:center}
.bar textarea{flex:1 1 22rem;min-height:2.4rem;font:inherit}
button{font:inherit;padding:.45rem 1.1rem;border:1px solid #777;border-radius:6px;background:#fff;cursor:pointer}
button.pick{font-weight:600;background:#eef3fb}button:disabled{opacity:.5}
kbd{font-size:.8em;color:#555;border:1px solid #bbb;border-radius:3px;padding:0 .3em}.muted{color:#666}.note{color:#7a4b00}
.fail{color:#a11}.saved{color:#2e7d32;font-weight:600}
details{border:1px solid #ddd;border-radius:6px;padding:.3rem .8rem;margin:.4rem 0;background:#fff}
summary{cursor:pointer}.scores td{padding:.1rem .6rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:1rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.5rem .8rem;background:#fff}
.card.ref{background:#fff6dc;border:2px solid #c9a227}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(22rem,1fr));gap:1rem}
.cols .story{max-height:36em;overflow-y:auto;font-size:16px}.cols h4{margin:.6rem 0 0}.cols p.muted{margin:0 0 .5rem}
.status{font-weight:600}.toc a{margin-right:.5rem}
nav a{margin-right:.6rem}svg{max-width:100%;height:auto}
"""


def page(title, body, script=""):
    """A whole HTML document: the shared CSS, and at most one script, the page's own."""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width,initial-scale=1'><title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main>{f'<script>{script}</script>' if script else ''}</body></html>")


def csp(script=""):
    """The policy sent with (or written into) a page: styles inline, images only as data, forms and
    requests only to the page's own server (none without a script), and no script but `script`,
    allowed by its hash."""
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; base-uri 'none'; "
            + (f"connect-src 'self'; script-src 'sha256-{digest}'" if script else "connect-src 'none'; script-src 'none'"))


def table(head, rows, numeric=()):
    """An HTML table of escaped cells; columns in `numeric` are right-aligned."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    tr = "".join("<tr>" + "".join(f"<td{' class=n' if k in numeric else ''}>{esc(c)}</td>" for k, c in enumerate(r))
                 + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{tr}</table>"

# -----------------------------------------------------------------------------
# charts: inline SVG, the legend under the plot so that it never covers the data

COLOURS = ["#1f5fa8", "#c4511a", "#2e8540", "#7b3fa0", "#a8821f", "#197a80", "#a11d4b", "#555555"]


def _ticks(lo, hi, n=5):
    if not hi > lo:  # one value: a tenth of it either side, and an axis of values >= 0 stays >= 0
        d = abs(lo) / 10 or 1
        lo, hi = (max(lo - d, 0) if lo >= 0 else lo - d), hi + d
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    first = math.floor(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1.999))]


def chart(title, series, y_label="", x_labels=None, x_label="", mark=None, w=560, h=300, band=False, thin=()):
    """An SVG plot. series: [(name, [(x, y, lo, hi), ...])], lo/hi a 95% interval or None; NaN
    points are left out. x_labels {x: label} marks categories (each series shifted a little so
    that the whiskers stay apart); else numeric ticks on x. Points of a series are joined; `mark`
    (value, label) draws a dashed line at that value, a target such as the requested length.
    band: lo/hi drawn as a shaded band along the line, not as whiskers (a spread over runs);
    thin: [(k, [(x, y), ...])], thin lines in series k's colour beneath it (each run of a group)."""
    pts = [(x, v) for _, ps in series for x, y, lo, hi in ps for v in (y, lo, hi)
           if v is not None and math.isfinite(v)]
    pts += [(x, y) for _, ps in thin for x, y in ps if math.isfinite(y)]
    if not pts:
        return f"<p class=muted>{esc(title)}: nothing to plot yet.</p>"
    pts += [(pts[0][0], mark[0])] if mark else []
    # a series keeps its colour when another has nothing to plot: a group is one colour in every chart
    series = [(k, name, ps) for k, (name, ps) in enumerate(series)
              if any(y is not None and math.isfinite(y) for _, y, _, _ in ps)]
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    pad = 0.04 * (hi - lo)  # a line at the minimum stays off the frame, and data >= 0 keeps an axis >= 0
    yt = _ticks(max(lo - pad, 0) if lo >= 0 else lo - pad, hi + pad)
    xs = sorted(x_labels) if x_labels else [x for x, _ in pts]
    x0, x1 = (min(xs) - 0.5, max(xs) + 0.5) if x_labels else (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
    left, right, top, bottom = 62, 14, 28, 44
    X = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
    Y = lambda y: top + (yt[-1] - y) / (yt[-1] - yt[0]) * (h - top - bottom)
    out = [f"<text x={w / 2:.0f} y=17 text-anchor=middle font-weight=600>{esc(title)}</text>",
           f"<rect x={left} y={top} width={w - left - right} height={h - top - bottom} fill=none stroke=#999 />"]
    for t in yt:
        out.append(f"<line x1={left} x2={w - right} y1={Y(t):.1f} y2={Y(t):.1f} stroke=#e4e4e4 />"
                   f"<text x={left - 6} y={Y(t) + 4:.1f} text-anchor=end font-size=12>{t:g}</text>")
    whole = all(float(x).is_integer() for x in xs)  # steps: no tick between two of them
    for x in (sorted(x_labels) if x_labels else [t for t in _ticks(x0, x1, 6) if not whole or float(t).is_integer()]):
        if x0 <= x <= x1:
            out.append(f"<text x={X(x):.1f} y={h - bottom + 16} text-anchor=middle font-size=12>"
                       f"{esc(x_labels[x]) if x_labels else f'{x:g}'}</text>")
    if mark:
        out.append(f"<line x1={left} x2={w - right} y1={Y(mark[0]):.1f} y2={Y(mark[0]):.1f} stroke=#444 "
                   f"stroke-dasharray='5 4' /><text x={w - right - 4} y={Y(mark[0]) - 4:.1f} text-anchor=end "
                   f"font-size=11 fill=#444>{esc(mark[1])}</text>")
    if x_label:
        out.append(f"<text x={(left + w - right) / 2:.0f} y={h - 8} text-anchor=middle font-size=12>{esc(x_label)}</text>")
    if y_label:
        out.append(f"<text transform='translate(14 {(top + h - bottom) / 2:.0f}) rotate(-90)' text-anchor=middle "
                   f"font-size=12>{esc(y_label)}</text>")
    for j, (k, name, ps) in enumerate(series):
        colour, dx = COLOURS[k % len(COLOURS)], ((j - (len(series) - 1) / 2) * 0.12 if x_labels else 0)
        ps = [(x + dx, y, lo, hi) for x, y, lo, hi in ps if y is not None and math.isfinite(y)]
        spread = [(x, lo, hi) for x, _, lo, hi in ps if None not in (lo, hi) and math.isfinite(lo + hi)]
        edge = [(x, hi) for x, _, hi in spread] + [(x, lo) for x, lo, _ in spread[::-1]]  # the top, back below
        if band and len(spread) > 1:
            out.append(f"<polygon fill={colour} fill-opacity=0.15 stroke=none points='"
                       + " ".join(f"{X(x):.1f},{Y(v):.1f}" for x, v in edge) + "' />")
        for line in [ys for i, ys in thin if i == k and len(ys) > 1]:
            out.append(f"<polyline fill=none stroke={colour} stroke-width=0.8 stroke-opacity=0.7 points='"
                       + " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in line if math.isfinite(y)) + "' />")
        if len(ps) > 1:
            out.append(f"<polyline fill=none stroke={colour} stroke-width=1.6 points='"
                       + " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y, _, _ in ps) + "' />")
        for x, y, lo, hi in ps:
            if not band and lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
                out.append(f"<line x1={X(x):.1f} x2={X(x):.1f} y1={Y(lo):.1f} y2={Y(hi):.1f} stroke={colour} />"
                           + "".join(f"<line x1={X(x) - 4:.1f} x2={X(x) + 4:.1f} y1={Y(v):.1f} y2={Y(v):.1f} "
                                     f"stroke={colour} />" for v in (lo, hi)))
            if x_labels or len(ps) < 60:
                out.append(f"<circle cx={X(x):.1f} cy={Y(y):.1f} r=3.2 fill={colour}><title>{esc(name)}: "
                           f"{y:.3g}</title></circle>")
    legend = "".join(f"<span style='margin-right:1rem'><span style='color:{COLOURS[k % len(COLOURS)]}'>&#9632;</span> "
                     f"{esc(name)}</span>" for k, name, _ in series)
    return (f"<figure style='margin:.5rem 1rem .5rem 0;display:inline-block;vertical-align:top'>"
            f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {w} {h}' width={w} height={h} "
            f"font-family='system-ui,sans-serif' role=img aria-label='{esc(title)}'>{''.join(out)}</svg>"
            f"<figcaption style='font-size:13px'>{legend}</figcaption></figure>")

# -----------------------------------------------------------------------------
# the server: one app function, a token off the loopback


LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 64 * 1024  # bytes of a POST: the forms send an item, a choice and a reason of REASON_CHARS at most
REASON_CHARS = 2000  # the reason's length: the textarea's maxlength, and refused by the server beyond it


def serve(app, host, port, what, script=""):
    """Serve app(method, path, params) -> (status, html, headers) on host:port until Ctrl-C or
    SIGTERM; print the address. `script` is the one script its pages may run. On the loopback anyone
    on this machine may open it (and only by a loopback name); bound to any other address, every
    request needs the access token printed here (asked for by a form, then kept in a cookie), and
    nothing else is served without it. Headers are checked before a body is read: the token, then
    a POST's Content-Length (400 when missing or not a number, 413 over MAX_BODY)."""
    token = None if host in LOOPBACK else secrets.token_urlsafe(18)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.answer("GET")

        def do_POST(self):
            self.answer("POST")

        def answer(self, method):
            url = urllib.parse.urlsplit(self.path)
            params = dict(urllib.parse.parse_qsl(url.query))
            if not token and urllib.parse.urlsplit("//" + self.headers.get("Host", "")).hostname not in LOOPBACK:
                return self.send(403, page("Refused", "<h1>This page answers only to 127.0.0.1.</h1>"))  # DNS rebinding
            if token:  # from the address or the cookie, never a body: nothing is read from a stranger
                jar = http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
                given = params.pop("token", None)
                same = lambda s: hmac.compare_digest(s.encode(), token.encode())  # constant time, any text
                if given is not None and same(given):
                    return self.send(303, "", {"Location": url.path or "/", "Set-Cookie":
                                               f"polaris_token={token}; HttpOnly; SameSite=Strict; Path=/"})
                if "polaris_token" not in jar or not same(jar["polaris_token"].value):
                    return self.send(401, page("Access token", "<h1>Access token</h1><p>This page needs the access "
                                               "token that its command printed when it started.</p><form method=get>"
                                               "<input name=token size=30 autofocus> <button>Open</button></form>"))
            if method == "POST":
                origin = self.headers.get("Origin")
                if origin and urllib.parse.urlsplit(origin).netloc != self.headers.get("Host"):
                    return self.send(403, page("Refused", "<h1>A form from another site was refused.</h1>"))
                size = self.headers.get("Content-Length", "").strip()
                if not (size.isascii() and size.isdigit()):  # missing, negative or not a number: read(-1) never ends
                    return self.send(400, page("Refused", "<h1>A form needs a Content-Length.</h1>"))
                if int(size) > MAX_BODY:
                    return self.send(413, page("Refused", f"<h1>A form of over {MAX_BODY:,} bytes was refused.</h1>"))
                params.update(urllib.parse.parse_qsl(self.rfile.read(int(size)).decode("utf-8", "replace")))
            try:
                status, body, headers = app(method, url.path, params)
            except Exception as e:  # noqa: BLE001 -- one bad request must not end the server
                status, body, headers = 500, page("Error", f"<h1>Error</h1><pre>{esc(e)}</pre>"), {}
            self.send(status, body, headers)

        def send(self, status, body, headers=None):
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            headers = dict(headers or {})
            headers.setdefault("Content-Type", "text/html; charset=utf-8")
            headers.setdefault("Content-Security-Policy", csp(script))
            for k, v in dict(headers, **{"Content-Length": str(len(data)), "Cache-Control": "no-store",
                                         "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass  # one line per request would drown the address

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{server.server_address[1]}/" + (f"?token={token}" if token else "")
    print(f"{what} at {url}" + ("" if token is None else "\n  (the token in this address is the page's password: "
                                "give it only to the people who should see the stories)") + "\n  Ctrl-C stops it",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()

# -----------------------------------------------------------------------------
# the annotation page: one item at a time, blind, A or B or tie


ANNOTATE_JS = """
const f = document.getElementById('choose'); let sent = false;
f.addEventListener('submit', e => { if (sent) { e.preventDefault(); return; } sent = true;
  setTimeout(() => f.querySelectorAll('button').forEach(b => b.disabled = true), 0); });
document.addEventListener('keydown', e => {
  if (e.target.tagName === 'TEXTAREA' || e.target.tagName === 'INPUT' || e.ctrlKey || e.metaKey || e.altKey) return;
  const b = f.querySelector('button[data-key="' + e.key.toLowerCase() + '"]');
  if (b) { e.preventDefault(); f.requestSubmit(b); } });
"""

HOW = ("<details{}><summary>How to judge</summary><p>Each item is one request and two stories written for it by two "
       "different writers, in a random order. Read both, then choose the one you would rather read as the "
       "answer to the request: <b>A</b>, <b>B</b>, or <b>tie</b> when you cannot choose. A story is not better for "
       "being longer; the requested length is measured apart, so judge the writing. A line on "
       "why helps but is optional. Keys: <kbd>a</kbd>, <kbd>b</kbd>, <kbd>t</kbd> (outside the text box). Each "
       "choice is saved at once: you may stop at any time and come back later. \"Take back\" removes your last "
       "choice and shows that item again.</p></details>")


def undo_form(last):
    return (f"<form method=post action=/undo style='display:inline'><input type=hidden name=item value={last}>"
            "<button>Take back the last choice</button></form>") if last else ""


def annotation_page(name, item, a, b, done, total, last, note="", reason="", saved=""):
    """The page for one item: the request, story A and story B side by side (stacked on a narrow
    window), the three choices and a reason. Nothing names a model, a file or a score. `saved`
    confirms the choice just made ("saved: A for item 3")."""
    status = [f"annotator {esc(name)}", f"<progress max={total} value={done}></progress> {done} done",
              f"<span class=saved>{esc(saved)}</span>" if saved else "", undo_form(last)]
    head = (f"<h1>Which story is better? <span class=muted>{done + 1} / {total}</span></h1>"
            # a div, not a p: a form inside a p ends the p before it, leaving the line's last "·" alone
            f"<div class=muted>{' &middot; '.join(p for p in status if p)}</div>{HOW.format('' if done else ' open')}"
            + (f"<p class=note>{esc(note)}</p>" if note else ""))
    body = (f"{head}<div class=prompt><b>The request:</b> {esc(item['prompt'])}</div>"
            f"<form id=choose method=post action=/choose><input type=hidden name=item value={item['item']}>"
            f"<div class=pair><article><h2>Story A</h2><div class=story>{esc(a)}</div></article>"
            f"<article><h2>Story B</h2><div class=story>{esc(b)}</div></article></div>"
            "<div class=bar><button class=pick name=choice value=A data-key=a>A is better <kbd>a</kbd></button>"
            "<button class=pick name=choice value=tie data-key=t>Tie <kbd>t</kbd></button>"
            "<button class=pick name=choice value=B data-key=b>B is better <kbd>b</kbd></button>"
            f"<textarea name=reason maxlength={REASON_CHARS} placeholder='Why? (optional)'>{esc(reason)}</textarea>"
            "</div></form>")
    return page(f"Story study {done + 1} / {total}", body, ANNOTATE_JS)


def annotation_done(name, total, last, saved=""):
    return page("Story study: done", f"<h1>All {total} items have a choice. Thank you, {esc(name)}.</h1>"
                + (f"<p class=saved>{esc(saved)}</p>" if saved else "")
                + f"<p>Your choices are saved; you can close this tab.</p>{undo_form(last)}")

# -----------------------------------------------------------------------------
# the report: one file that opens from disk with no network


def report_page(title, sections):
    """sections: [(heading, html)] -> a whole page with a table of contents. No script at all:
    stories fold with <details>; the policy is written into the page itself."""
    toc = "".join(f"<a href='#s{k}'>{esc(h)}</a> " for k, (h, _) in enumerate(sections))
    body = f"<h1>{esc(title)}</h1><nav>{toc}</nav>" + "".join(
        f"<section id=s{k}><h2>{esc(h)}</h2>{content}</section>" for k, (h, content) in enumerate(sections))
    return page(title, body).replace("<meta charset=utf-8>", "<meta charset=utf-8><meta http-equiv="
                                     f"Content-Security-Policy content=\"{csp()}\">", 1)


def scores_table(scores):
    """The judge's 16 scores, 0-10: the first 8 count for a story, the last 8 against it."""
    sign = {n: s for n, s, _ in rubric.DIMENSIONS}
    return "<table class=scores><tr><th>0-10</th><th></th></tr>" + "".join(
        f"<tr><td>{esc(k)}{' <span class=muted>(against)</span>' if sign.get(k, 1) < 0 else ''}</td>"
        f"<td class=n>{esc(f'{v:g}') if isinstance(v, (int, float)) else 'N/A'}</td></tr>"
        for k, v in scores.items()) + "</table>"


def reply_details(reply):
    """The judge's reply (its analysis, then its scores), folded."""
    return f"<details><summary>the judge's reply</summary><div class=reply>{esc(reply)}</div></details>" if reply else ""


def prompt_details(anchor, summary, prompt, stories):
    """One prompt, folded: its request, then its stories side by side (stacked on a narrow window),
    each under its heading and facts, with the judge's scores and reply folded beneath it.
    stories: [(heading, facts, story, scores or None, reply or None)]."""
    cols = "".join(f"<article><h4>{esc(head)}</h4><p class=muted>{esc(facts)}</p><div class=story>{esc(story)}</div>"
                   + (f"<details><summary>16 scores</summary>{scores_table(scores)}</details>" if scores else "")
                   + f"{reply_details(reply)}</article>" for head, facts, story, scores, reply in stories)
    return (f"<details id={anchor}><summary>{esc(summary)}</summary><div class=prompt>{esc(prompt)}</div>"
            f"<div class=cols>{cols}</div></details>")


def contents(groups):
    """A list of links, a line a group: groups [(heading, [(anchor, label)])]."""
    lines = [f"<p><b>{esc(head)}</b>: " + " ".join(f"<a href='#{a}'>{esc(label)}</a>" for a, label in links) + "</p>"
             for head, links in groups if links]
    return "<nav class=toc>" + "".join(lines) + "</nav>"

# -----------------------------------------------------------------------------
# the run viewer: a training run's charts and stories, read from its out_dir as it grows


STORY_CHARS = 1_000_000  # of a story the viewer shows (the longest real ones are ~100,000); past it, how much more
LINE_BYTES = 16 * 1024 * 1024  # a line over this is never parsed: named as too large, by file:line
CHUNK = 1024 * 1024  # a line is read this much at a time, so that one of any size costs bounded memory


def _problem(e):
    return "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not JSON"


class LineIndex:
    """Where each line of a JSONL file starts, by a key read off the line's head ("step" or "id"),
    so that a step of a 150 MB rollouts.jsonl is read when asked, never the whole file into
    memory. Lines are read a chunk at a time: a line of any size costs one pass and bounded
    memory, and one over max_line bytes is never parsed. Lines are indexed as they are completed,
    so a run that is still writing is followed; a file that shrank (rewritten on resume) is indexed
    again from its start. A line that is not a row (not UTF-8, not JSON, null, too large, a key
    not of `types`, or a row that valid() refuses) is left out and kept in `broken`: {line: why}."""

    def __init__(self, path, key, types=(int, str), valid=lambda r: True, max_line=LINE_BYTES):
        self.path, self.key, self.types, self.valid, self.max_line = path, key, types, valid, max_line
        self.head = re.compile(rb'^\{"' + key.encode() + rb'": ("(?:[^"\\]|\\.)*"|-?\d+)')
        # offsets: key -> [(byte offset, size, line number)]
        self.offsets, self.broken, self.done, self.lines, self.inode = {}, {}, 0, 0, None

    def refresh(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self
        if st.st_size < self.done or st.st_ino != self.inode:
            self.offsets, self.broken, self.done, self.lines, self.inode = {}, {}, 0, 0, st.st_ino
        with open(self.path, "rb") as f:
            f.seek(self.done)
            while True:
                parts, size, chunk = [], 0, b""
                while not chunk.endswith(b"\n"):
                    chunk = f.readline(CHUNK)
                    if not chunk:
                        return self  # being written: indexed once it is whole
                    if size <= self.max_line:  # past max_line only the head is kept
                        parts.append(chunk)
                    size += len(chunk)
                self.lines += 1
                line = b"".join(parts)
                if line.strip():
                    k, why = self._key(line, size)
                    if why:
                        self.broken[self.lines] = why
                    else:
                        self.offsets.setdefault(k, []).append((self.done, size, self.lines))
                self.done += size

    def too_large(self, size):
        return f"a line of {size:,} bytes: too large to show, over {self.max_line:,}"

    def _key(self, line, size):
        """(key, None) for a line that holds a row, read off its head where it can be; else (None, why)."""
        m = self.head.match(line)
        if not m and size > self.max_line:
            return None, self.too_large(size)
        try:
            row = None if m else json.loads(line)
            k = json.loads(m.group(1)) if m else row.get(self.key) if isinstance(row, dict) else None
        except ValueError as e:
            return None, _problem(e)
        if isinstance(k, bool) or not isinstance(k, self.types):
            return None, f"not a row with {'an integer' if self.types == (int,) else 'a'} {self.key}"
        return k, None

    def rows(self, k):
        """The rows of key k, each read by its offset when asked, one at a time; a line that turns
        out not to be a row (too large to parse, broken after its head) goes to `broken` instead."""
        if k not in self.offsets:
            return
        with open(self.path, "rb") as f:
            for at, size, line in self.offsets[k]:
                if size > self.max_line:
                    self.broken[line] = self.too_large(size)
                    continue
                f.seek(at)
                try:
                    row = json.loads(f.read(size))
                except ValueError as e:
                    self.broken[line] = _problem(e)
                    continue
                if isinstance(row, dict) and self.valid(row):
                    yield row
                else:
                    self.broken[line] = "not a row of this file"


def left_out(indexes):
    """One note naming each line the viewer left out, as file:line and why (ten a file at most)."""
    parts = []
    for index in indexes:
        name, broken = os.path.basename(index.path), sorted(index.broken.items())
        parts += [f"{name}:{line} ({why})" for line, why in broken[:10]]
        parts += [f"{len(broken) - 10} more lines of {name}"] if len(broken) > 10 else []
    return f"<p class=note>Left out: {esc('; '.join(parts))}.</p>" if parts else ""


def run_status(out_dir, last):
    """(state, one sentence) of the run in out_dir whose last logged step is `last` (None before
    any): 'waiting' for a run to start, 'running', 'finished' at its max_steps, or 'stopped' before
    them with no live run holding its run.lock. Only 'waiting' and 'running' can still change."""
    settings = rundir.settings(out_dir)
    goal = settings.get("max_steps")
    if isinstance(goal, int) and last is not None and last >= goal:
        return "finished", f"finished: all {goal} steps"
    if rundir.holder(os.path.join(out_dir, "run.lock"), settings.get("lock_stale_s", 120.0))[1]:
        return "running", (f"running: {last} of {goal or '?'} steps done" if last is not None else
                           "the run is starting: no step yet")
    if not settings and last is None:
        return "waiting", (f"waiting for a run to start in {out_dir}" if os.path.isdir(out_dir) else
                           f"waiting for a run to start: {out_dir} does not exist yet")
    if not settings:  # a folder from before run.json: how many steps it was to run is unknown
        return "stopped", f"not running: its last step is {last}"
    return "stopped", f"stopped at step {last} of {goal}" if last else f"stopped before its first step (of {goal})"


VIEWER_JS = """
const now = document.getElementById('status').dataset.state;
setInterval(() => fetch('state').then(r => r.text())
  .then(s => { if (s !== now) location.reload(); }).catch(() => {}), 2000);
"""


def run_viewer(out_dir, max_line=LINE_BYTES, max_story=STORY_CHARS, back=""):
    """app(method, path, params) for a run folder: the charts of metrics.jsonl, and a step's groups
    from rollouts.jsonl. The folder may not exist yet: the page waits for the run. While the run
    may still change, every page asks /state every 2 seconds (VIEWER_JS) and reloads when the run
    moved on; a finished or stopped run's page asks nothing. A folder from before run.json counted
    steps from 0 in its files and kept each reference's text in its rows: shown with steps from 1
    all the same. A line that is not a row is left out and named on the page; a story is shown up
    to max_story characters. Links are relative, so that the viewer can be served under a path of
    its own (several runs: compare.viewer); `back` links to the page above it."""
    path = lambda name: os.path.join(out_dir, name)
    is_story = lambda r: (isinstance(r.get("group"), int) and isinstance(r.get("id"), (int, str))
                          and isinstance(r.get("story"), (str, type(None))))
    rollouts = LineIndex(path("rollouts.jsonl"), "step", (int,), is_story, max_line)
    refs = LineIndex(path("references.jsonl"), "id", valid=lambda r: isinstance(r.get("story"), str), max_line=max_line)
    logged = LineIndex(path("metrics.jsonl"), "step", (int,), lambda r: type(r.get("step")) is int, max_line)
    lock = threading.Lock()  # the indexes grow as they are read: one request at a time

    def app(method, route, params):
        with lock:
            return answer(route, params)

    def shown(r):  # a reference's text from references.jsonl; a story past max_story cut, saying how much more
        if r.get("story") is None:
            r["story"] = next((x["story"] for x in refs.rows(r["id"])), "(the reference's text is not in "
                              "references.jsonl)") if r.get("is_ref") else ""
        r["more"] = max(0, len(r["story"]) - max_story)
        r["story"] = r["story"][:max_story]
        return r

    def read():  # (steps with stories, metrics by step, the run's state, its sentence, what a page compares)
        shift = 0 if os.path.exists(path("run.json")) else 1
        steps = sorted(s + shift for s in rollouts.refresh().offsets)
        refs.refresh()
        metrics = {}
        for s in sorted(logged.refresh().offsets):
            for r in logged.rows(s):
                metrics.setdefault(s + shift, {}).update(r, step=s + shift)
        last = max([*steps, *metrics], default=None)
        state, sentence = run_status(out_dir, last)
        return shift, steps, metrics, state, sentence, f"{state} {last} {len(steps)} {logged.lines}"

    def answer(route, params):
        if route not in ("/", "/state"):
            return 404, page("Not found", "<h1>Not found</h1>"), {}
        shift, steps, metrics, state, sentence, token = read()
        if route == "/state":
            return 200, token, {"Content-Type": "text/plain; charset=utf-8"}
        try:
            step = int(params.get("step") or (steps[-1] if steps else max(metrics, default=0)))
        except ValueError:
            return 400, page("Bad step", f"<h1>No step {esc(params.get('step'))}</h1><a href='.'>the latest step</a>"), {}
        stories = [shown(r) for r in rollouts.rows(step - shift)]
        status = f"<p id=status class=status data-state='{esc(token)}'>{esc(sentence)}</p>"
        body = run_page(out_dir, steps, step, metrics, stories, status + left_out((rollouts, logged, refs)),
                        script=VIEWER_JS if state in ("waiting", "running") else "", back=back)
        return 200, body, {}
    app.status = lambda: read()[3:5]  # (state, sentence), for the command that serves the page
    return app


def run_charts(metrics):
    rows = [metrics[s] for s in sorted(metrics)]
    line = lambda key: [(r["step"], r[key], None, None) for r in rows if isinstance(r.get(key), (int, float))]
    charts = [("Reward", [("stories", line("reward")), ("human references", line("ref_reward"))], "reward"),
              ("Story Quality", [("stories (training judge)", line("sq")), ("held-out (evaluation judge)",
                                                                          line("heldout_sq"))], "SQ"),
              ("Length ratio", [("stories", line("length_ratio")), ("held-out", line("heldout_length_ratio"))],
               "words / requested"),
              ("HRI: the reference's advantage, rank", [("ref_adv", line("ref_adv")), ("ref_rank", line("ref_rank"))], ""),
              ("HRI: reference NLL, policy entropy", [("ref_nll", line("ref_nll")),
                                                                    ("entropy", line("entropy"))], "nats a token")]
    return "".join(chart(t, s, y_label=y, x_label="step", w=390, h=240) for t, s, y in charts)


def _num(x, f):
    """x formatted, or '-' where a row holds no number (a judge that failed, a row written by hand)."""
    return format(x, f) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def story_card(r, label):
    judged = r.get("error")
    scores = r["scores"] if isinstance(r.get("scores"), dict) else {}
    facts = (f"reward {_num(r.get('reward'), '.1f')} &middot; advantage {_num(r.get('adv'), '+.2f')} &middot; "
             f"SQ {_num(r.get('sq'), '.1f')} &middot; {rubric.count_words(r['story'])} words"
             f"{' shown' if r.get('more') else ''}, ratio {_num(r.get('ratio'), '.2f')}"
             + (" &middot; truncated" if r.get("truncated") else ""))
    return (f"<div class='card{' ref' if r.get('is_ref') else ''}'><b>{esc(label)}</b><br><span class=muted>{facts}</span>"
            + (f"<p class=fail>judge failed: {esc(judged)}</p>" if judged else "")
            + (f"<details><summary>16 scores</summary>{scores_table(scores)}</details>" if scores else "")
            + reply_details(r.get("judge_reply"))
            + f"<div class=story style='max-height:24em;overflow-y:auto;font-size:15px'>{esc(r['story'])}</div>"
            + (f"<p class=note>cut here: {r['more']:,} more characters not shown</p>" if r.get("more") else "")
            + "</div>")


def run_page(out_dir, steps, step, metrics, stories, note="", script="", back=""):
    """A step of a run: the charts, the step's numbers, its best and worst story, and each group's
    stories side by side beside its prompt, the human reference marked; `note` (html) under the
    title; `script`, the page's one script. A run with nothing logged yet: the title and the note."""
    if not steps and not metrics:
        return page(f"{out_dir}: no step yet", f"<h1>{esc(out_dir)}</h1>{note}", script)
    nav = "".join(f"<a href='?step={s}'>{label}</a>" for s, label in (
        (steps[0] if steps else None, "first"), (step - 1, "previous"), (step + 1, "next"), (steps[-1] if steps else None, "latest"))
        if s in steps)
    nav = (f"<a href='{esc(back)}'>all runs</a>" if back else "") + nav
    form = (f"<form method=get style='display:inline'>step <input name=step type=number min=0 value={step} "
            f"style='width:5em'> <button>show</button></form> of {len(steps)} logged")
    m = metrics.get(step, {})
    numbers = " &middot; ".join(f"{k} {m[k]:.2f}" for k in ("reward", "ref_reward", "sq", "length_ratio", "entropy",
                                                            "ref_adv", "ref_nll", "heldout_sq") if isinstance(m.get(k), (int, float)))
    body = [f"<h1>{esc(out_dir)}: step {step}</h1><nav>{nav} {form}</nav>{note}", run_charts(metrics),
            f"<h2>Step {step}</h2><p>{numbers or 'no metrics for this step'}</p>"]
    if not stories:
        return page(f"{out_dir} step {step}", "".join(body) + "<p class=muted>No stories at this step.</p>", script)
    rolled = sorted((r for r in stories if not r.get("is_ref") and isinstance(r.get("reward"), (int, float))
                     and r["reward"] == r["reward"]), key=lambda r: r["reward"])
    if rolled:
        body.append("<h2>The best and the worst story of the step</h2><div class=pair>"
                    + story_card(rolled[-1], f"best: group {rolled[-1]['group']}, {rolled[-1]['id']}")
                    + story_card(rolled[0], f"worst: group {rolled[0]['group']}, {rolled[0]['id']}") + "</div>")
    groups = {}
    for r in stories:
        groups.setdefault(r["group"], []).append(r)
    for g, rs in sorted(groups.items()):
        prompt = next((r["prompt"] for r in rs if r.get("prompt")), None)
        body.append(f"<h2>Group {g}: {esc(rs[0]['id'])}</h2><div class=prompt>"
                    + (esc(prompt) if prompt else "<span class=muted>(this run's logs do not record the prompt)</span>")
                    + "</div><div class=grid>" + "".join(
                        story_card(r, "human reference" if r.get("is_ref") else f"story {j + 1}") for j, r in enumerate(rs))
                    + "</div>")
    return page(f"{out_dir} step {step}", "".join(body), script)
