"""
Evaluation: the paper's tables for your checkpoints and for API models, the blinded human study,
the pages that show the stories, and training runs side by side. Its command line and its tasks;
the numbers are stats.py's, the pages pages.py's kit with report.py, viewer.py, compare.py and
humanstudy.py's annotation page. It imports the trainer's modules; they never import it.

    # 1. stories for the 180 held-out prompts, from a checkpoint (thinking as it was trained) or its
    #    base, or any OpenAI-compatible endpoint; train.py's closing line prints the first two
    python eval.py --task=generate --model=out/polaris/ckpt_000160 --name=polaris --out=out/eval/polaris.jsonl
    python eval.py --task=generate --model=Qwen/Qwen3.5-9B --name=polaris-base --out=out/eval/polaris-base.jsonl
    python eval.py --task=generate --model=gpt-5.4 --api_url=https://api.openai.com/v1 \\
        --api_key_env=OPENAI_API_KEY --out=out/eval/gpt.jsonl
    # 2. Story Quality and length ratio by requested length (judge: config/eval.py, GPT-5.4)
    python eval.py config/eval.py --task=score --gens=out/eval/polaris.jsonl,out/eval/polaris-base.jsonl
    # 3. dual-position pairwise judging, win rates, Bradley-Terry Elo
    python eval.py config/eval.py --task=pairwise --gens=out/eval/polaris.jsonl,out/eval/polaris-base.jsonl
    python eval.py --task=elo --pairs=out/eval/pairs.jsonl --anchor=polaris-base:1000 --out=out/eval/ratings.json
    # 4. the human study: sampled once, then one annotation page per annotator
    python eval.py --task=study --gens=out/eval/polaris.jsonl,out/eval/polaris-base.jsonl --n=60 --out=out/study/study.jsonl
    python eval.py --task=annotate --study=out/study/study.jsonl --annotator=alice [--port=8800]
    # 5. the report: report.md and a self-contained report.html beside it
    python eval.py --task=report --gens=out/eval/polaris.jsonl,out/eval/polaris-base.jsonl --annotations=out/study/annotations
    # 6. a training run in the browser, from before its first step
    python eval.py --task=rollouts --run=out/polaris [--port=8801]
    python eval.py --task=rollouts --run=out/hri/s1-ref1,out/hri/s1-ref0,...   # several: their comparison, live
    # 7. training runs side by side: grouped by the settings in which they differ, the spread over seeds
    python eval.py --task=compare --runs=out/hri/s1-ref1,out/hri/s1-ref0,... --out=out/hri/compare.md

Each task ends with a line of what it wrote and the next command, as it can be copied; `--help`
lists the tasks and every setting. Every output is JSONL written a row at a time and resumable:
rows already there are skipped, and an interrupted run's half-written last line is dropped, never
the rest of the file. An input is only read: a last line still being written is skipped with a
warning, never removed. Each task is a function above the `__main__` guard that takes the settings
it uses by name; the guard is the one difference from train.py's top-to-bottom style.
"""
import inspect
import os
import pathlib
import shlex
import signal
import sys

import compare
import data
import genfiles
import humanstudy
import judge
import jsonl
import pages
import pairwise
import preflight
import report
import rubric
import rundir
import stats
import viewer
from configurator import redact_url

PAIRS = "out/eval/pairs.jsonl"  # the pairs file by default: pairwise writes it; elo and report read it
CLIENTS = []  # the judge or API clients a task has open: Ctrl-C cancels them

# -----------------------------------------------------------------------------
# what a task says last: the next command, as it can be copied


def files(gens):
    return [g for g in gens.split(",") if g]



def fail(msg):
    sys.exit(f"error: {redact_url(msg)}")


def command(*args):
    """A next command as it can be copied into a shell: this command's config files, args, then the
    judge settings it was given (a key in a URL shown as ***: keys never reach a log)."""
    configs = [a for a in sys.argv[1:] if not a.startswith("--")]
    keys = judge.SETTINGS + ("judge_cache", "length_weight")
    judging = [a for a in sys.argv[1:] if a.startswith("--") and a[2:].split("=")[0] in keys]
    return redact_url(" ".join(shlex.quote(a) for a in ["python", "eval.py", *configs, *args, *judging]))


def say_next(what, *commands):
    """A task's last line: what to do next, and the commands that do it, one a line."""
    print(f"next: {what}:" + "".join(f"\n  {cmd}" for cmd in commands), flush=True)


