#!/usr/bin/env python3
"""Isthmus's local engine against llama-server, same model, same threads, same session.

Runs each scenario against both servers in alternating rounds (one server up at a time, so
neither disturbs the other) with `isthmus bench`, and prints a table of medians and ratios
(Isthmus / llama-server). Build the anchor first with bench/build-llama-server and Isthmus
with `cargo build --release -p gateway --bin isthmus`.

Scenarios:
  decode-N      N concurrent streams (N = 1, 4, 8), short prompts, 128 tokens each:
                aggregate output tokens/s and time per output token.
  prefix-warm   4 concurrent requests sharing a ~1,000-token system prompt, cache warm:
                time to first token.
  long-prompts  3 running streams while another client sends a ~1,000-token prompt every 2 s:
                gaps between tokens of the running streams (p50, p99).
  rss           peak resident memory of the server after the runs above, same context.

    python3 bench/compare_local.py --isthmus target/release/isthmus \\
        --llama-server /var/cache/isthmus/anchor/llama-cpp-python-0.3.36/bin/llama-server \\
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 --rounds 3
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CONTEXT_TOKENS = 2048


def wait_http(url: str, deadline_s: float = 120) -> None:
    until = time.time() + deadline_s
    while time.time() < until:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


class Server:
    """One server process with a given number of parallel sequences."""

    def __init__(self, kind: str, args, parallel: int, port: int, workdir: str):
        self.kind, self.args, self.parallel, self.port, self.workdir = kind, args, parallel, port, workdir
        # Isthmus's lanes must divide its sequences: one lane where --lanes does not.
        self.lanes = args.lanes if parallel % args.lanes == 0 else 1
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(os.path.join(self.workdir, f"{self.kind}-{self.parallel}.log"), "ab")
        if self.kind == "llama-server":
            command = [
                self.args.llama_server, "-m", self.args.model,
                "-t", str(self.args.threads), "-tb", str(self.args.threads),
                "-c", str(CONTEXT_TOKENS * self.parallel), "-np", str(self.parallel),
                "--host", "127.0.0.1", "--port", str(self.port),
            ]
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
            wait_http(f"{self.url}/health")
        else:
            config = os.path.join(self.workdir, f"isthmus-{self.parallel}.toml")
            with open(config, "w") as out:
                out.write(f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:{self.port + 1}"
plain_listen = "127.0.0.1:{self.port}"
state_dir = "{self.workdir}/state"
[server.limits]
first_token_timeout_ms = 600000
[auth]
allow_anonymous = true
[models.smollm2]
path = "{os.path.abspath(self.args.model)}"
context_tokens = {CONTEXT_TOKENS}
parallel_sequences = {self.parallel}
threads = {self.args.threads}
queue_depth_max = 256
queue_timeout_ms = 600000
kv_unified = {str(self.args.kv_unified).lower()}
lanes = {self.lanes}
[logging]
level = "warn"
""")
            self.process = subprocess.Popen(
                [self.args.isthmus, "serve", "--config", config], stdout=log, stderr=log
            )
            wait_http(f"http://127.0.0.1:{self.port + 1}/readyz")

    def peak_rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.process:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None


# Every run that had failed requests, for the verdict at the end.
ERRORS: list = []


def bench(args, url: str, **options) -> dict:
    command = [args.isthmus, "bench", "--url", url, "--model", "smollm2", "--json"]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench failed: {result.stderr}{result.stdout}")
    report = json.loads(result.stdout)
    if report["errors"]:
        # A failed request leaves the medians of the others; the run fails at the end.
        ERRORS.append(f"{url}: {report['errors']} errors, first: {report['first_error']}")
        print(f"  warning: {report['errors']} errors: {report['first_error']}", file=sys.stderr)
    return report


