"""
Runs side by side: several training runs (the out_dirs train.py writes) grouped by the settings in
which their configs differ, their curves overlaid, and for each group the spread over its seeds
with a 95% interval, so that "does this setting help?" is answered against the seeds' own noise.

    python eval.py --task=compare --runs=out/hri/s1337-ref1,out/hri/s1337-ref0,... --out=out/hri/compare.md
    python eval.py --task=rollouts --run=out/hri/s1337-ref1,out/hri/s1337-ref0,...   # live, with the stories

The numbers are plain functions (numpy only; the t quantile is computed here, no scipy); the page
is made with pages.py's kit and opens from disk with no network.
"""
import json
import math
import os
import re

import numpy as np

import jsonl
import pages
import rundir
import stats
import viewer

# (metrics.jsonl key, name, format): what is charted and tabled
METRICS = [("reward", "reward", ".1f"), ("sq", "SQ (training judge)", ".1f"),
           ("heldout_sq", "held-out SQ", ".1f"), ("length_ratio", "length ratio", ".3f"),
           ("ref_adv", "reference's advantage", ".2f"), ("ref_nll", "reference NLL / token", ".2f"),
           ("entropy", "entropy", ".2f")]

# settings that runs compared must share: with another value the numbers measure something else,
# not the effect of a setting. Such runs are refused by name; compare them in a command of their own.
SAME = dict(train_data="other training prompts", init_from="another model", tiny_vocab="another tiny model",
            tiny_hidden="another tiny model", tiny_layers="another tiny model",
            group_size="another group size", eval_data="other held-out prompts")

# settings that cannot change what a run computes, left out of the grouping: where it writes, how it
# was started, how it logs, when it saves, how long it waits, what it costs. Seed is what a group
# spreads over; max_steps only ends a run (the learning rate does not decay): a run must reach each window.
INERT = dict(out_dir="where it writes", seed="the runs of a group differ by seed", max_steps="when it ends",
             resume="how it was started", resume_from="how it was started", wandb_log="logging",
             wandb_project="logging", wandb_run_name="logging", save_interval="checkpoints on disk",
             keep_last="checkpoints on disk", lock_stale_s="a wait", dist_timeout_s="a wait",
             device_memory_gb="a memory check", judge_workers="requests at once", judge_timeout="a wait",
             judge_backoff_max="a wait", judge_key_env="the key's variable", judge_price_in="the cost shown",
             judge_price_out="the cost shown", eval_judge_workers="requests at once",
             eval_judge_timeout="a wait", eval_judge_backoff_max="a wait",
             eval_judge_key_env="the key's variable", eval_judge_price_in="the cost shown",
             eval_judge_price_out="the cost shown")

# -----------------------------------------------------------------------------
# the numbers


def verdict(d, name_a, name_b):
    """What a difference's interval says, in words."""
    if not all(math.isfinite(x) for x in d["ci"]):
        return "too few seeds to tell (fewer than 2 a group)"
    if d["ci"][0] <= 0 <= d["ci"][1]:
        return "the seeds cannot tell these apart"
    return f"{name_a} higher" if d["mean"] > 0 else f"{name_b} higher"


def window_mean(rows, key, span):
    """A run's mean of one metric over the steps span = (first, last), NaN steps left out."""
    v = [x for x in (rows.get(s, {}).get(key) for s in range(span[0], span[1] + 1)) if finite(x)]
    return float(np.mean(v)) if v else math.nan


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)

# -----------------------------------------------------------------------------
# the runs: read, checked, grouped


def training(out_dir, stale_s):
    """Whether out_dir's run is training now: a live process holds its run.lock (rundir.holder, the
    rule by which train.py takes a lock over)."""
    return rundir.holder(os.path.join(out_dir, "run.lock"), stale_s)[1]


def changed_settings(meta):
    """Settings changed on a resume, from run.json's "starts" (one entry per start, absent before
    runs recorded them): each entry's "changed" names, or its "config" compared with the one before."""
    names, before = [], None
    for start in meta.get("starts") or []:
        if not isinstance(start, dict):
            continue
        config = start.get("config") if isinstance(start.get("config"), dict) else None
        changed = start.get("changed") if isinstance(start.get("changed"), (dict, list)) else []
        names += [k for k in changed if k not in names]
        if config and before:
            names += [k for k in config if config[k] != before.get(k) and k not in names and k not in INERT]
        before = config or before
    return names


