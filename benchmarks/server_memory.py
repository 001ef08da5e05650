"""The server's memory under large chat requests: peak and after-finish RSS, with and without the memory budget.

Each setting runs a server (the `debug` preset, glibc tuned as `blip3o serve` tunes it) in a fresh process,
then sends it ten concurrent chat requests of eight 4096x4096 PNG images each (a few KB each: solid colours)
and reads the server's resident memory from /proc every 10 ms. A request refused with 429 is sent again after
its Retry-After, as OpenAI's clients do, so every setting answers all ten. Settings:

    unbounded        no budget (1 TiB), freed memory kept by the allocator
    unbounded+trim   no budget, freed memory handed back (malloc_trim after large frees)
    budget           ServerConfig's defaults: the memory budget and the trim

Printed: a row per setting (RSS before the requests, peak, 2 s after the last answer; answers and 429s; wall
seconds), then the ratios of peak and after-finish RSS to the unbounded run's, and the budget beside the peak's
rise above the idle server.

    python benchmarks/server_memory.py                  # about 3 minutes on 2 CPU cores
    python benchmarks/server_memory.py --requests 4 --images 4
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

MIB = 1024 * 1024
SETTINGS = {"unbounded": dict(budget=1 << 40, trim=False), "unbounded+trim": dict(budget=1 << 40, trim=True),
            "budget": dict(budget=None, trim=True)}


def serve(budget: int | None, trim: bool) -> None:
    """The server process: prints its URL, then serves until killed."""
    import torch

    from blip3o import Blip3o
    from blip3o.allocator import keep_freed_memory
    from blip3o.server import Blip3oService, ServerConfig, create_app, listen_socket
    from blip3o.server import serve as run_server
    from blip3o.server import service as service_module

    keep_freed_memory()  # as `blip3o serve` does
    if not trim:
        service_module.return_freed_memory = lambda nbytes: None
    torch.manual_seed(0)
    config = ServerConfig() if budget is None else ServerConfig(memory_budget_bytes=budget)
    app = create_app(Blip3oService(Blip3o.from_preset("debug"), "debug", config))
    sock = listen_socket("127.0.0.1", 0)
    print(f"http://127.0.0.1:{sock.getsockname()[1]} {config.memory_budget_bytes}", flush=True)
    run_server(app, sock, log_level="warning")


def rss(pid: int) -> int:
    """Resident bytes of process `pid`."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def chat_body(images: int) -> bytes:
    from PIL import Image

    parts = []
    for i in range(images):
        buffer = io.BytesIO()
        Image.new("RGB", (4096, 4096), (40 * i % 256, 90, 200)).save(buffer, format="PNG")
        parts.append({"type": "image_url",
                      "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}})
    parts.append({"type": "text", "text": "what is in these pictures?"})
    return json.dumps({"max_tokens": 4, "messages": [{"role": "user", "content": parts}]}).encode()


def send(url: str, body: bytes) -> tuple[int, int]:
    """(final status, 429s before it) of one chat request, sent again after each 429's Retry-After."""
    refused = 0
    while True:
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                response.read()
                return response.status, refused
        except urllib.error.HTTPError as e:
            if e.code != 429:
                return e.code, refused
            refused += 1
            time.sleep(float(e.headers.get("Retry-After", "1")))


def measure(name: str, args: argparse.Namespace, body: bytes) -> dict:
    setting = SETTINGS[name]
    command = [sys.executable, __file__, "--serve", str(setting["budget"] or 0), *([] if setting["trim"] else
                                                                                  ["--no-trim"])]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url, budget = server.stdout.readline().split()
        time.sleep(1.0)  # uvicorn's startup
        idle = rss(server.pid)
        peak, done = [idle], threading.Event()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], rss(server.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            answers = list(pool.map(lambda _: send(url, body), range(args.requests)))
        seconds = time.perf_counter() - started
        time.sleep(2.0)
        done.set()
        sampler.join()
        return dict(name=name, idle=idle, peak=peak[0], after=rss(server.pid), budget=int(budget), seconds=seconds,
                    ok=sum(status == 200 for status, _ in answers), refused=sum(n for _, n in answers))
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10, help="concurrent chat requests (default 10)")
    ap.add_argument("--images", type=int, default=8, help="4096x4096 PNG images a request (default 8)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # the server process: its budget
    ap.add_argument("--no-trim", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        return serve(args.serve or None, trim=not args.no_trim)
    body = chat_body(args.images)
    print(f"{args.requests} concurrent chat requests of {args.images} 4096x4096 PNGs ({len(body) / MIB:.2f} MiB a "
          f"request); debug preset; python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'setting':16} {'idle MiB':>9} {'peak MiB':>9} {'after MiB':>9} {'200s':>5} {'429s':>5} {'seconds':>8}")
    rows = []
    for name in args.settings:
        row = measure(name, args, body)
        rows.append(row)
        print(f"{name:16} {row['idle'] / MIB:9.0f} {row['peak'] / MIB:9.0f} {row['after'] / MIB:9.0f} {row['ok']:5d} "
              f"{row['refused']:5d} {row['seconds']:8.1f}", flush=True)
    base = next((r for r in rows if r["name"] == "unbounded"), None)
    for row in rows:
        line = f"{row['name']}: peak rise {(row['peak'] - row['idle']) / MIB:.0f} MiB"
        if row["budget"] < 1 << 40:
            line += f" against a budget of {row['budget'] / MIB:.0f} MiB"
        if base is not None and row is not base:
            line += (f"; peak {row['peak'] / base['peak']:.2f}x and after-finish {row['after'] / base['after']:.2f}x "
                     "the unbounded run's")
        print(line)


if __name__ == "__main__":
    main()
