"""The `delvm` command line. Each pipeline stage registers its own verbs here."""

from __future__ import annotations

import argparse
import sys

from delvm.errors import DelvmError


def build_parser() -> argparse.ArgumentParser:
    # Imported here so importing delvm.cli stays cheap for code that only calls main().
    from delvm import configs, results, serve
    from delvm.classify import cli as classify_cli
    from delvm.data import cli as data_cli
    from delvm.demo import pipeline as demo
    from delvm.evaluation import evaluate, pascal5i
    from delvm.experiments import studies as experiments
    from delvm.inference import prompting
    from delvm.model import export
    from delvm.tokenizer import cli as tokenizer_cli
    from delvm.train import cli as train_cli

    parser = argparse.ArgumentParser(
        prog="delvm", description="Data-efficient autoregressive Large Vision Models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In pipeline order: tokenize, build data, train, evaluate, prompt, serve, hand over.
    tokenizer_cli.add_commands(sub)
    data_cli.add_commands(sub)
    train_cli.add_commands(sub)
    evaluate.add_commands(sub)
    pascal5i.add_commands(sub)
    experiments.add_commands(sub)
    prompting.add_commands(sub)
    serve.add_commands(sub)
    export.add_commands(sub)
    classify_cli.add_commands(sub)
    demo.add_commands(sub)
    configs.add_commands(sub)
    results.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except DelvmError as err:
        print(f"delvm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("delvm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
