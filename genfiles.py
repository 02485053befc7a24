"""
Generation files, as eval.py writes them (one model a file, one row a prompt: id, prompt,
target_words, story, model, ...): read and checked before any judging, the prompt ids several
files share, and a task's own output cleared of the rows whose judging failed.
"""
import os

import data
import jsonl

def read_gens(paths):
    """{file: (model name, rows)} of generation files, checked before any judging: every row
    can be scored, no id twice in a file, ids of one type in all (7 and "7" would be two prompts),
    and no two files with one model name (their rows would merge in every table)."""
    gens, owner, kind = {}, {}, None
    for f in paths:
        rows, seen = [], set()
        for line, r in jsonl.read(f, numbered=True):
            problem = data.row_problem(r, max_words=None, allow_empty=True, special_tokens=())
            if not problem and r["id"] in seen:
                problem = f"id {r['id']!r} given twice"
            elif not problem and kind not in (None, type(r["id"])):
                problem = f"id {r['id']!r} is {type(r['id']).__name__} where the ids before are {kind.__name__}"
            if problem:
                raise ValueError(f"{f}:{line}: {problem}")
            kind = type(r["id"])
            seen.add(r["id"])
            rows.append(r)
        if not rows:
            raise ValueError(f"{f}: no generations")
        name = rows[0].get("model") or os.path.basename(f)
        if name in owner:
            raise ValueError(f"{owner[name]} and {f} hold one model name, {name!r}: rename one (the 'model' field)")
        owner[name], gens[f] = f, (name, rows)
        data.warn_uncounted(f, rows)
    return gens


def drop_failed(path, failed):
    """Rows of a resumable output whose judging failed are removed, so that this run asks again."""
    rows = jsonl.read(path, must_exist=False, repair=True)
    keep = [r for r in rows if not failed(r)]
    if len(keep) < len(rows):
        print(f"{path}: asking again for {len(rows) - len(keep)} failed judgement(s)")
        jsonl.write(path, keep)
    return keep


def shared_ids(ids, allow_intersection):
    """The prompt ids every generation file covers, from {file: its ids}; any gap is an error naming
    the missing ids unless allow_intersection, which compares on the intersection and says how many."""
    common = set.intersection(*ids.values())
    union = set.union(*ids.values())
    if common != union:
        gaps = {f: sorted(union - s) for f, s in ids.items() if union - s}
        if not allow_intersection:
            raise ValueError("generation files do not cover the same prompt ids: " + "; ".join(
                f"{f} lacks {', '.join(g[:10])}{' ...' if len(g) > 10 else ''}" for f, g in gaps.items())
                + " (--allow_intersection=True compares on the ids all files share)")
        print(f"comparing on the {len(common)} prompt ids shared by all files ({len(union) - len(common)} left out)")
    return sorted(common)
