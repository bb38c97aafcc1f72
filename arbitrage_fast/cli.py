"""`arbitrage-fast` command line: demo, generate, sweep, calibrate, train-router, eval-router, serve."""
from __future__ import annotations

import argparse
import json
import sys

from arbitrage_fast.config import QUANT_FORMATS, QUANT_GROUPS


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="named bundle of models: testbed, qwen2.5-coder")
    p.add_argument("--draft", help="draft checkpoint: HF folder or .gguf file")
    p.add_argument("--target", help="target checkpoint: HF folder or .gguf file")
    p.add_argument("--prm", help="PRM: 'exact' (testbed), an HF PRM folder, or omit for target likelihood")
    p.add_argument("--router", help="router head folder")
    p.add_argument("--named-router", action="append", type=_named_router, default=[], metavar="NAME=DIR",
                   help="a further router head, read by the rows named 'arbitrage:NAME' (the testbed preset's "
                        "'exact' is its head trained on the exact checker's labels); replaces the preset's head "
                        "of that name; repeatable")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--dequantize", action="store_true",
                   help="dequantise a GGUF's weights at load (the reference path) instead of running its "
                        "quantized blocks packed (the default: as stored on CPU, repacked for the Triton kernel on a GPU)")
    p.add_argument("--dense-rows", type=_positive_int, default=None, metavar="N",
                   help="keep packed weights (GGUF, --draft-quant/--target-quant) and add a 16-bit copy: forwards "
                        "of at least N tokens (prefill chunks, wide decode batches) run the copy, narrower ones the "
                        "packed kernels. Faster under load where the 16-bit GEMM beats the packed kernels from a "
                        "few rows (4 on the AVX-512-BF16 host of benchmarks/RESULTS.md); costs the 16-bit weights' "
                        "memory on top")
    for role in ("draft", "target"):
        p.add_argument(f"--{role}-quant", default=None, choices=list(QUANT_FORMATS),
                       help=f"quantize the {role}'s linear layers at load: int8 per output channel, int4 or int3 "
                            "per group of --quant-group inputs (a GGUF is dequantised first)")
    p.add_argument("--quant-group", type=int, default=64, choices=list(QUANT_GROUPS),
                   help="inputs per scale and zero point for int4/int3 (default 64)")
    p.add_argument("--exact-arithmetic", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU norms, activation and attention: --no-exact-arithmetic runs the compiled kernels "
                        "for a float checkpoint too (faster; sums in another order), --exact-arithmetic keeps "
                        "transformers' arithmetic for packed weights too (default: float exact, packed compiled)")


def _decoding_args(p: argparse.ArgumentParser) -> None:
    """How the engine writes steps: chunked decoding and token-level speculation."""
    p.add_argument(
        "--decode-chunk", type=_non_negative_int, default=None, metavar="N",
        help="tokens decoded per host read while writing a step: 1 = every token; N > 1 = chunks of N "
             "(tokens past a step boundary are rolled back); 0 = adaptive, at most 2 host reads a step. "
             "With 1, every request's token shares one batched forward (replayed from a CUDA graph per batch "
             "bucket on a GPU); N != 1 decodes a lone request's steps in chunks, and, while others run, "
             "greedy steps as rows of one shared chunked loop per model (sampled ones per token; a seeded "
             "one keeps its own chunks). "
             "Default: 0 on a CUDA device (a step's tokens run with no host read between them), 1 elsewhere "
             "(on a CPU nothing "
             "is saved by fewer reads and each rolled-back token costs a forward). Where step lengths "
             "vary widely, a small fixed N (4-8) can roll back less than 0.")
    p.add_argument(
        "--spec-k", type=_non_negative_int, default=0, metavar="K",
        help="when the target rewrites an escalated step (rsd, arbitrage, oracle, every_step), the draft "
             "proposes K tokens at a time and the target verifies them in one forward: the same tokens when "
             "greedy, the target's distribution when sampling. 0 = off. Needs a draft and target with one "
             "vocabulary. The spec_decode policy speculates with K (4 when 0).")
    p.add_argument(
        "--reflection-cues", type=_word_list, default=None, metavar="W1,W2,...",
        help="spec_thinking: a kept draft step whose first word is one of these (case-insensitive) hands the "
             "next step to the target. Default: Wait,But,Alternatively,Hmm.")
    p.add_argument(
        "--lookahead-k", type=_positive_int, default=None, metavar="K",
        help="lookahead: draft steps written ahead before the target judges them all in one pass (the "
             "longest prefix it scores >= the threshold is kept). Default: 3.")
    p.add_argument(
        "--batch-invariant", action="store_true",
        help="compute every token's row independently of the other rows of its forward, so greedy output "
             "(bf16 included) is the same alone, in a batch or under speculation; costs per-query attention "
             "and, where a layer's kernel is not row-invariant, one-row products. Implies --decode-chunk 1.")