def read_run(out_dir):
    """One run folder: its config, its metrics by step (a step's rows merged, the later wins, as
    after a resume that evaluated a step again), its last step and whether it is still training."""
    path = os.path.join(out_dir, "run.json")
    if not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: no such folder (give the out_dir of a training run)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing: {out_dir} is not a training run's out_dir, or is from before "
                         "run.json (resume it once with --resume=auto to write one)") from None
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("max_steps"), int):
        raise ValueError(f"{path}: no \"config\" with max_steps (train.py writes it)")
    rows = {}
    for r in jsonl.read(os.path.join(out_dir, "metrics.jsonl"), must_exist=False):
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            rows.setdefault(r["step"], {}).update(r)
    last = max(rows, default=0)
    status = ("finished" if last >= config["max_steps"] else
              "training" if training(out_dir, config.get("lock_stale_s", 120)) else "stopped")
    return dict(out_dir=out_dir, config=config, seed=config.get("seed"), rows=rows, last=last, status=status,
                changed=changed_settings(meta))


def status_text(run):
    m = run["config"]["max_steps"]
    return {"finished": f"finished, {m} steps", "training": f"training: step {run['last']} of {m}",
            "stopped": f"stopped at step {run['last']} of {m} without finishing"}[run["status"]]


def setting(run, key):
    """A setting's value as text: the name of a group, the reason of a refusal."""
    v = run["config"].get(key, _MISSING)
    return "(not in run.json)" if v is _MISSING else json.dumps(v) if isinstance(v, (dict, list)) else str(v)


_MISSING = object()  # a setting an older run.json does not hold


def check_comparable(runs):
    """Refuse, naming each, the runs that differ from the first in a setting of SAME."""
    first = runs[0]
    bad = [f"{r['out_dir']} has {k}={setting(r, k)} where {first['out_dir']} has {setting(first, k)} ({why})"
           for r in runs[1:] for k, why in SAME.items() if setting(r, k) != setting(first, k)]
    if bad:
        raise ValueError("runs that cannot be compared: " + "; ".join(bad) + ". Runs compared must share "
                         + ", ".join(dict.fromkeys(SAME)) + ": compare these in a command of their own")
    dirs = [os.path.realpath(r["out_dir"]) for r in runs]
    twice = sorted({r["out_dir"] for r, d in zip(runs, dirs) if dirs.count(d) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)}: given twice in --runs")


def group(runs):
    """(the settings in which the runs differ, [(group name, [runs])]) in the order given; the name
    is those settings' values, such as 'n_ref=1'."""
    keys = list(dict.fromkeys(k for r in runs for k in r["config"]))
    differ = [k for k in keys if k not in INERT and k not in SAME and len({setting(r, k) for r in runs}) > 1]
    groups = {}
    for r in runs:
        name = ", ".join(f"{k}={setting(r, k)}" for k in differ) or "all runs"
        groups.setdefault(name, []).append(r)
    return differ, list(groups.items())


def windows_of(text, runs):
    """The windows of steps, [(first, last)]: from text such as '1-10,51-60', or by default the
    first and the last ten steps of the shortest run's max_steps. Each run must reach each window."""
    shortest = min(r["config"]["max_steps"] for r in runs)
    if not text:
        spans = [(1, min(10, shortest)), (max(1, shortest - 9), shortest)]
        return list(dict.fromkeys(spans))
    spans = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if not m or not 0 <= int(m.group(1)) <= int(m.group(2)):
            raise ValueError(f"--windows={text!r}: give steps as FIRST-LAST[,FIRST-LAST...] (1-10,51-60)")
        spans.append((int(m.group(1)), int(m.group(2))))
    short = [f"{r['out_dir']} ends at step {r['config']['max_steps']}" for r in runs
             if r["config"]["max_steps"] < max(b for _, b in spans)]
    if short:
        raise ValueError(f"--windows={text!r}: {', '.join(short)}: give windows that every run reaches")
    return spans


