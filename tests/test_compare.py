"""Runs side by side (eval.py --task=compare, compare.py): the numbers against a recomputation from
the runs' metrics.jsonl, grouping by the settings that differ, a run still training, runs that
cannot be compared, and the page opened from disk. Most run folders are written here directly."""
import json
import math
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys

import pytest

import compare
import stats

T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 10: 2.228139, 30: 2.042272,
        2.5: 3.574655, 3.7: 2.867521, 1000: 1.962339}  # Student t's 0.975 quantile, from published tables
BASE = dict(train_data="data/sample/train.jsonl", init_from="tiny", group_size=6,
            eval_data="data/sample/heldout.jsonl", max_steps=20, save_interval=20, lock_stale_s=120.0,
            learning_rate=0.01)


def fake_run(folder, seed, n_ref, last=20, rows_before=(), cut="", meta=None, **config):
    """A run folder as train.py writes it: run.json, and metrics.jsonl with step 0's held-out row and
    a made-up row per step (HRI climbs faster; ref_* NaN without references)."""
    rng = random.Random(seed * 7 + n_ref)
    nan = float("nan")
    rows = [dict(step=0, heldout_sq=-25 + rng.gauss(0, 1))] + list(rows_before)
    for s in range(1, last + 1):
        rows.append(dict(step=s, reward=-50 + s * (1.5 if n_ref else 1.0) + rng.gauss(0, 3),
                         sq=-25 + s + rng.gauss(0, 3), length_ratio=0.1 + 0.002 * s + rng.gauss(0, 0.01),
                         entropy=6.9 - 0.1 * s + rng.gauss(0, 0.1), ref_adv=2 + rng.gauss(0, 0.2) if n_ref else nan,
                         ref_nll=6.9 - 0.15 * s if n_ref else nan,
                         **(dict(heldout_sq=-25 + s + rng.gauss(0, 2)) if s % 10 == 0 else {})))
    os.makedirs(folder)
    with open(folder / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + cut)
    config = dict(BASE, out_dir=str(folder), seed=seed, n_ref=n_ref, **config)
    (folder / "run.json").write_text(json.dumps(dict(run_id="x", config=config, **(meta or {}))))
    return str(folder)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Six runs, three seeds with HRI and three without; one still training (its lock held by this
    process) with a line being written, one with a step evaluated again after a resume (two rows,
    the later wins), one whose save_interval differs (it changes nothing computed) and whose
    learning_rate changed on a resume. Compared by eval.py once."""
    root = tmp_path_factory.mktemp("compare")
    runs = []
    for seed in (1337, 1, 2):
        for n_ref in (1, 0):
            extra = {}
            if (seed, n_ref) == (2, 1):  # training: at step 15 of 20
                extra = dict(last=15, cut='{"step": 16, "rew')
            if (seed, n_ref) == (1, 1):  # step 10 logged, then logged again after a resume
                extra = dict(rows_before=[dict(step=10, reward=999.0, sq=999.0)])
            if (seed, n_ref) == (1337, 0):
                starts = [dict(step=0), dict(step=8, changed={"learning_rate": 0.5})]
                extra = dict(save_interval=5, meta=dict(starts=starts))
            runs.append(fake_run(root / f"s{seed}-ref{n_ref}", seed, n_ref, **extra))
    with open(root / "s2-ref1" / "run.lock", "w") as f:
        json.dump(dict(pid=os.getpid(), host=socket.gethostname(), since="now"), f)
    p = compare_task(runs, root / "hri.md")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return root, runs, p.stdout


def compare_task(runs, out):
    return subprocess.run([sys.executable, "eval.py", "--task=compare", f"--runs={','.join(runs)}", f"--out={out}"],
                          capture_output=True, text=True, timeout=120)


def md_tables(text):
    """{section heading: [rows of cells]} of a markdown file's tables, the head row first."""
    out, heading = {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ")
        elif line.startswith("| ") and "--- |" not in line:
            out.setdefault(heading, []).append([c.strip() for c in line.strip("| ").split(" | ")])
    return out


def metrics(folder):
    rows = {}
    for line in open(os.path.join(folder, "metrics.jsonl")):
        try:
            r = json.loads(line)
        except ValueError:
            continue  # the line being written
        rows.setdefault(r["step"], {}).update(r)
    return rows


def window(folder, key, span):
    """A run's mean of key over the steps of span, or None when the run has not reached its end."""
    rows = metrics(folder)
    v = [rows[s][key] for s in range(span[0], span[1] + 1) if key in rows.get(s, {})]
    v = [x for x in v if not math.isnan(x)]
    return statistics.fmean(v) if v and max(rows) >= span[1] else None


def close(text, value):
    """A number as printed equals value to the digits shown."""
    if value is None or math.isnan(value):
        return text == "-"
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-9


def interval_close(text, lo, hi):
    m = re.fullmatch(r"\[(\S+), (\S+)\]", text)
    return bool(m) and close(m.group(1), lo) and close(m.group(2), hi)


def test_the_numbers_equal_a_recomputation_from_metrics(compared):
    root, runs, stdout = compared
    tables = md_tables(open(root / "hri.md").read())
    wrote, says, command = stdout.splitlines()[-3:]
    assert wrote.startswith(f"wrote {root / 'hri.md'} and {root / 'hri.html'}"), f"it names what it wrote: {wrote}"
    assert says.startswith("next:") and command.strip().startswith("python eval.py --task=rollouts --run="), command
    assert "--task=rollouts --run=" + ",".join(runs) in command, "and the next command"
    label = {name: key for key, name, _ in compare.METRICS}
    groups = {1: [r for r in runs if r.endswith("ref1")], 0: [r for r in runs if r.endswith("ref0")]}
    seed = lambda folder: int(re.search(r"s(\d+)-ref", folder).group(1))
    values = {}  # (n_ref, key, span) -> {seed: value}
    for n_ref, folders in groups.items():
        heading = f"n_ref={n_ref}: seeds 1337, 1, 2"
        assert heading in tables, f"a table per group, named by the setting that differs: {list(tables)}"
        for name, steps, mean, sd, n, ci, each in tables[heading][1:]:
            span = tuple(int(x) for x in steps.split("-"))
            got = {seed(f): window(f, label[name], span) for f in folders}
            got = values[n_ref, label[name], span] = {s: v for s, v in got.items() if v is not None}
            v = list(got.values())
            where = f"n_ref={n_ref} {name} {steps}"
            shown = dict(x.split(": ") for x in each.split(", ")) if each != "-" else {}
            assert {int(k) for k in shown} == got.keys() and all(close(shown[str(k)], x) for k, x in got.items()), \
                f"{where}: each seed's value {each}"
            assert int(n) == len(v), f"{where}: {n} seeds, recomputed {len(v)}"
            assert close(mean, statistics.fmean(v) if v else None), f"{where}: mean {mean}"
            if len(v) > 1:
                m, half = statistics.fmean(v), T975[len(v) - 1] * statistics.stdev(v) / math.sqrt(len(v))
                assert close(sd, statistics.stdev(v)), f"{where}: sd {sd}"
                assert interval_close(ci, m - half, m + half), f"{where}: {ci}, recomputed {m - half}, {m + half}"
    assert values[1, "reward", (11, 20)].keys() == {1337, 1}, "a run still training is not in a window it has not reached"
    verdicts = set()
    for name, steps, a, b, diff, ci, how, says in tables["n_ref=1 against n_ref=0"][1:]:
        span = tuple(int(x) for x in steps.split("-"))
        va, vb = values[1, label[name], span], values[0, label[name], span]
        if not va or not vb:
            assert (diff, how, says) == ("-", "-", "not logged by n_ref=0 in these steps"), f"{name} {steps}: {says}"
            continue
        for text, v in ((a, va), (b, vb)):  # each group's mean and spread beside the difference
            m, sd = text.split(" ± ")
            assert close(m, statistics.fmean(v.values())) and close(sd, statistics.stdev(v.values())), text
        d = statistics.fmean(va.values()) - statistics.fmean(vb.values())
        assert close(diff, d), f"{name} {steps}: difference {diff}, recomputed {d}"
        m = re.fullmatch(r"\[(\S+), (\S+)\]", ci)
        lo, hi = float(m.group(1)), float(m.group(2))
        if va.keys() == vb.keys():  # the same seeds: the interval of the per-seed differences
            per_seed = [va[s] - vb[s] for s in va]
            half = T975[len(per_seed) - 1] * statistics.stdev(per_seed) / math.sqrt(len(per_seed))
            assert how == "paired, 3 seeds" and interval_close(ci, d - half, d + half), f"{name} {steps}: {ci}"
        else:  # Welch: the half-width over the standard error is t at Welch-Satterthwaite's df
            sa, sb = (statistics.variance(g.values()) / len(g) for g in (va, vb))
            df = (sa + sb) ** 2 / (sa ** 2 / (len(va) - 1) + sb ** 2 / (len(vb) - 1))
            q = (hi - lo) / 2 / math.sqrt(sa + sb)
            assert how == "Welch, 2 and 3 runs" and T975[math.ceil(df)] - 0.01 < q < T975[math.floor(df)] + 0.01, \
                f"{name} {steps}: {how}, t {q} for df {df}"
        should = ("the seeds cannot tell these apart" if lo <= 0 <= hi else "n_ref=1 higher" if d > 0
                  else "n_ref=0 higher")
        assert says == should, f"{name} {steps}: {says!r} for {ci}"
        verdicts.add(says)
    assert {"the seeds cannot tell these apart", "n_ref=1 higher"} <= verdicts, f"both cases are checked: {verdicts}"


def test_the_runs_table_says_which_run_is_training_and_what_changed(compared):
    root, runs, _ = compared
    table = md_tables(open(root / "hri.md").read())["Runs compared"]
    rows = {r[1]: r for r in table[1:]}
    assert rows[runs[4]][4] == "training: step 15 of 20", f"the run still training is marked: {rows[runs[4]]}"
    assert rows[runs[1]][5] == "learning_rate" and rows[runs[0]][5] == "-", "a setting changed on resume is named"
    assert all(rows[r][4] == "finished, 20 steps" for r in runs if r != runs[4]), table
    md = open(root / "hri.md").read()
    assert f"steps 11-20: without {runs[4]} (training: step 15 of 20)" in md, "what a window leaves out, and why"
    assert ("that differ in n_ref: n_ref=1 (3 runs), n_ref=0 (3 runs). Set aside: seed and out_dir, and "
            "save_interval (checkpoints on disk), which differ but change nothing") in md, "save_interval is inert"


def test_grouping_by_the_settings_that_differ(tmp_path):
    runs = [compare.read_run(fake_run(tmp_path / name, seed, n_ref, last=last, **config))
            for name, seed, n_ref, last, config in (("a", 1, 1, 20, {}), ("b", 2, 1, 20, dict(keep_last=1, wandb_log=True)),
                                                    ("c", 1, 0, 20, dict(learning_rate=0.02)),
                                                    ("d", 2, 0, 12, dict(learning_rate=0.02)))]
    differ, groups = compare.group(runs)
    assert differ == ["learning_rate", "n_ref"], f"seed and settings that change nothing are set aside: {differ}"
    assert [(name, [os.path.basename(r["out_dir"]) for r in rs]) for name, rs in groups] == [
        ("learning_rate=0.01, n_ref=1", ["a", "b"]), ("learning_rate=0.02, n_ref=0", ["c", "d"])], groups
    assert runs[3]["status"] == "stopped" and "stopped at step 12 of 20" in compare.status_text(runs[3]), \
        "a run short of max_steps without a live lock stopped without finishing"
    c = compare.compare([runs[0]["out_dir"], runs[3]["out_dir"]])
    says = {(key, span): d["verdict"] for (_, _, key, span), d in c["diffs"].items()}
    assert says["reward", (11, 20)] == "no run of learning_rate=0.02, n_ref=0 has reached step 20", says
    assert says["ref_nll", (1, 10)] == "not logged by learning_rate=0.02, n_ref=0 in these steps", says
    assert says["reward", (1, 10)] == "too few seeds to tell (fewer than 2 a group)", says
    del runs[1]["config"]["learning_rate"]  # a run.json from before a setting existed
    assert compare.group(runs[:2])[1][1][0] == "learning_rate=(not in run.json)", "a setting an older run lacks"
    assert compare.group(runs[:1])[1][0][0] == "all runs", "runs that differ by seed alone are one group"
    assert compare.windows_of("", runs) == [(1, 10), (11, 20)], "by default the first and the last ten steps"
    assert compare.windows_of("3-5,7-7", runs) == [(3, 5), (7, 7)], "or the windows asked for"
    for text, message in (("1-30", "ends at step 20"), ("10-5", "FIRST-LAST"), ("last", "FIRST-LAST")):
        with pytest.raises(ValueError, match=message):
            compare.windows_of(text, runs)


def test_runs_that_cannot_be_compared_are_refused_by_name(tmp_path):
    runs = [fake_run(tmp_path / "a", 1, 1, last=2), fake_run(tmp_path / "b", 2, 0, last=2, train_data="data/x.jsonl"),
            fake_run(tmp_path / "c", 3, 1, last=2, group_size=4), fake_run(tmp_path / "d", 1, 0, last=2)]
    p = compare_task(runs, tmp_path / "c.md")
    err = p.stderr.strip()
    assert p.returncode != 0 and err.startswith("error: runs that cannot be compared:"), err
    assert len(err.splitlines()) == 1, f"one line: {err}"
    for part in (f"{runs[1]} has train_data=data/x.jsonl where {runs[0]} has data/sample/train.jsonl (other training",
                 f"{runs[2]} has group_size=4 where {runs[0]} has 6 (another group size)"):
        assert part in err, f"{part!r} not in {err!r}"
    assert runs[3] not in err, "a run that can be compared is not named"
    assert not (tmp_path / "c.md").exists() and not (tmp_path / "c.html").exists(), "nothing written"
    os.remove(tmp_path / "d" / "run.json")
    for dirs, message in (([runs[0], runs[3]], "run.json: missing"), ([runs[0], runs[0]], "given twice"),
                          ([runs[0], str(tmp_path / "nope")], "no such folder")):
        with pytest.raises(ValueError, match=message):
            compare.compare(dirs)


def test_t_quantile_against_published_values():
    for df, t in T975.items():
        assert abs(stats.t_quantile(0.975, df) - t) < 2e-6, f"t(0.975, {df}): {stats.t_quantile(0.975, df)}"


def test_the_page_from_disk_in_a_browser(compared, browser):
    from test_study import Watched
    root, runs, _ = compared
    url = (root / "hri.html").as_uri()
    w = Watched(browser, lambda u: u == url)
    page = w.page
    try:
        page.goto(url)
        assert page.locator("h1").inner_text() == "Runs compared", "the page opens from disk"
        assert page.locator("figure svg").count() == len(compare.METRICS), "a chart per metric"
        assert page.locator("svg polygon").count() >= 2 * 6, "each group's band from its lowest to its highest run"
        assert page.locator("svg polyline[stroke-width='0.8']").count() >= 6 * 5, "each run a thin line"
        assert page.locator("table").count() == 4, "the runs, a table per group, the difference"
        assert "training: step 15 of 20, drawn to its last step" in page.content(), "the run in progress is marked"
        assert "--task=rollouts --run=" in page.locator("code").inner_text(), "the page names the live command"
        assert page.locator("script").count() == 0, "no script at all"
        page.screenshot(path=str(root / "compare.png"), full_page=True)
    finally:
        w.close()
    assert w.requests == [url] and not w.dialogs, f"no request but the file: {w.requests}, dialogs {w.dialogs}"


def test_the_viewer_of_several_runs(tmp_path, browser):
    """A real tiny run (the format train.py writes) and a copy of it as the other arm: the task's
    numbers from its metrics.jsonl; the viewer serves their comparison at / and each run under its
    own path, with relative links that stay there and a link back."""
    import requests
    from test_study import Watched, start_page, stop_page
    from test_train import FAST, train
    real, other = tmp_path / "real", tmp_path / "other"
    train(real, "--max_steps=2", *FAST)
    shutil.copytree(real, other)
    meta = json.loads((other / "run.json").read_text())
    meta["config"].update(n_ref=0, out_dir=str(other))
    (other / "run.json").write_text(json.dumps(meta))
    rewards = [json.loads(line)["reward"] for line in open(real / "metrics.jsonl")]
    c = compare.compare([str(real), str(other)])
    assert c["spans"] == [(1, 2)] and [name for name, _ in c["groups"]] == ["n_ref=1", "n_ref=0"], c["groups"]
    assert c["stats"]["n_ref=1", "reward", (1, 2)]["mean"] == pytest.approx(statistics.fmean(rewards)), \
        "metrics.jsonl read as train.py writes it"
    server, url = start_page("--task=rollouts", f"--run={real},{other}")
    w = Watched(browser, lambda u: u.startswith(url))
    page = w.page
    try:
        page.goto(url)
        assert page.locator("h1").inner_text() == "Runs compared" and page.locator("figure svg").count() == 6, \
            "the comparison at /, its charts (held-out SQ is off in this run)"
        page.locator("a[href='run/2/']").click()
        page.wait_for_selector("h1:has-text('step 2')")
        assert page.url == url + "run/2/" and str(other) in page.locator("h1").inner_text(), "run 2's viewer"
        page.get_by_role("link", name="previous").click()
        page.wait_for_selector("h1:has-text('step 1')")
        assert page.url == url + "run/2/?step=1", f"a step's link stays under the run's path: {page.url}"
        page.get_by_role("link", name="all runs").click()
        page.wait_for_selector("h1:has-text('Runs compared')")
        assert page.url == url, "and a link back to the comparison"
        assert requests.get(url + "run/3/", timeout=30).status_code == 404, "no run 3"
        r = requests.get(url + "run/1", timeout=30)
        assert r.url == url + "run/1/" and str(real) in r.text, "a run's path without its slash is redirected"
    finally:
        stop_page(server)
        w.close()
    assert not w.refused and not w.dialogs, f"requests refused {w.refused}, dialogs {w.dialogs}"
