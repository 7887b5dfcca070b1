"""delvm's model against transformers' LlamaForCausalLM: same config, same weights, one run.

Measures, side by side:
- a training step (forward, backward, AdamW) in tokens/s and MFU against the matmul peak measured
  in this run;
- generation of 256 new tokens after a 1792-token prompt (batch 1 and 8), decode tokens/s against
  the memory-bandwidth bound (weight bytes / read bandwidth measured in this run): delvm's
  decoding step in the model's dtype, with bf16 weight copies, and with those compiled
  (`Generator(compile=True)`); on a CPU also with int8 weight copies (`--dtype int8`: rounded
  weights, not the same ones), eager and compiled.

    python benchmarks/model_throughput.py                  # CPU, fp32 (a few minutes on 2 cores)
    python benchmarks/model_throughput.py --device cuda    # GPU, bf16 weights, flash SDPA
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from timing import results_file
from transformers import LlamaForCausalLM

from delvm.inference.generate import Generator, SamplingConfig
from delvm.model.checkpoint import save_model
from delvm.model.export import export_hf
from delvm.model.transformer import VisualLM, preset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the practical peak MFU is measured against."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    seconds = timed(lambda: a @ b, device, repeats=5)
    return 2 * n**3 / seconds


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of streaming a buffer much larger than the caches (a sum reads every byte once)."""
    x = torch.ones(256 * 2**20, device=device)  # 1 GiB of fp32
    seconds = timed(lambda: x.sum(), device, repeats=5)
    return x.numel() * x.element_size() / seconds


def training_flops_per_token(model: VisualLM, seq_len: int) -> float:
    """6 x matmul parameters (forward + backward) plus causal attention scores and values."""
    c = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    matmul_params -= c.vocab_size * c.hidden_size if c.embedding == "learned" else 0  # a gather
    attention = 6 * c.num_layers * seq_len * c.hidden_size  # 12·L·T·d halved by causality
    return 6 * matmul_params + attention


def train_step(model, logits_of, device, seq_len: int):
    """One training step (forward, backward, AdamW) of ``model`` on random ids, as a function."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, 8192, (1, seq_len + 1), device=device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            logits = logits_of(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), ids[:, 1:].flatten()
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    return step


def best_in_turn(calls: dict, device: torch.device, rounds: int) -> dict:
    """Each call's best wall time over ``rounds`` rounds that run every call in turn, so that
    the machine's drift between rounds falls on all of them alike (warm them up first)."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for key, call in calls.items():
            best[key] = min(best[key], once(call, device))
    return best


