"""
The report: report.md (its tables) and, beside it with its stem, a self-contained report.html
that opens from disk with no network: Story Quality and the length ratio by requested length
with 95% intervals, quality by category, Elo, win rates, the human study, and every prompt with
its stories side by side, each with the judge's 16 scores and reply. The numbers are stats.py's.
"""
import json
import math
import os
import re
import time

import numpy as np

import jsonl
import pages
import rubric
import stats
from rubric import BUCKETS, bucket


def scores_path(gens):
    return gens[: -len(".jsonl")] + ".scores.jsonl" if gens.endswith(".jsonl") else gens + ".scores.jsonl"


def write(md_path, html_path, read_from, gens_by_file, all_pairs, votes, anchor, n_boot):
    """Both files of the report of read_from (the inputs' paths, named on report.md's first line);
    returns report.md's text."""
    gen_files, inputs, now = list(gens_by_file), ", ".join(read_from), {os.path.normpath(p) for p in read_from}
    md = [f"<!-- polaris report of {json.dumps(sorted(now))} -->", "# POLARIS evaluation", "",
          f"{time.strftime('%Y-%m-%d')}, from {inputs}. Stories, plots and the judge's scores: "
          f"{os.path.basename(html_path)}", ""]
    sections = [("Inputs", f"<p>{pages.esc(time.strftime('%Y-%m-%d'))}, from {pages.esc(inputs)}</p>")]

    def add(title, head_rows, note="", figure=""):
        md.extend([f"## {title}", "", pages.md_table(*head_rows), ""] + ([note, ""] if note else []))
        sections.append((title, figure + pages.table(*head_rows) + (f"<p class=muted>{pages.esc(note)}</p>" if note else "")))
    if gen_files:
        q = quality_table(gen_files, n_boot)
        labels = dict(enumerate(b for b, _ in BUCKETS))

        def plot(key, what, mark=None):  # one series a model, a point (bucket, mean, lo, hi) per bucket
            return pages.chart(what, [(r["model"], [(k, r[key][b][0], *r[key][b][1]) for k, b in labels.items()]) for r in q],
                               y_label=f"{what} (95% CI)", x_labels=labels, mark=mark)
        add("Story Quality by requested length", quality_rows(q), "Mean and 95% CI over prompts, n prompts; the judge's "
            "failures are left out.", plot("sq", "Story Quality") + plot("ratio", "Length ratio", (1.0, "as requested")))
        head, rows = category_rows(gens_by_file)
        if rows:
            add("Story Quality by category", (head, rows), "Mean SQ (n prompts) of each writing category.")
    if all_pairs:
        table = elo_table(all_pairs, anchor, min(n_boot, 200))
        add("Pairwise Elo (Bradley-Terry, dual position)", elo_rows(table),
            elo_note(table) or "95% CI by bootstrap over prompts.")
        add("Win rates (LLM judge, dual position: agreement wins, disagreement ties)", win_rows(win_table(all_pairs, n_boot)))
    if votes:
        order = [m for m, _ in gens_by_file.values()] or [m for v in votes for m in v[2:4]]
        pref, between, judged = human_rows(stats.human_study(votes, order, judge_verdicts(all_pairs), n_boot))
        add("Human study: which story people preferred", pref, "An item is one prompt and its two stories; its score is "
            "the mean of its annotators' votes (a tie, or two annotators who disagree, count half). The bootstrap "
            "resamples items; Wilson's interval counts each item as one vote, which is conservative (wider than 95%) "
            "when items carry several annotators.")
        if between[1]:
            add("Human study: agreement between annotators", between, "Share of items two annotators judged alike, with "
                "ties and without (items where either said tie left out); Cohen's kappa over the three outcomes. Kappa "
                "can be low, even negative, beside high agreement: when one answer dominates the votes, as when both "
                "prefer one model almost every time, chance alone agrees that often, and kappa counts only the "
                "agreement beyond chance (Feinstein and Cicchetti 1990, \"high agreement but low kappa\").")
        if judged[1]:
            add("Human study: the LLM judge against the annotators", judged, "The judge's dual-position verdict (pairs "
                "file) against each annotator's vote on the same item, with and without ties (MT-Bench's agreement).")
    if gen_files:
        sections.append(("Stories", stories_html(gens_by_file)))
    jsonl.write_text(md_path, "\n".join(md))
    jsonl.write_text(html_path, pages.report_page("POLARIS evaluation", sections))
    return "\n".join(md)