def judged_by(config):
    local = config["judge_url"] == "local"
    return "the local heuristic judge (config/eval.py after eval.py: GPT-5.4)" if local else config["judge_model"]


def with_base(path):
    """A generation file and its base's beside it, the trained model's first (NAME.jsonl and
    NAME-base.jsonl, as train.py's closing line names them), or the file alone when the other is not there."""
    stem = path[: -len(".jsonl")] if path.endswith(".jsonl") else path
    both = [stem[: -len("-base")] + ".jsonl", path] if stem.endswith("-base") else [path, stem + "-base.jsonl"]
    return both if all(os.path.isfile(f) for f in both) else [path]


def report_path(first_input):
    """Where a printed report command writes: beside its first input, named for it (tiny.report.md)."""
    return (first_input[: -len(".jsonl")] if first_input.endswith(".jsonl") else first_input) + ".report.md"


def pairs_flag(pairs):
    """--pairs=... for a next command, when this command's pairs file is not the default one."""
    return [] if pairs == PAIRS else [f"--pairs={pairs}"]


def open_judge(config):
    """The judge of the settings, kept where Ctrl-C finds it."""
    CLIENTS.append(judge.from_config(config, cache_dir=config["judge_cache"] or None))
    return CLIENTS[-1]

# -----------------------------------------------------------------------------
# the tasks: `python eval.py --task=NAME` runs TASKS[NAME] with the settings its parameters name


def trained_thinking(model):
    """Whether a train.py checkpoint folder (its state.pt holds the run's settings) was trained with
    thinking; True for any other model (a hub model, the tiny base), as Qwen3.5's template does."""
    path = os.path.join(model, "state.pt")
    if not os.path.isfile(path):
        return True
    import pickle

    import torch
    try:
        return bool(torch.load(path, weights_only=False)["config"]["enable_thinking"])
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as e:
        fail(f"{path}: cannot read how the checkpoint was trained ({e}): give --enable_thinking=True or False")


