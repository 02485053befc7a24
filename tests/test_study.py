"""The human study and the report: the draw, the statistics (the card's 67.5% [55.0, 80.0] among
them), the annotation page driven in headless Chromium as an annotator would, and report.html
opened from disk with every request but file:// failing the test."""
import hashlib
import html
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

import eval as ev
import humanstudy
import report
import rubric
import stats

SUB = dict(capture_output=True, text=True, timeout=300)
HOSTILE = "<script>alert('story')</script><img src=x onerror=alert('img')> "  # what a model could write


def run_eval(*args, check=True):
    p = subprocess.run([sys.executable, "eval.py", *args], **SUB)
    assert not check or p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


@pytest.fixture(scope="session")
def judged(tmp_path_factory):
    """Two models' generations for 18 prompts (6 per bucket), every story of the first carrying
    markup, scored and compared pairwise by the local judge over HTTP."""
    root = tmp_path_factory.mktemp("judged")
    prompts = [json.loads(l) for l in open("data/eval/prompts.jsonl")][::10]
    stories = [json.loads(l)["story"] for l in open("data/sample/train.jsonl")]
    gens = []
    for m, name in enumerate(("polaris-9b", "qwen-base")):
        gens.append(root / f"{name}.jsonl")
        with open(gens[-1], "w") as f:
            for k, p in enumerate(prompts):
                words = stories[(k + 5 * m) % len(stories)].split()
                story = HOSTILE + " ".join(words) if m == 0 else " ".join(words[::-1][: len(words) // 2])
                f.write(json.dumps(dict(id=p["id"], prompt=p["prompt"], target_words=p["target_words"],
                                        category=p["category"], model=name, story=story)) + "\n")
    common = [f"--gens={gens[0]},{gens[1]}", f"--judge_cache={root}/cache"]
    run_eval("--task=score", *common)
    run_eval("--task=pairwise", *common, f"--pairs={root}/pairs.jsonl")
    return root, [str(g) for g in gens]


# -----------------------------------------------------------------------------
# the draw and the statistics


def test_study_draws_each_bucket_alike_once(judged, tmp_path):
    root, gens = judged
    out = tmp_path / "s" / "study.jsonl"
    p = run_eval("--task=study", f"--gens={','.join(gens)}", "--n=9", f"--out={out}")
    items = [json.loads(l) for l in open(out)]
    assert [it["item"] for it in items] == list(range(1, 10)) and len({it["id"] for it in items}) == 9, "9 distinct prompts"
    counts = {b: sum(it["bucket"] == b for it in items) for b, _ in rubric.BUCKETS}
    assert set(counts.values()) == {3}, f"stratified: 3 per requested-length bucket, got {counts}"
    by_id = {json.loads(l)["id"]: json.loads(l) for l in open(gens[0])}
    for it in items:
        assert [s["model"] for s in it["stories"]] == ["polaris-9b", "qwen-base"] and it["stories"][0]["story"] == by_id[it["id"]]["story"]
        assert it["prompt"] == by_id[it["id"]]["prompt"] and it["category"] and it["seed"] == 1337
    assert "3 ID 1-4k, 3 near OOD 4-8k, 3 far OOD 8-12k" in p.stdout, p.stdout
    again = run_eval("--task=study", f"--gens={','.join(gens)}", "--n=9", f"--out={out}", check=False)
    assert again.returncode != 0 and "is drawn once" in again.stderr, "a study is never drawn over"
    other = tmp_path / "t" / "study.jsonl"
    run_eval("--task=study", f"--gens={','.join(gens)}", "--n=9", f"--out={other}")
    assert open(other).read() == open(out).read(), "the draw is the seed's"
    for args, why in (([f"--gens={gens[0]}", "--n=2"], "exactly two generation files"),
                      ([f"--gens={','.join(gens)}", "--n=19"], "--n=19: the two files share 18 prompts")):
        p = run_eval("--task=study", *args, f"--out={tmp_path}/x.jsonl", check=False)
        assert p.returncode != 0 and why in p.stderr and not (tmp_path / "x.jsonl").exists(), p.stderr


def votes_for(item_scores, annotators=2):
    """Votes whose per-item means are item_scores (1 = tuned, 0 = base, 0.5 a tie or a split)."""
    votes = []
    for i, s in enumerate(item_scores):
        pick = {1.0: ["A"] * annotators, 0.0: ["B"] * annotators, 0.5: ["tie", "tie"] if i % 2 else ["A", "B"]}[s]
        votes += [(f"h{k}", f"p{i}", "tuned", "base", c) for k, c in enumerate(pick[:annotators])]
    return votes


def test_human_win_rate_intervals_and_the_cards_arithmetic():
    # the card: 67.5% [55.0, 80.0]. 40 items, 23 won, 8 even (ties or split annotators), 9 lost
    # give exactly that; 60 items x 2 annotators cannot: even all-or-nothing items (the widest
    # spread a rate of 67.5% allows) give at most about [55.8, 79.2]
    [s] = stats.human_study(votes_for([1.0] * 23 + [0.5] * 8 + [0.0] * 9), order=["tuned"], n_boot=10000)
    assert (s["x"], s["y"], s["items"], s["annotators"], s["votes"]) == ("tuned", "base", 40, ["h0", "h1"], 80), s
    assert s["rate"] == pytest.approx(0.675) and (s["wins"], s["ties"], s["losses"]) == (23, 8, 9)
    assert s["ci"][0] == pytest.approx(0.55, abs=0.0126) and s["ci"][1] == pytest.approx(0.80, abs=0.0126), s["ci"]
    lo, hi = s["wilson"]
    assert lo == pytest.approx(0.5205, abs=1e-3) and hi == pytest.approx(0.7992, abs=1e-3), "Wilson's interval, n = 40 items"
    assert "conservative" in report.human_rows([s])[0][0][4], "Wilson's interval with n = items is labelled a conservative bound"
    [wide] = stats.human_study(votes_for([1.0] * 40 + [0.5] + [0.0] * 19), order=["tuned"], n_boot=10000)
    assert wide["rate"] == pytest.approx(0.675) and wide["items"] == 60
    assert wide["ci"][1] - wide["ci"][0] < 0.245, f"60 items cannot give a 25-point interval: {wide['ci']}"
    # the vote, not the item, as the unit would be narrower still: 120 independent votes
    votes = [(f"h{k % 2}", f"p{k}", "tuned", "base", "A" if k < 81 else "B") for k in range(120)]
    [flat] = stats.human_study(votes, order=["tuned"], n_boot=10000)
    assert flat["ci"][1] - flat["ci"][0] < wide["ci"][1] - wide["ci"][0], "items of two agreeing votes carry less"


def test_agreement_kappa_and_the_judge_against_people():
    # two annotators on 10 items: 6 alike (4 tuned, 2 tie), 4 apart (2 of them against a tie)
    first = ["A"] * 4 + ["tie"] * 2 + ["A", "B", "A", "tie"]
    second = ["A"] * 4 + ["tie"] * 2 + ["B", "A", "tie", "B"]
    votes = [(who, f"p{i}", "tuned", "base", c) for who, cs in (("ann", first), ("bea", second)) for i, c in enumerate(cs)]
    judged = {(f"p{i}", frozenset(("tuned", "base"))): "tuned" for i in range(10)}
    [s] = stats.human_study(votes, order=["tuned"], judged=judged, n_boot=50)
    [pair] = s["between"]
    assert pair["annotators"] == ("ann", "bea") and pair["items"] == 10
    assert pair["agreement"] == pytest.approx((0.6, 4 / 6, 6)), "with ties 6/10; without: 4 of the 6 tie-free items"
    # kappa by hand: p_o 0.6; marginals ann (6 tuned, 1 base, 3 tie), bea (5, 2, 3): p_e = (30 + 2 + 9) / 100
    assert pair["kappa"] == pytest.approx((0.6 - 0.41) / (1 - 0.41)), pair["kappa"]
    n, with_ties, without, kept = s["judge"]
    assert n == 20 and with_ties == pytest.approx(11 / 20), "the judge said tuned every time: 11 of 20 votes"
    assert (without, kept) == (pytest.approx(11 / 14), 14), "without ties: 14 votes, 11 for tuned"
    assert stats.kappa(["x", "y"] * 5, ["x", "y"] * 5, ("x", "y", "tie")) == 1.0, "perfect agreement"
    assert stats.wilson(1.0, 5)[1] == 1.0 and stats.wilson(0.0, 5)[0] == 0.0, "within [0, 1]"


def test_each_annotator_has_an_order_and_balanced_sides_of_their_own():
    items = [dict(item=k, bucket=b) for k, b in enumerate(["ID"] * 5 + ["near"] * 4 + ["far"] * 3, 1)]
    extra, orders = {"ID": 0, "far": 0}, set()
    for k in range(200):
        order, flipped = humanstudy.annotation_plan(items, "sha256:one", f"ann{k}")
        assert (order, flipped) == humanstudy.annotation_plan(items, "sha256:one", f"ann{k}"), "a restarted page shows the same"
        assert sorted(it["item"] for it in order) == list(range(1, 13)), "every item once"
        for b, size in (("ID", 5), ("near", 4), ("far", 3)):
            n = sum(it["item"] in flipped for it in items if it["bucket"] == b)
            assert n in (size // 2, (size + 1) // 2), f"{b}: the second model is A on {n} of {size} items"
            extra[b] = extra.get(b, 0) + (n > size // 2)
        orders.add(tuple(it["item"] for it in order))
    assert len(orders) > 190, f"each annotator sees an order of their own: {len(orders)} orders for 200"
    assert all(70 < extra[b] < 130 for b in ("ID", "far")), f"an odd bucket's extra A goes either way: {extra}"
    assert humanstudy.annotation_plan(items, "sha256:two", "ann0") != humanstudy.annotation_plan(items, "sha256:one", "ann0"), \
        "another study, another plan"


def test_a_study_leaves_out_identical_stories(tmp_path):
    a, b, c = (tmp_path / f"{m}.jsonl" for m in "abc")
    row = lambda k, m, story: json.dumps(dict(id=f"p{k}", prompt="Write a story.", target_words=1000 + 4000 * (k % 3),
                                              model=m, story=story)) + "\n"
    a.write_text("".join(row(k, "a", f"The story {k} by a.") for k in range(6)))
    b.write_text("".join(row(k, "b", f"The story {k} by a." if k in (1, 3) else f"Story {k} by b.") for k in range(6)))
    c.write_text("".join(row(k, "c", f"The story {k}  by a.\n") for k in range(6)))
    p = run_eval("--task=study", f"--gens={a},{b}", "--n=4", f"--out={tmp_path}/s.jsonl")
    assert "2 of the 6 prompts both files cover have the same story in both, left out of the draw: p1, p3" in p.stderr, \
        p.stderr
    ids = {json.loads(l)["id"] for l in open(tmp_path / "s.jsonl")}
    assert len(ids) == 4 and not ids & {"p1", "p3"}, f"no item of two identical stories: {ids}"
    p = run_eval("--task=study", f"--gens={a},{c}", "--n=4", f"--out={tmp_path}/t.jsonl", check=False)
    assert p.returncode != 0 and "hold the same story for each of the 6 prompts they share" in p.stderr, p.stderr
    assert not (tmp_path / "t.jsonl").exists(), "nothing drawn"


def test_an_annotations_folder_belongs_to_one_study_by_its_content(tmp_path):
    studies = []
    for name in ("one", "two"):  # two studies, both named study.jsonl
        (tmp_path / name).mkdir()
        studies.append(tmp_path / name / "study.jsonl")
        studies[-1].write_text("".join(json.dumps(dict(item=k, id=f"p{k}", prompt="Write.", target_words=100, bucket="ID",
                                                       stories=[dict(model="x", story=f"{name} {k} x"),
                                                                dict(model="y", story=f"{name} {k} y")])) + "\n"
                                       for k in (1, 2)))
    one, two = (humanstudy.study_tag(str(s)) for s in studies)
    folder = tmp_path / "one" / "annotations"
    folder.mkdir()
    vote = lambda study, **k: json.dumps(dict(dict(item=1, id="p1", study=study, model_a="x", model_b="y", choice="A"), **k))
    (folder / "ann.jsonl").write_text(vote(one) + "\n")
    (folder / "bea.jsonl").write_text(vote("study.jsonl") + "\n")  # written before the hash: the file's name
    assert len(humanstudy.read_annotations(str(folder))) == 2, "a row tied by name reads as the study beside its folder"
    (folder / "cid.jsonl").write_text(vote(two) + "\n")  # the other study.jsonl's choices, moved here
    with pytest.raises(ValueError, match="holds the choices of several studies"):
        humanstudy.read_annotations(str(folder))
    p = run_eval("--task=annotate", f"--study={studies[0]}", "--annotator=cid", check=False)
    assert p.returncode != 0 and f"{folder}/cid.jsonl:1: a choice for another study" in p.stderr, p.stderr[-1000:]
    for bad in ("[]", vote(one, item=None)):  # a line that is not an annotation: named, with what to do
        (folder / "dan.jsonl").write_text(vote(one) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=r"dan.jsonl:2: not an annotation .* remove or correct this line"):
            humanstudy.read_annotations(str(folder))
        p = run_eval("--task=annotate", f"--study={studies[0]}", "--annotator=dan", check=False)
        assert p.returncode != 0 and p.stderr.startswith(f"error: {folder}/dan.jsonl:2: not an annotation") \
            and len(p.stderr.strip().splitlines()) == 1, p.stderr[-1000:]


def test_the_evaluation_prompts():
    rows = [json.loads(l) for l in open("data/eval/prompts.jsonl")]
    assert len(rows) == 180 and len({r["id"] for r in rows}) == 180
    assert {b: sum(rubric.bucket(r["target_words"]) == b for r in rows) for b, _ in rubric.BUCKETS} == \
        {"ID 1-4k": 60, "near OOD 4-8k": 60, "far OOD 8-12k": 60}, "60 per requested-length bucket"
    for b, _ in rubric.BUCKETS:
        cats = {r["category"] for r in rows if rubric.bucket(r["target_words"]) == b}
        assert len(cats) >= 8 and all(r["category"] for r in rows), f"{b}: every prompt has a category, {cats}"
    first = "".join(open("data/eval/prompts.jsonl").readlines()[:60])
    assert hashlib.sha256(first.encode()).hexdigest()[:16] == "f962fc3fd8cc5908", \
        "the first 60 prompts keep their places (their seeds)"

# -----------------------------------------------------------------------------
# the pages in a real browser


class Watched:
    """A browser page whose dialogs and requests are recorded: a test fails on any of either
    that it did not expect."""

    def __init__(self, browser, allowed, width=1280, height=900):
        self.context = browser.new_context(viewport=dict(width=width, height=height))
        self.page = self.context.new_page()
        self.dialogs, self.requests, self.refused = [], [], []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

        def route(r):
            self.requests.append(r.request.url)
            if allowed(r.request.url):
                return r.continue_()
            self.refused.append(r.request.url)
            r.abort()
        self.context.route("**/*", route)

    def close(self):
        self.context.close()


def start_page(*args):
    """eval.py serving a page (--task=annotate, rollouts) in a subprocess; returns (process, its address)."""
    p = subprocess.Popen([sys.executable, "eval.py", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    for line in p.stdout:
        m = re.search(r"at (http://\S+)", line)
        if m:
            return p, m.group(1)
        assert time.monotonic() < deadline, "the page never printed its address"
    raise AssertionError(p.stderr.read())


def stop_page(p):
    p.send_signal(signal.SIGINT)
    p.wait(timeout=20)
    p.stdout.close()
    p.stderr.close()


def raw_post(port, headers, body=b"", more=0):
    """A POST over a raw socket (a client library would mend what these tests break), then `more`
    chunks of 64 KB while the answer is read -> (status or None when none came in 10 s, answer)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    s.sendall(f"POST /choose HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}\r\n".encode() + body)

    def send_more():
        try:
            for _ in range(more):
                s.sendall(b"x" * 65536)
        except OSError:
            pass  # the server answered and closed without reading the rest
    sender = threading.Thread(target=send_more)
    sender.start()
    answer = b""
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except TimeoutError:
        pass  # a server still reading
    finally:
        s.close()
        sender.join()
    return (int(answer.split(b" ", 2)[1]) if answer else None), answer


def test_the_page_server_checks_a_form_before_reading_it(judged, tmp_path):
    root, gens = judged
    study = tmp_path / "study.jsonl"
    run_eval("--task=study", f"--gens={','.join(gens)}", "--n=3", f"--out={study}")
    first = humanstudy.annotation_plan([json.loads(l) for l in open(study)], humanstudy.study_tag(str(study)), "ann")[0][0]["item"]
    form = f"item={first}&choice=A&reason=".encode()
    server, url = start_page("--task=annotate", f"--study={study}", "--annotator=ann")
    port = int(url.split(":")[2].strip("/"))
    try:
        for headers, more, want in (({"Content-Length": "-1"}, 100, 400), ({}, 0, 400), ({"Content-Length": "abc"}, 0, 400),
                                    ({"Content-Length": str(70 * 1024)}, 2, 413)):
            status, _ = raw_post(port, headers, form, more)
            assert status == want, f"{headers}: {status}, not {want}, and at once"
        status, answer = raw_post(port, {"Content-Length": str(len(form) + 3000)}, form + b"x" * 3000)
        assert status == 400 and b"3,000 characters, over the 2,000 allowed" in answer, "a long reason refused out loud"
        status, _ = raw_post(port, {"Content-Length": str(len(form) + 4)}, form + b"fine")
        assert status == 303, status
    finally:
        stop_page(server)
    rows = [json.loads(l) for l in open(tmp_path / "annotations" / "ann.jsonl")]
    assert [(r["item"], r["reason"], r["study"]) for r in rows] == [(first, "fine", humanstudy.study_tag(str(study)))], \
        f"only the form within bounds saved, tied to its study by the content's hash: {rows}"


def test_annotation_page_in_a_browser(judged, browser, tmp_path):
    root, gens = judged
    study = tmp_path / "study.jsonl"
    run_eval("--task=study", f"--gens={','.join(gens)}", "--n=12", f"--out={study}")
    items = [json.loads(l) for l in open(study)]
    answers = tmp_path / "annotations" / "ann.jsonl"
    server, url = start_page("--task=annotate", f"--study={study}", "--annotator=ann")
    other, other_url = start_page("--task=annotate", f"--study={study}", "--annotator=bea")  # a second annotator at once, on another port
    w = Watched(browser, lambda u: u.startswith("http://127.0.0.1:"))
    page = w.page
    try:
        page.goto(url)
        assert "1 / 12" in page.locator("h1").inner_text()
        texts = page.locator(".story").all_inner_texts()
        assert any(t.startswith(HOSTILE.strip()) for t in texts), "the markup of a story is shown as its text"
        assert page.locator(".story script, .story img").count() == 0, "and never becomes elements"
        for name in ("polaris-9b", "qwen-base", ".jsonl", "SQ "):
            assert name not in page.content(), f"{name!r} reaches the page: no model, file or score may"
        page.screenshot(path=str(tmp_path / "annotate.png"))
        # five items: by click, by key, a reason typed, a double press, a take-back and a redo
        page.get_by_role("button", name=re.compile("^A is better")).dblclick()
        page.wait_for_selector("text=2 / 12")
        status = page.locator("div.muted").first.inner_text()
        assert "saved: A for item 1" in status and not status.strip().endswith("·"), f"the choice confirmed: {status!r}"
        page.keyboard.press("b")
        page.wait_for_selector("text=3 / 12")
        assert "saved: B for item 2" in page.locator(".saved").inner_text(), "each saved choice confirmed, by its number"
        page.fill("textarea", "B's ending is earned; A meanders")
        page.get_by_role("button", name=re.compile("^Tie")).click()
        page.wait_for_selector("text=4 / 12")
        # a double press: two key presses before the page can answer, then a double click
        page.evaluate("for (const k of 'tt') document.dispatchEvent(new KeyboardEvent('keydown', {key: k}))")
        page.wait_for_selector("text=5 / 12")
        page.get_by_role("button", name="Take back the last choice").click()
        page.wait_for_selector("text=4 / 12")
        page.keyboard.press("a")
        page.wait_for_selector("text=5 / 12")
        second = w.context.new_page()  # a second tab on the same item: its choice must not count twice
        second.goto(url)
        assert "5 / 12" in second.locator("h1").inner_text()
        page.keyboard.press("b")
        page.wait_for_selector("text=6 / 12")
        second.get_by_role("button", name=re.compile("^A is better")).click()
        second.wait_for_selector("text=6 / 12")
        bea = w.context.new_page()
        bea.goto(other_url)
        bea.keyboard.press("a")
        bea.wait_for_selector("text=2 / 12")
    finally:
        stop_page(server)
        stop_page(other)
    rows = [json.loads(l) for l in open(answers)]
    order = humanstudy.annotation_plan(items, humanstudy.study_tag(str(study)), "ann")[0]
    assert [r["item"] for r in rows] == [it["item"] for it in order[:5]], f"five choices, in ann's own order: {rows}"
    assert [r["choice"] for r in rows] == ["A", "B", "tie", "A", "B"], "the fourth taken back and chosen again"
    assert rows[2]["reason"] == "B's ending is earned; A meanders" and all(r["seconds"] >= 0 for r in rows)
    for r, it in zip(rows, order):
        assert r["id"] == it["id"] and r["study"] == humanstudy.study_tag(str(study)) and \
            {r["model_a"], r["model_b"]} == {"polaris-9b", "qwen-base"}
        assert set(r) >= {"item", "id", "study", "model_a", "model_b", "choice", "reason", "seconds", "time"}
    shown = [r["model_a"] for r in rows] + [json.loads(l)["model_a"] for l in open(tmp_path / "annotations" / "bea.jsonl")]
    assert len(shown) == 6 and len(open(tmp_path / "annotations" / "bea.jsonl").readlines()) == 1, "one file each"
    paths = {u.split("/", 3)[3].split("?")[0] for u in w.requests}
    assert not w.dialogs and not w.refused and paths <= {"", "choose", "undo"}, \
        f"no script ran ({w.dialogs}) and nothing else was fetched ({w.refused}, {paths})"
    # stopped and started again: the page continues at the first item without a choice
    server, url = start_page("--task=annotate", f"--study={study}", "--annotator=ann")
    try:
        page.goto(url)
        assert "6 / 12" in page.locator("h1").inner_text() and "5 done" in page.content()
        r = requests.get(url, headers={"Host": f"rebound.example:{url.split(':')[2]}"}, timeout=10)
        assert r.status_code == 403 and "Story A" not in r.text, "on the loopback only a loopback Host is served"
        dup = subprocess.run([sys.executable, "eval.py", "--task=annotate", f"--study={study}", "--annotator=ann"], **SUB)
        assert dup.returncode != 0 and "ann.lock is in use by pid" in dup.stderr, "one page per annotator's file"
    finally:
        stop_page(server)
        w.close()
    assert len(open(answers).readlines()) == 5, "nothing lost or added by the restart"
    bad = subprocess.run([sys.executable, "eval.py", "--task=annotate", f"--study={study}", "--annotator=a/b"], **SUB)
    assert bad.returncode != 0 and "letters, digits" in bad.stderr


def test_off_the_loopback_nothing_is_served_without_the_token(judged, tmp_path):
    root, gens = judged
    study = tmp_path / "study.jsonl"
    run_eval("--task=study", f"--gens={','.join(gens)}", "--n=3", f"--out={study}")
    server, url = start_page("--task=annotate", f"--study={study}", "--annotator=remote", "--host=0.0.0.0")
    try:
        base = url.split("?")[0]
        assert "?token=" in url, "off the loopback the printed address carries the token"
        first = humanstudy.annotation_plan([json.loads(l) for l in open(study)], humanstudy.study_tag(str(study)), "remote")[0][0]
        story = html.escape(first["stories"][0]["story"][100:160])
        status, answer = raw_post(int(base.split(":")[2].strip("/")), {"Content-Length": "200000000"}, more=4)
        assert status == 401 and b"access token" in answer, "no token: 401 before a byte of the 200 MB is read"
        for method, path in (("get", ""), ("post", "choose"), ("get", "?token=wrong")):
            r = getattr(requests, method)(base + path, data=dict(item=1, choice="A"), allow_redirects=False, timeout=10)
            assert r.status_code == 401 and "access token" in r.text and story not in r.text, (method, path, r.status_code)
        s = requests.Session()
        r = s.get(url, timeout=10)
        assert r.status_code == 200 and "1 / 3" in r.text and story in r.text, "the printed address opens the page"
        assert s.post(base + "choose", data=dict(item=first["item"], choice="tie"), timeout=10).status_code == 200
    finally:
        stop_page(server)
    assert [json.loads(l)["choice"] for l in open(tmp_path / "annotations" / "remote.jsonl")] == ["tie"]


def test_report_html_opens_from_disk_with_no_network(judged, browser, tmp_path):
    root, gens = judged
    study = tmp_path / "study.jsonl"
    run_eval("--task=study", f"--gens={','.join(gens)}", "--n=6", f"--out={study}")
    (tmp_path / "annotations").mkdir()
    for who, flip in (("ann", 0), ("bea", 1)):
        with open(tmp_path / "annotations" / f"{who}.jsonl", "w") as f:
            for it in map(json.loads, open(study)):
                a, b = it["stories"][::-1] if (it["item"] + flip) % 3 == 0 else it["stories"]
                f.write(json.dumps(dict(item=it["item"], id=it["id"], study="study.jsonl", model_a=a["model"],
                                        model_b=b["model"], choice="A" if a["model"] == "polaris-9b" else "B")) + "\n")
    report = tmp_path / "out" / "report.md"
    p = run_eval("--task=report", f"--gens={','.join(gens)}", f"--pairs={root}/pairs.jsonl",
                 f"--annotations={tmp_path}/annotations", f"--out={report}")
    md = report.read_text()
    for part in ("Story Quality by requested length", "Story Quality by category", "| literary realism |",
                 "not bounded: won all 18 comparisons", "Human study", "| polaris-9b | qwen-base | 100.0% |", "| 6 | 2 |",
                 "ann & bea", "the LLM judge against the annotators"):
        assert part in md, f"{part!r} not in report.md:\n{md}"
    with open(tmp_path / "annotations" / "cid.jsonl", "w") as f:  # a second study's choices in the same folder
        f.write(json.dumps(dict(item=1, id="id-00", study="other.jsonl", model_a="x", model_b="y", choice="A")) + "\n")
    mixed = run_eval("--task=report", f"--annotations={tmp_path}/annotations", f"--out={tmp_path}/r2.md", check=False)
    assert mixed.returncode != 0 and "holds the choices of several studies" in mixed.stderr, mixed.stderr[-1000:]
    (tmp_path / "annotations" / "cid.jsonl").unlink()
    assert "3752" not in md and "(unbounded)" not in md and "\n(" not in md, "an unbounded Elo has no number"
    html_path = tmp_path / "out" / "report.html"
    assert html_path.exists() and "wrote" in p.stdout
    w = Watched(browser, lambda u: u.startswith("file://"))
    try:
        w.page.goto(html_path.as_uri())
        assert w.page.locator("svg").count() >= 2 and w.page.locator("svg circle").count() >= 6, "the plots are inline SVG"
        prompts = w.page.locator("details:has(> .prompt)")
        assert prompts.count() == 18, "each prompt once, folded"
        toc = w.page.locator("nav.toc p").all_inner_texts()
        assert [t.split(":")[0] for t in toc] == [f"{b} (6 prompts)" for b, _ in rubric.BUCKETS], f"contents by bucket: {toc}"
        assert w.page.locator("nav.toc a").count() == 18, "a link to each prompt"
        w.page.locator("nav.toc a").nth(7).click()  # the second bucket's second prompt
        second = w.page.locator("details:has(> .prompt)").nth(7)
        assert second.evaluate("d => location.hash === '#' + d.id"), "the contents link leads to its prompt"
        first = prompts.first
        first.locator("> summary").click()
        summary = first.locator("> summary").inner_text()
        assert "polaris-9b SQ" in summary and "qwen-base SQ" in summary, f"each model's SQ beside the prompt: {summary}"
        a, b = first.locator(".cols > article").all()
        assert a.locator("h4").inner_text() == "polaris-9b" and b.locator("h4").inner_text() == "qwen-base"
        box_a, box_b = a.bounding_box(), b.bounding_box()
        assert box_a["y"] == box_b["y"] and box_b["x"] > box_a["x"] + box_a["width"] / 2, "side by side"
        assert a.locator(".story").inner_text().startswith(HOSTILE.strip()), "a story is shown as text"
        a.locator("summary", has_text="16 scores").click()
        assert a.locator(".scores td.n").count() == 16, "with the judge's 16 scores"
        a.locator("summary", has_text="the judge's reply").click()
        assert "Prompt Adherence:" in a.inner_text(), "and its reply"
        w.page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    finally:
        w.close()
    assert not w.dialogs and not w.refused, f"dialogs {w.dialogs}, requests {w.refused}"
    assert not re.search(r"<(script|link|img)\b", html_path.read_text().split("<main>")[0]), "nothing loaded in the head"
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html_path.read_text()), "no external address"
    assert "high agreement but low kappa" in md, "why kappa can be low beside high agreement, in one sentence"
    # another report to the same files: refused, naming them, unless --force; the same report again is written
    written = (report.read_bytes(), html_path.read_bytes())
    other = run_eval("--task=report", f"--gens={gens[0]}", f"--pairs={root}/pairs.jsonl", f"--out={report}", check=False)
    assert other.returncode != 0 and f"error: {report} and {html_path} hold a report of " in other.stderr \
        and "--force=True" in other.stderr and len(other.stderr.strip().splitlines()) == 1, other.stderr[-1000:]
    assert (report.read_bytes(), html_path.read_bytes()) == written, "nothing written over"
    again = run_eval("--task=report", f"--gens={','.join(gens)}", f"--pairs={root}/pairs.jsonl",
                     f"--annotations={tmp_path}/annotations", f"--out={report}", "--n_boot=50")
    assert "writing over" not in again.stdout and "wrote" in again.stdout, "its own report of the same inputs: rewritten"
    forced = run_eval("--task=report", f"--gens={gens[0]}", f"--out={report}", "--force=True", "--n_boot=50")
    assert f"writing over {report} and {html_path}, a report of " in forced.stdout, forced.stdout[-1000:]
    assert "qwen-base" not in report.read_text(), "--force=True wrote the other report"
