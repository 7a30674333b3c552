"""Evaluate the LIMA way: generate responses, judge them in pairs (both orders) or grade them
1-6 with a model, report with bootstrap intervals, choose a run's checkpoint by a judge.

`python -m lima_core.eval COMMAND --help` describes each command. Bad input (a missing or
malformed file, a bad setting, a judge that never answers) ends with one line, `error: ...`,
and exit status 2. Every request is retried with exponential backoff (--retries,
--retry-delay); nothing already stored is asked again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lima_core.checkpoint.hf import CheckpointError
from lima_core.cli import add_flags, config_from_args
from lima_core.config import DTYPES, ConfigError
from lima_core.data.tokenizer import TokenizerError
from lima_core.eval.client import EndpointError, make_client
from lima_core.eval.generate import EvalError
from lima_core.eval.store import StoreError

BAD_INPUT = (EvalError, StoreError, EndpointError, ConfigError, CheckpointError, TokenizerError)


def _endpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""),
                        help="the endpoint's key (default: $OPENAI_API_KEY; none for a local server)")
    parser.add_argument("--retries", type=int, default=4, help="retries of a failed or unparsed request (default 4)")
    parser.add_argument("--retry-delay", type=float, default=1.0,
                        help="seconds before the first retry, doubling each time (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (default 600)")


def _judge_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge-url", required=True, help="an OpenAI-compatible base URL, e.g. http://host:8000/v1")
    parser.add_argument("--judge-model", required=True, help="the judge's model name (the rater in the database)")
    parser.add_argument("--judge-temperature", type=float, default=0.0, help="the judge's temperature (default 0)")
    parser.add_argument("--judge-max-tokens", type=int, default=1024, help="longest judge reply (default 1024)")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight at once (default 4)")
    _endpoint_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lima_core.eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add_commands in (_generate_command, _judge_commands, _report_command, _people_commands, _choose_command):
        add_commands(commands)  # in this order: the order --help lists them in
    return parser


def _generate_command(commands) -> None:
    generate = commands.add_parser("generate", help="responses to a prompt set, one JSON line per (prompt, sample)")
    generate.add_argument("--prompts", required=True, help="JSONL prompts: LIMA's test format or conversations")
    generate.add_argument("--out", required=True, help="the responses' JSONL file (a rerun fills in what is missing)")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an HF-format folder, decoded here")
    source.add_argument("--endpoint", help="an OpenAI-compatible base URL (with --model)")
    generate.add_argument("--model", help="the endpoint's model name")
    generate.add_argument("--system", help="the system's name in the results (default: the checkpoint folder or model)")
    generate.add_argument("--samples", type=int, default=1, help="responses per prompt (default 1)")
    generate.add_argument("--limit", type=int, help="only the first N prompts of the file")
    generate.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    generate.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    add_flags(generate, ["sampling"])
    generate.add_argument("--max-tokens", dest="sampling.max_new_tokens", default=None, metavar="VALUE",
                          help="the same as --max-new-tokens")
    _endpoint_flags(generate)


def _judge_commands(commands) -> None:
    judge = commands.add_parser("judge", help="pairwise judgments of two systems' responses, both orders")
    judge.add_argument("responses_a", metavar="A.jsonl", help="the system under test's responses")
    judge.add_argument("responses_b", metavar="B.jsonl", help="the baseline's responses")
    judge.add_argument("--db", required=True, help="the SQLite file judgments are kept in")
    _judge_flags(judge)

    likert = commands.add_parser("likert", help="a 1-6 helpfulness grade of each response")
    likert.add_argument("responses", metavar="RESPONSES.jsonl")
    likert.add_argument("--db", required=True)
    _judge_flags(likert)


def _report_command(commands) -> None:
    report = commands.add_parser("report", help="figure, page and table from a judgments database")
    report.add_argument("--db", required=True)
    report.add_argument("--out", required=True, help="folder for win_tie_loss.png, report.html, report.json")
    report.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the prompts (default 2000)")
    report.add_argument("--seed", type=int, default=0)


def _people_commands(commands) -> None:
    annotate = commands.add_parser("annotate", help="a web page where people judge pairs of responses")
    annotate.add_argument("--db", required=True, help="the SQLite file the people's judgments are kept in")
    annotate.add_argument("--pairs", nargs=2, required=True, metavar=("A.jsonl", "B.jsonl"),
                          help="the system under test's responses and the baseline's")
    annotate.add_argument("--overlap", type=int, default=0,
                          help="items every annotator gets (for agreement); the rest go to one each (default 0)")
    annotate.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    annotate.add_argument("--port", type=int, default=8100)
    annotate.add_argument("--seed", type=int, default=0, help="the shuffle that picks the shared items")

    chat = commands.add_parser("chat", help="a web page where a person talks with a served model and labels replies")
    chat.add_argument("--endpoint", required=True, help="an OpenAI-compatible base URL, e.g. http://host:8000/v1")
    chat.add_argument("--model", required=True, help="the endpoint's model name (the checkpoint in the report)")
    chat.add_argument("--db", required=True, help="the SQLite file conversations and labels are kept in")
    chat.add_argument("--max-tokens", type=int, default=256, help="longest reply (default 256)")
    chat.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    chat.add_argument("--port", type=int, default=8101)
    _endpoint_flags(chat)

    export = commands.add_parser("export", help="the people's judgments as JSONL or CSV")
    export.add_argument("--db", required=True)
    export.add_argument("--out", required=True, help="a .jsonl or .csv file")


def _choose_command(commands) -> None:
    choose = commands.add_parser("choose", help="rank a run's epochs by a judge; write the choice in summary.json")
    choose.add_argument("run_dir", metavar="RUN_DIR")
    choose.add_argument("--db", help="the SQLite file (default: RUN_DIR/judgments.sqlite)")
    choose.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the prompts (default 1000)")
    choose.add_argument("--seed", type=int, default=0)
    _judge_flags(choose)


def _at_least(value: int, minimum: int, flag: str) -> None:
    if value < minimum:
        raise EvalError(f"{flag} must be at least {minimum}, got {value}")


def _judge(args):
    from lima_core.eval.judge import Judge

    _at_least(args.retries, 0, "--retries")
    _at_least(args.workers, 1, "--workers")
    _at_least(args.judge_max_tokens, 1, "--judge-max-tokens")
    return Judge(make_client(args.judge_url, args.api_key, args.timeout), args.judge_model, retries=args.retries,
                 base_delay=args.retry_delay, temperature=args.judge_temperature, max_tokens=args.judge_max_tokens,
                 workers=args.workers)


def run_generate(args) -> None:
    from lima_core.eval import generate

    _at_least(args.samples, 1, "--samples")
    _at_least(args.batch_size, 1, "--batch-size")
    if args.limit is not None:
        _at_least(args.limit, 1, "--limit")
    if args.endpoint and not args.model:
        raise EvalError("--endpoint needs --model NAME (the model the endpoint serves)")
    if args.checkpoint and args.model:
        raise EvalError("--model names an endpoint's model; a --checkpoint is named with --system")
    sampling = config_from_args(args).sampling.model_dump()
    prompts = generate.read_prompts(args.prompts)[:args.limit]
    settings = {**sampling, "seed": args.seed}
    if not args.checkpoint:
        client = make_client(args.endpoint, args.api_key, args.timeout)
        answer_batch = generate.endpoint_answerer(client, args.model, sampling, args.retries, args.retry_delay)
        _generated(generate.generate(prompts, Path(args.out), args.system or args.model, args.samples, settings,
                                     answer_batch, args.batch_size), args, prompts)
        return
    import torch

    from lima_core.parallel.distributed import destroy_distributed, init_distributed

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ranks = init_distributed("cuda" if device.startswith("cuda") else "cpu")  # under torchrun: one copy over the node
    try:
        answer_batch = generate.checkpoint_answerer(args.checkpoint, sampling, args.seed, device, DTYPES[args.dtype],
                                                    ranks)
        system = args.system or generate.system_name(args.checkpoint)
        written = generate.generate(prompts, Path(args.out), system, args.samples, settings, answer_batch,
                                    args.batch_size, ranks.group)
        if ranks.rank == 0:
            _generated(written, args, prompts, system)
    finally:
        destroy_distributed(ranks)


def _generated(written: int, args, prompts: list, system: str | None = None):
    system = system or args.system or args.model
    print(f"{system}: {written} responses written to {args.out} ({len(prompts)} prompts x {args.samples} samples)")


def run_judge(args) -> None:
    from lima_core.eval import store
    from lima_core.eval.judge import judge_pairs, pair_up, responses_of

    pairs = pair_up(responses_of(args.responses_a), responses_of(args.responses_b),
                    (args.responses_a, args.responses_b))
    counts = judge_pairs(store.connect(args.db), _judge(args), pairs)
    print(f"{pairs[0][0].system} vs {pairs[0][1].system}: {len(pairs)} pairs, {counts['asked']} judgments asked "
          f"({counts['A']} A, {counts['B']} B, {counts['tie']} tie, {counts['unparsed']} unparsed), "
          f"{counts['cached']} already in {args.db}")


def run_likert(args) -> None:
    from lima_core.eval import store
    from lima_core.eval.judge import grade_responses, responses_of

    responses = list(responses_of(args.responses).values())
    counts = grade_responses(store.connect(args.db), _judge(args), responses)
    print(f"{responses[0].system}: {counts['asked']} grades asked ({counts['unparsed']} unparsed), "
          f"{counts['cached']} already in {args.db}")


def run_report(args) -> None:
    from lima_core.eval.report import write_report
    from lima_core.eval.report_text import summary_lines

    _at_least(args.bootstrap, 100, "--bootstrap")
    numbers = write_report(args.db, args.out, args.bootstrap, args.seed)
    if not numbers["comparisons"] and not numbers["likert"] and not numbers["live"]:
        print(f"{args.db}: no judgments or grades yet", file=sys.stderr)
    for line in summary_lines(numbers):
        print(line)
    print(f"wrote {Path(args.out) / 'report.html'}, win_tie_loss.png, report.json")


def run_annotate(args) -> None:
    import uvicorn

    from lima_core.eval.annotate import Annotation, create_app, load_pairs

    _at_least(args.overlap, 0, "--overlap")
    shared, spread = load_pairs(args.pairs[0], args.pairs[1], args.overlap, args.seed)
    if args.overlap > len(shared):
        raise EvalError(f"--overlap {args.overlap} is more than the {len(shared)} pairs there are")
    app = create_app(Annotation(args.db, shared, spread))
    print(f"annotation of {len(shared) + len(spread)} pairs ({len(shared)} shared) on http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def run_chat(args) -> None:
    import uvicorn

    from lima_core.eval.live_chat import Chat, create_chat_app, endpoint_reply

    _at_least(args.max_tokens, 1, "--max-tokens")
    reply = endpoint_reply(args.endpoint, args.model, args.api_key, args.timeout, args.max_tokens, args.retries)
    app = create_chat_app(Chat(args.db, args.model, reply))
    print(f"live ratings of {args.model} on http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def run_export(args) -> None:
    from lima_core.eval.annotate import export

    count = export(args.db, args.out)
    print(f"{count} people's judgments written to {args.out}")


def run_choose(args) -> None:
    from lima_core.eval.choose import choose

    _at_least(args.bootstrap, 100, "--bootstrap")
    record = choose(args.run_dir, _judge(args), args.db, args.bootstrap, args.seed)
    print("rank  epoch  strength [95% CI]        best in resamples  dev loss")
    for rank, r in enumerate(record["ranking"], start=1):
        loss = "-" if r["dev_loss"] is None else f"{r['dev_loss']:.4f}"
        print(f"{rank:<5} {r['epoch']:<6} {r['strength']:.3f} [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]"
              f"{'':6} {100 * r['best_in_resamples']:5.1f}%{'':12} {loss}")
    rho = record["spearman_dev_loss_vs_judge"]
    print(f"Spearman correlation of the dev-loss order with the judge's: {'-' if rho is None else f'{rho:+.3f}'}")
    print(f"chosen: epoch {record['epoch']} ({record['reason']}); written to {Path(args.run_dir) / 'summary.json'}")


COMMANDS = {"generate": run_generate, "judge": run_judge, "likert": run_likert, "report": run_report,
            "choose": run_choose,
            "annotate": run_annotate, "chat": run_chat, "export": run_export}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
