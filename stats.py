"""
The evaluation's statistics, numpy only, as plain functions: bootstrap intervals over prompts,
the dual-position verdict and win rates, Bradley-Terry ratings (and whether they exist: the win
graph's strongly connected parts), the human study's win rate, intervals and agreement, and the
spread over seeds with Student's t for comparing training runs. Nothing here reads a file.
"""
import functools
import math
from itertools import combinations

import numpy as np

# -----------------------------------------------------------------------------
# prompts as the unit: bootstrap, dual position, Bradley-Terry


def bootstrap_ci(groups, stat, n_boot=1000, seed=0):
    """95% percentile interval of stat(list of groups) when the groups (one per prompt) are
    resampled with replacement: prompts, not single judgements, are the unit of sampling."""
    if not groups:  # nothing to resample (every judgement failed)
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    stats = [stat([groups[i] for i in rng.integers(0, len(groups), len(groups))]) for _ in range(n_boot)]
    stats = [s for s in stats if not math.isnan(s)]
    return (float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))) if stats else (math.nan, math.nan)


def dual_verdict(first, second):
    """Overall verdicts of one pair judged twice: `first` with model a shown as A, `second`
    with model b shown as A. Agreement is a win, disagreement a tie; a failed judgement
    (None) makes the comparison missing, never a tie or a loss."""
    if first is None or second is None:
        return None
    return {("A", "B"): "a", ("B", "A"): "b"}.get((first, second), "tie")


def win_rate(outcomes):
    """(W + 0.5 T) / N from a list of 'a' / 'b' / 'tie' seen from model a."""
    return sum(1.0 if o == "a" else 0.5 if o == "tie" else 0.0 for o in outcomes) / len(outcomes) if outcomes else math.nan


def components(models, battles):
    """Connected parts of the comparison graph: ratings across parts mean nothing."""
    parent = {m: m for m in models}

    def find(m):
        while parent[m] != m:
            m = parent[m]
        return m
    for a, b, _ in battles:
        parent[find(a)] = find(b)
    parts = {}
    for m in models:
        parts.setdefault(find(m), []).append(m)
    return sorted(sorted(p) for p in parts.values())


def strong_parts(models, battles):
    """The strongly connected parts of the win graph (an edge from winner to loser, a tie both
    ways; Kosaraju's two depth-first searches), in an order where each part won every comparison
    it had with the parts after it. Maximum-likelihood ratings exist only when there is one part:
    otherwise the data give the parts' order, never how far apart they are (Zermelo 1929)."""
    beat = {m: set() for m in models}  # beat[x]: the models x won against or tied with at least once
    for a, b, s in battles:
        if s > 0:
            beat[a].add(b)
        if s < 1:
            beat[b].add(a)
    finished, seen = [], set()

    def visit(m):  # the first search: models in the order their searches finish
        seen.add(m)
        for x in sorted(beat[m]):
            if x not in seen:
                visit(x)
        finished.append(m)
    for m in models:
        if m not in seen:
            visit(m)
    parts, placed = [], set()

    def gather(m, part):  # the second, against the edges: what reaches m is in m's part
        placed.add(m)
        part.append(m)
        for x in models:
            if m in beat[x] and x not in placed:
                gather(x, part)
    for m in reversed(finished):  # the last to finish is in a part that nothing outside it beat
        if m not in placed:
            parts.append([])
            gather(m, parts[-1])
    return [sorted(p) for p in parts]


def bradley_terry(battles, models, anchor=None, ridge=1e-6):
    """Maximum-likelihood ratings on the Elo scale, P(i beats j) = 1 / (1 + 10^((R_j - R_i)/400)).
    battles: [(model_a, model_b, score of a: 1, 0.5 for a tie, or 0)]. Newton's method on the
    log-likelihood; the tiny ridge only pins the free additive constant. The ratings are then
    shifted so that anchor = (name, rating) holds, or so that their mean is 1000."""
    idx = {m: i for i, m in enumerate(models)}
    M = len(models)
    W, N = np.zeros((M, M)), np.zeros((M, M))  # W[i, j]: points of i against j; N: games
    for a, b, s in battles:
        i, j = idx[a], idx[b]
        W[i, j] += s
        W[j, i] += 1 - s
        N[i, j] += 1
        N[j, i] += 1
    theta = np.zeros(M)  # natural-log strengths
    for _ in range(100):
        p = 1 / (1 + np.exp(theta[None, :] - theta[:, None]))  # p[i, j] = P(i beats j)
        grad = (W - N * p).sum(1) - ridge * theta
        H = N * p * (1 - p)
        hess = H - np.diag(H.sum(1)) - ridge * np.eye(M)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    R = theta * 400 / math.log(10)
    shift = anchor[1] - R[idx[anchor[0]]] if anchor else 1000 - R.mean()
    return {m: float(R[idx[m]] + shift) for m in models}

# -----------------------------------------------------------------------------
# the human study: people's votes, their agreement, and the judge's agreement with them


def wilson(rate, n, z=1.96):
    """Wilson's 95% score interval for a rate over n units (ties already counted as half)."""
    if not n:
        return (math.nan, math.nan)
    mid, half = rate + z * z / (2 * n), z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return (max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n)))


