"""Send a 10 MB prompt to every door (the worker's Generate and Tokenize, the gateway's HTTP front) and print
each answer as JSON, with when the sending began and ended:
`python -m tests.chaos.big_prompt WORKER_ADDRESS GATEWAY_URL MODEL`.

A process of its own, so that building and sending 10 MB never stalls the test's event loop, which times the
live stream's arrivals (the largest gap must be the servers', not the measuring client's)."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import grpc

from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc

BIG = "x" * (10 * 1024 * 1024)


def worker_rpc(worker: str, name: str) -> str:
    with grpc.insecure_channel(worker, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.DenoiserStub(channel)
        try:
            if name == "Generate":
                for _ in stub.Generate(pb.GenerateRequest(prompt=pb.Prompt(text=BIG)), timeout=60):
                    pass
            else:
                stub.Tokenize(pb.TokenizeRequest(prompt=pb.Prompt(text=BIG)), timeout=60)
            return "OK"
        except grpc.RpcError as err:
            return str(err.code().name)


def gateway_http(url: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": BIG}], "max_tokens": 4}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return str(response.status)
    except urllib.error.HTTPError as err:
        return str(err.code)


def main(worker: str, url: str, model: str) -> None:
    began = time.monotonic()  # one clock for every process on the machine (CLOCK_MONOTONIC)
    answers = {f"worker {name}": worker_rpc(worker, name) for name in ("Generate", "Tokenize")}
    answers["gateway http"] = gateway_http(url, model)
    print(json.dumps({"answers": answers, "sending": [began, time.monotonic()]}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
