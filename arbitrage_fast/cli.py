"""`arbitrage-fast` command line: demo, generate, sweep, train-router, eval-router."""
from __future__ import annotations

import argparse
import json
import sys


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="named bundle of models (testbed)")
    p.add_argument("--draft", help="draft checkpoint: HF folder or .gguf file")
    p.add_argument("--target", help="target checkpoint: HF folder or .gguf file")
    p.add_argument("--prm", help="PRM: 'exact' (testbed), an HF PRM folder, or omit for target likelihood")
    p.add_argument("--router", help="router head folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def _engine(args, preset):
    from arbitrage_fast import Engine, EngineConfig

    return Engine(EngineConfig(draft=preset.draft, target=preset.target, device=args.device,
                               dtype=args.dtype or preset.dtype, prm=preset.prm, router=preset.router))


def _preset(args):
    from arbitrage_fast.presets import resolve

    return resolve(args.preset, draft=args.draft, target=args.target, prm=args.prm, router=args.router)


def cmd_generate(args) -> int:
    from arbitrage_fast import SamplingParams

    preset = _preset(args)
    engine = _engine(args, preset)
    res = engine.generate(args.prompt, policy=args.policy, threshold=args.threshold, chat=args.chat or preset.chat,
                          sampling=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                                  seed=args.seed))
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "finish_reason": res.finish_reason,
                          "steps": [s.__dict__ for s in res.steps], "stats": res.stats}, indent=2))
        return 0
    for i, s in enumerate(res.steps):
        print(f"[{i:02d} {s.source:6s}] {s.text.rstrip()}")
    print(f"\nfinish: {res.finish_reason}  stats: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.stats.items()})}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arbitrage-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate one answer step by step")
    _model_args(g)
    g.add_argument("prompt")
    g.add_argument("--policy", default="rsd")
    g.add_argument("--threshold", type=float, default=None)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"arbitrage-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