def generate(model, out, prompts, limit, name, batch_size, api_url, api_key_env, api_extra, gen_cache,
             enable_thinking, max_new_tokens, temperature, top_p, top_k, repetition_penalty, presence_penalty,
             dtype, seed, config):
    """Stories for the prompts file, from a checkpoint (one batched decode per --batch_size
    prompts) or an OpenAI-compatible endpoint; a generation without a story is never written."""
    if not model or not out:
        fail("--task=generate needs --model and --out")
    rows = jsonl.read(prompts, numbered=True)
    for line, r in rows:
        problem = data.row_problem(r, story=False)
        if problem:
            fail(f"{prompts}:{line}: {problem}")
    rows = [r for _, r in rows][:limit or None]
    label = name or os.path.basename(model.rstrip("/"))
    there = jsonl.read(out, must_exist=False, repair=True)
    others = sorted({str(r.get("model")) for r in there} - {label})
    if others:  # one file, one model: its rows would be read as one model's in every table
        fail(f"{out} holds the stories of {others[0]!r}, not of {label!r}: give {label} a file of its own (--out)")
    done = {r["id"] for r in there}
    todo = [r for r in rows if r["id"] not in done]
    if not todo:  # no model is loaded for nothing
        print(f"all {len(rows)} prompts already in {out}")
        return say_generated(out, 0, config=config)
    thinking = enable_thinking
    if thinking is None:  # as the checkpoint was trained; a hub model, a base or an API model thinks
        thinking = True if api_url else trained_thinking(model)
    as_trained = enable_thinking is None and not api_url and os.path.isfile(os.path.join(model, "state.pt"))
    print(f"{len(rows) - len(todo)} of {len(rows)} prompts already in {out}; generating {len(todo)} with {label}, "
          f"thinking {'on' if thinking else 'off'}{' as it was trained' if as_trained else ''}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    import rollout  # torch: after the checks above, which need none
    from tqdm import tqdm

    def split_reply(reply):  # an API reply -> (thinking, story, finish reason)
        content = reply["content"]
        if reply["reasoning"]:  # the server split the thinking out (reasoning_content)
            return reply["reasoning"].strip(), content.strip(), reply["finish_reason"]
        # a server without a reasoning parser returns the raw text
        thinking, story, _ = rollout.split_thinking(
            content, "</think>" in content or content.lstrip().startswith("<think>"), False)
        return thinking, story, reply["finish_reason"]

    if api_url:  # an API model or a served checkpoint (vLLM, transformers serve), over HTTP
        # what a server needs to sample as the card says: the OpenAI sampling fields, and
        # thinking on or off for its chat template. top_k and repetition_penalty are not
        # OpenAI fields (transformers serve refuses them): vLLM and transformers serve take
        # them from the checkpoint's generation_config, or add them with --api_extra, which
        # adds fields or replaces them one by one (None: not sent)
        fields = dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      presence_penalty=presence_penalty or None,
                      chat_template_kwargs=dict(enable_thinking=thinking))
        fields.update(api_extra)
        client = judge.Judge(api_url, model, key_env=api_key_env, workers=config["judge_workers"],
                             timeout=config["judge_timeout"], retries=config["judge_retries"], max_tokens=0,
                             max_reply_bytes=config["judge_max_reply_bytes"], cache_dir=gen_cache or None,
                             extra={k: v for k, v in fields.items() if v is not None}, url_setting="api_url")
        CLIENTS.append(client)
        # a reply without a story is not cached, so that a later run asks again
        futures = [client.pool.submit(client.chat, [dict(role="user", content=r["prompt"])],
                                      keep=lambda reply: not rubric.is_blank(split_reply(reply)[1])) for r in todo]
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import checkpoint
        preflight.check_sampling(repetition_penalty, presence_penalty)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        checkpoint.quiet(device)  # on a CPU, Qwen3.5's CUDA-only kernels are no news
        weights = getattr(torch, dtype) if device == "cuda" else torch.float32
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=weights).to(device)
        tok = AutoTokenizer.from_pretrained(model)
        eos = rollout.eos_ids(lm, tok)
    index = {r["id"]: k for k, r in enumerate(rows)}  # a prompt's seed: its place in the prompts file

    def from_api(k):  # -> (thinking, story, finish reason), story None when the request failed
        try:
            return split_reply(futures[k].result())
        except judge.JudgeError as e:
            return "", None, str(e)

    missed = []  # prompts left for a later run: failed requests, and generations without a story
    for i in tqdm(range(0, len(todo), batch_size), desc=f"generating, {batch_size} prompts at a time"):
        batch = todo[i:i + batch_size]
        if api_url:
            results = [from_api(k) for k in range(i, i + len(batch))]
        else:  # one batched decode; each story depends on its prompt's seed alone, not on the batch
            samples = rollout.sample(
                lm, tok, [rollout.render_prompt(tok, r["prompt"], thinking) for r in batch],
                seeds=[seed + index[r["id"]] for r in batch], n=1, eos=eos, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                presence_penalty=presence_penalty, enable_thinking=thinking)
            results = [(s.thinking, s.text, "length" if s.truncated else "stop") for [s] in samples]
        for r, (thinking, story, finish) in zip(batch, results):
            if story is None or rubric.is_blank(story):  # never written as if it were a finished story
                missed.append(f"{r['id']} ({finish})" if story is None else
                              f"{r['id']} (no story: {finish}, {rubric.count_words(thinking)} words of thinking)")
                continue
            jsonl.append(out, [dict(id=r["id"], prompt=r["prompt"], target_words=r["target_words"],
                                    category=r.get("category", ""), model=label, story=story,
                                    words=rubric.count_words(story), thinking_words=rubric.count_words(thinking),
                                    finish_reason=finish)], sync=True)
    for client in CLIENTS:
        client.close()
    say_generated(out, len(todo) - len(missed), missed, config)
    if missed:
        fail(f"{len(missed)} of {len(todo)} generations came back without a story and were not written: "
             + ", ".join(missed[:20]) + (" ..." if len(missed) > 20 else "") + ". A story cut off in its "
             "thinking needs a larger max_new_tokens, or --enable_thinking=False for a model that does not close its "
             "thinking (the tiny random model never does); an empty reply from a server, its reasoning settings. "
             "Run again to ask for these again")


def say_generated(out, n, missed=(), config=None):
    """generate's last lines: how many stories it wrote, and, when none is missing, the next command."""
    print(f"wrote {n} stories to {out} ({len(jsonl.read(out, must_exist=False))} in all)")
    if not missed:
        say_next(f"Story Quality by requested length, judged by {judged_by(config)}",
                 command("--task=score", "--gens=" + ",".join(with_base(out))))


