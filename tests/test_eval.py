"""eval.py's statistics as functions, its tasks as subprocesses against the local judge, and data/prepare.py."""
import html
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import requests

import eval as ev
import jsonl
import data
import preflight
import tiny
from local_judge import serve_local
from test_train import ENV, train
import genfiles
import pairwise
import report
import rubric
import stats

SUB = dict(capture_output=True, text=True, timeout=300)


def test_bucket_edges():
    assert rubric.bucket(4000) == "ID 1-4k" and rubric.bucket(4001) == "near OOD 4-8k", "4000 is ID, 4001 near OOD"
    assert rubric.bucket(8000) == "near OOD 4-8k" and rubric.bucket(8001) == "far OOD 8-12k", "8001 is far OOD"
    assert rubric.bucket(1) == "ID 1-4k" and rubric.bucket(12000) == "far OOD 8-12k"


def test_dual_position():
    assert stats.dual_verdict("A", "B") == "a", "a preferred in both positions: a wins"
    assert stats.dual_verdict("B", "A") == "b", "b preferred in both positions: b wins"
    assert stats.dual_verdict("A", "A") == "tie" and stats.dual_verdict("B", "B") == "tie", "position bias: a tie"
    assert stats.dual_verdict(None, "A") is None, "a failed judgement is missing, not a tie"
    assert stats.win_rate(["a", "a", "tie", "b"]) == pytest.approx(2.5 / 4), "(W + 0.5 T) / N"


def simulate(true, n, rng, per_prompt=4):
    models = list(true)
    out = []
    for k in range(n):
        a, b = rng.choice(len(models), 2, replace=False)
        p = 1 / (1 + 10 ** ((true[models[b]] - true[models[a]]) / 400))
        out.append(dict(id=f"p{k // per_prompt}", model_a=models[a], model_b=models[b], winner="a" if rng.random() < p else "b"))
    return out


def test_bradley_terry_recovers_ratings():
    true = {"m0": 1000.0, "m1": 1100.0, "m2": 1250.0, "m3": 1400.0}
    pairs = simulate(true, 3000, np.random.default_rng(0))
    battles = [b for bs in report.battles_by_prompt(pairs).values() for b in bs]
    fit = stats.bradley_terry(battles, sorted(true), anchor=("m0", 1000.0))
    for m in true:
        assert abs(fit[m] - true[m]) < 25, f"{m}: fitted {fit[m]:.0f}, true {true[m]:.0f}"
    shifted = stats.bradley_terry(battles, sorted(true), anchor=("m0", 1500.0))
    assert all(shifted[m] - fit[m] == pytest.approx(500) for m in true), "anchoring shifts every rating equally"


def test_bradley_terry_two_player_closed_form():
    battles = [("x", "y", 1.0)] * 70 + [("x", "y", 0.0)] * 25 + [("x", "y", 0.5)] * 10
    fit = stats.bradley_terry(battles, ["x", "y"])
    w = 70 + 5  # ties count half to each side
    assert fit["x"] - fit["y"] == pytest.approx(400 * math.log10(w / (105 - w)), abs=0.01), "R_x - R_y = 400 log10(W/L)"
    assert fit["x"] + fit["y"] == pytest.approx(2000), "no anchor: mean rating 1000"


def test_bootstrap_interval_covers_the_true_win_rate():
    rng = np.random.default_rng(1)
    p, hits, trials = 0.6, 0, 200
    for t in range(trials):
        groups = [["a" if rng.random() < p else "b"] for _ in range(80)]
        lo, hi = stats.bootstrap_ci(groups, lambda gs: stats.win_rate([o for g in gs for o in g]), n_boot=300, seed=t)
        hits += lo <= p <= hi
    assert 0.88 <= hits / trials <= 0.99, f"a 95% interval covered the truth in {hits}/{trials} trials"


def test_disconnected_graph_and_missing_ids_are_errors(tmp_path):
    pairs = [dict(id="1", model_a="a", model_b="b", winner="a"), dict(id="1", model_a="c", model_b="d", winner="tie")]
    with pytest.raises(ValueError, match=r"not connected.*a, b \| c, d"):
        report.elo_table(pairs)
    ids = {"x.jsonl": {"p1", "p2", "p3"}, "y.jsonl": {"p1", "p3"}}
    with pytest.raises(ValueError, match="y.jsonl lacks p2"):
        genfiles.shared_ids(ids, False)
    assert genfiles.shared_ids(ids, True) == ["p1", "p3"], "the explicit flag compares on the intersection"