def kappa(first, second, labels):
    """Cohen's kappa of two raters' labels for the same items: (p_o - p_e) / (1 - p_e)."""
    n = len(first)
    p_o = sum(a == b for a, b in zip(first, second)) / n
    p_e = sum(first.count(c) * second.count(c) for c in labels) / (n * n)
    return (p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan


def agreement(first, second):
    """Share of equal outcomes with ties, and (share, n) without: items where either said tie left out."""
    both = [(a, b) for a, b in zip(first, second) if "tie" not in (a, b)]
    share = lambda ps: sum(a == b for a, b in ps) / len(ps) if ps else math.nan
    return share(list(zip(first, second))), share(both), len(both)


def human_study(votes, order=(), judged=None, n_boot=1000):
    """votes: [(annotator, prompt id, model shown as A, model shown as B, 'A' | 'B' | 'tie')].
    Per model pair (x, y), x the earlier in `order`: x's win rate with ties as half, the item as
    the unit (an item's score is the mean of its annotators' votes), a 95% bootstrap interval over
    items and Wilson's (n = items); agreement between every two annotators (with ties, without,
    Cohen's kappa over x / y / tie); and, given judged {(id, frozenset pair): winner or 'tie'} (the
    LLM judge's dual-position verdicts), the judge's agreement with each vote on the same items."""
    rank = lambda m: (order.index(m) if m in order else len(order), m)
    items = {}  # (x, y) -> {id: {annotator: winner or 'tie'}}
    for who, i, ma, mb, choice in votes:
        x, y = sorted((ma, mb), key=rank)
        items.setdefault((x, y), {}).setdefault(i, {})[who] = {"A": ma, "B": mb}.get(choice, "tie")
    out = []
    for (x, y), by_item in sorted(items.items(), key=lambda kv: (rank(kv[0][0]), rank(kv[0][1]))):
        points = {x: 1.0, y: 0.0, "tie": 0.5}
        per_item = [float(np.mean([points[w] for w in v.values()])) for v in by_item.values()]
        rate = float(np.mean(per_item))
        people = sorted({w for v in by_item.values() for w in v})
        pairs = []
        for p, q in combinations(people, 2):
            common = [v for v in by_item.values() if p in v and q in v]
            if common:
                a, b = [v[p] for v in common], [v[q] for v in common]
                pairs.append(dict(annotators=(p, q), items=len(common), agreement=agreement(a, b),
                                  kappa=kappa(a, b, (x, y, "tie"))))
        seen = [(w, judged[(i, frozenset((x, y)))]) for i, v in by_item.items() for w in v.values()
                if judged and (i, frozenset((x, y))) in judged]
        out.append(dict(x=x, y=y, rate=rate, ci=bootstrap_ci(per_item, np.mean, n_boot), wilson=wilson(rate, len(per_item)),
                        items=len(per_item), annotators=people, votes=sum(len(v) for v in by_item.values()),
                        wins=sum(s > 0.5 for s in per_item), ties=sum(s == 0.5 for s in per_item),
                        losses=sum(s < 0.5 for s in per_item), between=pairs,
                        judge=(len(seen), *agreement([h for h, _ in seen], [j for _, j in seen])) if seen else None))
    return out

# -----------------------------------------------------------------------------
# training runs over seeds: the mean, its spread, a difference of two groups (compare.py)


@functools.lru_cache(maxsize=None)
def t_quantile(p, df):
    """Student t's p-quantile (p >= 0.5) for df > 0 degrees of freedom, whole or not (Welch's):
    the density integrated by Simpson's rule on 2,000 intervals, the bound found by bisection.
    Within 1e-9 of the tables: t(0.975, 1) = 12.7062, t(0.975, 2) = 4.3027, 1.9600 as df grows."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x):
        u = np.linspace(0.0, x, 2001)
        f = c * (1 + u * u / df) ** (-(df + 1) / 2)
        return 0.5 + (u[1] - u[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def spread(values):
    """Mean, standard deviation (n - 1), n and a 95% Student t interval of the mean of a list of
    numbers (one a seed); NaN where n is too small to say."""
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    n = len(v)
    if n < 2:
        return dict(mean=float(v[0]) if n else math.nan, sd=math.nan, n=n, ci=(math.nan, math.nan))
    m, sd = float(v.mean()), float(v.std(ddof=1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return dict(mean=m, sd=sd, n=n, ci=(m - half, m + half))


def difference(a, b):
    """Group a's mean minus group b's, a and b [(seed, value)], with a 95% interval: paired by seed
    when both hold the same seeds once each (a seed's own luck then cancels), else Welch's interval
    with the Welch-Satterthwaite degrees of freedom."""
    if not a or not b:  # a metric one group does not log (ref_* without references)
        return dict(mean=math.nan, ci=(math.nan, math.nan), how="-")
    seeds_a, seeds_b = [s for s, _ in a], [s for s, _ in b]
    if len(a) > 1 and sorted(seeds_a) == sorted(seeds_b) and len(set(seeds_a)) == len(seeds_a):
        by_seed = dict(b)
        return dict(spread([v - by_seed[s] for s, v in a]), how=f"paired, {len(a)} seeds")
    (ma, va, na), (mb, vb, nb) = ((np.mean([v for _, v in g]), np.var([v for _, v in g], ddof=1) if len(g) > 1
                                   else math.nan, len(g)) for g in (a, b))
    how = f"Welch, {na} and {nb} runs"
    if na < 2 or nb < 2:
        return dict(mean=float(ma - mb), ci=(math.nan, math.nan), how=how)
    se2 = va / na + vb / nb
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1)) if se2 > 0 else na + nb - 2
    half = t_quantile(0.975, df) * math.sqrt(se2)
    return dict(mean=float(ma - mb), ci=(float(ma - mb - half), float(ma - mb + half)), how=how)