def compare(run_dirs, windows=""):
    """Everything the tables and the page show, from the runs' folders: runs, groups, windows, each
    group's spread per (metric, window) and, for every two groups, their difference."""
    runs = [read_run(d) for d in run_dirs]
    check_comparable(runs)
    differ, groups = group(runs)
    spans = windows_of(windows, runs)
    spreads, missing = {}, {}
    for name, rs in groups:
        for span in spans:
            missing[name, span] = [r for r in rs if r["last"] < span[1]]  # still short of the window's end
            for key, _, _ in METRICS:
                values = [(r["seed"], window_mean(r["rows"], key, span)) for r in rs if r["last"] >= span[1]]
                spreads[name, key, span] = dict(stats.spread(v for _, v in values), values=[sv for sv in values
                                                                                    if math.isfinite(sv[1])])
    diffs, size = {}, {name: len(rs) for name, rs in groups}
    for i, (a, _) in enumerate(groups):
        for b, _ in groups[i + 1:]:
            for key, _, _ in METRICS:
                for span in spans:
                    d = stats.difference(spreads[a, key, span]["values"], spreads[b, key, span]["values"])
                    empty = [g for g in (a, b) if not spreads[g, key, span]["values"]]
                    says = (verdict(d, a, b) if not empty else
                            f"no run of {empty[0]} has reached step {span[1]}"
                            if len(missing[empty[0], span]) == size[empty[0]] else "not logged in these steps"
                            if len(empty) == 2 else f"not logged by {empty[0]} in these steps")
                    diffs[a, b, key, span] = dict(d, verdict=says)
    return dict(runs=runs, differ=differ, groups=groups, spans=spans, stats=spreads, missing=missing,
                diffs=diffs)

# -----------------------------------------------------------------------------
# tables: (head, rows) pairs, written as markdown and shown as HTML


def num(v, f):
    return f"{v:{f}}" if math.isfinite(v) else "-"


def interval(ci, f):
    return f"[{ci[0]:{f}}, {ci[1]:{f}}]" if all(math.isfinite(x) for x in ci) else "-"


def span_text(span):
    return f"{span[0]}-{span[1]}" if span[1] > span[0] else f"{span[0]}"


def runs_rows(c):
    return (["group", "run", "seed", "steps logged", "status", "changed on resume"],
            [[name, r["out_dir"], r["seed"], r["last"], status_text(r), ", ".join(r["changed"]) or "-"]
             for name, rs in c["groups"] for r in rs])


def group_rows(c, name):
    rows = []
    for key, label, f in METRICS:
        for span in c["spans"]:
            s = c["stats"][name, key, span]
            rows.append([label, span_text(span), num(s["mean"], f), num(s["sd"], f), s["n"],
                         interval(s["ci"], f), ", ".join(f"{seed}: {v:{f}}" for seed, v in s["values"]) or "-"])
    return ["metric", "steps", "mean over seeds", "sd", "seeds", "95% interval", "each seed"], rows


def mean_sd(s, f):
    return num(s["mean"], f) + (f" ± {s['sd']:{f}}" if math.isfinite(s["sd"]) else "")


def diff_rows(c, a, b):
    rows = []
    for key, label, f in METRICS:
        for span in c["spans"]:
            d = c["diffs"][a, b, key, span]
            rows.append([label, span_text(span), mean_sd(c["stats"][a, key, span], f),
                         mean_sd(c["stats"][b, key, span], f), num(d["mean"], f), interval(d["ci"], f),
                         d["how"], d["verdict"]])
    return (["metric", "steps", f"{a}: mean ± sd", f"{b}: mean ± sd", "difference", "95% interval", "by",
             "what the seeds say"], rows)


def group_title(name, runs):
    return f"{name}: seeds {', '.join(str(r['seed']) for r in runs)}"


def notes(c, name):
    """Which runs a group's windows leave out, and why."""
    return [f"steps {span_text(span)}: without " + ", ".join(f"{r['out_dir']} ({status_text(r)})" for r in rs)
            for (g, span), rs in c["missing"].items() if g == name and rs]


def intro(c):
    names = ", ".join(f"{name} ({len(rs)} run{'s' * (len(rs) > 1)})" for name, rs in c["groups"])
    by = f"that differ in {', '.join(c['differ'])}: {names}" if c["differ"] else "with the same settings"
    inert = [f"{k} ({why})" for k, why in INERT.items()
             if k not in ("seed", "out_dir") and len({setting(r, k) for r in c["runs"]}) > 1]
    n = len(c["groups"])
    return (f"{len(c['runs'])} runs in {n} group{'s' * (n > 1)} {by}. Set aside: seed and out_dir"
            + (f", and {', '.join(inert)}, which differ but change nothing a run computes" if inert else "")
            + ".")


HOW = ("For each run, the mean of a metric over the steps of a window; over a group's runs, the mean, the "
       "standard deviation (n - 1), the number of seeds and a 95% Student t interval of the mean. A "
       "difference of two groups is paired by seed when both hold the same seeds (the interval of the "
       "per-seed differences), else Welch's. \"The seeds cannot tell these apart\": the interval covers 0. A "
       "run counts in a window once it has logged the window's last step.")