def check_overwrite(md_path, html_path, read_from, force):
    """A report is written over only by one that reads all its inputs (the same report again, or
    one with more in it), or with force: each report.md names its inputs on its first line."""
    there = [p for p in (md_path, html_path) if os.path.exists(p)]
    before, now = report_inputs(md_path), {os.path.normpath(p) for p in read_from}
    what = f"a report of {', '.join(sorted(before))}" if before else "a report of unknown inputs"
    if there and (before is None or not before <= now):
        if not force:
            raise ValueError(f"{' and '.join(there)} hold {what}, not of {', '.join(read_from)}: give another --out, "
                             "or --force=True to write over them")
        print(f"writing over {' and '.join(there)}, {what} (--force=True)")
    elif there and before != now:
        print(f"writing over {' and '.join(there)}, {what}: this report reads all of them and more")


def ci_text(m, ci, n, f=".1f"):
    return f"{m:{f}} [{ci[0]:{f}}, {ci[1]:{f}}] (n={n})" if n else "-"


def scored_rows(gens_file):
    """The judge's rows of a generation file (--task=score wrote them), by prompt id."""
    scored = jsonl.read(scores_path(gens_file), must_exist=False)
    if not scored:
        raise ValueError(f"{scores_path(gens_file)}: no scores; run --task=score first")
    return {r["id"]: r for r in scored}


def quality_table(gens_files, n_boot=1000):
    """Per model: mean SQ and the length ratio per requested-length bucket, each with a 95%
    bootstrap CI over prompts and its count, and the count of judge failures (left out)."""
    rows = []
    for f in gens_files:
        scored = list(scored_rows(f).values())
        out = dict(model=scored[0].get("model") or os.path.basename(f), failures=sum(r.get("error") is not None for r in scored),
                   sq={}, ratio={})
        for b, _ in BUCKETS:
            for key, ok in (("sq", lambda r: r.get("error") is None), ("ratio", lambda r: True)):
                v = [r[key] for r in scored if bucket(r["target_words"]) == b and ok(r)]
                out[key][b] = (float(np.mean(v)) if v else math.nan, stats.bootstrap_ci(v, np.mean, n_boot), len(v))
        rows.append(out)
    return rows


def quality_rows(table):
    far = BUCKETS[-1][0]
    return (["model"] + [f"SQ {b}" for b, _ in BUCKETS] + ["length ratio 8-12k", "judge failures"],
            [[r["model"]] + [ci_text(*r["sq"][b]) for b, _ in BUCKETS] + [ci_text(*r["ratio"][far], f=".2f"), r["failures"]]
             for r in table])


def category_rows(gens_by_file):
    """Mean SQ (n) per writing category and model, when the prompts carry a category."""
    sq = {}  # category -> model -> [SQ]
    for f, (name, rows) in gens_by_file.items():
        scored = scored_rows(f)
        for r in rows:
            s = scored.get(r["id"])
            if r.get("category") and s and s.get("error") is None:
                sq.setdefault(r["category"], {}).setdefault(name, []).append(s["sq"])
    models = [name for name, _ in gens_by_file.values()]
    return ["category"] + models, [[c] + [f"{np.mean(by[m]):.1f} (n={len(by[m])})" if m in by else "-" for m in models]
                                   for c, by in sorted(sq.items())]


def battles_by_prompt(pairs):
    """{prompt id: [(model_a, model_b, score of a)]}, missing judgements left out."""
    out = {}
    for r in pairs:
        if r["winner"] is not None:
            out.setdefault(r["id"], []).append((r["model_a"], r["model_b"], {"a": 1.0, "b": 0.0, "tie": 0.5}[r["winner"]]))
    return out


