"""
The blinded human study: drawn once from two generation files (each item one prompt and its two
stories, which model wrote each in the study file alone), then one page per annotator: one item at
a time, A or B or tie, each choice saved at once; which model is A and the items' order are each
annotator's own, from the study's content and the name. The report reads the choices back.
"""
import datetime
import glob
import hashlib
import os
import re
import sys
import threading
import time
import urllib.parse

import numpy as np

import jsonl
import pages
import rundir
from rubric import BUCKETS, bucket

REASON_CHARS = 2000  # the reason's length: the textarea's maxlength, and refused by the server beyond it

def draw(gens_by_file, n, out, seed):
    """N prompts that both generation files ({file: (model, rows)}) cover, stratified by
    requested-length bucket (equal shares as far as each bucket has prompts), drawn once with
    `seed` and shown in a shuffled order; each item holds both stories and which model wrote each.
    Prompts whose two stories are the same are left out, with a warning. Returns what it drew,
    a line of words."""
    if os.path.exists(out):
        raise ValueError(f"{out} exists: a study is drawn once for all its annotators; remove it or give another --out")
    gen_files = list(gens_by_file)
    (name_a, rows_a), (name_b, rows_b) = gens_by_file.values()
    a, b = {r["id"]: r for r in rows_a}, {r["id"]: r for r in rows_b}
    shared = [i for i in a if i in b]
    for i in shared:
        if (a[i]["prompt"], a[i]["target_words"]) != (b[i]["prompt"], b[i]["target_words"]):
            raise ValueError(f"prompt id {i!r} has another prompt in {gen_files[0]} than in {gen_files[1]}")
    same = [i for i in shared if a[i]["story"].split() == b[i]["story"].split()]
    if same:  # a choice between two identical stories measures nothing
        if len(same) == len(shared):
            raise ValueError(f"{gen_files[0]} and {gen_files[1]} hold the same story for each of the "
                             f"{len(shared)} prompts they share: give the generations of two different models")
        print(f"warning: {len(same)} of the {len(shared)} prompts both files cover have the same story in both, "
              f"left out of the draw: {', '.join(map(str, same[:10]))}{' ...' if len(same) > 10 else ''}", file=sys.stderr)
        shared = [i for i in shared if i not in same]
    if not 0 < n <= len(shared):
        raise ValueError(f"--n={n}: the two files share {len(shared)} prompts"
                         + (" with two different stories" if same else ""))
    by_bucket = {b_: [i for i in shared if bucket(a[i]["target_words"]) == b_] for b_, _ in BUCKETS}
    want = dict.fromkeys(by_bucket, 0)
    while sum(want.values()) < n:  # one more to each bucket that has one left, in turn
        for b_ in want:
            if want[b_] < len(by_bucket[b_]) and sum(want.values()) < n:
                want[b_] += 1
    rng = np.random.default_rng(seed)
    chosen = [ids[k] for b_, ids in by_bucket.items() for k in sorted(rng.permutation(len(ids))[:want[b_]])]
    chosen = [chosen[k] for k in rng.permutation(len(chosen))]
    jsonl.write(out, [dict(item=k, id=i, prompt=a[i]["prompt"], target_words=a[i]["target_words"],
                           bucket=bucket(a[i]["target_words"]), category=a[i].get("category", ""), seed=seed,
                           stories=[dict(model=name_a, file=gen_files[0], story=a[i]["story"]),
                                    dict(model=name_b, file=gen_files[1], story=b[i]["story"])])
                      for k, i in enumerate(chosen, 1)])
    return (f"wrote {n} items to {out} (" + ", ".join(f"{k} {b_}" for b_, k in want.items() if k) + ") of the "
            f"{len(shared)} prompts both files cover{' with two different stories' if same else ''}, seed {seed}")