def score(gens, pairs, n_boot, config):
    """Each story of each generation file judged on the rubric, into <gens>.scores.jsonl."""
    gen_files = files(gens)
    if not gen_files:
        fail("--task=score needs --gens=FILE[,FILE...]")
    gens_by_file = genfiles.read_gens(gen_files)
    client = open_judge(config)
    wrote = []
    for f, (label, rows) in gens_by_file.items():
        path = report.scores_path(f)
        done = {r["id"] for r in genfiles.drop_failed(path, lambda r: r.get("error") is not None)}
        todo = [r for r in rows if r["id"] not in done]
        print(f"{f}: scoring {len(todo)} of {len(rows)} ({len(done)} already in {path})")
        results, used = judge.score(client, todo, progress=True)
        jsonl.append(path, [dict(id=r["id"], target_words=r["target_words"], model=label, **res)
                            for r, res in zip(todo, results)], sync=True)
        wrote.append(f"{len(todo)} scores to {path} ({len(jsonl.read(path))} in all)")
        unknown = f" (+ the unknown cost of {used['unpriced']} replies without token counts)" if used["unpriced"] else ""
        print(f"  judge: {used['failures']} failures, {used['tokens_in'] + used['tokens_out']} tokens, "
              f"${used['cost']:.4f}{unknown}")
    client.close()
    print(pages.md_table(*report.quality_rows(report.quality_table(gen_files, n_boot))))
    print("wrote " + ", ".join(wrote))
    if len(gen_files) > 1:
        say_next(f"each pair of models judged on each prompt, twice with the positions swapped, by "
                 f"{judged_by(config)}", command("--task=pairwise", f"--gens={gens}", *pairs_flag(pairs)))
    else:
        say_next("the report", command("--task=report", f"--gens={gens}", f"--out={report_path(gen_files[0])}"))


def judge_pairs(gens, pairs, allow_intersection, max_chars, n, n_boot, config):
    """Every pair of models on every shared prompt, judged twice with the positions swapped."""
    gen_files = files(gens)
    if len(gen_files) < 2:
        fail("--task=pairwise needs --gens with two or more files")
    gens_by_file = genfiles.read_gens(gen_files)
    ids = genfiles.shared_ids({f: {r["id"] for r in rows} for f, (_, rows) in gens_by_file.items()}, allow_intersection)
    by_file = {f: {r["id"]: r for r in rows} for f, (_, rows) in gens_by_file.items()}
    label = {f: name for f, (name, _) in gens_by_file.items()}
    client = open_judge(config)
    genfiles.drop_failed(pairs, lambda r: r.get("winner") is None)
    done = {(r["id"], r["model_a"], r["model_b"]) for r in pairwise.read_pairs(pairs, must_exist=False)}
    cut = lambda t: t[:max_chars] if max_chars else t  # noqa: E731
    ask = lambda first, second: client.pool.submit(  # noqa: E731
        pairwise.ask, client, pairwise.messages(first["prompt"], cut(first["story"]), cut(second["story"])))
    jobs = []
    for fa, fb in ((fa, fb) for k, fa in enumerate(gen_files) for fb in gen_files[k + 1:]):
        for i in ids:
            if (i, label[fa], label[fb]) not in done:
                a, b = by_file[fa][i], by_file[fb][i]
                jobs.append((i, label[fa], label[fb], ask(a, b), ask(b, a)))
    os.makedirs(os.path.dirname(os.path.abspath(pairs)), exist_ok=True)
    from tqdm import tqdm
    for i, ma, mb, f1, f2 in tqdm(jobs, desc="pairwise"):
        r1, r2 = f1.result(), f2.result()
        overall = lambda r: r["parsed"]["Overall"] if r["parsed"] else None  # noqa: E731
        row = dict(id=i, model_a=ma, model_b=mb, winner=stats.dual_verdict(overall(r1), overall(r2)),
                   first=r1["parsed"], second=r2["parsed"], error=r1["error"] or r2["error"])
        jsonl.append(pairs, [row], sync=True)
    client.close()
    every = pairwise.read_pairs(pairs)
    print(pages.md_table(*report.win_rows(report.win_table(every, n_boot))))
    print(f"wrote {len(jobs)} judged pairs to {pairs} ({len(every)} in all)")
    report_cmd = command("--task=report", f"--gens={gens}", *pairs_flag(pairs), f"--out={report_path(gen_files[0])}")
    study_out = os.path.join(report_path(gen_files[0])[: -len(".report.md")] + "-study", "study.jsonl")
    differ = [i for i in ids if len(gen_files) == 2 and by_file[gen_files[0]][i]["story"].split()
              != by_file[gen_files[1]][i]["story"].split()]  # a study leaves out a prompt of two equal stories
    if os.path.exists(study_out):
        say_next(f"the report; the study of the two is drawn in {study_out}: a page for each annotator",
                 report_cmd, command("--task=annotate", f"--study={study_out}", "--annotator=alice"))
    elif differ:
        say_next("the report; or first a blinded human study of the two, whose choices the report then adds",
                 report_cmd, command("--task=study", f"--gens={gens}", f"--n={min(n, len(differ))}",
                                     f"--out={study_out}"))
    else:
        say_next("the report", report_cmd)


