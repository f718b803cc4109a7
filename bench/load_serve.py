"""Bounded load test of ``megacontext serve``: throughput and latency percentiles.

Starts a server (``megacontext serve``, in a subprocess on a free port) or uses one
given with ``--url``; ``--concurrency`` clients each hold their own conversation and
send streamed turns to it (every ``--turns`` turns they start a new conversation)
until ``--requests`` turns are done or ``--time-limit`` seconds have passed,
whichever comes first. Reports requests/s, generated tokens/s, end-to-end latency
and time to first token (p50/p90/p99/max), errors, and how many conversations the
server's forwards carried (``/health``'s batch sizes), as Markdown:

    .venv/bin/python bench/load_serve.py --model tiny-llama --requests 200 \\
        --concurrency 8 --time-limit 300 --out bench/results/serve-cpu-<date>.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Load:
    def __init__(self, url: str, model: str, args: argparse.Namespace):
        self.url, self.model, self.args = url, model, args
        self.lock = threading.Lock()
        self.started = 0
        self.results: list[dict] = []
        self.errors: list[str] = []
        self.deadline = 0.0
        self.loadavg = "unknown"

    def _claim(self) -> bool:
        with self.lock:
            if self.started >= self.args.requests or time.monotonic() >= self.deadline:
                return False
            self.started += 1
            return True

    def worker(self, w: int) -> None:
        a = self.args
        turn, conv = 0, f"load-{os.getpid()}-{w}-0"
        with httpx.Client(timeout=a.request_timeout) as client:
            while self._claim():
                if turn and turn % a.turns == 0:
                    conv = f"load-{os.getpid()}-{w}-{turn}"
                body = {
                    "model": self.model,
                    "messages": [
                        {
                            "role": "user",
                            "content": f"Client {w}, turn {turn}: " + a.prompt_words * "word ",
                        }
                    ],
                    "max_tokens": a.max_tokens,
                    "temperature": 1.0,
                    "seed": 1000 * w + turn,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                turn += 1
                t0 = time.perf_counter()
                first = None
                usage = None
                try:
                    with client.stream(
                        "POST",
                        f"{self.url}/v1/chat/completions",
                        json=body,
                        headers={"X-Conversation-Id": conv},
                    ) as r:
                        if r.status_code != 200:
                            r.read()
                            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(chunk["error"]["message"])
                            if chunk.get("usage"):
                                usage = chunk["usage"]
                            choices = chunk.get("choices") or []
                            if first is None and choices and choices[0]["delta"].get("content"):
                                first = time.perf_counter() - t0
                except Exception as exc:  # recorded, not fatal: errors are a result
                    with self.lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                total = time.perf_counter() - t0
                with self.lock:
                    self.results.append(
                        {
                            "latency_s": total,
                            "ttft_s": first,
                            "completion_tokens": usage["completion_tokens"] if usage else 0,
                            "prompt_tokens": usage["prompt_tokens"] if usage else 0,
                        }
                    )

    def run(self) -> float:
        with contextlib.suppress(OSError):
            self.loadavg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        self.deadline = time.monotonic() + self.args.time_limit
        threads = [
            threading.Thread(target=self.worker, args=(w,)) for w in range(self.args.concurrency)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0


def _start_server(args: argparse.Namespace, state_dir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = Path(sys.executable).parent / "megacontext"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "megacontext.cli"]
    cmd += [
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
        "--max-open",
        str(max(args.concurrency, 1)),
        "--max-batch",
        str(args.max_batch),
        "--max-tokens",
        str(max(args.max_tokens, 1)),
        "--default-max-tokens",
        "1",
        "--log-level",
        "warning",
    ]
    if args.w_max:
        cmd += ["--w-max", str(args.w_max)]
    if args.config:
        cmd += ["--config", str(args.config)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the server did not start within {args.start_timeout}s")


def _report(args, health0, health1, load: Load, wall: float, command: str) -> str:
    res = load.results
    lat = [r["latency_s"] * 1e3 for r in res]
    ttft = [r["ttft_s"] * 1e3 for r in res if r["ttft_s"] is not None]
    gen = sum(r["completion_tokens"] for r in res)
    prompt = sum(r["prompt_tokens"] for r in res)
    b0, b1 = health0.get("batch_sizes", {}), health1.get("batch_sizes", {})
    batches = {int(k): v - b0.get(k, 0) for k, v in b1.items() if v - b0.get(k, 0) > 0}
    steps = sum(batches.values())
    mean_batch = sum(k * v for k, v in batches.items()) / steps if steps else float("nan")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    today = dt.date.today().isoformat()
    lines = [
        f"# `megacontext serve` under load, {device.upper()}, {health1.get('model')} ({today})",
        "",
        f"Machine: {_cpu()}, {os.cpu_count()} cores, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if device == 'cuda' else 'no GPU'}; "
        f"{platform.platform()}, Python {platform.python_version()}. Versions: megacontext "
        f"{_version('megacontext')}, torch {torch.__version__}, transformers "
        f"{_version('transformers')}, fastapi {_version('fastapi')}, uvicorn "
        f"{_version('uvicorn')}, httpx {_version('httpx')}.",
        "",
        f"Model {health1.get('model')}, W_max {health1.get('w_max')}. {args.concurrency} "
        f"concurrent clients, each in its own conversation ({args.turns} turns, then a new "
        f"one), streamed turns of a {args.prompt_words}-word user message and up to "
        f"{args.max_tokens} sampled tokens; bounds: {args.requests} turns or "
        f"{args.time_limit:.0f} s, whichever first.",
        "",
        f"    {command}",
        "",
        *(
            [
                "tiny-llama is a random 2-layer model (d=64): these numbers measure the "
                "server (HTTP, scheduling, the focus loop, a save after every turn), not a "
                "real model's decoding.",
                "",
            ]
            if health1.get("model") == "tiny-llama"
            else []
        ),
        f"Load average when the run started: {load.loadavg}.",
        "",
        "| what | value |",
        "| --- | ---: |",
        f"| turns completed | {len(res)} |",
        f"| errors | {len(load.errors)} |",
        f"| wall time | {wall:.1f} s |",
        f"| turns/s | {len(res) / wall:.2f} |",
        f"| generated tokens/s | {gen / wall:.1f} |",
        f"| prompt tokens ingested | {prompt} |",
        f"| latency p50 / p90 / p99 / max | {_pct(lat, 0.5):.0f} / {_pct(lat, 0.9):.0f} / "
        f"{_pct(lat, 0.99):.0f} / {max(lat, default=float('nan')):.0f} ms |",
        f"| time to first token p50 / p90 / p99 | {_pct(ttft, 0.5):.0f} / {_pct(ttft, 0.9):.0f} "
        f"/ {_pct(ttft, 0.99):.0f} ms |",
        f"| decode steps (batched forwards) | {steps} |",
        f"| mean conversations per forward | {mean_batch:.2f} |",
        f"| forwards by batch size | {', '.join(f'{k}: {v}' for k, v in sorted(batches.items()))} |",
        "",
    ]
    if load.errors:
        lines += ["Errors (first 5):", ""] + [f"- {e}" for e in load.errors[:5]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="an already running server (default: start one)")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--w-max", type=int, default=None)
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--requests", type=int, default=200, help="turns in all (count limit)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds (time limit)")
    p.add_argument("--turns", type=int, default=5, help="turns per conversation")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--prompt-words", type=int, default=40)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.time_limit <= 0 or args.turns < 1:
        p.error("--requests, --concurrency, --turns must be >= 1 and --time-limit > 0")
    command = "python bench/load_serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    proc = None
    with tempfile.TemporaryDirectory(prefix="megacontext-load-") as tmp:
        try:
            if args.url:
                url = args.url.rstrip("/")
            else:
                proc, url = _start_server(args, Path(tmp) / "state")
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            health0 = httpx.get(f"{url}/health", timeout=30).json()
            load = Load(url, model, args)
            wall = load.run()
            health1 = httpx.get(f"{url}/health", timeout=30).json()
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    report = _report(args, health0, health1, load, wall, command)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 1 if not load.results else 0


if __name__ == "__main__":
    raise SystemExit(main())