def test_half_written_file_is_resumed_not_truncated(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"id": "a"}) + "\n" + json.dumps({"id": "b"}) + "\n" + '{"id": "c", "sto')
    before = f.read_bytes()
    assert [r["id"] for r in jsonl.read(str(f))] == ["a", "b"], "complete rows are kept"
    assert f.read_bytes() == before, "a file that is only read is never changed"
    assert [r["id"] for r in jsonl.read(str(f), repair=True)] == ["a", "b"], "its owner removes the cut line"
    jsonl.append(str(f), [{"id": "c"}])
    assert [json.loads(l)["id"] for l in f.read_text().splitlines()] == ["a", "b", "c"], "appending continues cleanly"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two tiny checkpoints with different random weights, as a base and a 'trained' model."""
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("base", 0), ("other", 1)):
        model, tok = tiny.build_tiny(["data/sample/train.jsonl"], seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def run_eval(*args):
    p = subprocess.run([sys.executable, "eval.py", *args], **SUB)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def test_generate_score_pairwise_elo_report(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(l) for l in open("data/eval/prompts.jsonl")]
    prompts.write_text("".join(json.dumps(rows[i]) + "\n" for i in (0, 1, 20, 21, 40, 41)))  # two per bucket
    common = [f"--prompts={prompts}", "--max_new_tokens=24", "--enable_thinking=False", f"--judge_cache={tmp_path}/cache",
              f"--gen_cache={tmp_path}/gen_cache"]
    gens = []
    for name in ("base", "other"):
        out = tmp_path / f"{name}.jsonl"
        run_eval("--task=generate", f"--model={tiny_models / name}", f"--out={out}", *common)
        gens.append(str(out))
    g = [json.loads(l) for l in open(gens[0])]
    assert len(g) == 6 and {"story", "words", "thinking_words", "finish_reason", "category"} <= set(g[0]), g[0]
    p = run_eval("--task=generate", f"--model={tiny_models / 'base'}", f"--out={gens[0]}", *common)
    assert "all 6 prompts already" in p.stdout and len(open(gens[0]).readlines()) == 6, "resumable: nothing redone"
    # an OpenAI-compatible endpoint as a peer (the local judge stands in for a served model)
    server, url = serve_local()
    try:
        api_out = tmp_path / "api.jsonl"
        run_eval("--task=generate", "--model=served", f"--api_url={url}", f"--out={api_out}", *common)
    finally:
        server.shutdown()
    api_rows = [json.loads(l) for l in open(api_out)]
    assert len(api_rows) == 6 and all(r["finish_reason"] == "stop" and r["words"] > 0 for r in api_rows), api_rows[0]
    gens.append(str(api_out))
    p = run_eval("--task=score", f"--gens={','.join(gens)}", *common)
    assert "SQ ID 1-4k" in p.stdout and "length ratio 8-12k" in p.stdout, p.stdout
    scored = [json.loads(l) for l in open(report.scores_path(gens[0]))]
    assert len(scored) == 6 and all(r["error"] is None for r in scored), "every generation scored"
    pairs = tmp_path / "pairs.jsonl"
    p = run_eval("--task=pairwise", f"--gens={','.join(gens)}", f"--pairs={pairs}", *common)
    prs = [json.loads(l) for l in open(pairs)]
    assert len(prs) == 3 * 6 and all(r["winner"] in ("a", "b", "tie") for r in prs), "3 model pairs x 6 prompts"
    assert "win rate of A" in p.stdout
    ratings = tmp_path / "ratings.json"
    run_eval("--task=elo", f"--pairs={pairs}", "--anchor=base:1000", f"--out={ratings}")
    table = json.load(open(ratings))
    assert table["base"]["rating"] == pytest.approx(1000) and set(table) == {"base", "other", "served"}
    assert all(len(r["ci"]) == 2 and r["n"] == 12 for r in table.values()), table
    md = tmp_path / "report.md"
    run_eval("--task=report", f"--gens={','.join(gens)}", f"--pairs={pairs}", f"--out={md}")
    text = md.read_text()
    assert "Story Quality by requested length" in text and "Pairwise Elo" in text and "Win rates" in text, text


def test_pairwise_refuses_uncovered_ids(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    row = dict(prompt="Write a 100-word story about x.", target_words=100, story="Once.", model="m")
    a.write_text(json.dumps(dict(row, id="p1")) + "\n" + json.dumps(dict(row, id="p2")) + "\n")
    b.write_text(json.dumps(dict(row, id="p1", model="n")) + "\n")
    p = subprocess.run([sys.executable, "eval.py", "--task=pairwise", f"--gens={a},{b}", f"--pairs={tmp_path}/p.jsonl"], **SUB)
    assert p.returncode != 0 and "lacks p2" in p.stderr, p.stderr


def test_prepare_builds_training_data(tmp_path):
    src = tmp_path / "stories"
    src.mkdir()
    rows = [json.loads(l) for l in open("data/sample/train.jsonl")]
    for r in rows[:12]:
        (src / f"{r['id']}.txt").write_text("  " + r["story"].replace("\n\n", "\n  \t\n").replace(" ", "   ") + "\n\n\n")
    (src / "copy.txt").write_text(rows[0]["story"])
    (src / "huge.txt").write_text("word " * 4001)
    out = tmp_path / "data"
    p = subprocess.run([sys.executable, "data/prepare.py", f"--src={src}", f"--out_dir={out}", "--heldout_percent=25",
                        f"--judge_cache={tmp_path}/cache"], **SUB)
    assert p.returncode == 0, p.stderr
    assert "huge.txt: 4001 words, over max_ref_words=4000" in p.stdout and "duplicate of" in p.stdout, p.stdout
    train = [json.loads(l) for l in open(out / "train.jsonl")]
    held = [json.loads(l) for l in open(out / "heldout.jsonl")]
    assert len(train) + len(held) == 12 and held and train, "duplicates and long stories dropped, both splits used"
    by_id = {r["id"]: r for r in rows}
    for r in train + held:
        original = by_id.get(r["id"]) or by_id["realism-ferry"]
        assert r["story"] == original["story"], "whitespace normalised back to the original paragraphs"
        assert r["target_words"] % 100 == 0 and r["prompt"].startswith(f"Write a {r['target_words']}-word story about ")
    import rubric
    data.load_rows(out / "train.jsonl")  # train.py's loader accepts it
    p2 = subprocess.run([sys.executable, "data/prepare.py", f"--src={src}", f"--out_dir={tmp_path}/again",
                         "--heldout_percent=25", f"--judge_cache={tmp_path}/cache"], **SUB)
    assert p2.returncode == 0, p2.stderr
    assert open(out / "heldout.jsonl").read() == open(tmp_path / "again/heldout.jsonl").read(), "the split is deterministic"


def test_a_clean_sweep_is_flagged_unbounded():
    pairs = [dict(id=str(i), model_a="x", model_b="y", winner="a") for i in range(10)]
    t = report.elo_table(pairs, n_boot=20)
    assert t["x"]["unbounded"] and t["y"]["unbounded"] and (t["x"]["rank"], t["y"]["rank"]) == (1, 2), \
        "10 wins of 10: no finite rating, flagged, ordered"
    assert t["x"]["rating"] is None and t["x"]["ci"] is None, "and no number"
    pairs.append(dict(id="10", model_a="x", model_b="y", winner="tie"))
    assert not report.elo_table(pairs, n_boot=20)["x"]["unbounded"], "one tie (counted both ways) bounds the rating"


def test_no_elo_number_where_the_win_graph_is_not_strongly_connected(tmp_path):
    # g and p beat b and s every time; within each pair the results are mixed
    pairs = [dict(id=f"{w}{l}{k}", model_a=w, model_b=l, winner="a") for w in "gp" for l in "bs" for k in range(3)]
    pairs += [dict(id="i1", model_a="g", model_b="p", winner="a"), dict(id="i2", model_a="g", model_b="p", winner="b"),
              dict(id="i3", model_a="b", model_b="s", winner="tie")]
    assert stats.strong_parts(list("bgps"), [b for bs in report.battles_by_prompt(pairs).values() for b in bs]) == \
        [["g", "p"], ["b", "s"]], "two parts, the winners first"
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    sentence = "No Bradley-Terry rating exists: in the order g, p > b, s, each won every comparison"
    p = run_eval("--task=elo", f"--pairs={f}", f"--out={tmp_path}/ratings.json")
    assert sentence in p.stdout and not re.search(r"\| \d{3,}", p.stdout), p.stdout
    table = json.load(open(tmp_path / "ratings.json"))
    assert {m: (r["rating"], r["rank"], r["unbounded"]) for m, r in table.items()} == \
        {"g": (None, 1, True), "p": (None, 1, True), "b": (None, 3, True), "s": (None, 3, True)}, table
    run_eval("--task=report", f"--pairs={f}", f"--out={tmp_path}/report.md")
    for name in ("report.md", "report.html"):
        text = html.unescape((tmp_path / name).read_text())
        assert sentence in text and "not bounded" in text and not re.search(r"(\| |<td>)\d{3,}", text), f"{name}: {text}"


def test_pairs_rows_are_checked(tmp_path):
    f = tmp_path / "pairs.jsonl"
    good = dict(id="p1", model_a="x", model_b="y", winner="A")
    for bad, why in ((dict(good, winner="C"), "winner must be one of A, B, tie or null"),
                     (dict(good, model_b=None), "needs the names model_a and model_b"),
                     ({k: v for k, v in good.items() if k != "id"}, "needs an id")):
        f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"{f}:2: .*{why}"):
            pairwise.read_pairs(str(f))
    f.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, winner=None)) + "\n")
    assert [r["winner"] for r in pairwise.read_pairs(str(f))] == ["a", None], "A reads as a; null is a missing judgement"
    p = subprocess.run([sys.executable, "eval.py", "--task=elo", f"--pairs={f},{tmp_path}/nope.jsonl"], **SUB)
    assert p.returncode != 0 and f"{tmp_path}/nope.jsonl: no such file" in p.stderr, p.stderr


@pytest.mark.parametrize("args", [
    ["--task=generate", "--model=m", "--out=OUT/g.jsonl", "--prompts=OUT/missing.jsonl"],
    ["--task=score", "--gens=OUT/missing.jsonl"],
    ["--task=pairwise", "--gens=data/sample/train.jsonl,OUT/missing.jsonl", "--pairs=OUT/p.jsonl"],
    ["--task=elo", "--pairs=OUT/missing.jsonl"],
    ["--task=report", "--pairs=OUT/missing.jsonl", "--out=OUT/r.md"],
    ["--task=report", "--gens=OUT/missing.jsonl", "--out=OUT/r.md"],
])
def test_a_named_file_that_does_not_exist_is_an_error(tmp_path, args):
    p = subprocess.run([sys.executable, "eval.py", *(a.replace("OUT", str(tmp_path)) for a in args)], **SUB)
    assert p.returncode != 0 and f"{tmp_path}/missing.jsonl: no such file" in p.stderr, p.stdout[-500:] + p.stderr
    assert not list(tmp_path.iterdir()), "nothing written"


def test_api_generation_fields_thinking_and_empty_replies(tmp_path):
    from test_judge import FaultServer

    def reply(content, reasoning=None, finish="stop"):
        message = dict(role="assistant", content=content, **({"reasoning_content": reasoning} if reasoning else {}))
        return ("body", json.dumps(dict(choices=[dict(message=message, finish_reason=finish)], usage={})).encode())
    s = FaultServer([reply("The first story.", "a plan"),  # vLLM / transformers serve split the thinking out
                     reply("", "thinking until the end", "length"),  # came back without a story
                     reply("<think>\nplan\n</think>\n\nThe third story."),  # no reasoning parser: split here
                     reply("\u200b\u2060 \ufeff\u200b")])  # only invisible characters: no story either
    out = tmp_path / "g.jsonl"
    args = [sys.executable, "eval.py", "--task=generate", "--model=served", f"--api_url={s.url}", f"--out={out}",
            "--limit=4", "--judge_workers=1", "--enable_thinking=False", "--max_new_tokens=99",
            "--api_extra={'top_p': None, 'temperature': 0.9, 'seed': 5}", f"--gen_cache={tmp_path}/cache"]
    try:
        p = subprocess.run(args, **SUB)
        rows = [json.loads(l) for l in open(out)]
        cached = len(list((tmp_path / "cache").rglob("*.json")))
        subprocess.run(args, **SUB)
    finally:
        s.close()
    prompts = [json.loads(l) for l in open("data/eval/prompts.jsonl")][:4]
    assert p.returncode != 0 and "2 of 4 generations came back without a story" in p.stderr and \
        prompts[1]["id"] in p.stderr and prompts[3]["id"] in p.stderr, p.stderr[-1000:]
    assert [(r["id"], r["story"], r["thinking_words"]) for r in rows] == \
        [(prompts[0]["id"], "The first story.", 2), (prompts[2]["id"], "The third story.", 1)], rows
    body = s.requests[0]["body"]
    assert body["chat_template_kwargs"] == {"enable_thinking": False}, "thinking on or off reaches the template"
    assert body["max_tokens"] == 99 and body["temperature"] == 0.9 and body["seed"] == 5 and "top_k" not in body, body
    assert "top_p" not in body, "api_extra adds fields, replaces them one by one, and None removes one"
    assert [r["body"]["messages"][0]["content"] for r in s.requests[4:]] == [prompts[1]["prompt"], prompts[3]["prompt"]], \
        "the empty and the invisible replies were not cached: the next run asks again for those prompts only"
    assert cached == 2, "API generations are cached apart from the judge's replies, those without a story not at all"


def gens_row(i, **k):
    return json.dumps(dict(dict(id=i, prompt="Write a 100-word story about x.", target_words=100, story="Once.", model="m"), **k))


@pytest.mark.parametrize("files, where, why", [
    ([[gens_row("p1"), gens_row("p2"), gens_row("p1")]], "g0.jsonl:3", "id 'p1' given twice"),
    ([[gens_row("p1"), "", json.dumps(dict(id="p2", prompt="Write.", target_words=100, model="m"))]], "g0.jsonl:3",
     "missing field 'story'"),
    ([[gens_row(7), gens_row("7")]], "g0.jsonl:2", "id '7' is str where the ids before are int"),
    ([[gens_row(7)], [gens_row("7", model="n")]], "g1.jsonl:1", "id '7' is str where the ids before are int"),
    ([[gens_row("p1")], [gens_row("p1")]], "g0.jsonl and ", "hold one model name, 'm'"),
    ([[gens_row("p1"), gens_row("p2", story="cafe").encode().replace(b"fe", b"f\xe9")]], "g0.jsonl:2", "not UTF-8 (byte 0xe9 at column"),
])
def test_generation_files_are_checked(tmp_path, files, where, why):
    paths = []
    for k, lines in enumerate(files):
        paths.append(tmp_path / f"g{k}.jsonl")
        paths[-1].write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    with pytest.raises(ValueError, match=re.escape(why)) as e:
        genfiles.read_gens([str(p) for p in paths])
    assert f"{tmp_path}/{where}" in str(e.value), str(e.value)
    p = subprocess.run([sys.executable, "eval.py", "--task=pairwise" if len(paths) > 1 else "--task=score",
                        f"--gens={','.join(map(str, paths))}", f"--pairs={tmp_path}/p.jsonl", f"--judge_cache="], **SUB)
    assert p.returncode != 0 and p.stderr.startswith("error: ") and why in p.stderr, p.stderr[-1000:]
    assert len(p.stderr.strip().splitlines()) == 1, f"one line, no traceback: {p.stderr[-1000:]}"


def test_inputs_are_only_read_while_their_writer_appends(tmp_path):
    """study, score, pairwise and report on a generation file whose last line is still being
    written: its bytes are never rewritten, the writer's later rows all land, one warning a task."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    b.write_text("".join(gens_row(f"p{k}", model="n", story=f"Story {k} by n.") + "\n" for k in range(4)))
    writer = open(a, "a")
    writer.write("".join(gens_row(f"p{k}", story=f"Story {k} by m.") + "\n" for k in range(3)) + gens_row("p3")[:30])
    writer.flush()
    before, inode = a.read_bytes(), a.stat().st_ino
    common = [f"--gens={a},{b}", f"--judge_cache={tmp_path}/cache", f"--pairs={tmp_path}/pairs.jsonl"]
    for args, ok in ((["--task=study", "--n=2", f"--out={tmp_path}/s.jsonl"], True),
                     (["--task=study", "--n=9", f"--out={tmp_path}/t.jsonl"], False),  # fails after reading
                     (["--task=score"], True), (["--task=pairwise", "--allow_intersection=True"], True),
                     (["--task=report", f"--out={tmp_path}/r.md"], True)):
        p = subprocess.run([sys.executable, "eval.py", *common, *args], **SUB)
        assert (p.returncode == 0) == ok, p.stdout[-1000:] + p.stderr[-1000:]
        assert p.stderr.count(f"warning: {a}:4: skipping a half-written last line") == 1 and \
            p.stderr.count("half-written") == 1, f"{args}: one warning naming file:line\n{p.stderr[-1000:]}"
        assert a.read_bytes() == before and a.stat().st_ino == inode, f"{args}: the input was rewritten"
    writer.write(gens_row("p3")[30:] + "\n" + gens_row("p4") + "\n")
    writer.close()
    assert [json.loads(l)["id"] for l in open(a)] == ["p0", "p1", "p2", "p3", "p4"], "every row of the writer landed"