def anchor_rating(anchor):
    """--anchor=NAME:RATING -> (name, rating), or None."""
    if anchor and not anchor.rsplit(":", 1)[-1].replace(".", "", 1).lstrip("-").isdigit():
        fail(f"--anchor={anchor!r} must look like NAME:RATING")
    return (anchor.rsplit(":", 1)[0], float(anchor.rsplit(":", 1)[1])) if anchor else None


def elo(pairs, anchor, n_boot, out):
    """Bradley-Terry ratings of the pairs file, printed and written to --out as JSON."""
    table = report.elo_table(pairwise.read_pairs(pairs), anchor_rating(anchor), min(n_boot, 200))
    note = report.elo_note(table)
    print(pages.md_table(*report.elo_rows(table)) + (f"\n\n{note}" if note else ""))
    if out:
        jsonl.write_json(out, table)
    print(f"wrote {out}" if out else "wrote nothing (--out=ratings.json writes the table)")
    say_next("the report, which holds this table", command(
        "--task=report", f"--pairs={pairs}", *([f"--anchor={anchor}"] if anchor else []),
        f"--out={report_path(pairs.split(',')[0])}"))


def draw_study(gens, n, out, seed):
    """A blinded human study of two generation files, drawn once (humanstudy.draw)."""
    gen_files = files(gens)
    if len(gen_files) != 2 or not out:
        fail("--task=study needs --gens with exactly two generation files and --out=STUDY.jsonl")
    print(humanstudy.draw(genfiles.read_gens(gen_files), n, out, seed))
    say_next("one page for each annotator, under a name of their own (it names their file of choices)",
             command("--task=annotate", f"--study={out}", "--annotator=alice"))


def annotate(study, annotator, host, port):
    """The blinded annotation page for one annotator, served until Ctrl-C (humanstudy.py). Each
    choice is appended to annotations/NAME.jsonl beside the study and flushed to disk at once."""
    items, path, rows, app = humanstudy.annotation_app(study, annotator)
    print(f"{study}: {len(items)} items, {len(rows)} with a choice by {annotator} in {path}")
    pages.serve(app, host, port, f"the annotation page for {annotator}", script=humanstudy.ANNOTATE_JS)
    files_of = [s.get("file") for s in items[0]["stories"]]  # the generation files, when the study names them
    named = all(isinstance(f, str) for f in files_of)
    print(f"{len(rows)} of {len(items)} items have a choice by {annotator}, in {path}")
    if not rows:
        print("next: the same command shows the page again")
        return
    say_next(f"the same command continues where {annotator} stopped; once every annotator is done, the report",
             command("--task=report", *([f"--gens={','.join(files_of)}"] if named else []),
                     f"--annotations={os.path.join(os.path.dirname(study), 'annotations')}",
                     f"--out={report_path(files_of[0] if named else study)}"))


def write_report(gens, pairs, annotations, out, anchor, n_boot, force):
    """report.md and, beside it with its stem, a self-contained report.html (report.py). A report
    is written over only by one that reads all its inputs, or with --force=True."""
    gen_files = files(gens)
    all_pairs = pairwise.read_pairs(pairs, must_exist=pairs != PAIRS)  # the default pairs file joins if it is there
    gens_by_file = genfiles.read_gens(gen_files) if gen_files else {}
    votes = humanstudy.read_annotations(annotations) if annotations else []
    md_path = out or "out/eval/report.md"
    html_path = (md_path[: -len(".md")] if md_path.endswith(".md") else md_path) + ".html"
    read_from = gen_files + [p for p in files(pairs) if all_pairs] + ([annotations] if votes else [])
    if not read_from:
        fail("--task=report needs --gens, --pairs or --annotations with something in them")
    report.check_overwrite(md_path, html_path, read_from, force)
    md = report.write(md_path, html_path, read_from, gens_by_file, all_pairs, votes, anchor_rating(anchor), n_boot)
    print("\n".join(md.split("\n")[1:]) + f"\nwrote {md_path} and {html_path}")
    print(f"next: open {pathlib.Path(os.path.abspath(html_path)).as_uri()} in a browser (it needs no network)")


