"""Choose a run's checkpoint by a judge, as LIMA chose by reading dev generations (section 2.3).

The epochs of the selection window whose dev generations the trainer saved
(`generations-epoch-<k>.json`, listed in summary.json) are compared two at a time on every dev
prompt, each pair in both orders, by the same judge code as `eval judge` (and the same cache).
Each prompt's outcome is a win, a tie (counted half a win to each) or unparsed (left out), and
a Bradley-Terry fit ranks the epochs; the intervals come from a bootstrap over the dev prompts.
The strongest epoch becomes summary.json's `chosen_epoch` and `checkpoint`, with the reason; the
dev-loss choice it replaces is kept as `chosen_by_dev_loss`, and the Spearman correlation
between the dev-loss order and the judge's order is printed and stored (LIMA's observation that
perplexity does not track generation quality, measured on this run).
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np

from lima_core.checkpoint.atomic import write_json
from lima_core.eval import stats, store
from lima_core.eval.generate import EvalError, prompt_id
from lima_core.eval.judge import PAIRWISE_HASH, Judge, judge_pairs
from lima_core.eval.report import item_outcome
from lima_core.eval.store import Response

# A Bradley-Terry maximum does not exist when an epoch lost every comparison (its strength goes
# to zero). Half a game of prior, a quarter win each way, between every two epochs keeps every
# strength finite and moves the fit by little next to 2 x (dev prompts) real judgments a pair.
PRIOR_GAMES = 0.5


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except OSError as e:
        raise EvalError(f"{path}: cannot read: {e.strerror or e} (is {run_dir} a finished run folder?)") from None
    except ValueError as e:
        raise EvalError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("epochs"), list):
        raise EvalError(f"{path}: not a run summary (no 'epochs' list)")
    return summary


def candidates(run_dir: Path, summary: dict) -> list[tuple[dict, Path]]:
    """(epoch record, generations file) of each epoch in the window with saved generations. A
    file named by a path that no longer resolves (the run folder moved) is looked for beside
    summary.json."""
    first, last = summary.get("window") or (1, float("inf"))
    found = []
    for record in summary["epochs"]:
        if not isinstance(record, dict) or not record.get("generations") or not first <= record["epoch"] <= last:
            continue
        path = Path(record["generations"])
        if not path.is_file():
            path = run_dir / path.name
        if not path.is_file():
            raise EvalError(f"{run_dir}: the dev generations of epoch {record['epoch']} ({record['generations']}) "
                            "are missing")
        found.append((record, path))
    if len(found) < 2:
        raise EvalError(f"{run_dir}: {len(found)} epoch(s) with dev generations in the window; choosing needs two "
                        "(was the run given a dev set?)")
    return found


def generations(path: Path, system: str) -> dict[str, Response]:
    """An epoch's dev generations as responses, by prompt id."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: cannot read the dev generations: {e}") from None
    responses = {}
    for i, entry in enumerate(entries if isinstance(entries, list) else [None]):
        if not (isinstance(entry, dict) and isinstance(entry.get("prompt"), list)
                and isinstance(entry.get("answer"), str)):
            raise EvalError(f"{path}: entry {i + 1} is not a dev generation ({{'prompt', 'system', 'answer'}})")
        pid = prompt_id(entry.get("system"), entry["prompt"])
        responses[pid] = Response(system, pid, 0, {"system": entry.get("system"), "turns": entry["prompt"]},
                                  entry["answer"])
    return responses


def win_matrices(conn, judge: Judge, systems: list[str],
                 responses: list[dict[str, Response]]) -> tuple[np.ndarray, int]:
    """[prompts, n, n]: per dev prompt, wins[p, i, j] of epoch i over epoch j (a tie half a win to
    each), from the stored judgments of both orders; and how many comparisons were unparsed."""
    prompts = sorted(set.intersection(*(set(r) for r in responses)))
    wins = np.zeros((len(prompts), len(systems), len(systems)))
    unparsed = 0
    for i, j in combinations(range(len(systems)), 2):
        for p, pid in enumerate(prompts):
            a, b = responses[i][pid], responses[j][pid]
            verdicts = []
            for order in ("AB", "BA"):
                key = {"prompt_id": pid, "sample": 0, "system_a": a.system, "system_b": b.system, "response_a": a.hash,
                       "response_b": b.hash, "order_shown": order, "rater": judge.model, "template_hash": PAIRWISE_HASH}
                verdicts.append(store.judgment_verdict(conn, key))
            outcome = item_outcome([v for v in verdicts if v is not None])
            if outcome == "win":
                wins[p, i, j] += 1
            elif outcome == "loss":
                wins[p, j, i] += 1
            elif outcome == "tie":
                wins[p, i, j] += 0.5
                wins[p, j, i] += 0.5
            else:
                unparsed += 1
    return wins, unparsed


