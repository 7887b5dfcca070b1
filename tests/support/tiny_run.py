"""A tiny trained run through the CLI: toy world -> token store -> `delvm train` (seconds).

The tokenizer is untrained (32 px images, 4 x 4 = 16 tokens each) and the model is the `tiny`
preset trained for 4 steps: what the tests check is that the files fit together, not quality.
"""

from pathlib import Path

from delvm.cli import main
from tests.support.tiny import untrained_cpu_tokenizer

# A split unlike the defaults (seed 0, val_fraction 0.05, 16 sentences, the model's context), so
# a command that ignores the run's own gets other held-out sentences.
SPLIT = {"seed": 7, "val_fraction": 0.25, "val_sentences": 3, "seq_len": 64}


def train_tiny_run(folder: Path) -> dict[str, Path]:
    """Build FOLDER/tok, FOLDER/store and FOLDER/run (checkpoints at steps 2 and 4)."""
    tokenizer = untrained_cpu_tokenizer(resolution=32, num_embeddings=128)
    tok = tokenizer.save_pretrained(folder / "tok")
    build = folder / "build.toml"
    build.write_text(
        f'out = "{folder / "store"}"\ntokenizer = "{tok}"\nbalance = "augment"\n'
        '[[sources]]\nformat = "toyworld"\nresolution = 32\nsegmentation = 16\npose = 8\nderain = 8\n'
    )
    assert main(["data", "build", str(build)]) == 0
    overrides = [f"out='{folder / 'run'}'", f"data.store='{folder / 'store'}'",
                 f"tokenizer='{tok}'", "steps=4", "checkpoint_every=2", "eval_every=2",
                 "precision='fp32'", "tensorboard=false",
                 *(f"data.{key}={value}" for key, value in SPLIT.items())]  # fmt: skip
    assert main(["train", "tiny", *overrides]) == 0
    return {"tokenizer": tok, "store": folder / "store", "run": folder / "run"}