def rollouts(run, windows, host, port):
    """A training run in the browser: its charts and each step's stories, served until Ctrl-C. The
    run may not have started: the page waits for it, then follows it. Several runs (--run=A,B,...):
    their comparison (compare.py), live, linking to each run's viewer."""
    dirs = files(run)
    if len(dirs) > 1:
        compare.compare(dirs, windows)  # runs that cannot be compared are refused before the server starts
        pages.serve(compare.app(dirs, windows), host, port, f"the comparison of {len(dirs)} runs",
                    script=viewer.VIEWER_JS)
        return
    if not run:
        fail("--task=rollouts needs --run=OUT_DIR, a training run's folder (the page waits for a run not yet started)")
    if os.path.exists(run) and not os.path.isdir(run):
        fail(f"--run={run} is a file: give a training run's folder (its out_dir)")
    app = viewer.run_viewer(run)
    print(f"{run}: {app.status()[1]}")
    pages.serve(app, host, port, f"the run viewer for {run}", script=viewer.VIEWER_JS)
    state, sentence = app.status()
    print(f"{run}: {sentence}")
    settings = rundir.settings(run)
    if state == "finished":
        tiny = settings.get("init_from") == "tiny"
        print(rundir.closing_lines(run, settings["max_steps"], base=os.path.join(run, "base") if tiny
                                   else settings.get("init_from"), thinking=settings.get("enable_thinking", True),
                                   tiny=tiny, max_new_tokens=settings.get("max_new_tokens")))
    elif state == "stopped":
        print("next: the command that started the run, with --resume=auto, continues it from its last checkpoint")
    else:
        print("next: the run prints its next commands when it ends; the same command shows the page again")


def compare_runs(runs, windows, out):
    """Training runs side by side (compare.py): grouped by the settings in which they differ, the
    spread over seeds; --out (PATH.md) and, with its stem, a self-contained PATH.html."""
    dirs = files(runs)
    if len(dirs) < 2:
        fail("--task=compare needs --runs=OUT_DIR,OUT_DIR,...: two or more training runs' folders")
    md_path = out or "out/compare.md"
    html_path = (md_path[: -len(".md")] if md_path.endswith(".md") else md_path) + ".html"
    c = compare.compare(dirs, windows)
    jsonl.write_text(md_path, compare.markdown(c, os.path.basename(html_path)))
    jsonl.write_text(html_path, compare.page(c))
    print(compare.markdown(c) + f"\nwrote {md_path} and {html_path} (open it in a browser: "
          f"{pathlib.Path(os.path.abspath(html_path)).as_uri()})")
    say_next("each run's stories, beside their comparison, followed live",
             command("--task=rollouts", f"--run={','.join(dirs)}"))


TASKS = dict(generate=generate, score=score, pairwise=judge_pairs, elo=elo, study=draw_study, annotate=annotate,
             report=write_report, rollouts=rollouts, compare=compare_runs)
