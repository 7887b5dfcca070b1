"""The shipped paper configs say what the paper says (DeLVM, Guo et al. 2024; DESIGN.md).

The tables below hold the paper's values. Each config is read with `load_config` and its derived
values are taken from the code the trainer runs (`model_config_for`, `tokens_per_step`,
`lr_schedule`), so a config is checked as it would train, on the number of GPUs its launch line
names.
"""

import re

import pytest
import torch

from delvm.configs import find_config, shipped_configs
from delvm.data.store import load_build_config
from delvm.model.transformer import VisualLM
from delvm.train.config import TrainConfig, load_config
from delvm.train.trainer import lr_schedule, model_config_for, stage_plan

# Table 7: hidden, MLP, heads, layers, block; parameters in the blocks as DESIGN.md states them
# (1.113B, 274M, 85M), to the digits it gives.
TABLE_7 = {
    "1b": (2048, 5504, 16, 22, "llama", 1.113e9),
    "300m": (1024, 2688, 8, 22, "llama", 274e6),
    "80m": (768, 3072, 12, 12, "vit", 85e6),
}
# Table 8: AdamW, warmup over 0.56 % of the steps, cosine down to 1.5e-5.
TABLE_8 = {"lr": 1.5e-4, "min_lr": 1.5e-5, "weight_decay": 0.1, "betas": (0.9, 0.95),
           "eps": 1e-8, "grad_clip": 1.0, "warmup_ratio": 0.0056}  # fmt: skip
TOKENS_PER_STEP = 262_144
CONTEXT = 2048  # 4 pairs of 256-token images
STEPS_TABLES_1_3 = 35_000
STEPS_FIGURE_2 = 12_000  # an override the pretraining configs name
TABLE_10_STAGE_LRS = (1.5e-4, 8e-5, 5e-5)  # the peak lr of the first three continual stages
KD = {"w_gt": 1.0, "w_kd": 1.0, "temperature": 1.0}  # DeLVM's kd_config (Hinton)
VOCAB, CODEBOOK_DIM = 8192, 64  # the public f16-8192 VQGAN

# config -> the Table 7 model it trains
PRETRAINING = {"paper_1b": "1b", "paper_300m": "300m", "paper_80m": "80m"}
DISTILLATION = {"kd_1b_to_300m": "300m", "kd_1b_to_80m": "80m"}
CONTINUAL = {"paper_300m_continual": "300m"}
PAPER = {**PRETRAINING, **DISTILLATION, **CONTINUAL}


class PublicTokenizer:
    """What the trainer reads from a store built with the public tokenizer."""

    vocab_size = VOCAB

    def codebook(self) -> torch.Tensor:
        return torch.zeros(VOCAB, CODEBOOK_DIM)


def launch_world_size(name: str) -> int:
    """The number of GPUs the config's own launch line names (torchrun --nproc_per_node N)."""
    found = re.findall(r"--nproc_per_node (\d+)", find_config(name).read_text())
    assert len(found) == 1, f"{name}: one launch line naming --nproc_per_node"
    return int(found[0])


def lrs(config: TrainConfig) -> list[float]:
    """The lr of every optimizer step, as the trainer sets it."""
    tasks = sorted({task for stage in config.stages for task in stage.tasks}) or ["any"]
    lr_at = lr_schedule(config, stage_plan(config, tasks))
    return [lr_at(step) for step in range(config.steps)]


def test_every_paper_kd_and_continual_config_is_checked_here():
    shipped = {n for n in shipped_configs() if re.match(r"(paper_|kd_|continual)", n)}
    assert shipped == set(PAPER) | {"continual"}  # continual: the toy preset, checked below


