"""Evaluation the LIMA way (Zhou et al. 2023, sections 4 and 5): responses to a prompt set,
pairwise judgments by a model (or a person) in both orders, helpfulness grades, a report with
honest intervals, and a run's checkpoint chosen by a judge.

    python -m lima_core.eval generate --prompts test.jsonl --out a.jsonl --checkpoint runs/lima/epoch-7
    python -m lima_core.eval judge a.jsonl b.jsonl --judge-url URL --judge-model NAME --db judgments.sqlite
    python -m lima_core.eval likert a.jsonl --judge-url URL --judge-model NAME --db judgments.sqlite
    python -m lima_core.eval report --db judgments.sqlite --out report/
    python -m lima_core.eval choose runs/lima --judge-url URL --judge-model NAME

Modules: generate (prompts and response files), client (the OpenAI-compatible endpoint, with
retries), judge (templates, strict parsing, asking), store (the SQLite file), stats (bootstrap,
agreement, Bradley-Terry, Spearman), report, choose.
"""
