"""`delvm export-hf` and `delvm import-hf`: hand checkpoints to Hugging Face and back.

``export_hf`` writes a standard ``LlamaForCausalLM`` folder (config.json + model.safetensors) that
``transformers`` — and engines reading its format — load as is, computing the same logits. No
bos/eos/pad ids are set: every id is a VQ code. Beside the weights go the tokenizer
(``tokenizer/``), so the folder alone can be prompted, and a model card (``README.md``: config,
parameters, tokenizer, the training run's data and validation scores where known).
``import_hf`` turns a Hugging Face ``llama`` or ``internlm`` folder (LVM's and DeLVM's releases)
into a delvm checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from delvm.devices import DTYPES
from delvm.errors import DelvmError
from delvm.fileio import atomic_write, read_json, write_json
from delvm.model.checkpoint import (
    TOKENIZER_DIR,
    checkpoint_tokenizer,
    load_model,
    save_model,
    tokenizer_fingerprint,
)
from delvm.model.hf import hf_config, load_hf_model, to_hf_state
from delvm.model.transformer import VisualLM, count_parameters
from delvm.train.state import STATE_NAME, read_training_state, resolve_checkpoint


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    dtype: torch.dtype = torch.float32,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write a checkpoint (run, delvm or Hugging Face folder) as a ``LlamaForCausalLM`` folder,
    with its tokenizer (``tokenizer``, default: the one the checkpoint names) and a model card."""
    from delvm.tokenizer import load_tokenizer

    folder = resolve_checkpoint(checkpoint)
    model = load_model(folder)
    tokenizer = tokenizer or checkpoint_tokenizer(folder)
    vqgan = None if tokenizer is None else load_tokenizer(tokenizer)
    expected = tokenizer_fingerprint(folder)
    if vqgan is not None and expected and vqgan.fingerprint() != expected:
        raise DelvmError(
            f"{tokenizer}: tokenizer {vqgan.fingerprint()}, but {folder} was trained with "
            f"{expected}; pass the tokenizer it was trained with"
        )
    state = {k: v.to(dtype).contiguous() for k, v in to_hf_state(model).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / "model.safetensors", lambda tmp: save_file(state, str(tmp), {"format": "pt"})
    )
    write_json(out / "config.json", hf_config(model.config, dtype))
    write_json(
        out / "generation_config.json",
        {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
    )
    if vqgan is not None:
        vqgan.save_pretrained(out / TOKENIZER_DIR)
    else:
        print(
            f"note: {folder} names no tokenizer, so the export has none; pass --tokenizer DIR "
            "to make it promptable on its own",
            file=sys.stderr,
        )
    card = model_card(out.name, folder, model, dtype, vqgan and vqgan.fingerprint())
    atomic_write(out / "README.md", lambda tmp: tmp.write_text(card))
    return out


def model_card(
    name: str, checkpoint: Path, model: VisualLM, dtype: torch.dtype, tokenizer: str | None
) -> str:
    """The export's README.md: what the model is, how to prompt it, and what is known of its
    training (the run's config, data and validation scores, where the checkpoint has them)."""
    config, params = model.config, count_parameters(model)
    lines = [
        f"# {name}",
        "",
        "A visual-sentence model (DeLVM, arXiv 2402.04841; LVM, arXiv 2312.00785) exported by "
        "`delvm export-hf` as a Hugging Face `LlamaForCausalLM`. Its token ids are the VQ codes "
        "of the tokenizer in `tokenizer/`; no id is a special token.",
        "",
        "## Use",
        "",
        "```bash",
        f"delvm prompt {name} --examples IN.png OUT.png --query QUERY.png --out answers",
        "```",
        "",
        "```python",
        "import delvm",
        f'prompter = delvm.load_prompter("{name}")',
        'answers = prompter([("IN.png", "OUT.png")], ["QUERY.png"])  # RGB uint8 arrays',
        "```",
        "",
        "## Model",
        "",
        f"- parameters: {params['total']:,} ({params['blocks']:,} in the blocks)",
        f"- weights: {str(dtype).removeprefix('torch.')}",
        f"- tokenizer: {'`tokenizer/`, fingerprint ' + tokenizer if tokenizer else 'not included'}",
        "",
        "```json",
        json.dumps(config.to_dict(), indent=2),
        "```",
    ]
    if (checkpoint / STATE_NAME).is_file():
        state = read_training_state(checkpoint, mmap=True)
        lines += _training_summary(state) + _validation_scores(checkpoint, state["step"])
    return "\n".join(lines) + "\n"


def _training_summary(state: dict) -> list[str]:
    """The run's length, batch, data and starting point, from its training state."""
    run = state["config"]
    data = run["data"]
    tokens = run["micro_batch"] * run["grad_accum"] * state["world_size"] * data["seq_len"]
    lines = [
        "", "## Training", "",
        f"- steps: {state['step']:,} of {run['steps']:,}, {tokens:,} tokens per step "
        f"({run['micro_batch']} micro-batch x {run['grad_accum']} accumulation x "
        f"{state['world_size']} ranks x {data['seq_len']} tokens)",
        f"- data: store `{data['store']}`, balance {data['balance']}, seed {data['seed']}",
    ]  # fmt: skip
    if run.get("init_from"):
        lines.append(f"- fine-tuned from `{run['init_from']}`")
    if run["distill"].get("teacher"):
        lines.append(f"- distilled from `{run['distill']['teacher']}`")
    manifest = Path(data["store"]) / "manifest.json"
    if manifest.is_file():
        for task, info in read_json(manifest)["tasks"].items():
            lines.append(
                f"- task {task}: {info['examples']:,} examples of {info['images_per_example']} "
                f"images, {info['rows']:,} with augmented copies"
            )
    return lines


def _validation_scores(checkpoint: Path, step: int) -> list[str]:
    """The validation metrics the run logged at ``step`` (OUT/log.jsonl), if it did."""
    from delvm.evaluation.evaluate import markdown_table

    log = checkpoint.parent.parent / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    for record in records:
        if record.get("step") == step and "val" in record:
            return ["", "## Validation scores", "",
                    f"Held-out sentences of the training data at step {step:,}:", "",
                    markdown_table(record["val"])]  # fmt: skip
    return []


def import_hf(source: str | Path, out: str | Path, num_codes: int | None = None) -> Path:
    """Convert a Hugging Face ``llama`` / ``internlm`` folder into a delvm checkpoint folder."""
    return save_model(load_hf_model(source, num_codes), out)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-hf", help="write a checkpoint as a Hugging Face LlamaForCausalLM, with tokenizer"
    )
    p.add_argument(
        "checkpoint", type=Path, help="a run folder (its latest checkpoint) or checkpoint"
    )
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder to include (default: the one the checkpoint names)")  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights' number format")
    p.set_defaults(
        func=lambda a: print(export_hf(a.checkpoint, a.out, DTYPES[a.dtype], a.tokenizer))
    )

    p = sub.add_parser(
        "import-hf", help="convert a Hugging Face llama / internlm folder to a checkpoint"
    )
    p.add_argument("source", type=Path, help="Hugging Face model folder (LVM, DeLVM, exports)")
    p.add_argument("out", type=Path, help="output delvm checkpoint folder")
    p.add_argument(
        "--num-codes",
        type=int,
        default=None,
        help="ids that are VQ codes if the vocabulary is larger (default: all; 8192 for LVM's 8292)",
    )
    p.set_defaults(func=lambda a: print(import_hf(a.source, a.out, a.num_codes)))