def test_failed_judgements_are_asked_again(tmp_path):
    from test_judge import FaultServer
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(gens_row("p1") + "\n" + gens_row("p2") + "\n")
    b.write_text(gens_row("p1", model="n") + "\n" + gens_row("p2", model="n") + "\n")
    s = FaultServer([("status", 400, {})] * 2)  # the first two requests fail, the rest are answered
    common = [f"--judge_url={s.url}", "--judge_workers=1", "--judge_cache=", "--judge_reasks=0", f"--pairs={tmp_path}/p.jsonl"]
    try:
        first = subprocess.run([sys.executable, "eval.py", "--task=score", f"--gens={a}", *common], **SUB)
        again = subprocess.run([sys.executable, "eval.py", "--task=score", f"--gens={a}", *common], **SUB)
        scored = [json.loads(l) for l in open(report.scores_path(str(a)))]
        s.script = [("status", 400, {})]
        pair1 = subprocess.run([sys.executable, "eval.py", "--task=pairwise", f"--gens={a},{b}", *common], **SUB)
        pair2 = subprocess.run([sys.executable, "eval.py", "--task=pairwise", f"--gens={a},{b}", *common], **SUB)
        pairs = [json.loads(l) for l in open(tmp_path / "p.jsonl")]
    finally:
        s.close()
    assert "2 failures" in first.stdout and "asking again for 2 failed" in again.stdout, first.stdout + again.stdout
    assert [(r["id"], r["error"]) for r in scored] == [("p1", None), ("p2", None)], "the failed rows are replaced"
    assert "asking again for 1 failed" in pair2.stdout, pair1.stdout + pair2.stdout
    assert sorted(r["id"] for r in pairs) == ["p1", "p2"] and all(r["winner"] for r in pairs), pairs


