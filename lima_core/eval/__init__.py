"""Evaluation the LIMA way (Zhou et al. 2023, sections 4 and 5): responses to a prompt set,
pairwise judgments by a model (or a person) in both orders, helpfulness grades, a report with
honest intervals, and a run's checkpoint chosen by a judge; people's pairwise judgments from a
web page (section 4's study) and live Fail / Pass / Excellent labels of conversations (section 6).

    python -m lima_core.eval generate --prompts test.jsonl --out a.jsonl --checkpoint runs/lima/epoch-7
    python -m lima_core.eval judge a.jsonl b.jsonl --judge-url URL --judge-model NAME --db judgments.sqlite
    python -m lima_core.eval likert a.jsonl --judge-url URL --judge-model NAME --db judgments.sqlite
    python -m lima_core.eval report --db judgments.sqlite --out report/
    python -m lima_core.eval choose runs/lima --judge-url URL --judge-model NAME
    python -m lima_core.eval annotate --db judgments.sqlite --pairs a.jsonl b.jsonl --overlap 50
    python -m lima_core.eval chat --endpoint http://127.0.0.1:8000/v1 --model NAME --db judgments.sqlite
    python -m lima_core.eval export --db judgments.sqlite --out people.csv

Modules: generate (prompts and response files), client (the OpenAI-compatible endpoint, with
retries), judge (templates, strict parsing, asking), store (the SQLite file), stats (bootstrap,
agreement, Krippendorff's alpha, Bradley-Terry, Spearman), report (what the judgments say;
its text, page and figure in report_text, report_html and report_figure), choose, annotate (the
pairwise page), live_chat (the live-ratings page), web (what the served pages and the report's
page share).
"""
