"""A whole (tiny) Mixtral model on the CPU, with transformers' eager experts against ours.

The layer-level benchmark (moe_dispatch.py) times the experts alone; this one times what a user
of `experts_implementation="finteam"` sees: the model's forward and forward+backward, attention,
norms, routers and loss included. Both models hold the same weights; each prints the largest
logit difference against the other and, in bf16, against the fp32 model (routing decisions that
flip on near-ties make a bf16 difference between two correct models larger than either's error).

Model: H=256, I=512, E=8, top-2, 2 layers, 8 heads (4 KV heads), vocabulary 1024; input
batch x seq random tokens (4 x 128 by default). The two providers are timed interleaved.

    python benchmarks/tiny_mixtral.py [--dtype float32|bfloat16] [--batch B] [--seq S] [--threads N]
                                      [--full] [--out DIR]
"""
from __future__ import annotations

import argparse

import torch

import harness

import finteam_kernels.hf  # noqa: F401  (registers experts_implementation="finteam")
from finteam_kernels._backend import pick_backend

VOCAB = 1024


def config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=512)


def models(dtype: torch.dtype) -> dict:
    """eager and finteam models with the same weights (seed 0), and the fp32 eager one."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    fp32 = AutoModelForCausalLM.from_config(config(), experts_implementation="eager")
    built = {"fp32": fp32}
    for impl in ("eager", "finteam"):
        model = AutoModelForCausalLM.from_config(config(), experts_implementation=impl)
        model.load_state_dict(fp32.state_dict())
        built[impl] = model.to(dtype)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--full", action="store_true", help="longer measurements")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<cpu>-<date>/)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    built = models(dtype)
    ids_BS = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def forward(model):
        with torch.no_grad():
            return model(input_ids=ids_BS).logits.float()

    def forward_backward(model):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids_BS, labels=ids_BS).loss.backward()

    logits = {name: forward(model) for name, model in built.items()}
    diff = {"finteam vs eager": float((logits["finteam"] - logits["eager"]).abs().max())}
    if dtype != torch.float32:
        diff.update({f"{name} vs fp32": float((logits[name] - logits["fp32"]).abs().max()) for name in ("eager", "finteam")})
    env = harness.environment("cpu", packages=("transformers",))
    before = harness.machine_load()
    rows = []
    quick = not args.full
    for mode, fn in (("forward", forward), ("forward+backward", forward_backward)):
        stats = harness.interleaved({name: (lambda m=built[name]: fn(m)) for name in ("eager", "finteam")}, quick)
        for name, s in stats.items():
            rows.append({"mode": mode, "provider": name, **s.to_dict()})
        rows.append({"mode": mode, "provider": "finteam / eager",
                     "time_ratio": stats["finteam"].median_ms / stats["eager"].median_ms})
    after = harness.machine_load()
    backend = pick_backend("auto", torch.device("cpu"), "moe_experts")
    payload = {"environment": env, "dtype": args.dtype, "tokens": [args.batch, args.seq], "finteam_backend": backend,
               "max_logit_diff": diff, "max_abs_logit": float(logits["fp32"].abs().max()),
               "load": {"before": before, "after": after}, "rows": rows}
    path = harness.write_results(args.out or harness.default_out_dir("cpu"), f"tiny_mixtral_{args.dtype}", payload)

    print(f"tiny Mixtral (H=256, I=512, E=8, top-2, 2 layers), {args.batch}x{args.seq} tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads, finteam experts on backend {backend}; {env['cpu']}, torch {torch.__version__}")
    print(f"machine load before/after: {before['load_average']:.2f}/{after['load_average']:.2f}")
    print("max |logit difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items())
          + f" (max |logit| {payload['max_abs_logit']:.2f})")
    print(f"{'mode':17s} {'provider':16s} {'median ms':>10s} {'p20':>9s} {'p80':>9s}")
    for r in rows:
        if "time_ratio" in r:
            print(f"{r['mode']:17s} {r['provider']:16s} {r['time_ratio']:10.2f}")
        else:
            print(f"{r['mode']:17s} {r['provider']:16s} {r['median_ms']:10.2f} {r['p20_ms']:9.2f} {r['p80_ms']:9.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
