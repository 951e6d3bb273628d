"""A chat-completions server on loopback that answers each request with its last user
message: a test decides every answer (valid JSON, broken JSON, fenced) by its prompt. Also
in-process runs and CLI calls against it."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path
from typing import Any

import anyio

from runner.cli import main as cli_main
from runner.engine import job
from runner.store.state import RunDir

from .conftest import spec_text, write_rows, write_spec

RECEIVED: list[bytes] = []  # every request body any echo server received, as received


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    ids = count()

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        RECEIVED.append(raw)
        body = json.loads(raw)
        content = body["messages"][-1]["content"]
        answer = {
            "id": f"echo-{next(self.ids)}",
            "object": "chat.completion",
            "created": 1,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def echo_server() -> Iterator[str]:
    """The server's base URL while it runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass(frozen=True)
class Done:
    """A finished run in `folder` (runs under folder/runs)."""

    folder: Path
    run: RunDir

    def cli(self, *args: str) -> tuple[int, str, str]:
        return cli(*args, "--runs-dir", str(self.folder / "runs"))


def cli(*args: str) -> tuple[int, str, str]:
    """`runner ARGS` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 4
        else:
            code = 0
    return code, out.getvalue(), err.getvalue()


def submit_prompts(
    folder: Path,
    base_url: str,
    prompts: list[str],
    extra: str = "",
    *,
    schema: dict[str, Any] | None = None,
    request_extra: str = "",
    models: list[str] | None = None,
    input_extra: str = 'id_column = "id"\nprompt_column = "text"',
) -> Done:
    """A run of one row per prompt (ids r0, r1, ...), each answered with its prompt."""
    write_rows(folder / "data.jsonl", [{"id": f"r{i}", "text": p} for i, p in enumerate(prompts)])
    if schema is not None:
        (folder / "schema.json").write_text(json.dumps(schema))
    text = spec_text(base_url=base_url, request_extra=request_extra, input_extra=input_extra)
    text += extra
    if models is not None:
        text = text.replace('model = "gpt-4o-mini"', f"model = {json.dumps(models)}")
    spec = write_spec(folder, text)
    prepared = job.prepare(spec)
    anyio.run(lambda: job.submit(prepared, folder / "runs", handle_signals=False))
    (path,) = (folder / "runs").iterdir()
    return Done(folder, RunDir(path))
