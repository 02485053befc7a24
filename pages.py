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
import math
import secrets
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import rubric


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

def md_table(head, rows):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])

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
# the report's and the viewer's pieces: a page with contents, a story's scores, the judge's reply


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

# -----------------------------------------------------------------------------
# the server: one app function, a token off the loopback


LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 64 * 1024  # bytes of a POST: the forms send an item, a choice and a reason (2,000 characters)


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


# -----------------------------------------------------------------------------
# the report: one file that opens from disk with no network


# -----------------------------------------------------------------------------
# the run viewer: a training run's charts and stories, read from its out_dir as it grows


