"""The training run in a browser (eval.py --task=rollouts): a real tiny run's folder, a run followed
from before it starts, a run that is still writing, one that stopped, a folder from before steps
counted from 1, and the line index that keeps a 150 MB rollouts.jsonl out of memory (bench.py
times that file)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import pytest
import requests

import pages
import rundir
from test_study import HOSTILE, Watched, start_page, stop_page
from test_train import ENV, train
import viewer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step tiny run with the held-out evaluation at steps 0, 2 and 3."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    train(out, "--max_steps=3", "--eval_interval=2", "--save_interval=10", "--max_new_tokens=24")
    return out


def serve(folder, *args):
    return start_page("--task=rollouts", f"--run={folder}", *args)


def test_the_viewer_in_a_browser(run, browser, tmp_path):
    folder = tmp_path / "live"
    shutil.copytree(run, folder)
    server, url = serve(folder)
    w = Watched(browser, lambda u: u.startswith(url))
    page = w.page
    try:
        page.goto(url)
        assert "step 3" in page.locator("h1").inner_text(), "the first page is the latest step"
        assert page.locator("svg").count() >= 5 and page.locator("svg polyline").count() >= 6, "the charts, as SVG"
        assert "held-out (evaluation judge)" in page.content(), "held-out SQ charted beside the training judge's"
        assert page.locator("h2", has_text=re.compile("^Group")).count() == 2 and page.locator(".card.ref").count() >= 2
        assert page.locator(".prompt").first.inner_text().startswith("Write a "), "the prompt beside its group"
        assert "The best and the worst story of the step" in page.content()
        page.locator(".card").nth(2).locator("summary", has_text="the judge's reply").click()
        assert "Prompt Adherence:" in page.locator(".card").nth(2).inner_text(), "the judge's reply, kept in the log"
        page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
        page.fill("input[name=step]", "1")
        page.get_by_role("button", name="show").click()
        page.wait_for_selector("h1:has-text('step 1')")
        assert page.locator(".card").count() == 2 + 12 and "human reference" in page.content(), "step 1's two groups"
        # the run goes on writing: a step with a story that is markup, and a line still being written
        step1 = [json.loads(line) for line in open(folder / "rollouts.jsonl") if json.loads(line)["step"] == 1]
        with open(folder / "rollouts.jsonl", "a") as f:
            for r in step1:
                f.write(json.dumps(dict(r, step=4, story=None if r["is_ref"] else HOSTILE + (r["story"] or ""))) + "\n")
            f.write('{"step": 5, "group": 0, "story": "half')
        page.goto(url)
        assert "step 4" in page.locator("h1").inner_text(), "the viewer follows the run; a half line waits"
        texts = page.locator(".card .story").all_inner_texts()
        assert sum(t.startswith(HOSTILE.strip()) for t in texts) >= 10, "a story's markup is shown as its text"
        assert page.locator(".card script, .card img").count() == 0
    finally:
        stop_page(server)
        w.close()
    paths = {u.split("/", 3)[3].split("?")[0] for u in w.requests}
    assert not w.dialogs and not w.refused and paths == {""}, f"dialogs {w.dialogs}, requests {w.refused} {paths}"


def test_a_run_folder_from_before_steps_counted_from_1(run, tmp_path):
    """Steps from 0 in the files, each reference's text in its rows, no run.json: the viewer shows
    it from step 1, and a resume renumbers it and goes on."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    refs = {r["id"]: r["story"] for r in map(json.loads, open(old / "references.jsonl"))}
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        rows = [json.loads(line) for line in open(old / name)]
        rows = [dict(r, step=r["step"] - 1, story=refs[r["id"]] if r.get("is_ref") else r.get("story"))
                for r in rows if r["step"] >= 1]
        (old / name).write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("heldout")}) + "\n"
                                        for r in rows))
    for name in ("run.json", "references.jsonl", "evals.jsonl"):
        os.remove(old / name)
    server, url = serve(old)
    try:
        text = requests.get(url + "?step=1", timeout=30).text
        assert "step 1</h1>" in text and "human reference" in text and "no metrics for this step" not in text
        assert pages.esc(next(iter(refs.values()))[:80]) in text, "the reference's text from its own row"
        assert "step 3</h1>" in requests.get(url, timeout=30).text, "the latest of 0, 1, 2 is shown as step 3"
    finally:
        stop_page(server)
    p = train(old, "--max_steps=4", "--eval_interval=2", "--save_interval=10", "--max_new_tokens=24", "--resume=auto")
    assert "step 4/4" in p.stdout
    assert [json.loads(line)["step"] for line in open(old / "metrics.jsonl")] == [1, 2, 3, 4], "renumbered from 1"
    assert sorted({json.loads(line)["step"] for line in open(old / "rollouts.jsonl")}) == [1, 2, 3, 4]
    assert (old / "run.json").exists()