@pytest.mark.parametrize("name", sorted(PAPER))
def test_the_model_is_table_7s(name):
    config = load_config(name)
    model = model_config_for(config, PublicTokenizer())  # raises if the context does not fit
    hidden, mlp, heads, layers, block, parameters = TABLE_7[PAPER[name]]
    shape = (model.hidden_size, model.intermediate_size, model.num_heads, model.num_layers)
    assert (*shape, model.block) == (hidden, mlp, heads, layers, block)
    assert (model.vocab_size, model.embedding) == (VOCAB, "codebook")  # DeLVM's embedding
    with torch.device("meta"):
        blocks = VisualLM(model).blocks
    assert sum(p.numel() for p in blocks.parameters()) == pytest.approx(parameters, rel=1e-3)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_the_recipe_is_table_8s(name):
    config = load_config(name)
    for key, value in TABLE_8.items():
        assert getattr(config.optim, key) == value, f"{name}: optim.{key}"
    assert config.data.seq_len == CONTEXT
    world_size = launch_world_size(name)
    assert (world_size, config.tokens_per_step(world_size)) == (8, TOKENS_PER_STEP)
    schedule = lrs(config)
    first_stage = config.stages[0].steps if config.stages else config.steps
    # Linear warmup over 0.56 % of the (first stage's) steps to the peak, cosine after it.
    warmup = schedule.index(max(schedule[:first_stage])) + 1
    assert warmup == round(TABLE_8["warmup_ratio"] * first_stage)
    assert schedule[0] == pytest.approx(TABLE_8["lr"] / warmup)
    assert schedule[-1] == pytest.approx(TABLE_8["min_lr"], rel=1e-6)


@pytest.mark.parametrize("name", sorted({**PRETRAINING, **DISTILLATION}))
def test_pretraining_and_distillation_run_as_long_as_tables_1_and_3(name):
    config = load_config(name)
    assert (config.steps, config.stages) == (STEPS_TABLES_1_3, [])
    if name in PRETRAINING:  # and the header tells how Figure 2's runs differ
        assert f"(its Figure 2 runs: steps={STEPS_FIGURE_2})" in find_config(name).read_text()


@pytest.mark.parametrize("name", sorted(DISTILLATION))
def test_distillation_takes_delvms_kd_config(name):
    distill = load_config(name).distill
    assert {key: getattr(distill, key) for key in KD} == KD
    assert distill.teacher == ""  # the 1B teacher is the user's: a run or DeLVM's LLaMA-1b-hf


def test_the_300m_continual_stages_peak_at_table_10s_lrs():
    config = load_config("paper_300m_continual")
    assert config.lr_policy == "rescale"
    assert [s.tasks for s in config.stages] == [["segmentation"], ["pose"], ["derain"]]
    schedule, first = lrs(config), 0
    for stage, peak in zip(config.stages, TABLE_10_STAGE_LRS, strict=True):
        within = schedule[first : first + stage.steps]
        warmup = round(TABLE_8["warmup_ratio"] * stage.steps)
        assert max(within) == within[warmup - 1] == pytest.approx(peak)  # after its own warmup
        assert within[-1] == pytest.approx(TABLE_8["min_lr"], rel=1e-6)
        first += stage.steps


def test_the_toy_continual_preset_is_tiny_and_says_so():
    config = load_config("continual")
    assert config.model.preset == "tiny" and config.data.seq_len < CONTEXT
    assert "toy size" in find_config("continual").read_text().splitlines()[0]
    paper = load_config("paper_300m_continual")
    assert [s.tasks for s in config.stages] == [s.tasks for s in paper.stages]


def test_the_real_formats_store_holds_no_pascal_voc_and_an_unlabelled_image_folder():
    # Pascal-5i is Table 4's zero-shot evaluation: none of its images may be pretrained on.
    config = load_build_config("data/real_formats", tokenizer="tok")
    formats = [source["format"] for source in config.sources]
    assert "pascal5i" not in formats
    paths = [str(v) for source in config.sources for v in source.values()]
    assert not [p for p in paths if re.search(r"voc|pascal", p, re.IGNORECASE)]
    assert "image_folder" in formats  # LAION-style unlabelled photos (Appendix A.3)
    # Table 8's augmentation: RandomResizedCrop at torchvision's default scale and ratio.
    augment = config.augment_config("any", 256)
    assert (*augment.scale, *augment.ratio) == pytest.approx((0.08, 1.0, 3 / 4, 4 / 3), abs=1e-4)