def elo_table(pairs, anchor=None, n_boot=200, seed=0):
    """{model: dict(rating, ci, n, points, rank, unbounded)}, best first. Ratings exist only when the
    win graph is strongly connected; otherwise every rating and ci is None and rank orders the groups."""
    by_prompt = battles_by_prompt(pairs)
    battles = [b for bs in by_prompt.values() for b in bs]
    if not battles:
        raise ValueError("no judged pairs to rate")
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    parts = stats.components(models, battles)
    if len(parts) > 1:
        raise ValueError("the comparison graph is not connected; ratings across these parts mean nothing: "
                         + " | ".join(", ".join(p) for p in parts))
    if anchor and anchor[0] not in models:
        raise ValueError(f"--anchor: no model named {anchor[0]!r} among {', '.join(models)}")
    n = {m: sum(m in (a, b) for a, b, _ in battles) for m in models}
    points = {m: sum(s if m == a else 1 - s for a, b, s in battles if m in (a, b)) for m in models}
    parts = stats.strong_parts(models, battles)
    if len(parts) > 1:  # no finite rating for anyone: the ridge alone would set the gaps, so no number is given
        ranks = {m: 1 + sum(len(p) for p in parts[:k]) for k, part in enumerate(parts) for m in part}
        return {m: dict(rating=None, ci=None, n=n[m], points=points[m], rank=ranks[m], unbounded=True)
                for part in parts for m in part}
    ratings = stats.bradley_terry(battles, models, anchor)
    groups = list(by_prompt.values())
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):  # resample prompts, refit
        sample = [b for i in rng.integers(0, len(groups), len(groups)) for b in groups[i]]
        present = sorted({m for a, b, _ in sample for m in (a, b)})
        if present == models and len(stats.components(models, sample)) == 1 and (not anchor or anchor[0] in present):
            boot.append(stats.bradley_terry(sample, models, anchor))
    return {m: dict(rating=ratings[m], ci=[float(np.percentile([r[m] for r in boot], q)) for q in (2.5, 97.5)],
                    n=n[m], points=points[m], rank=k, unbounded=False)
            for k, m in enumerate(sorted(models, key=lambda m: -ratings[m]), 1)}


def elo_note(table):
    """One plain sentence where the ratings do not exist, else ''."""
    if not any(r["unbounded"] for r in table.values()):
        return ""
    groups = {}
    for m, r in table.items():
        groups.setdefault(r["rank"], []).append(m)
    order = " > ".join(", ".join(ms) for _, ms in sorted(groups.items()))
    return (f"No Bradley-Terry rating exists: in the order {order}, each won every comparison it had with those "
            "after it (a tie counts for both sides), so the data give the order, not the distances.")


def elo_rows(table):
    rows = []
    for m, r in table.items():
        if r["unbounded"]:
            swept = {r["n"]: ": won all", 0: ": lost all"}.get(r["points"])
            rows.append([r["rank"], m, f"not bounded{swept} {r['n']} comparisons" if swept else "not bounded", "-", r["n"]])
        else:
            rows.append([r["rank"], m, f"{r['rating']:.0f}", f"[{r['ci'][0]:.0f}, {r['ci'][1]:.0f}]", r["n"]])
    return ["rank", "model", "Elo", "95% CI", "comparisons"], rows


def win_table(pairs, n_boot=1000):
    """Win rate of model_a over model_b for every pair of models, 95% CI over prompts."""
    rows = []
    for a, b in sorted({(r["model_a"], r["model_b"]) for r in pairs}):
        per = {}
        for r in pairs:
            if (r["model_a"], r["model_b"]) == (a, b) and r["winner"] is not None:
                per.setdefault(r["id"], []).append(r["winner"])
        groups = list(per.values())
        flat = lambda gs: stats.win_rate([o for g in gs for o in g])
        missing = sum((r["model_a"], r["model_b"]) == (a, b) and r["winner"] is None for r in pairs)
        outcomes = [o for g in groups for o in g]
        rows.append(dict(a=a, b=b, rate=flat(groups), ci=stats.bootstrap_ci(groups, flat, n_boot), wins=outcomes.count("a"),
                         ties=outcomes.count("tie"), losses=outcomes.count("b"), missing=missing))
    return rows


def win_rows(table):
    return (["model A", "vs model B", "win rate of A", "95% CI", "W / T / L", "missing"],
            [[r["a"], r["b"], f"{r['rate']:.3f}", f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
              f"{r['wins']} / {r['ties']} / {r['losses']}", r["missing"]] for r in table])


def judge_verdicts(pairs):
    """{(prompt id, frozenset of the two models): the winner's name or 'tie'} from pairs rows."""
    return {(r["id"], frozenset((r["model_a"], r["model_b"]))): {"a": r["model_a"], "b": r["model_b"]}.get(r["winner"], "tie")
            for r in pairs if r["winner"] is not None}


