"""The statistics of the evaluation, each small enough to check by hand: the bootstrap over
prompts, agreement between raters (LIMA's tie-discounted accuracy and linearly weighted Cohen's
kappa), Bradley-Terry strengths and Spearman's rank correlation.

Every random draw takes an explicit seed: no global random state.
"""

from __future__ import annotations

import numpy as np

OUTCOMES = ("loss", "tie", "win")  # ordinal: a loss < a tie < a win (of the system under test)
OUTCOME_OF = {"A": "win", "B": "loss", "tie": "tie"}  # a verdict (store.py's) -> the outcome for system_a


def bootstrap_sums(per_prompt: np.ndarray, replicates: int = 2000, seed: int = 0) -> np.ndarray:
    """Column sums of `per_prompt` [prompts, m] over `replicates` resamples of its rows (the
    prompts, with replacement) -> [replicates, m].

    A prompt's rows travel together, so samples of one prompt and both orders of one judgment
    are resampled as the unit they are. A resample's weights are multinomial counts: the same
    draw as picking prompt indices, without the [replicates, prompts, m] array."""
    per_prompt = np.asarray(per_prompt, dtype=np.float64)
    n = len(per_prompt)
    if n == 0:
        return np.zeros((replicates, per_prompt.shape[1] if per_prompt.ndim == 2 else 0))
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=replicates)  # [R, prompts]
    return counts @ per_prompt


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The central `level` interval of bootstrap replicates (NaN replicates, where a resample had
    no item to measure, left out); None when none is finite."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def ratio_interval(numerators: np.ndarray, denominators: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The percentile interval of numerator / denominator across replicates."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return percentile_interval(np.asarray(numerators) / np.asarray(denominators), level)


def fractions_with_intervals(per_prompt: np.ndarray, replicates: int = 2000, seed: int = 0,
                             level: float = 0.95) -> list[tuple[float, tuple[float, float] | None]]:
    """Each column's share of the total, `per_prompt` [prompts, k] holding counts per prompt
    (e.g. wins, ties, losses), with a bootstrap interval over prompts: [(share, (low, high))]."""
    per_prompt = np.asarray(per_prompt, dtype=np.float64)
    total = per_prompt.sum()
    sums = bootstrap_sums(per_prompt, replicates, seed)
    out = []
    for column in range(per_prompt.shape[1]):
        share = float(per_prompt[:, column].sum() / total) if total else float("nan")
        out.append((share, ratio_interval(sums[:, column], sums.sum(axis=1), level)))
    return out


def agreement_score(x: str, y: str) -> float:
    """LIMA's tie-discounted agreement of two verdicts: 1 when they agree, 0.5 when exactly one
    is a tie, 0 when one says win and the other loss."""
    if x == y:
        return 1.0
    return 0.5 if "tie" in (x, y) else 0.0


def tie_discounted_accuracy(first: list[str], second: list[str]) -> float:
    """The mean agreement score over items both raters judged (verdicts from OUTCOMES)."""
    if not first or len(first) != len(second):
        raise ValueError("two equally long, non-empty lists of verdicts")
    return sum(agreement_score(x, y) for x, y in zip(first, second)) / len(first)


def weighted_kappa(first: list[str], second: list[str]) -> float | None:
    """Cohen's kappa with linear weights over the ordered categories loss < tie < win.

    With three ordered categories the linear agreement weights are 1, 0.5 and 0: the observed
    agreement is exactly the tie-discounted accuracy, and kappa sets it against the agreement
    the two raters' marginal rates would reach by chance. None when chance agreement is 1 (both
    raters always give one and the same verdict: kappa is undefined)."""
    if not first or len(first) != len(second):
        raise ValueError("two equally long, non-empty lists of verdicts")
    k = len(OUTCOMES)
    index = {o: i for i, o in enumerate(OUTCOMES)}
    joint = np.zeros((k, k))
    for x, y in zip(first, second):
        joint[index[x], index[y]] += 1
    joint /= joint.sum()
    i, j = np.indices((k, k))
    weights = 1 - np.abs(i - j) / (k - 1)
    observed = float((weights * joint).sum())
    chance = float((weights * np.outer(joint.sum(axis=1), joint.sum(axis=0))).sum())
    if np.isclose(chance, 1.0):
        return None
    return (observed - chance) / (1 - chance)