def _word_list(text: str) -> tuple[str, ...]:
    words = tuple(w.strip() for w in text.split(","))
    if not all(words):
        raise argparse.ArgumentTypeError(f"expected comma-separated words, got {text!r}")
    return words


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0 = adaptive), got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _named_router(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder or ":" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (a head's name without ':', then its folder), got {text!r}")
    return name, folder


def _preset(args):
    from arbitrage_fast.presets import resolve

    return resolve(args.preset, draft=args.draft, target=args.target, prm=args.prm, router=args.router,
                   routers=dict(args.named_router))


def _remote_args(p: argparse.ArgumentParser) -> None:
    """Models served elsewhere: the policies drive two OpenAI-compatible servers instead."""
    p.add_argument("--draft-url", help="draft served by vLLM/SGLang, e.g. http://host:8000 (then --target-url "
                   "too; --draft/--target, if given, are the local tokenizer folders used for --chat)")
    p.add_argument("--target-url", help="target served by vLLM/SGLang")
    p.add_argument("--draft-name", help="the draft's served model name (default: none sent)")
    p.add_argument("--target-name", help="the target's served model name (default: none sent)")


def _labelling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=_positive_int, default=1,
                   help="problems labelled at once (continuous batching; the labels equal batch 1's)")
    p.add_argument("--label-cache", default=None, metavar="DIR",
                   help="keep each problem's labels here and reuse them on a rerun (resumes an interrupted "
                        "labelling; any run labels only the problems the directory lacks)")


def _router_datasets_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=_word_list, default=None, metavar="NAMES",
                   help="comma-separated datasets whose problems are labelled, e.g. gsm8k,math500 (default: the "
                        "preset's); with several, --label-cache needs '{dataset}' in its path")


def _records_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", default=None, metavar="JSONL",
                   help="append each solved (problem, policy, threshold) here and, when rerun with the same "
                        "file, skip what it already holds: resumes a long sweep after an interruption. The "
                        "file's header holds the settings, plan and code revision; other settings are refused")


def _batch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="runs in flight at once (continuous batching). 1: each problem alone, so its "
                        "latency is its own. N > 1: more problems an hour, for choices resting on "
                        "accuracy and escalations (calibrate on dev); latencies are then times in "
                        "a shared batch and CPU times are not recorded, and the records file says so")


def _remote_engine(args):
    """The remote engine when server URLs are given, else None."""
    if not (args.draft_url or args.target_url):
        return None
    if not (args.draft_url and args.target_url):
        raise ValueError("remote models need both --draft-url and --target-url")
    from arbitrage_fast.backends import RemoteEngine, RemoteModel

    cues = {"reflection_cues": args.reflection_cues} if getattr(args, "reflection_cues", None) else {}
    return RemoteEngine(RemoteModel(args.draft_url, args.draft_name, tokenizer=args.draft),
                        RemoteModel(args.target_url, args.target_name, tokenizer=args.target), **cues)


def _engine_for(args):
    """The native engine on local checkpoints, or the remote one when server URLs are given;
    returns (engine, chat by default)."""
    remote = _remote_engine(args)
    if remote is not None:
        return remote, False
    from arbitrage_fast.commands.common import build_engine, decoding_options

    preset = _preset(args)
    return build_engine(preset, args.device, args.dtype, **decoding_options(args)), preset.chat


def cmd_generate(args) -> int:
    from arbitrage_fast import SamplingParams

    engine, chat = _engine_for(args)
    res = engine.generate(args.prompt, policy=args.policy, threshold=args.threshold, chat=args.chat or chat,
                          sampling=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                                  seed=args.seed, stop=tuple(args.stop)))
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "finish_reason": res.finish_reason,
                          "stop_reason": res.stop_reason,
                          "steps": [s.__dict__ for s in res.steps], "stats": res.stats}, indent=2))
        return 0
    for i, s in enumerate(res.steps):
        print(f"[{i:02d} {s.source:6s}] {s.text.rstrip()}")
    print(f"\nfinish: {res.finish_reason}  stats: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.stats.items()})}")
    return 0