def human_rows(study):
    pct = lambda x: f"{100 * x:.1f}%" if math.isfinite(x) else "-"
    interval = lambda ci: f"[{pct(ci[0])}, {pct(ci[1])}]"
    pref = (["model", "vs", "preferred (ties half)", "95% CI, bootstrap over items", "Wilson 95%, conservative",
             "items", "annotators", "W / T / L (items)"],
            [[s["x"], s["y"], pct(s["rate"]), interval(s["ci"]), interval(s["wilson"]), s["items"], len(s["annotators"]),
              f"{s['wins']} / {s['ties']} / {s['losses']}"] for s in study])
    between = (["models", "annotators", "items", "agreement with ties", "without ties (items)", "Cohen's kappa"],
               [[f"{s['x']} vs {s['y']}", " & ".join(p["annotators"]), p["items"], pct(p["agreement"][0]),
                 f"{pct(p['agreement'][1])} ({p['agreement'][2]})", f"{p['kappa']:.2f}" if math.isfinite(p["kappa"]) else "-"]
                for s in study for p in s["between"]])
    judge = (["models", "votes", "annotators", "agreement with ties", "without ties (votes)"],
             [[f"{s['x']} vs {s['y']}", s["judge"][0], len(s["annotators"]), pct(s["judge"][1]),
               f"{pct(s['judge'][2])} ({s['judge'][3]})"] for s in study if s["judge"]])
    return pref, between, judge


def report_inputs(md_path):
    """The inputs a report.md was written from, as its first line names them; None when it names none."""
    try:
        with open(md_path, encoding="utf-8") as f:
            m = re.fullmatch(r"<!-- polaris report of (\[.*\]) -->\n?", f.readline())
        return set(json.loads(m.group(1))) if m else None
    except (OSError, ValueError):
        return None


def stories_html(gens_by_file):
    """Each prompt once, with a contents list by requested-length bucket: its stories side by side,
    each with its SQ, words and the judge's 16 scores and reply, the whole prompt folded."""
    scored = {f: scored_rows(f) for f in gens_by_file}
    by_id = {}  # prompt id -> {file: its row}
    for f, (_, rows) in gens_by_file.items():
        for r in rows:
            by_id.setdefault(r["id"], {})[f] = r
    toc, parts, n = [], [], 0  # n: the prompts so far, which name each prompt's anchor
    for b, _ in BUCKETS:
        ids = [i for i, rs in by_id.items() if bucket(next(iter(rs.values()))["target_words"]) == b]
        toc.append((f"{b} ({len(ids)} prompts)", [(f"prompt-{n + k}", str(i)) for k, i in enumerate(ids)]))
        parts.append(f"<h3>{pages.esc(b)}</h3>" if ids else "")
        for i in ids:
            first = next(iter(by_id[i].values()))
            stories, sqs = [], []
            for f, (label, _) in gens_by_file.items():
                r, s = by_id[i].get(f), scored[f].get(i, {})
                sq = f"SQ {s['sq']:.1f}" if s.get("error") is None and s.get("sq") is not None else \
                    f"no SQ ({s.get('error') or 'not scored'})"
                sqs.append(f"{label} {sq if r else 'no story'}")
                if r:
                    stories.append((label, f"{sq} · {rubric.count_words(r['story'])} of {r['target_words']} words",
                                    r["story"], s.get("scores"), s.get("reply")))
            summary = f"{i} · {first.get('category') or 'no category'} · " + " · ".join(sqs)
            parts.append(prompt_details(f"prompt-{n}", summary, first["prompt"], stories))
            n += 1
    return contents(toc) + "".join(parts)


def prompt_details(anchor, summary, prompt, stories):
    """One prompt, folded: its request, then its stories side by side (stacked on a narrow window),
    each under its heading and facts, with the judge's scores and reply folded beneath it.
    stories: [(heading, facts, story, scores or None, reply or None)]."""
    cols = "".join(f"<article><h4>{pages.esc(head)}</h4><p class=muted>{pages.esc(facts)}</p><div class=story>{pages.esc(story)}</div>"
                   + (f"<details><summary>16 scores</summary>{pages.scores_table(scores)}</details>" if scores else "")
                   + f"{pages.reply_details(reply)}</article>" for head, facts, story, scores, reply in stories)
    return (f"<details id={anchor}><summary>{pages.esc(summary)}</summary><div class=prompt>{pages.esc(prompt)}</div>"
            f"<div class=cols>{cols}</div></details>")


def contents(groups):
    """A list of links, a line a group: groups [(heading, [(anchor, label)])]."""
    lines = [f"<p><b>{pages.esc(head)}</b>: " + " ".join(f"<a href='#{a}'>{pages.esc(label)}</a>" for a, label in links) + "</p>"
             for head, links in groups if links]
    return "<nav class=toc>" + "".join(lines) + "</nav>"
