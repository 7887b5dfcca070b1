"""`delvm eval RUN`: per-task validation loss, accuracy and perplexity.

The held-out sentences are the sampler's fixed validation sentences: examples never seen in
training, chosen by the run's own store, seed and split (val_fraction, val_sentences, seq_len),
which `delvm eval` reads from the checkpoint's training state; flags override them, and name them
for checkpoints without one. A task with a validation store of its own (the run's
``data.val_stores``, or ``--val-store TASK=STORE``) is measured on all of that store instead, as
the paper validates pose on MPII and deraining on Test2800. Figures come twice, labelled: over
every token of the sentence (DeLVM's convention) and over the last image only (LVM's perplexity).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from delvm.data.sampler import SamplerConfig, SentenceSampler, open_val_stores
from delvm.data.store import open_store
from delvm.devices import add_device_argument, add_dtype_argument, inference_dtype, resolve_device
from delvm.errors import DelvmError
from delvm.evaluation.metrics import SCOPES, TaskMetrics
from delvm.model.checkpoint import load_model, tokenizer_fingerprint
from delvm.model.transformer import VisualLM
from delvm.train.state import resolve_checkpoint, run_config


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


def _val_stores(args: argparse.Namespace, run: dict) -> dict[str, str]:
    """Task -> validation store: the run's ``data.val_stores``, updated by ``--val-store``."""
    stores = dict(run.get("val_stores", {}))
    for given in args.val_store or []:
        task, sep, path = given.partition("=")
        if not (sep and task and path):
            raise DelvmError(f"--val-store {given!r}: expected TASK=STORE, e.g. pose=stores/mpii")
        stores[task] = path
    return stores


def _split(args: argparse.Namespace, run: dict, model: VisualLM) -> tuple[Path, SamplerConfig]:
    """The store and the validation split: each from its flag, else from the run's data config
    (``run``; empty for a checkpoint without training state), else the default."""

    def pick(name: str, default):
        flag = getattr(args, name)
        return flag if flag is not None else run.get(name, default)

    store = pick("store", None)
    if not store:
        raise DelvmError("no token store: pass --store STORE (the checkpoint records no run's)")
    defaults = SamplerConfig()
    config = SamplerConfig(
        seq_len=pick("seq_len", model.config.max_seq_len), balance="none",
        val_fraction=pick("val_fraction", defaults.val_fraction),
        val_sentences=pick("val_sentences", defaults.val_sentences), seed=pick("seed", defaults.seed),
    )  # fmt: skip
    return Path(store), config


def _run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    folder = resolve_checkpoint(args.checkpoint)
    model = load_model(folder, device).to(inference_dtype(args.dtype, device))
    run = (run_config(folder) or {}).get("data", {})
    store, config = _split(args, run, model)
    fingerprint = tokenizer_fingerprint(folder)
    val_stores = open_val_stores(_val_stores(args, run), fingerprint)
    sampler = SentenceSampler(open_store(store, fingerprint=fingerprint), config, None, val_stores)
    print(f"{folder}: {config.val_sentences} validation sentences of {config.seq_len} tokens per "
          f"task (seed {config.seed})")  # fmt: skip
    for task in sampler.tasks:
        print(f"  {task}: {sampler.val_source(task)}")
    result = evaluate(model, sampler, args.batch_size)
    table = markdown_table(result)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "metrics.md").write_text(table + "\n")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="per-task validation loss / accuracy / perplexity")
    p.add_argument("checkpoint", type=Path,
                   help="a run folder (its latest checkpoint), checkpoint or Hugging Face folder")  # fmt: skip
    p.add_argument("--store", type=Path, default=None, help="token store (default: the run's)")
    p.add_argument("--out", type=Path, default=None, help="write metrics.json and metrics.md")
    run = "default: the run's, else "
    p.add_argument("--seq-len", type=int, default=None, help=run + "the model's context")
    p.add_argument("--val-fraction", type=float, default=None, help=run + "0.05")
    p.add_argument("--val-sentences", type=int, default=None, help=run + "16 per task")
    p.add_argument("--val-store", action="append", metavar="TASK=STORE",
                   help="validate TASK on all of STORE (its own validation set), not on the "
                        "held-out split; repeatable; adds to the run's data.val_stores")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help=run + "0 (the data seed)")
    p.add_argument("--batch-size", type=int, default=4)
    add_device_argument(p)
    add_dtype_argument(p)
    p.set_defaults(func=_run)