def read_study(path):
    """A study file's items (python eval.py --task=study writes them), each checked."""
    items = []
    for line, r in jsonl.read(path, numbered=True):
        stories = r.get("stories") if isinstance(r, dict) else None
        if not (isinstance(stories, list) and isinstance(r.get("item"), int) and "id" in r and isinstance(r.get("prompt"), str)
                and len(stories) == 2 and all(isinstance(s, dict) and isinstance(s.get("model"), str)
                                              and isinstance(s.get("story"), str) for s in stories)
                and stories[0]["model"] != stories[1]["model"]):
            raise ValueError(f"{path}:{line}: a study item needs item, id, prompt and two stories by two models "
                             "(python eval.py --task=study writes them)")
        items.append(r)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def study_tag(path):
    """What ties an annotations folder to its study: a hash of the study file's content, so that
    two studies both named study.jsonl are never merged."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def annotation_problem(r):
    """Why a row of an annotations file is not one that --task=annotate wrote, or None."""
    if not (isinstance(r, dict) and isinstance(r.get("item"), int) and "id" in r
            and r.get("choice") in ("A", "B", "tie")
            and all(isinstance(r.get(k), str) and r[k] for k in ("study", "model_a", "model_b"))):
        return ("not an annotation (item, id, study, model_a, model_b and a choice A, B or tie, as --task=annotate "
                "writes them): remove or correct this line")
    return None


def annotation_plan(items, tag, annotator):
    """(the items in the order this annotator sees them, the items whose second story is shown as A).
    Each annotator has an order of their own. Sides are balanced within each requested-length
    bucket; the odd item of an odd bucket shows the second model as A by the parity of a hash of
    (study, annotator, bucket), so that the extra A cancels across annotators. Both follow from the
    study's content and the name alone: a restarted page shows the same."""
    seed = lambda *key: int.from_bytes(hashlib.sha256(":".join(map(str, key)).encode()).digest()[:8], "big")
    rng = np.random.default_rng(seed(tag, annotator))
    order = [items[k] for k in rng.permutation(len(items))]
    flipped = set()
    for b in sorted({str(it.get("bucket")) for it in items}):
        its = [it["item"] for it in items if str(it.get("bucket")) == b]
        k = len(its) // 2 + len(its) % 2 * (seed(tag, annotator, b) % 2)
        flipped |= {its[j] for j in rng.permutation(len(its))[:k]}
    return order, flipped


def read_annotations(folder):
    """Every annotator's choices in folder, one NAME.jsonl each, checked: [(annotator, prompt
    id, model shown as A, model shown as B, 'A' | 'B' | 'tie')]. Read only: a page may be writing.
    All must be of one study: rows name it by its content hash, or (written before the hash) by
    the name of the study file beside the folder, which is then hashed."""
    files = sorted(glob.glob(os.path.join(folder, "*.jsonl")))
    if not files:
        raise ValueError(f"{folder}: no annotation files (NAME.jsonl, written by --task=annotate)")
    votes, studies, tags = [], {}, {}
    for f in files:
        for line, r in jsonl.read(f, numbered=True):
            problem = annotation_problem(r)
            if problem:
                raise ValueError(f"{f}:{line}: {problem}")
            if r["study"] not in tags:
                beside = os.path.join(os.path.dirname(os.path.abspath(folder)), r["study"])
                old = not r["study"].startswith("sha256:") and os.path.basename(r["study"]) == r["study"]
                tags[r["study"]] = study_tag(beside) if old and os.path.isfile(beside) else r["study"]
            studies.setdefault(tags[r["study"]], f)
            votes.append((os.path.basename(f)[: -len(".jsonl")], r["id"], r["model_a"], r["model_b"], r["choice"]))
    if len(studies) > 1:  # the same prompt id in two studies would merge two items
        named = ", ".join(f"{s[:19]} in {f}" for s, f in studies.items())
        raise ValueError(f"{folder} holds the choices of several studies ({named}): give each study its own folder")
    return votes

# -----------------------------------------------------------------------------
# the annotation page


