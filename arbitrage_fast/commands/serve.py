"""`serve`: the engine behind an OpenAI-compatible HTTP API."""
from __future__ import annotations

from .common import build_engine, decoding_options, default_max_batch
from .thresholds import recommended_thresholds


def default_policy(preset) -> str:
    """Arbitrage when a router head is there to steer it, RSD otherwise."""
    return "arbitrage" if preset.router else "rsd"


def run(preset, args) -> int:
    run_server, create_app = _server()
    engine = build_engine(preset, args.device, args.dtype, max_batch=args.max_batch or default_max_batch(args.device),
                          prefix_cache=args.enable_prefix_caching, **decoding_options(args))
    name = args.served_model_name or preset.name
    policy, recommended = args.policy or default_policy(preset), recommended_thresholds(preset)
    threshold = args.threshold if args.threshold is not None else recommended.get(policy)
    app = create_app(engine, name, policy=policy, threshold=threshold, policy_thresholds=recommended,
                     max_tokens=args.max_tokens, chat_by_default=preset.chat, **server_options(args))
    print(f"serving {name} ({preset.draft} -> {preset.target}) on http://{args.host}:{args.port}/v1; requests "
          f"naming no policy get {policy} at threshold {'its default' if threshold is None else f'{threshold:g}'}",
          flush=True)
    return run_server(app, args.host, args.port)


def run_remote(engine, args) -> int:
    """Serve the policies in front of two OpenAI-compatible model servers (RSD by default:
    the router needs the draft's hidden states, which the servers do not return)."""
    run_server, create_app = _server()
    name = args.served_model_name or "arbitrage-remote"
    app = create_app(engine, name, policy=args.policy or "rsd", threshold=args.threshold, max_tokens=args.max_tokens,
                     **server_options(args))
    print(f"serving {name} ({args.draft_url} -> {args.target_url}) on http://{args.host}:{args.port}/v1", flush=True)
    return run_server(app, args.host, args.port)


def server_options(args) -> dict:
    """The `--max-waiting` / `--api-key` / `--max-body-bytes` flags as `create_app` keywords."""
    return {"max_waiting": args.max_waiting, "api_key": args.api_key, "max_body_bytes": args.max_body_bytes}


def _server():
    try:
        from arbitrage_fast.serve import create_app, run_server
    except ImportError as e:
        raise ValueError(f"serving needs FastAPI and uvicorn: pip install -e \".[serve]\" ({e})") from None
    return run_server, create_app