def run_scenario(args, server: Server, scenario: str) -> dict:
    if scenario.startswith("decode-"):
        streams = int(scenario.split("-")[1])
        report = bench(args, server.url, concurrency=streams, requests=streams * args.requests_per_stream,
                       max_tokens=128, prompt_tokens=64, warmup=streams)
        return {"tok/s": report["output_tokens_per_s"], "TPOT p50 ms": report["tpot_ms"]["p50"]}
    if scenario == "prefix-warm":
        report = bench(args, server.url, concurrency=4, requests=16, max_tokens=8, prompt_tokens=1050,
                       shared_prefix_tokens=1000, warmup=4)
        return {"TTFT p50 ms": report["ttft_ms"]["p50"], "TTFT p99 ms": report["ttft_ms"]["p99"],
                "cached tokens": report["cached_tokens_mean"]}
    if scenario == "long-prompts":
        prompts = subprocess.Popen(
            [args.isthmus, "bench", "--url", server.url, "--model", "smollm2", "--json",
             "--concurrency", "1", "--requests", "1000", "--max-tokens", "1", "--prompt-tokens", "1000",
             "--interval-ms", "2000", "--warmup", "0", "--timeout-s", "600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            time.sleep(1.0)
            report = bench(args, server.url, concurrency=3, requests=6, max_tokens=96, prompt_tokens=32, warmup=0)
        finally:
            # SIGINT: the load starts no more prompts, finishes the one in flight and reports.
            prompts.send_signal(signal.SIGINT)
            try:
                stdout, stderr = prompts.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                prompts.kill()
                stdout, stderr = prompts.communicate()
        # The gaps mean something only if the long prompts really ran beside the streams.
        if prompts.returncode != 0:
            raise SystemExit(f"long-prompts on {server.kind}: the prompt load failed: {stderr}{stdout}")
        load = json.loads(stdout)
        if load["errors"] or load["succeeded"] == 0:
            raise SystemExit(f"long-prompts on {server.kind}: {load['succeeded']} long prompts answered, "
                             f"{load['errors']} errors, first: {load['first_error']}")
        return {"ITL p50 ms": report["itl_ms"]["p50"], "ITL p99 ms": report["itl_ms"]["p99"],
                "p99/p50": report["itl_ms"]["p99"] / max(report["itl_ms"]["p50"], 1e-9)}
    raise SystemExit(f"unknown scenario {scenario}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isthmus", required=True)
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--kv-unified", type=lambda text: text == "true", default=True)
    parser.add_argument("--lanes", type=int, default=1, help="isthmus lanes, where they divide the scenario's sequences (else 1)")
    parser.add_argument("--scenarios", default="decode-1,decode-4,decode-8,prefix-warm,long-prompts")
    parser.add_argument("--json", help="also write all samples here")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="isthmus-compare-")
    samples = {}
    rss = {}
    for scenario in args.scenarios.split(","):
        parallel = int(scenario.split("-")[1]) if scenario.startswith("decode-") else 4
        for round_index in range(args.rounds):
            # Alternating order, so that a drift within a round falls on both contenders.
            kinds = ("llama-server", "isthmus") if round_index % 2 == 0 else ("isthmus", "llama-server")
            for kind in kinds:
                server = Server(kind, args, parallel, 18600 + 2 * round_index, workdir)
                server.start()
                try:
                    result = run_scenario(args, server, scenario)
                    rss[(kind, parallel)] = max(rss.get((kind, parallel), 0.0), server.peak_rss_mib())
                finally:
                    server.stop()
                samples.setdefault((scenario, kind), []).append(result)
                print(f"{scenario:13} round {round_index + 1} {kind:12} "
                      + "  ".join(f"{key} {value:.1f}" for key, value in result.items()), flush=True)

    print()
    print("| scenario | metric | llama-server | isthmus | ratio |")
    print("|---|---|---|---|---|")
    for scenario in args.scenarios.split(","):
        anchor, ours = samples[(scenario, "llama-server")], samples[(scenario, "isthmus")]
        for metric in anchor[0]:
            a = statistics.median(sample[metric] for sample in anchor)
            o = statistics.median(sample[metric] for sample in ours)
            ratio = o / a if a else float("nan")
            print(f"| {scenario} | {metric} | {a:.1f} | {o:.1f} | {ratio:.2f} |")
    for parallel in sorted({parallel for (_, parallel) in rss}):
        a, o = rss.get(("llama-server", parallel), 0.0), rss.get(("isthmus", parallel), 0.0)
        print(f"| rss, {parallel} sequences x {CONTEXT_TOKENS} | peak MiB | {a:.0f} | {o:.0f} | {o - a:+.0f} MiB |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({f"{s}|{k}": v for (s, k), v in samples.items()}, out, indent=1)
    if ERRORS:
        raise SystemExit("requests failed, so the medians above leave them out:\n" + "\n".join(ERRORS))


if __name__ == "__main__":
    main()