def annotation_app(study, annotator):
    """The checks before an annotator's page (the name, the study, the annotator's file tied to this
    study, one page per file: a lock), then app(method, route, params) for pages.serve: one item at
    a time in the annotator's own order, each choice appended at once. Returns (items, the file,
    its rows, app)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", annotator):
        raise ValueError(f"--annotator={annotator!r}: letters, digits, '-' and '_' only (it names the annotator's file)")
    items = read_study(study)
    tag, study_name = study_tag(study), os.path.basename(study)
    path = os.path.join(os.path.dirname(os.path.abspath(study)), "annotations", f"{annotator}.jsonl")
    rundir.take_lock(path[: -len(".jsonl")] + ".lock", 120.0)  # one page per annotator's file
    rows = jsonl.read(path, numbered=True, must_exist=False, repair=True)
    for line, r in rows:  # rows written before the hash name the study file instead
        problem = annotation_problem(r)
        if not problem and (r["study"] not in (tag, study_name) or r["item"] not in {it["item"] for it in items}):
            problem = (f"a choice for another study ({r['study'][:19]}, item {r['item']}; {study} is {tag[:19]}): "
                       "give each study its own folder")
        if problem:
            raise ValueError(f"{path}:{line}: {problem}")
    rows = [r for _, r in rows]
    lock, shown, undone = threading.Lock(), {}, {}  # when each item was first shown; choices taken back
    order, flipped = annotation_plan(items, tag, annotator)
    ab = lambda item: item["stories"][::-1] if item["item"] in flipped else item["stories"]

    def app(method, route, params):
        with lock:  # one choice at a time: a second tab or a double press finds its item chosen
            chosen = {r["item"] for r in rows}
            todo = [it for it in order if it["item"] not in chosen]
            last = rows[-1]["item"] if rows else None
            if method == "POST" and route == "/choose":
                reason = params.get("reason", "").strip()
                if todo and params.get("item") == str(todo[0]["item"]) and len(reason) > REASON_CHARS:
                    return 400, item_page(todo, note=f"Your choice was not saved: its reason is {len(reason):,} "
                                          f"characters, over the {REASON_CHARS:,} allowed. Shorten it and "
                                          "choose again.", reason=reason), {}
                if todo and params.get("item") == str(todo[0]["item"]) and params.get("choice") in ("A", "B", "tie"):
                    a, b = ab(todo[0])
                    row = dict(item=todo[0]["item"], id=todo[0]["id"], study=tag, annotator=annotator,
                               model_a=a["model"], model_b=b["model"], choice=params["choice"], reason=reason,
                               seconds=round(time.time() - shown.get(todo[0]["item"], time.time()), 1),
                               time=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
                    jsonl.append(path, [row], sync=True)
                    rows.append(row)
                    return 303, "", {"Location": f"/?saved={len(rows)}"}  # the next page says it was saved
                if rows and (str(last), rows[-1]["choice"]) == (params.get("item"), params.get("choice")):
                    return 303, "", {"Location": "/"}  # the same press twice: saved once, nothing to say
                return 303, "", {"Location": f"/?refused={urllib.parse.quote(params.get('item', ''))}"}
            if method == "POST" and route == "/undo":
                if rows and params.get("item") == str(last):
                    jsonl.write(path, rows[:-1])
                    undone[last] = rows.pop()
                    shown[last] = time.time()
                return 303, "", {"Location": "/"}
            if route != "/":
                return 404, pages.page("Not found", "<h1>Not found</h1>"), {}
            saved = ""  # the choice just made, numbered as the annotator saw it ("3 / 12")
            if rows and params.get("saved") == str(len(rows)):
                saved = f"saved: {rows[-1]['choice']} for item {len(rows)}"
            if not todo:
                return 200, annotation_done(annotator, len(items), last, saved=saved), {}
            was = undone.get(todo[0]["item"])
            note = ("Your last choice was not recorded: its item has a choice already (from another tab?), or is not "
                    "the one shown now." if params.get("refused") else
                    f"You took back your choice ({was['choice']}) for this item." if was else "")
            return 200, item_page(todo, note=note, reason=was["reason"] if was else "", saved=saved), {}

    def item_page(todo, note, reason, saved=""):  # the first item without a choice
        shown.setdefault(todo[0]["item"], time.time())
        a, b = ab(todo[0])
        return annotation_page(annotator, todo[0], a["story"], b["story"], len(items) - len(todo), len(items),
                                     rows[-1]["item"] if rows else None, note=note, reason=reason, saved=saved)
    return items, path, rows, app


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
    status = [f"annotator {pages.esc(name)}", f"<progress max={total} value={done}></progress> {done} done",
              f"<span class=saved>{pages.esc(saved)}</span>" if saved else "", undo_form(last)]
    head = (f"<h1>Which story is better? <span class=muted>{done + 1} / {total}</span></h1>"
            # a div, not a p: a form inside a p ends the p before it, leaving the line's last "·" alone
            f"<div class=muted>{' &middot; '.join(p for p in status if p)}</div>{HOW.format('' if done else ' open')}"
            + (f"<p class=note>{pages.esc(note)}</p>" if note else ""))
    body = (f"{head}<div class=prompt><b>The request:</b> {pages.esc(item['prompt'])}</div>"
            f"<form id=choose method=post action=/choose><input type=hidden name=item value={item['item']}>"
            f"<div class=pair><article><h2>Story A</h2><div class=story>{pages.esc(a)}</div></article>"
            f"<article><h2>Story B</h2><div class=story>{pages.esc(b)}</div></article></div>"
            "<div class=bar><button class=pick name=choice value=A data-key=a>A is better <kbd>a</kbd></button>"
            "<button class=pick name=choice value=tie data-key=t>Tie <kbd>t</kbd></button>"
            "<button class=pick name=choice value=B data-key=b>B is better <kbd>b</kbd></button>"
            f"<textarea name=reason maxlength={REASON_CHARS} placeholder='Why? (optional)'>{pages.esc(reason)}</textarea>"
            "</div></form>")
    return pages.page(f"Story study {done + 1} / {total}", body, ANNOTATE_JS)


def annotation_done(name, total, last, saved=""):
    return pages.page("Story study: done", f"<h1>All {total} items have a choice. Thank you, {pages.esc(name)}.</h1>"
                + (f"<p class=saved>{pages.esc(saved)}</p>" if saved else "")
                + f"<p>Your choices are saved; you can close this tab.</p>{undo_form(last)}")
