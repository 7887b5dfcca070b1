"""`delvm eval CKPT --store STORE`: per-task validation loss, accuracy and perplexity.

The held-out sentences are the sampler's fixed validation sentences (examples never seen in
training, by the same seed and val_fraction as the run). Figures come twice, labelled: over every
token of the sentence (DeLVM's convention) and over the last image only (LVM's perplexity).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from delvm.data.sampler import SamplerConfig, SentenceSampler
from delvm.data.store import open_store
from delvm.errors import DelvmError
from delvm.evaluation.metrics import SCOPES, TaskMetrics
from delvm.model.checkpoint import load_model, read_checkpoint_config
from delvm.model.hf import is_hf_folder
from delvm.model.transformer import VisualLM


@torch.no_grad()
def evaluate(model: VisualLM, sampler: SentenceSampler, batch_size: int = 4) -> dict:
    """{task: {scope: {loss, accuracy, perplexity}}} over the sampler's validation sentences."""
    if model.config.codes != sampler.vocab_size:
        raise DelvmError(
            f"the model predicts {model.config.codes} codes but the store holds "
            f"{sampler.vocab_size}-code tokens; evaluate on a store of the model's tokenizer"
        )
    if model.config.max_seq_len < sampler.sentence_tokens - 1:
        raise DelvmError(
            f"sentences of {sampler.sentence_tokens} tokens exceed the model's context "
            f"{model.config.max_seq_len}; pass --seq-len {model.config.max_seq_len}"
        )
    model.eval()
    device = model.head.weight.device
    metrics = TaskMetrics(sampler.image_tokens)
    for ids, tasks, _ in sampler.val_batches(batch_size):
        ids = ids.to(device)
        metrics.add(tasks, model(ids[:, :-1]), ids[:, 1:])
    return metrics.result()


def markdown_table(result: dict) -> str:
    """The paper's layout: one row per task; loss / acc (%) / ppl per scope."""
    header = ["task"] + [
        f"{name} ({scope})" for scope in SCOPES for name in ("loss", "acc %", "ppl")
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in sorted(result):
        cells = [task]
        for scope in SCOPES:
            m = result[task][scope]
            cells += [f"{m['loss']:.4f}", f"{m['accuracy']:.2f}", f"{m['perplexity']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint, args.device)
    fingerprint = None
    if not is_hf_folder(args.checkpoint):
        fingerprint = read_checkpoint_config(args.checkpoint)[1]["tokenizer"]["fingerprint"]
    store = open_store(args.store, fingerprint=fingerprint)
    config = SamplerConfig(
        seq_len=args.seq_len or model.config.max_seq_len, balance="none",
        val_fraction=args.val_fraction, val_sentences=args.val_sentences, seed=args.seed,
    )  # fmt: skip
    result = evaluate(model, SentenceSampler(store, config), args.batch_size)
    table = markdown_table(result)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "metrics.md").write_text(table + "\n")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="per-task validation loss / accuracy / perplexity")
    p.add_argument("checkpoint", type=Path, help="delvm checkpoint or Hugging Face folder")
    p.add_argument("--store", type=Path, required=True, help="token store (delvm data build)")
    p.add_argument("--out", type=Path, default=None, help="write metrics.json and metrics.md")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's context")
    p.add_argument("--val-fraction", type=float, default=0.05, help="as in training")
    p.add_argument("--val-sentences", type=int, default=16, help="per task")
    p.add_argument("--seed", type=int, default=0, help="the data seed used in training")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run)