ABOUT = """tasks (--task=NAME), each ending with the command to run next:
  generate  stories for the prompts, from a checkpoint, a hub model or an OpenAI-compatible API
  score     Story Quality and the length ratio of each story by requested length, by the judge
  pairwise  each two models' stories for each prompt, judged twice with the positions swapped
  elo       Bradley-Terry ratings of the pairs file
  study     a blinded human study of two generation files, drawn once
  annotate  one annotator's page for a study
  report    report.md and a self-contained report.html of all of the above
  rollouts  a training run in the browser, followed from before its first step (several: compared)
  compare   training runs side by side: groups by their differing settings, the spread over seeds
"""

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    from configurator import check_ranges, configure
    # task
    task = "generate"  # generate | score | pairwise | elo | study | annotate | report | rollouts | compare
    prompts = "data/eval/prompts.jsonl"
    out = ""  # generate: the generations file; elo: ratings.json; study: the study file; report, compare: PATH.md
    gens = ""  # comma-separated generation files (score, pairwise, study, report)
    pairs = PAIRS  # pairwise writes it; elo and report read it (comma-separated for several)
    limit = 0  # generate: only the first N prompts (0: all)
    batch_size = 16  # generate: prompts decoded together from a checkpoint; output written after each batch
    allow_intersection = False  # pairwise: compare on the prompt ids all files share
    max_chars = 0  # pairwise: cut each story to this many characters (0: whole), against length bias
    anchor = ""  # elo: 'NAME:RATING'
    n_boot = 1000
    # the human study and the pages
    n = 60  # study: items drawn
    study = ""  # annotate: the study file
    annotator = ""  # annotate: the annotator's name, which names annotations/NAME.jsonl
    annotations = ""  # report: the folder of annotation files
    force = False  # report: write over a report of other inputs
    run = ""  # rollouts: a training run's out_dir (several, comma-separated: their comparison, each run linked)
    runs = ""  # compare: training runs' out_dirs, comma-separated
    windows = ""  # compare, rollouts of several runs: steps averaged, '1-10,51-60' ('': the first and last ten)
    host, port = "127.0.0.1", 0  # annotate, rollouts: the page's address (port 0: any free one); elsewhere a token is asked
    # generation: within the card's recommended ranges; no presence penalty (the card allows 0.0-1.5;
    # training uses 1.0 against loops in long rollouts, evaluation measures the model as it is)
    model = ""  # a checkpoint folder or hub id, or the model name at api_url
    name = ""  # the model's name in the tables (default: the folder's or model's name)
    api_url = ""  # '' generates locally with transformers; else an OpenAI-compatible base URL
    api_key_env = ""
    api_extra = {}  # API generation: body fields added to those sent (a field set to None is not sent)
    gen_cache = "out/eval/gen_cache"  # API generations' replies, apart from the judge's ('' to disable)
    enable_thinking = None  # None: as the checkpoint was trained (its state.pt), else on; True or False overrides
    max_new_tokens = 14336  # the card, for 8-12k-word targets
    temperature = 0.6
    top_p = 0.95
    top_k = 20
    repetition_penalty = 1.0
    presence_penalty = 0.0
    dtype = "bfloat16"
    seed = 1337
    # judge (config/eval.py: GPT-5.4)
    judge_url = "local"  # base URL ending in /v1, or 'local' for the built-in heuristic judge
    judge_model = "polaris-local"
    judge_key_env = ""  # the NAME of the environment variable holding the API key
    judge_workers = 16  # requests in flight at once (API generation too)
    judge_timeout = 300.0  # seconds for one request: connecting, headers and body
    judge_retries = 6  # on 429, 5xx, timeouts and bodies cut on the wire
    judge_reasks = 2  # on a reply that does not parse
    judge_backoff_max = 60.0  # the longest wait between retries
    judge_extra = {}  # passed through in the body: {'reasoning_effort': 'low', ...}
    judge_max_tokens = 8192  # the reply's cap, sent as max_completion_tokens (0: none)
    judge_max_reply_bytes = 1_000_000  # a larger reply body is a failure, never re-asked or cached
    judge_price_in = 0.0  # dollars per million tokens in
    judge_price_out = 0.0  # dollars per million tokens out
    judge_cache = "out/judge_cache"  # '' to disable
    length_weight = 25.0  # reward = SQ - length_weight * (1 - length score)
    c = configure(globals(), about=ABOUT)
    check_ranges(c, dict(preflight.SAMPLING_RANGES, **judge.RANGES, limit=">= 0", n_boot=">= 1", max_chars=">= 0",
                         batch_size=">= 1", n=">= 1", port="[0, 65535]"))
    if enable_thinking not in (None, True, False):
        fail(f"--enable_thinking={enable_thinking!r} must be True, False or None (as the checkpoint was trained)")
    if task not in TASKS:
        fail(f"--task={task!r} must be one of {', '.join(TASKS)}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the run like Ctrl-C
    run_task = TASKS[task]
    wanted = inspect.signature(run_task).parameters
    try:
        run_task(**{k: c[k] for k in wanted if k != "config"}, **({"config": c} if "config" in wanted else {}))
    except (OSError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:  # the rows written so far stay, and a rerun resumes after them
        judge.exit_now(CLIENTS[-1] if CLIENTS else None,
                       "interrupted: queued judge requests cancelled" if CLIENTS else "stopped")