def markdown(c, html_name=""):
    md = ["# Runs compared", "", intro(c) + (f" Curves and runs: {html_name}" if html_name else ""), "",
          pages.md_table(*runs_rows(c)), ""]
    for name, rs in c["groups"]:
        md += [f"## {group_title(name, rs)}", "", pages.md_table(*group_rows(c, name)), ""]
        md += [f"- {n}" for n in notes(c, name)] + ([""] if notes(c, name) else [])
    for a, b in dict.fromkeys((a, b) for a, b, _, _ in c["diffs"]):
        md += [f"## {a} against {b}", "", pages.md_table(*diff_rows(c, a, b)), ""]
    return "\n".join(md + [HOW, ""])

# -----------------------------------------------------------------------------
# the page


def curves(c):
    """One chart per metric: each group's mean over its runs, a band from its lowest to its
    highest run, over the steps that every run of the group has logged; each run a thin line."""
    out = []
    for key, label, _ in METRICS:
        series, thin = [], []
        for k, (name, rs) in enumerate(c["groups"]):
            per_run = [{s: row[key] for s, row in r["rows"].items() if isinstance(row.get(key), (int, float))
                        and math.isfinite(row[key])} for r in rs]
            shared = sorted(set.intersection(*(set(v) for v in per_run)))
            series.append((name, [(s, float(np.mean([v[s] for v in per_run])), min(v[s] for v in per_run),
                                   max(v[s] for v in per_run)) for s in shared]))
            thin += [(k, sorted(v.items())) for v in per_run]
        out.append(pages.chart(label, series, y_label=label, x_label="step", band=True, thin=thin))
    return "".join(out)


def page(c, served=False):
    """The comparison as one self-contained page; served: each run's name links to its viewer."""
    if served:
        where = "Each run's charts and stories: " + " ".join(
            f"<a href='run/{k}/'>{pages.esc(r['out_dir'])}</a>" for k, r in enumerate(c["runs"], 1))
    else:
        where = ("Each run's stories, with this page computed live as the runs go on: <code>python eval.py "
                 f"--task=rollouts --run={pages.esc(','.join(r['out_dir'] for r in c['runs']))}</code>")
    unfinished = [f"{r['out_dir']} is {status_text(r)}, drawn to its last step" for r in c["runs"]
                  if r["status"] != "finished"]
    how = ("Each group's mean over its runs (thick), a band from its lowest to its highest run over the "
           "steps all of its runs have logged, and each run a thin line" + (": " if unfinished else ".")
           + "; ".join(unfinished))
    sections = [("Runs", f"<p>{pages.esc(intro(c))}</p>{pages.table(*runs_rows(c))}<p>{where}</p>"),
                ("Curves", f"<p class=muted>{pages.esc(how)}</p>{curves(c)}")]
    for name, rs in c["groups"]:
        left_out = "".join(f"<p class=note>{pages.esc(n)}</p>" for n in notes(c, name))
        sections.append((group_title(name, rs), pages.table(*group_rows(c, name), numeric=(2, 3, 4)) + left_out))
    for a, b in dict.fromkeys((a, b) for a, b, _, _ in c["diffs"]):
        sections.append((f"{a} against {b}", pages.table(*diff_rows(c, a, b), numeric=(2, 3, 4))))
    sections.append(("How these numbers are made", f"<p>{pages.esc(HOW)}</p>"))
    return pages.report_page("Runs compared", sections)


def app(run_dirs, windows=""):
    """app(method, path, params) for several runs: / is their comparison, computed anew from their
    files at each request (it follows runs in progress), and /run/K/ is run K's viewer."""
    apps = [viewer.run_viewer(d, back="../../") for d in run_dirs]

    def app(method, route, params):
        if route == "/":
            c = compare(run_dirs, windows)
            body = page(c, served=True)
            if any(r["status"] == "training" for r in c["runs"]):  # the browser asks again every 30 seconds
                body = body.replace("<title>", "<meta http-equiv=refresh content=30><title>", 1)
            return 200, body, {}
        m = re.fullmatch(r"/run/(\d+)(/.*)?", route)
        if not m or not 1 <= int(m.group(1)) <= len(apps):
            return 404, pages.page("Not found", "<h1>Not found</h1><a href='/'>the comparison</a>"), {}
        if not m.group(2):  # the run's page links relative to its folder
            return 303, "", {"Location": f"/run/{m.group(1)}/"}
        return apps[int(m.group(1)) - 1](method, m.group(2), params)
    return app