def fit(wins: np.ndarray) -> np.ndarray:
    """Bradley-Terry strengths from summed wins [n, n], with the prior."""
    prior = PRIOR_GAMES / 2 * (1 - np.eye(len(wins)))
    return stats.bradley_terry(wins + prior)


def rank_epochs(per_prompt: np.ndarray, replicates: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Strengths, their 95% intervals [n, 2] and each epoch's share of bootstrap resamples (over
    prompts) in which it is the strongest."""
    strengths = fit(per_prompt.sum(axis=0))
    counts = np.random.default_rng(seed).multinomial(len(per_prompt), np.full(len(per_prompt), 1 / len(per_prompt)),
                                                     size=replicates)
    resampled = np.array([fit(w) for w in np.tensordot(counts, per_prompt, axes=1)])  # [R, n]
    intervals = np.quantile(resampled, [0.025, 0.975], axis=0).T
    best = np.bincount(resampled.argmax(axis=1), minlength=len(strengths)) / replicates
    return strengths, intervals, best


def choose(run_dir: str | Path, judge: Judge, db: str | Path | None = None, replicates: int = 1000,
           seed: int = 0) -> dict:
    """Judge, rank, and write the choice into summary.json; returns the `chosen_by_judge` record."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    found = candidates(run_dir, summary)
    name = run_dir.resolve().name
    systems = [f"{name}/epoch-{record['epoch']}" for record, _ in found]
    responses = [generations(path, system) for (_, path), system in zip(found, systems)]
    if not set.intersection(*(set(r) for r in responses)):
        raise EvalError(f"{run_dir}: the epochs' dev generations share no prompt")
    conn = store.connect(db or run_dir / "judgments.sqlite")
    for i, j in combinations(range(len(found)), 2):
        shared = sorted(set(responses[i]) & set(responses[j]))
        judge_pairs(conn, judge, [(responses[i][p], responses[j][p]) for p in shared])
    per_prompt, unparsed = win_matrices(conn, judge, systems, responses)
    strengths, intervals, best = rank_epochs(per_prompt, replicates, seed)
    epochs = [record["epoch"] for record, _ in found]
    order = np.argsort(-strengths, kind="stable")
    ranking = [{"epoch": epochs[k], "strength": float(strengths[k]), "interval": intervals[k].tolist(),
                "best_in_resamples": float(best[k]), "dev_loss": found[k][0].get("dev_loss")} for k in order]
    losses = [record.get("dev_loss") for record, _ in found]
    rho = stats.spearman(losses, list(-strengths)) if all(isinstance(x, (int, float)) for x in losses) else None
    winner = found[order[0]][0]
    by_loss = summary.get("chosen_by_dev_loss") or {"epoch": summary.get("chosen_epoch")}
    reason = (f"strongest Bradley-Terry fit (ties as half wins) among epochs {', '.join(map(str, epochs))} on "
              f"{len(per_prompt)} dev prompts, each pair judged in both orders by {judge.model}; the strongest in "
              f"{100 * best[order[0]]:.0f}% of {replicates} bootstrap resamples of the prompts; dev loss chose "
              f"epoch {by_loss['epoch']}")
    record = {"epoch": winner["epoch"], "checkpoint": winner.get("export"), "ranking": ranking, "reason": reason,
              "judge": judge.model, "template_hash": PAIRWISE_HASH, "prompts": len(per_prompt),
              "unparsed_comparisons": unparsed, "prior_games_per_pair": PRIOR_GAMES,
              "spearman_dev_loss_vs_judge": rho, "db": str(db or run_dir / "judgments.sqlite")}
    summary.setdefault("chosen_by_dev_loss", {key: summary.get(k) for key, k in
                                              (("epoch", "chosen_epoch"), ("checkpoint", "checkpoint"),
                                               ("reason", "reason"))})
    summary.update({"chosen_epoch": winner["epoch"], "checkpoint": winner.get("export"), "reason": reason,
                    "chosen_by_judge": record})
    write_json(run_dir / "summary.json", summary)
    return record