def once(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--generate-repeats", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=1792)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--results", metavar="DIR",
                        help="also write the table to DIR/results.md (for `delvm results`)")  # fmt: skip
    args = parser.parse_args()
    with results_file(args.results, "delvm against transformers: `benchmarks/model_throughput.py`"):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    # The shape: SwiGLU 768/3072/12/12, learned embedding so both models are identical.
    config = preset("80m", block="llama", embedding="learned", max_seq_len=args.prompt + args.new)
    ours = VisualLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, Path(tmp) / "ckpt")
        export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf")
        theirs = LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32)
    theirs.config._attn_implementation = "sdpa"
    ours.to(device)
    theirs.to(device)

    peak = matmul_peak(device, dtype)
    bandwidth = read_bandwidth(device)
    rows = []
    print(f"device {device}, compute dtype {dtype}, {torch.get_num_threads()} threads")
    print(
        f"measured matmul peak {peak / 1e9:.1f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s"
    )

    if not args.skip_train:
        seq = ours.config.max_seq_len  # prompt + new: 2048 by default
        flops = training_flops_per_token(ours, seq)
        steps = {
            "delvm": train_step(ours, lambda x: ours(x), device, seq),
            "transformers": train_step(theirs, lambda x: theirs(x).logits, device, seq),
        }
        for step in steps.values():
            step()  # warm-up
        best = best_in_turn(steps, device, args.train_repeats)
        t_ours, t_hf = best["delvm"], best["transformers"]
        for name, t in (("delvm", t_ours), ("transformers", t_hf)):
            rows.append(
                (f"train step, seq {seq}, batch 1", name, f"{seq / t:,.0f} tok/s",
                 f"MFU {flops * seq / t / peak:.1%}", f"{t_hf / t:.2f}x")
            )  # fmt: skip

    if not args.skip_generate:
        gen_dtype = dtype
        ours.to(gen_dtype).eval()
        theirs.to(gen_dtype).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        bound = bandwidth / weight_bytes  # tokens/s at batch 1 if only weights were read
        greedy = SamplingConfig(temperature=0)
        dtype_name = str(gen_dtype).removeprefix("torch.")
        exact = Generator(ours)
        # Decode with bf16 weight copies (prefill stays in the model's dtype); on GPU the model
        # already runs in bf16, so both rows coincide there.
        fast = Generator(ours, decode_dtype=torch.bfloat16)
        # The same, its decoding step compiled (inductor on a CPU, CUDA graphs on a GPU).
        compiled = Generator(ours, decode_dtype=torch.bfloat16, compile=True)
        # On a CPU: int8 weight copies (`--dtype int8`), eager and compiled. These decode with
        # rounded weights, not the same ones: the greedy codes may differ from the others'.
        int8 = {}
        if device.type == "cpu":
            int8 = {
                "delvm int8 decode": Generator(ours, decode_dtype=torch.int8),
                "delvm int8 decode, compiled": Generator(ours, torch.int8, compile=True),
            }
        for batch in args.batches:
            prompt = torch.randint(0, 8192, (batch, args.prompt), device=device)
            mask = torch.ones_like(prompt)

            def hf_run(n, prompt=prompt, mask=mask):
                with torch.inference_mode():
                    theirs.generate(prompt, attention_mask=mask, max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False)  # fmt: skip

            results = {}
            # Each arm's decode bound: the bytes its weights take (bf16: 2 per parameter).
            arms = (
                (f"delvm {dtype_name}", lambda n, p=prompt: exact(p, n, greedy), bound),
                ("delvm bf16 decode", lambda n, p=prompt: fast(p, n, greedy),
                 bound * gen_dtype.itemsize / 2),
                ("delvm bf16 decode, compiled", lambda n, p=prompt: compiled(p, n, greedy),
                 bound * gen_dtype.itemsize / 2),
                *((name, lambda n, p=prompt, g=g: g(p, n, greedy), bound * gen_dtype.itemsize)
                  for name, g in int8.items()),
                ("transformers", hf_run, bound),
            )  # fmt: skip
            # A compiled step is compiled for the cache of prompt + new codes on its first
            # call: that call is left out of the timing.
            for generator in (compiled, *int8.values()):
                if generator.compile:
                    generator(prompt, args.new, greedy)
            for _, run, _ in arms:
                run(1)  # warm-up
            # Per arm, the prefill alone (1 code) and the whole answer, timed apart.
            calls = {
                (name, n): lambda run=run, n=n: run(n)
                for name, run, _ in arms
                for n in (1, args.new)
            }
            best = best_in_turn(calls, device, args.generate_repeats)
            for name, _, arm_bound in arms:
                prefill, total = best[name, 1], best[name, args.new]
                results[name] = (
                    batch * (args.new - 1) / (total - prefill),
                    batch * args.new / total,
                    arm_bound,
                )
            hf_decode, hf_end_to_end, _ = results["transformers"]
            for name, (decode, end_to_end, arm_bound) in results.items():
                rows.append(
                    (f"generate {args.new} after {args.prompt}, batch {batch}", name,
                     f"{decode:,.1f} tok/s decode ({decode / batch / arm_bound:.0%} of its bound)",
                     f"{end_to_end:,.1f} tok/s end-to-end",
                     f"{decode / hf_decode:.2f}x decode, "
                     f"{end_to_end / hf_end_to_end:.2f}x end to end")
                )  # fmt: skip
        rows.append(
            (f"decode bound at batch 1: {dtype_name} weights {weight_bytes / 2**20:.0f} MiB / "
             "read bandwidth", "",
             f"{bound:,.1f} tok/s", "", "")
        )  # fmt: skip

    header = ("benchmark", "model", "speed", "detail", "vs transformers")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
