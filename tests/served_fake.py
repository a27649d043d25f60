"""A stand-in for ``vllm serve`` in tests of kd's launcher and client (run as a script).

It takes the flags kd's launcher passes (``--port`` is read, the rest ignored) and:

* starts a grandchild process (a sleeping Python) so tests can see that stopping the
  server stops its whole process group; writes ``<pid-dir>/server.pid`` and
  ``<pid-dir>/child.pid``;
* answers ``/health`` (after ``--health-delay`` seconds), and forwards every other request
  to ``--upstream`` (a real vLLM server) when given, else answers ``/v1/models`` and
  ``/tokenize`` itself and ``/v1/completions`` per ``--mode`` (``ok``: a well-formed
  ``prompt_logprobs`` answer, uniform over 4 ids; ``malformed``: a body without it;
  ``slow``: never in time);
* with ``--die-after N``, exits (group and all) when the (N+1)-th ``/v1/completions``
  request arrives: a server that goes down mid-run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default=None)
    parser.add_argument("--die-after", type=int, default=-1)
    parser.add_argument("--pid-dir", default=None)
    parser.add_argument("--health-delay", type=float, default=0.0)
    parser.add_argument("--mode", default="ok")
    args, _ = parser.parse_known_args()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if args.pid_dir:
        Path(args.pid_dir).mkdir(parents=True, exist_ok=True)
        Path(args.pid_dir, "server.pid").write_text(str(os.getpid()))
        Path(args.pid_dir, "child.pid").write_text(str(child.pid))
    started = time.monotonic()
    completions = [0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def forward(self, data: bytes | None) -> None:
            req = urllib.request.Request(args.upstream + self.path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    self.reply(r.status, r.read())
            except urllib.error.HTTPError as e:
                self.reply(e.code, e.read())

        def do_GET(self) -> None:
            if self.path == "/health":
                self.reply(200 if time.monotonic() - started >= args.health_delay else 503, b"")
            elif args.upstream:
                self.forward(None)
            else:
                self.reply(200, json.dumps({"data": [{"id": "fake"}]}).encode())

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/v1/completions":
                completions[0] += 1
                if 0 <= args.die_after < completions[0]:
                    child.kill()
                    os._exit(1)
            if args.upstream:
                return self.forward(data)
            body = json.loads(data)
            if self.path == "/tokenize":
                return self.reply(200, json.dumps({"tokens": [ord(c) % 7 for c in body["prompt"]]}).encode())
            if args.mode == "slow":
                time.sleep(30)
            if args.mode == "malformed":
                return self.reply(200, json.dumps({"choices": [{"index": 0, "text": ""}]}).encode())
            k = int(body.get("prompt_logprobs") or 0)
            if k > 4:
                return self.reply(400, json.dumps({"error": {"message": f"Requested prompt logprobs of {k}, which "
                                                             "is greater than max allowed: 4"}}).encode())
            choices = []
            for i, prompt in enumerate(body["prompt"]):
                entries = [None]
                for token in prompt[1:]:
                    entry = {str(t): {"logprob": -math.log(4), "rank": t + 1} for t in range(4)}
                    entry.setdefault(str(token), {"logprob": -30.0, "rank": 99})
                    entries.append(entry)
                choices.append({"index": i, "text": "", "prompt_logprobs": entries, "token_ids": [1]})
            self.reply(200, json.dumps({"choices": choices}).encode())

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