def bradley_terry(wins: np.ndarray, tol: float = 1e-12, max_iter: int = 100) -> np.ndarray:
    """Bradley-Terry strengths p (P(i beats j) = p_i / (p_i + p_j)) maximising the likelihood of
    `wins` [n, n] (wins[i, j]: i's wins over j; a tie counts half a win to each), normalised to
    a geometric mean of 1.

    Newton's method on theta = log p, where the log-likelihood is concave: the gradient is
    W_i - sum_j n_ij s(theta_i - theta_j) (s the logistic function; zero at the maximum: each
    player's expected wins equal its wins), the Hessian the weighted graph Laplacian of
    n_ij s (1 - s); theta_0 is held at 0 (the likelihood sees only differences) and each step
    is halved until the likelihood does not fall. A handful of steps where Hunter's MM
    iteration takes thousands, which matters inside a bootstrap.

    The maximum exists when every player has a win and the comparison graph is connected;
    callers that cannot promise it add a small prior of ties (see choose.py)."""
    wins = np.asarray(wins, dtype=np.float64)
    games = wins + wins.T
    total_wins = wins.sum(axis=1)
    if np.any(total_wins <= 0):
        raise ValueError("a player without a win has no finite Bradley-Terry strength")

    def log_likelihood(theta):
        return -(wins * np.logaddexp(0.0, theta[None, :] - theta[:, None])).sum()

    theta = np.zeros(len(wins))
    for _ in range(max_iter):
        s = 1 / (1 + np.exp(theta[None, :] - theta[:, None]))  # s[i, j] = P(i beats j)
        gradient = total_wins - (games * s).sum(axis=1)
        weights = games * s * (1 - s)
        laplacian = np.diag(weights.sum(axis=1)) - weights  # minus the Hessian
        step = np.zeros_like(theta)
        try:
            step[1:] = np.linalg.solve(laplacian[1:, 1:], gradient[1:])
        except np.linalg.LinAlgError:
            raise ValueError("the comparisons do not connect every player: no common scale") from None
        before, size = log_likelihood(theta), 1.0
        while log_likelihood(theta + size * step) < before and size > 1e-10:
            size /= 2
        theta = theta + size * step
        if np.max(np.abs(size * step)) < tol:
            break
    return np.exp(theta - theta.mean())


def ranks(values: list[float]) -> np.ndarray:
    """1-based ranks, smallest value first; tied values share their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    result = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        result[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the ranks, ties at mean rank); None when
    either side has fewer than two distinct values (no ordering to correlate)."""
    if len(x) != len(y):
        raise ValueError("two equally long lists")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    if len(x) < 2 or denominator == 0:
        return None
    return float((rx * ry).sum() / denominator)


def krippendorff_alpha_interval(units: list[list[str]]) -> float | None:
    """Krippendorff's alpha with the interval metric over loss < tie < win (values 0, 1, 2), for
    any number of raters and missing ratings: `units` holds each item's verdicts (one per rater
    who judged it).

    Only units with two or more verdicts are pairable. The coincidence matrix counts, within each
    unit of m verdicts, every ordered pair of verdicts by different raters with weight 1/(m-1);
    alpha = 1 - D_o / D_e, the observed disagreement (mean squared difference over pairs within
    units) against the expected one (over all pairs of the pooled verdicts). None when the pooled
    verdicts are all the same (no disagreement to expect: alpha is undefined)."""
    index = {o: i for i, o in enumerate(OUTCOMES)}
    k = len(OUTCOMES)
    coincidences = np.zeros((k, k))
    for unit in units:
        m = len(unit)
        if m < 2:
            continue
        counts = np.bincount([index[v] for v in unit], minlength=k).astype(np.float64)
        coincidences += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    totals = coincidences.sum(axis=1)
    n = totals.sum()
    i, j = np.indices((k, k))
    distance = (i - j) ** 2.0
    if n < 2:
        return None
    observed = (coincidences * distance).sum() / n
    expected = (np.outer(totals, totals) * distance).sum() / (n * (n - 1))
    if expected == 0:
        return None
    return float(1 - observed / expected)


def majority(verdicts: list[str]) -> str | None:
    """The verdict more than half of `verdicts` give, or None when none does."""
    for v in set(verdicts):
        if 2 * verdicts.count(v) > len(verdicts):
            return v
    return None
