"""Hub-compatible servers on loopback for the Hub tests.

- :class:`MirrorHub` runs `olah` (a self-hosted Hub mirror, PyPI) in offline mode over local git
  repositories, so downloads go through ``huggingface_hub`` exactly as against the real Hub.
- :class:`RecordingHub` answers the calls a push makes (create repo, validate the card's YAML,
  pre-upload, commit)
  and records them, to check at the HTTP boundary what ``push_to_hub`` sends.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MirrorHub:
    """olah serving ``root/mirrors/models/ORG/NAME`` git repositories at ``endpoint``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mirrors = root / "mirrors"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'mirrors-path = ["{self.mirrors}"]\nrepos-path = "{root / "repos"}"\n'
            "[accessibility]\noffline = true\n"
        )
        command = [sys.executable, "-c", "from olah.server import cli; cli()", "-c", str(config)]
        command += ["--log-path", str(root / "logs")]
        self.log = (root / "server.log").open("w")
        self.process = subprocess.Popen(command, cwd=root, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_until_up()

    def _wait_until_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/api/models/none/none/revision/main", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("olah did not start within a minute")

    def publish(self, repo_id: str, folder: Path) -> str:
        """Make ``folder``'s files the ``main`` branch of ``repo_id``; return the commit hash."""
        repo = self.mirrors / "models" / repo_id
        if repo.exists():
            shutil.rmtree(repo)
        shutil.copytree(folder, repo)
        git = ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com"]
        subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", f"publish {repo_id}"], check=True)
        return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


class RecordingHub:
    """Answers create-repo, card validation, pre-upload and commit like the Hub API, and records each request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
                parts = self.path.strip("/").split("/")
                if self.path == "/api/validate-yaml":  # the Hub checks a README's metadata before commits
                    self._json({"errors": [], "warnings": []})
                elif self.path == "/api/repos/create":
                    name = json.loads(body)
                    self._json({"url": f"{hub.endpoint}/{name.get('organization')}/{name['name']}"})
                elif len(parts) >= 6 and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    self._json(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                elif len(parts) >= 6 and parts[4] == "commit":
                    repo = "/".join(parts[2:4])
                    self._json({"commitUrl": f"{hub.endpoint}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
                else:
                    self.send_error(404, f"RecordingHub does not know POST {self.path}")

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers), "body": b""})
                self.send_error(404, f"RecordingHub does not know GET {self.path}")

            def _json(self, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def commits(self) -> list[dict[str, Any]]:
        """Each commit request as ``{"path", "summary", "files": {path: bytes}}``."""
        commits = []
        for request in self.requests:
            if "/commit/" not in request["path"]:
                continue
            lines = [json.loads(line) for line in request["body"].decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            commits.append({"path": request["path"], "summary": header["summary"], "files": files})
        return commits

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
