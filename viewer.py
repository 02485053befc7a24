"""
The run viewer: a training run's charts and each step's stories, read from its out_dir as it grows
(`eval.py --task=rollouts`). rollouts.jsonl is indexed by byte offset and a step read when asked,
so a paper-sized file opens in a fraction of a second; a line of any size costs bounded time and
memory; a broken line is left out and named. The page follows a run from before its first step
to its last, and says when it finished or stopped.
"""
import json
import os
import re
import threading

import rubric
import rundir
from pages import chart, esc, page, reply_details, scores_table

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
