"""Serving throughput and latency under concurrent clients: continuous batching vs one request
at a time, and vLLM on the same model when it is installed, all in one run.

The servers are separate processes on loopback: `arbitrage-fast serve` with `--max-batch B`
(continuous batching) and with `--max-batch 1` (requests queue and run one by one: the engine
before batching), and vLLM's OpenAI server when `--vllm-python` names the interpreter of a
virtualenv with vllm installed (it may serve another model, e.g. the target alone, beside the
pair). `--servers batched:POLICY[@THRESHOLD]` adds an engine server under another step policy
than `--policy`, so several policies meet one vLLM in one run; `+FLAG[=VALUE]` after a name
adds `--FLAG [VALUE]` to that server's command line (`batched:arbitrage@0.7+dense-rows=4`), so
two loads of the same models meet in one run too. Each is driven by 1, 4, 8, 16 concurrent
clients (a client sends its requests one after another, streaming) over a fixed list of
GSM8K prompts; every request asks for exactly `--max-tokens` tokens (ignore_eos), so every
server generates the same number of tokens. Reported per (server, clients): aggregate
generated tokens/s, p50/p99 request latency, p50 time to first streamed event (a step here,
a token for vLLM), and ratios against the batch-1 server and vLLM measured in this run.

    python benchmarks/bench_serving.py --draft M.gguf --target M.gguf --policy draft_only \
        [--vllm-python /opt/vllm/bin/python --vllm-model DIR] [--clients 1,4,8,16]

With `--paired-single K`, the two engine servers first run side by side and take K single
requests in turn (one in flight at a time, the order swapped every round, each round's prompt
sent to both), so drift in the machine's load hits both alike: the batched server's latency
over the batch-1 server's at one client, with a paired bootstrap interval. `--servers ""` then
skips the concurrent-client rows.

All servers are up at once (an idle one waits on its queue without spinning) and are driven
one at a time, in turn at each client count. With `--repeats R` the whole round runs R times,
the servers' order rotating every repeat, and each throughput ratio gets a paired bootstrap
interval over the repeats (a repeat's rows ran back to back, so the machine's drift hits both).

The JSON is rewritten after every row (benchmarks/results/serving_<name>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, cpu_run_record, write_json  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on loopback, up until `close()`."""

    def __init__(self, argv: list[str], port: int, name: str, log: Path, startup_s: float,
                 cwd: str | None = None) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self._log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=cwd)
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode} before serving; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{name} did not answer /health within {startup_s:.0f} s; see {log}")
            time.sleep(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def one_request(client: httpx.Client, body: dict) -> dict:
    """Stream one completion (a chat completion when the body holds messages); returns latency,
    time to the first event, tokens generated, the text and why it finished."""
    start = time.perf_counter()
    first = None
    tokens = 0
    text: list[str] = []
    finish = None
    # include_usage: vLLM reports the token count in a last chunk only when asked (this server
    # always sends usage in its closing chunk and ignores the option).
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with client.stream("POST", path, json={**body, **stream}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(f"server error: {event['error']}")
            if first is None:
                first = time.perf_counter() - start
            for choice in event.get("choices") or ():
                piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                text.append(piece or "")
                finish = choice.get("finish_reason") or finish
            usage = event.get("usage")
            if usage:
                tokens = usage["completion_tokens"]
    return {"latency_s": time.perf_counter() - start, "first_event_s": first, "tokens": tokens,
            "text": "".join(text), "finish_reason": finish}


def drive(url: str, bodies: list[dict], clients: int, per_client: int) -> dict:
    """`clients` threads, each sending `per_client` requests in turn; one row of figures."""
    records: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        with httpx.Client(base_url=url, timeout=3600) as http:
            for k in range(per_client):
                body = bodies[(c * per_client + k) % len(bodies)]
                try:
                    rec = one_request(http, body)
                except Exception as e:  # noqa: BLE001 - recorded, the row is marked failed
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    return
                with lock:
                    records.append(rec)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r["latency_s"] for r in records)
    row = {"clients": clients, "requests": len(records), "wall_s": wall,
           "tokens": sum(r["tokens"] for r in records), "errors": errors}
    if records:
        row.update(tok_s=row["tokens"] / wall, p50_latency_s=statistics.median(lat),
                   p99_latency_s=lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
                   p50_first_event_s=statistics.median(r["first_event_s"] for r in records))
    return row


REFERENCES = ("batch1", "vllm")


def ratios(rows: list[dict], references: tuple[str, ...] = REFERENCES) -> None:
    """Each row's throughput and p99 latency against the batch-1 server and vLLM (and any other
    reference server), same clients and same repeat (the rows driven back to back)."""
    key = lambda r: (r["clients"], r.get("repeat", 0))  # noqa: E731
    by = {(r["server"], *key(r)): r for r in rows if "tok_s" in r}
    for r in rows:
        for ref in references:
            other = by.get((ref, *key(r))) if "tok_s" in r else None
            if other is None or r["server"] == ref:
                continue
            r[f"tok_s_vs_{ref}"] = r["tok_s"] / other["tok_s"]
            r[f"p99_latency_vs_{ref}"] = r["p99_latency_s"] / other["p99_latency_s"]


def repeat_summary(rows: list[dict], references: tuple[str, ...] = REFERENCES) -> list[dict]:
    """Per (server, clients) over the repeats: median tok/s and, against each reference server,
    the throughput ratio with a paired bootstrap interval over repeats (each repeat drove both
    servers back to back, so drift in the machine's load hits a pair alike)."""
    from arbitrage_fast.eval.intervals import paired_bootstrap

    done = [r for r in rows if "tok_s" in r and r["tokens"] > 0]
    by = {(r["server"], r["clients"], r.get("repeat", 0)): r for r in done}
    out = []
    for server, clients in dict.fromkeys((r["server"], r["clients"]) for r in done):
        mine = {k[2]: r for k, r in by.items() if k[:2] == (server, clients)}
        entry = {"server": server, "clients": clients, "repeats": len(mine),
                 "median_tok_s": statistics.median(r["tok_s"] for r in mine.values())}
        for ref in references:
            pairs = [(r, by[(ref, clients, k)]) for k, r in sorted(mine.items()) if (ref, clients, k) in by]
            if server == ref or not pairs:
                continue
            # seconds per generated token: the speed-up of its sum is the throughput ratio
            value, low, high = paired_bootstrap([a["wall_s"] / a["tokens"] for a, _ in pairs],
                                                [b["wall_s"] / b["tokens"] for _, b in pairs], "speedup")
            entry[f"tok_s_vs_{ref}"], entry[f"tok_s_vs_{ref}_interval"] = value, [low, high]
            entry[f"median_p99_latency_vs_{ref}"] = statistics.median(
                a["p99_latency_s"] / b["p99_latency_s"] for a, b in pairs)
        out.append(entry)
    return out


def paired_single(servers: dict[str, "Server"], bodies: list[dict], rounds: int) -> dict:
    """`rounds` single requests to each server in turn (batched first in even rounds), same prompt."""
    lat: dict[str, list[float]] = {name: [] for name in servers}
    first: dict[str, list[float]] = {name: [] for name in servers}
    clients = {name: httpx.Client(base_url=srv.url, timeout=3600) for name, srv in servers.items()}
    try:
        for k in range(rounds):
            order = list(servers) if k % 2 == 0 else list(reversed(servers))
            for name in order:
                rec = one_request(clients[name], bodies[k % len(bodies)])
                lat[name].append(rec["latency_s"])
                first[name].append(rec["first_event_s"])
    finally:
        for c in clients.values():
            c.close()
    from arbitrage_fast.eval.intervals import paired_bootstrap

    speedup, low, high = paired_bootstrap(lat["batched"], lat["batch1"], "speedup")
    # The latency ratio is the speed-up's inverse: its interval's ends swap.
    return {"rounds": rounds, "latency_s": lat, "first_event_s": first,
            "latency_vs_batch1": 1 / speedup, "latency_vs_batch1_interval": [1 / high, 1 / low]}


def render(out: dict) -> str:
    """The run as a markdown table (what RESULTS.md shows), from its JSON."""
    lines = []
    paired = out.get("paired_single")
    if paired:
        med = {k: statistics.median(v) for k, v in paired["latency_s"].items()}
        low, high = paired["latency_vs_batch1_interval"]
        lines += ["| one client, requests in turn | rounds | p50 latency s, batched | p50 latency s, batch 1 "
                  "| latency batched / batch 1 [95% CI] |", "|---|---|---|---|---|",
                  f"| paired | {paired['rounds']} | {med['batched']:.2f} | {med['batch1']:.2f} "
                  f"| {paired['latency_vs_batch1']:.3f}x [{low:.3f}, {high:.3f}] |", ""]
    if out.get("summary"):
        compare = out.get("compare")
        extra = f" tok/s vs {compare} [95% CI] |" if compare else ""
        lines += ["| server | clients | repeats | median tok/s | tok/s vs batch 1 [95% CI] | tok/s vs vLLM [95% CI] "
                  f"| median p99 latency vs batch 1 |{extra}", "|---|---|---|---|---|---|---|" + ("---|" if compare else "")]
        ci = lambda e, ref: ("" if f"tok_s_vs_{ref}" not in e else  # noqa: E731
                             "{:.2f}x [{:.2f}, {:.2f}]".format(e[f"tok_s_vs_{ref}"], *e[f"tok_s_vs_{ref}_interval"]))
        for e in out["summary"]:
            p99 = e.get("median_p99_latency_vs_batch1")
            lines.append(f"| {e['server']} | {e['clients']} | {e['repeats']} | {e['median_tok_s']:.1f} "
                         f"| {ci(e, 'batch1')} | {ci(e, 'vllm')} | {'' if p99 is None else f'{p99:.2f}x'} |"
                         + (f" {ci(e, compare)} |" if compare else ""))
        lines.append("")
    if not out["rows"]:
        return "\n".join(lines)
    lines += ["| server | clients | tok/s | p50 latency s | p99 latency s | p50 first event s | tok/s vs batch 1 "
              "| p99 vs batch 1 | tok/s vs vLLM |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec=".2f": "" if v is None else format(v, spec)  # noqa: E731
    ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
    repeated = out.get("repeats", 1) > 1
    for r in out["rows"]:
        server = f"{r['server']} (repeat {r['repeat']})" if repeated and "repeat" in r else r["server"]
        if "tok_s" not in r:
            lines.append(f"| {server} | {r['clients']} | failed: {'; '.join(r['errors'])[:80]} |||||||")
            continue
        lines.append(f"| {server} | {r['clients']} | {fmt(r['tok_s'], '.1f')} | {fmt(r['p50_latency_s'])} "
                     f"| {fmt(r['p99_latency_s'])} | {fmt(r['p50_first_event_s'])} | {ratio(r.get('tok_s_vs_batch1'))} "
                     f"| {ratio(r.get('p99_latency_vs_batch1'))} | {ratio(r.get('tok_s_vs_vllm'))} |")
    return "\n".join(lines)


def server_argv(serve: list[str], name: str, port: int, max_batch: dict[str, int], policy: str,
                threshold: float | None) -> list[str]:
    """An engine server's command line: `batched` / `batch1` serve `policy`/`threshold`;
    `batched:POLICY[@THRESHOLD]` its own; each `+FLAG[=VALUE]` after it adds `--FLAG [VALUE]`."""
    name, *flags = name.split("+")
    kind, _, spec = name.partition(":")
    if spec:
        policy, _, threshold = spec.partition("@")
    argv = serve + ["--policy", policy, "--max-batch", str(max_batch[kind]), "--port", str(port)]
    for flag in flags:
        key, _, value = flag.partition("=")
        argv += [f"--{key}", value] if value else [f"--{key}"]
    return argv + (["--threshold", str(threshold)] if threshold not in ("", None) else [])


def server_args(ap: argparse.ArgumentParser) -> None:
    """The options that say which models the servers load and how."""
    ap.add_argument("--preset", default=None)
    ap.add_argument("--draft")
    ap.add_argument("--target")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dequantize", action="store_true", help="serve GGUF weights dequantised (bf16 matmuls)")
    ap.add_argument("--no-exact-arithmetic", action="store_true",
                    help="serve with the compiled CPU norm, activation and attention kernels for float weights too")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--vllm-python", default=None, help="python of a virtualenv with vllm (reference server)")
    ap.add_argument("--vllm-model", default=None, help="the model folder vLLM serves (same weights)")
    # vLLM's CPU backend reserves this fraction of host memory for its KV cache by default 0.92,
    # which a machine already holding this project's models cannot give.
    ap.add_argument("--vllm-args", default="--gpu-memory-utilization 0.3 --max-model-len 4096")
    ap.add_argument("--startup-s", type=float, default=900)


def serve_command(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(the model options, the engine server's command line before its policy and port)."""
    models = ["--preset", args.preset] if args.preset else ["--draft", args.draft, "--target", args.target]
    serve = [sys.executable, "-m", "arbitrage_fast.cli", "serve", *models, "--dtype", args.dtype,
             "--served-model-name", "m", "--max-waiting", "1024"]
    if args.dequantize:
        serve.append("--dequantize")
    if args.no_exact_arithmetic:
        serve.append("--no-exact-arithmetic")
    return models, serve


def vllm_argv(python: str, model: str, dtype: str, port: int, extra: str) -> list[str]:
    """vLLM's OpenAI server on loopback, serving `model` under the name the engine servers use."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", dtype,
            "--served-model-name", "m", "--port", str(port), "--host", "127.0.0.1", *extra.split()]


def vllm_version(python: str) -> str:
    return subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                          text=True).stdout.strip()


def start(name: str, argv: list[str], port: int, log: Path, startup_s: float) -> Server:
    """One server, up and answering. vLLM starts outside this checkout: its own `triton_kernels`
    package must not be shadowed by this repository's folder of that name on the working
    directory's path."""
    print(f"starting {name}: {' '.join(argv)}", flush=True)
    return Server(argv, port, name, log, startup_s, cwd="/" if name == "vllm" else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server_args(ap)
    ap.add_argument("--policy", default="draft_only")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--chat", action="store_true",
                    help="send chat completions of the problems with Qwen's step-by-step instruction (instruct models)")
    ap.add_argument("--servers", default="batched,batch1,vllm",
                    help="which servers to run, in order; batched:POLICY[@THRESHOLD] (or batch1:...) adds an "
                         "engine server under another policy than --policy")
    ap.add_argument("--compare", default=None, metavar="SERVER",
                    help="one more reference server for the ratios (a name from --servers), beside batch1 and vllm")
    ap.add_argument("--repeats", type=int, default=1,
                    help="times each (server, clients) row is driven; with 2 or more, ratios get a paired "
                         "bootstrap interval over repeats")
    ap.add_argument("--paired-single", type=int, default=0, metavar="K",
                    help="first, K rounds of one request to the batched and the batch-1 server in turn")
    ap.add_argument("--name", default="serving")
    ap.add_argument("--report", default=None, metavar="JSON", help="print a finished run's table and exit")
    args = ap.parse_args()
    if args.report:
        print(render(json.loads(Path(args.report).read_text())))
        return 0

    from arbitrage_fast.eval.datasets import load_dataset

    clients = [int(c) for c in args.clients.split(",")]
    if args.chat:  # the instruct models' own prompt shape: the chat template and Qwen's instruction
        from arbitrage_fast.presets import STEP_BY_STEP_BOXED

        items = load_dataset("gsm8k", n=16, split="test", seed=0, instruction=STEP_BY_STEP_BOXED)
        prompts = [{"messages": [{"role": "user", "content": i.prompt}]} for i in items]
    else:
        prompts = [{"prompt": i.prompt} for i in load_dataset("gsm8k", n=16, split="test", seed=0)]
    bodies = [{**p, "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0.0} for p in prompts]
    models, serve = serve_command(args)
    out = {"run": cpu_run_record(), "policy": args.policy, "dtype": args.dtype, "dequantize": args.dequantize,
           "exact_arithmetic": not args.no_exact_arithmetic, "chat": args.chat, "threshold": args.threshold,
           "max_tokens": args.max_tokens,
           "per_client": args.per_client, "max_batch": args.max_batch, "repeats": args.repeats, "models": models,
           "compare": args.compare, "rows": []}
    references = REFERENCES + ((args.compare,) if args.compare else ())
    logs = RESULTS / "serving_logs"
    logs.mkdir(parents=True, exist_ok=True)
    engine_servers = {"batched": args.max_batch, "batch1": 1}

    def engine_argv(name: str, port: int) -> list[str]:
        return server_argv(serve, name, port, engine_servers, args.policy, args.threshold)

    if args.paired_single:
        pair = {}
        try:
            for name in engine_servers:
                port = free_port()
                pair[name] = Server(engine_argv(name, port), port, name,
                                    logs / f"{args.name}_{name}_paired.log", args.startup_s)
                drive(pair[name].url, bodies[:1], 1, 1)  # warm-up
            out["paired_single"] = paired_single(pair, bodies, args.paired_single)
        finally:
            for server in pair.values():
                server.close()
        write_json(out, RESULTS, f"serving_{args.name}.json")
        print(render(out), flush=True)
    # Every server is up at once (an idle one blocks on its queue), and each repeat drives them
    # back to back at each client count, the order rotating every repeat.
    servers: dict[str, Server] = {}
    try:
        for name in filter(None, args.servers.split(",")):
            port = free_port()
            if name.split("+")[0].partition(":")[0] in engine_servers:
                argv = engine_argv(name, port)
            elif name == "vllm":
                if not (args.vllm_python and args.vllm_model):
                    print("vllm: skipped (give --vllm-python and --vllm-model)")
                    continue
                argv = vllm_argv(args.vllm_python, args.vllm_model, args.dtype, port, args.vllm_args)
                out["vllm_version"] = vllm_version(args.vllm_python)
            else:
                raise SystemExit(f"unknown server {name!r}: expected batched, batch1, vllm or "
                                 "batched:POLICY[@THRESHOLD][+FLAG[=VALUE]...]")
            try:
                servers[name] = start(name, argv, port, logs / f"{args.name}_{name}.log", args.startup_s)
            except RuntimeError as e:  # recorded as a failed row; the other servers still run
                out["rows"].append({"server": name, "clients": None, "errors": [str(e)]})
                write_json(out, RESULTS, f"serving_{args.name}.json")
                print(f"{name}: {e}", flush=True)
                continue
            drive(servers[name].url, bodies[:1], 1, 1)  # warm-up: first-call costs stay out of the figures
        names = list(servers)
        for r in range(args.repeats):
            for c in clients:
                for name in names[r % len(names):] + names[:r % len(names)] if names else []:
                    row = {"server": name, "repeat": r, **drive(servers[name].url, bodies, c, args.per_client)}
                    out["rows"].append(row)
                    ratios(out["rows"], references)
                    if args.repeats > 1:
                        out["summary"] = repeat_summary(out["rows"], references)
                    write_json(out, RESULTS, f"serving_{args.name}.json")
                    print(json.dumps({k: v for k, v in row.items() if k != "errors"}), flush=True)
    finally:
        for server in servers.values():
            server.close()
    if args.repeats > 1:
        print(render(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