def _with_preset(run):
    def call(args):
        return run(_preset(args), args)
    return call


def cmd_demo(preset, args):
    from arbitrage_fast.commands import demo
    return demo.run(preset, args)


def cmd_sweep(preset, args):
    from arbitrage_fast.commands import sweep
    return sweep.run(preset, args)


def cmd_calibrate(preset, args):
    from arbitrage_fast.commands import calibrate
    return calibrate.run(preset, args)


def cmd_serve(args):
    from arbitrage_fast.commands import serve

    if args.preset is None and not (args.draft or args.target or args.draft_url or args.target_url):
        args.preset = "testbed"  # bare `serve` serves the shipped testbed; given models get no preset's router

    remote = _remote_engine(args)
    if remote is not None:  # a step router in front of two model servers
        if args.enable_prefix_caching:
            raise ValueError("--enable-prefix-caching applies to this engine's own KV pool; with --draft-url/"
                             "--target-url, enable it on the model servers instead")
        return serve.run_remote(remote, args)
    return serve.run(_preset(args), args)


def cmd_train_router(preset, args):
    from arbitrage_fast.commands import router
    return router.run_train(preset, args)


def cmd_eval_router(preset, args):
    from arbitrage_fast.commands import router
    return router.run_eval(preset, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arbitrage-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="solve problems step by step and compare policies (the main job)")
    _model_args(d)
    d.set_defaults(preset="testbed")
    d.add_argument("--n", type=int, default=None, help="problems in the comparison table (default: 20 on the "
                   "testbed, 2 for qwen2.5-coder)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-new-tokens", type=int, default=None, help="token cap per problem (default: 256 on the "
                   "testbed, 192 for qwen2.5-coder)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    _decoding_args(d)
    d.set_defaults(func=_with_preset(cmd_demo))

    s = sub.add_parser("sweep", help="accuracy vs latency of each policy over thresholds")
    _model_args(s)
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--dataset", default=None, help="testbed | gsm8k | math500 (default: the preset's)")
    s.add_argument("--policies", default="target_only,rsd,arbitrage")
    s.add_argument("--thresholds", default=None, help='e.g. "rsd=0.5,0.9;arbitrage=0.2,0.4"')
    s.add_argument("--thresholds-from", default=None, metavar="JSON",
                   help="run exactly the policies and thresholds a `calibrate` file chose on dev (and "
                        "target_only), and add the matched-accuracy table of that protocol to the report")
    s.add_argument("--split", default="test", choices=["train", "dev", "test"],
                   help="problems to sweep (default test; thresholds are chosen on dev by `calibrate`)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--json", default=None)
    s.add_argument("--plot", default=None, help="write the Pareto plot (PNG)")
    _records_arg(s)
    _batch_arg(s)
    s.add_argument("--block", type=_positive_int, default=1, metavar="N",
                   help="time N problems at once: each block of N consecutive problems runs under one policy "
                        "and threshold at a time, all in flight together, timed as a whole (wall and CPU). "
                        "Latencies are then each block's time per problem (throughput under load, not one "
                        "problem's latency), speed-ups ratios of the same blocks' times with intervals over "
                        "blocks; the records file says so")
    s.add_argument("--report-only", action="store_true",
                   help="run nothing: report the points of the --records file over the problems it holds under "
                        "every policy and threshold (a sweep may still be appending to it)")
    _decoding_args(s)
    s.set_defaults(func=_with_preset(cmd_sweep))

    c = sub.add_parser("calibrate", help="choose each policy's thresholds on the dev split (for sweep "
                                         "--thresholds-from)")
    _model_args(c)
    c.add_argument("--n", type=int, default=200, help="dev problems (default 200, or all a dataset's dev split has)")
    c.add_argument("--dataset", default=None, help="testbed | gsm8k | math500 (default: the preset's)")
    c.add_argument("--policies", default="target_only,rsd,arbitrage")
    c.add_argument("--grid-points", type=int, default=21,
                   help="thresholds per policy, the same number for every policy (default 21)")
    c.add_argument("--grid", choices=("even", "quantile"), default="even",
                   help="where the thresholds go: evenly over each policy's score range (default), or at the "
                        "evenly spaced quantiles of the policy's own scores of draft steps on --grid-pilot "
                        "train problems (the same escalation shares for every policy), the range's ends kept")
    c.add_argument("--grid-pilot", type=_positive_int, default=16, metavar="N",
                   help="train problems whose draft steps place a quantile grid (default 16)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--out", required=True, metavar="JSON", help="the calibration file to write")
    _records_arg(c)
    _batch_arg(c)
    _decoding_args(c)
    c.set_defaults(func=_with_preset(cmd_calibrate))

    t = sub.add_parser("train-router", help="label steps with the PRM advantage, train and save a router head")
    _model_args(t)
    t.add_argument("--n", type=int, default=400, help="training problems of each dataset")
    _router_datasets_arg(t)
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=300)
    t.add_argument("--patience", type=int, default=40,
                   help="stop when the validation loss has not improved for this many epochs")
    t.add_argument("--head", choices=["linear", "mlp"], default="linear",
                   help="linear (default): a logistic score over the features, its hidden-state penalty "
                        "chosen by cross-validation over the training problems; mlp: one SiLU layer of "
                        "--width units, early-stopped on the validation loss")
    t.add_argument("--width", type=int, default=64, help="hidden units of the mlp head")
    t.add_argument("--label-margin", type=float, default=0.0, metavar="D",
                   help="train on label advantage > D instead of > 0 (the steps the target clearly improves); "
                        "eval-router judges the AUROC against advantage > 0 unless given the same margin")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-new-tokens", type=int, default=256)
    t.add_argument("--json", default=None)
    t.add_argument("--cached-only", action="store_true",
                   help="train on those of the --n problems the label cache already holds, labelling none (an "
                        "interim router while a long labelling run goes on)")
    _labelling_args(t)
    t.set_defaults(func=_with_preset(cmd_train_router))

    e = sub.add_parser("eval-router", help="Spearman/AUROC of a router vs the oracle advantage on held-out problems")
    _model_args(e)
    e.add_argument("--n", type=int, default=200, help="held-out problems of each dataset")
    _router_datasets_arg(e)
    e.add_argument("--label-margin", type=float, default=0.0, metavar="D",
                   help="judge the AUROC against label advantage > D (the margin the head was trained on) instead "
                        "of > 0; Spearman ρ and the escalation table read the advantage itself")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--json", default=None)
    _labelling_args(e)
    e.set_defaults(func=_with_preset(cmd_eval_router))

    g = sub.add_parser("generate", help="generate one answer step by step")
    _model_args(g)
    g.add_argument("prompt")
    g.add_argument("--policy", default="rsd")
    g.add_argument("--threshold", type=float, default=None)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer before this string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--json", action="store_true")
    _decoding_args(g)
    _remote_args(g)
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions), "
                                     "streaming one event per reasoning step")
    _model_args(v)
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--served-model-name", default=None, help="the model name clients send (default: the preset's)")
    v.add_argument("--policy", default=None, help="policy for requests that name none (default: arbitrage "
                   "with a router head, rsd without)")
    v.add_argument("--threshold", type=float, default=None, help="threshold for requests that name none")
    v.add_argument("--max-tokens", type=int, default=256, help="token cap for requests that set none")
    v.add_argument("--max-batch", type=_positive_int, default=None,
                   help="requests decoded at once (continuous batching; default 8 on CPU, 32 on CUDA); "
                        "1 serves one request at a time")
    v.add_argument("--max-waiting", type=_positive_int, default=256,
                   help="requests that may wait for admission; beyond it the server answers 503 with Retry-After")
    v.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20, help="request body size limit (413)")
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    v.add_argument("--enable-prefix-caching", action="store_true",
                   help="keep ended requests' KV for later requests that start with the same tokens "
                        "(multi-turn chat, shared system prompts); evicted least recently used")
    _decoding_args(v)
    _remote_args(v)
    v.set_defaults(func=cmd_serve)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"arbitrage-fast: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a remote server that cannot be reached or used
        from arbitrage_fast.backends import RemoteBackendError

        if not isinstance(e, RemoteBackendError):
            raise
        print(f"arbitrage-fast: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