def test_ctrl_c_while_judging_ends_at_once(tmp_path):
    import time
    from test_judge import FaultServer
    g = tmp_path / "g.jsonl"
    g.write_text("".join(gens_row(f"p{i}", story=f"Once, {i}.") + "\n" for i in range(40)))
    s = FaultServer(latency=0.5)
    p = subprocess.Popen([sys.executable, "eval.py", "--task=score", f"--gens={g}", f"--judge_url={s.url}", "--judge_workers=2",
                          "--judge_cache="], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(s.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=5)
        n = len(s.requests)
        time.sleep(1)
        assert len(s.requests) == n and n < 10, f"no request after the interrupt ({n}, then {len(s.requests)})"
    finally:
        p.kill()
        s.close()
    assert p.returncode != 0 and "interrupted" in err and "Traceback" not in err, err[-2000:]


def test_the_commands_a_run_prints_work_as_printed(tmp_path):
    """The first hour of a new user: a tiny run, then each command that it and eval.py print, run
    through a shell exactly as printed, from a folder that stands for a fresh clone (eval.py and
    data/ linked in; Python finds the modules beside the real eval.py), through to report.html."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("eval.py", "data"):
        (clone / name).symlink_to(os.path.abspath(name))

    def shell(cmd, ok=True):
        p = subprocess.run(cmd, shell=True, cwd=clone, env=ENV, **SUB)
        assert (p.returncode == 0) == ok, f"{cmd}\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
        return p

    def printed(stdout):  # the commands under the last "next:" line, as printed
        lines = stdout.splitlines()
        k = max(i for i, line in enumerate(lines) if line.startswith("next:"))
        return [line[2:] for line in lines[k + 1:] if line.startswith("  python ")]

    run = train(tmp_path / "out" / "tiny", "--max_steps=2", "--eval_interval=0", "--max_new_tokens=16", "--batch_groups=1")
    final, base = printed(run.stdout)
    folder = tmp_path / "out" / "eval"
    assert f"--model={tmp_path}/out/tiny/ckpt_000002 --name=tiny --out={folder}/tiny.jsonl" in final and \
        "--limit=60" in final and "enable_thinking" not in final, f"the checkpoint knows how it thinks: {final}"
    p = shell(final)
    assert "thinking off as it was trained" in p.stdout and "falling back" not in p.stderr, p.stdout + p.stderr[-2000:]
    assert f"wrote 60 stories to {folder}/tiny.jsonl (60 in all)" in p.stdout, p.stdout[-1000:]
    refused = shell(base.replace("tiny-base.jsonl", "tiny.jsonl"), ok=False)
    assert refused.stderr.strip() == f"error: {folder}/tiny.jsonl holds the stories of 'tiny', not of 'tiny-base': " \
        "give tiny-base a file of its own (--out)", "one model's stories never join another's: " + refused.stderr[-1000:]
    assert len(open(folder / "tiny.jsonl").readlines()) == 60, "and the file is as it was"
    p = shell(base)
    assert f"wrote 60 stories to {folder}/tiny-base.jsonl (60 in all)" in p.stdout, p.stdout[-1000:]
    [score] = printed(p.stdout)
    assert f"--gens={folder}/tiny.jsonl,{folder}/tiny-base.jsonl" in score, "the trained model's file and its base's"
    p = shell(score)
    assert f"wrote 60 scores to {folder}/tiny.scores.jsonl (60 in all), 60 scores to" in p.stdout, p.stdout[-1000:]
    [pairwise] = printed(p.stdout)
    p = shell(pairwise)
    assert "wrote 60 judged pairs to out/eval/pairs.jsonl (60 in all)" in p.stdout, p.stdout[-1000:]
    report, study = printed(p.stdout)
    p = shell(report)
    assert f"wrote {folder}/tiny.report.md and {folder}/tiny.report.html" in p.stdout, p.stdout[-1000:]
    assert f"next: open file://{folder}/tiny.report.html in a browser" in p.stdout
    html = (folder / "tiny.report.html").read_text()
    assert html.count("<details id=prompt-") == 60 and "tiny-base SQ" in html, "each prompt once, both models' stories"
    [annotate] = printed(shell(study).stdout)
    page = subprocess.Popen(annotate, shell=True, cwd=clone, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        url = next(re.search(r"at (http://\S+)", line).group(1) for line in page.stdout if " at http://" in line)
        first = re.search(r"name=item value=(\d+)", requests.get(url, timeout=30).text).group(1)
        saved = requests.post(url + "choose", data=dict(item=first, choice="A"), timeout=30).text
        assert "saved: A for item 1" in saved, "the page confirms the choice"
    finally:
        os.killpg(page.pid, signal.SIGINT)  # Ctrl-C in a terminal: to the command's process group
        out, err = page.communicate(timeout=30)
    assert "1 of 60 items have a choice by alice" in out, out + err
    p = shell(printed(out)[0])
    assert f"writing over {folder}/tiny.report.md and {folder}/tiny.report.html, a report of " in p.stdout and \
        "Human study" in (folder / "tiny.report.md").read_text(), p.stdout[-2000:]


def test_help_lists_the_tasks():
    p = run_eval("--help")
    for task in ev.TASKS:
        assert re.search(rf"^  {task} +\S", p.stdout, re.M), f"{task}: one line in --help\n{p.stdout[:1500]}"
    assert "--enable_thinking=None  # None: as the checkpoint was trained" in p.stdout, p.stdout