def test_the_line_index_reads_a_step_and_follows_a_growing_file(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    rows = [dict(step=s, group=g, story="x" * 5000 + f"{s}-{g}") for s in range(1, 41) for g in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 41, "gro')
    index = viewer.LineIndex(str(path), "step").refresh()
    assert sorted(index.offsets) == list(range(1, 41)) and all(len(v) == 6 for v in index.offsets.values())
    assert [r["story"][-4:] for r in index.rows(17)] == [f"17-{g}" for g in range(6)], "a step read by offset"
    with open(path, "a") as f:
        f.write('up": 0, "story": "late"}\n')
    assert [r["story"] for r in index.refresh().rows(41)] == ["late"], "a line indexed once it is whole"
    path.write_text(json.dumps(dict(step=1, story="rewritten")) + "\n")  # trimmed on resume
    assert sorted(index.refresh().offsets) == [1] and next(index.rows(1))["story"] == "rewritten"
    ids = viewer.LineIndex(str(tmp_path / "refs.jsonl"), "id")
    (tmp_path / "refs.jsonl").write_text(json.dumps(dict(id='a "quoted" id', story="s")) + "\n" + json.dumps(dict(id=7)) + "\n")
    assert sorted(ids.refresh().offsets, key=str) == [7, 'a "quoted" id'], "string and integer ids"


def test_broken_and_huge_lines_are_left_out_and_named(tmp_path):
    """A line of 20 MB (the cap lowered to 1 MB, as 100 MB against the real 16 MB), a story over
    the story cap, a non-UTF-8 byte, null and a binary line in each file: the page is served, each
    left-out line named once by file:line, in bounded memory."""
    row = lambda **k: json.dumps(dict(dict(step=1, group=0, id="p1", is_ref=False, story="A story.", reward=1.0, adv=0.5,
                                           sq=40.0, ratio=0.9, scores={"Prompt Adherence": 7}, error=None), **k)).encode()
    binary = bytes(range(256)).replace(b"\n", b"")
    (tmp_path / "run.json").write_text(json.dumps(dict(config=dict(max_steps=1))))
    (tmp_path / "rollouts.jsonl").write_bytes(b"\n".join([
        row(), row(story="x" * 5000), b'{"step": 1, "group": 0, "story": "' + b"y" * 20_000_000 + b'"}', b"null",
        b'{"step": 1, "group": 1, "story": "caf\xe9"}', binary, row(is_ref=True, story=None, id="r1", reward=None)]) + b"\n")
    (tmp_path / "metrics.jsonl").write_bytes(b'{"reward": 12.5, "step": 1}\nnull\n{"step": 1, "x": "\xff"}\n' + binary + b"\n")
    (tmp_path / "references.jsonl").write_bytes(binary + b"\n" + json.dumps(dict(id="r1", story="The reference.")).encode()
                                                + b"\n")
    app = viewer.run_viewer(str(tmp_path), max_line=1_000_000, max_story=1000)
    tracemalloc.start()
    try:
        status, body, _ = app("GET", "/", {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 200 and "reward 12.50" in body and "The reference." in body, body[-2000:]
    assert peak < 8e6 and len(body) < 100_000, f"bounded: {peak:,} bytes at the peak, {len(body):,} of HTML"
    for where in ("rollouts.jsonl:3 (a line of 20,000,037 bytes: too large to show", "rollouts.jsonl:4 (not a row",
                  "rollouts.jsonl:5 (not UTF-8)", "rollouts.jsonl:6 (", "metrics.jsonl:2 (not a row",
                  "metrics.jsonl:3 (not UTF-8)", "metrics.jsonl:4 (", "references.jsonl:1 ("):
        assert body.count(pages.esc(where)) == 1, f"{where} named once: {body[:3000]}"
    assert "x" * 1000 in body and "x" * 1001 not in body and "4,000 more characters not shown" in body, "cut, and said"
    assert app("GET", "/", {"step": "1"})[0] == 200, "and it keeps serving"


def test_off_the_loopback_the_viewer_asks_for_the_token(run):
    server, url = serve(run, "--host=0.0.0.0")
    try:
        base = url.split("?")[0]
        r = requests.get(base + "?step=1", timeout=30)
        assert r.status_code == 401 and "Group" not in r.text, "nothing of the run without the token"
        assert "Group 0" in requests.Session().get(url, timeout=30).text
    finally:
        stop_page(server)


def test_the_viewer_follows_a_run_from_before_it_starts(browser, tmp_path):
    """The viewer started on a folder that does not exist yet; a short run started into it; the
    page, never reloaded by the test, goes from waiting to the run's steps to finished, then asks
    nothing more. The human reference's card stands out; Ctrl-C prints the run's next commands."""
    from local_judge import serve_local
    folder = tmp_path / "later" / "tiny"
    server, url = serve(folder)
    judge, judge_url = serve_local(latency=2.5)  # each step takes 2.5 s or more: time for the page to show it
    w = Watched(browser, lambda u: u.startswith(url))
    page, seen = w.page, []
    try:
        page.goto(url)
        assert "does not exist yet" in page.locator("#status").inner_text(), "it says it is waiting"
        run = subprocess.Popen([sys.executable, "train.py", "config/tiny.py", f"--out_dir={folder}", "--max_steps=2",
                                "--batch_groups=1", "--max_new_tokens=16", f"--judge_url={judge_url}"], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while not (seen and seen[-1][0].startswith("finished")) and time.monotonic() < deadline:
            try:  # what the page shows now; it may be reloading itself
                now = (page.locator("#status").get_attribute("data-state", timeout=2000),
                       page.locator("h1").inner_text(timeout=2000))
            except Exception:  # noqa: BLE001 -- a page being replaced by its reload
                continue
            if not seen or seen[-1] != now:
                seen.append(now)
            time.sleep(0.2)
        assert run.wait(timeout=120) == 0, run.stderr.read()[-2000:]
        states = [state.split()[0] for state, _ in seen]
        assert states[0] == "waiting" and "running" in states and states[-1] == "finished", f"followed: {seen}"
        assert any(re.search(r"step [01]$", h1) for _, h1 in seen), f"the page of a step before the last: {seen}"
        assert seen[-1][1].endswith("step 2") and page.locator("#status").inner_text() == "finished: all 2 steps", seen
        asked = len(w.requests)
        time.sleep(2.5)  # longer than the 2 s between two questions of a page that still follows
        assert len(w.requests) == asked and page.locator("script").count() == 0, "a finished run's page asks no more"
        colour = lambda css: page.locator(css).first.evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour(".card.ref") == "rgb(255, 246, 220)" != colour(".card:not(.ref)"), "the human reference stands out"
    finally:
        judge.shutdown()
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=60)
        w.close()
    assert f"python eval.py --task=generate --model={folder}/ckpt_000002 --name=tiny" in out, out[-2000:]
    assert w.requests.count(url) >= 4 and not w.refused and not w.dialogs, "the page reloaded itself, and only that"


def test_a_run_that_stopped_is_shown_stopped(run, tmp_path):
    """Whether a run may still change, from run.json's settings in force and its run.lock: a live
    lock follows the run on every page (the step-0 page too), a run whose lock is gone or whose
    process died before its max_steps is stopped at its last step, and its page asks nothing."""
    folder = tmp_path / "stopped"
    shutil.copytree(run, folder)
    meta = json.load(open(folder / "run.json"))
    meta["starts"].append(dict(step=3, world_size=1, changed={"max_steps": [3, 5]}))  # resumed for 5 steps
    (folder / "run.json").write_text(json.dumps(meta))
    assert rundir.settings(str(folder))["max_steps"] == 5, "the first start's settings, then each start's changes"
    app = viewer.run_viewer(str(folder))
    body = app("GET", "/", {})[1]
    assert app.status() == ("stopped", "stopped at step 3 of 5") and "stopped at step 3 of 5" in body, body[:2000]
    assert "<script>" not in body, "a stopped run's page asks nothing"
    lock = lambda pid: (folder / "run.lock").write_text(json.dumps(dict(pid=pid, host=socket.gethostname(), since="")))
    lock(os.getpid())  # a live run holds the lock
    assert app.status() == ("running", "running: 3 of 5 steps done") and "<script>" in app("GET", "/", {"step": "1"})[1]
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock(gone.pid)  # the run was killed: its lock stays, its process is gone
    assert app.status()[0] == "stopped"
    early = tmp_path / "early"  # a live run at its held-out evaluation of step 0, before its first step
    early.mkdir()
    shutil.copy(folder / "run.json", early)
    (early / "metrics.jsonl").write_text(json.dumps(dict(step=0, heldout_sq=-25.4, heldout_length_ratio=0.12)) + "\n")
    (early / "run.lock").write_text((folder / "run.lock").read_text().replace(str(gone.pid), str(os.getpid())))
    body = viewer.run_viewer(str(early))("GET", "/", {})[1]
    assert "step 0</h1>" in body and "running: 0 of 5 steps done" in body and "<script>" in body, body[:3000]
    ticks = re.findall(r"text-anchor=end font-size=12>([^<]+)<", pages.chart("Length ratio", [("held-out", [(0, 0.12, None, None)])]))
    assert min(map(float, ticks)) >= 0 and min(map(float, ticks)) <= 0.12 < max(map(float, ticks)) < 0.5, \
        f"the axis starts where the data do: {ticks}"
