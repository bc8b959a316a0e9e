"""An OpenAI-compatible judge served on 127.0.0.1 by the tests themselves
(a ThreadingHTTPServer in a thread of the test process, scripted replies):
POST /v1/chat/completions answers `server.respond(body, n)`; every request
is logged with its path, body and Authorization header."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import threading

SHOWN = re.compile(r"\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nWhich",
                   re.S)


def chat_reply(content):
  """A chat completion whose message is `content`."""
  return {"id": "x", "object": "chat.completion", "choices": [
      {"index": 0, "message": {"role": "assistant", "content": content},
       "finish_reason": "stop"}]}


def shown(body) -> tuple[str, str]:
  """(Response A, Response B) of a judge request's body."""
  return SHOWN.search(body["messages"][1]["content"]).groups()


def prefers_good(body, _):
  """A consistent judge: the response containing 'good' wins, else a tie."""
  first, second = shown(body)
  verdict = "A" if "good" in first else "B" if "good" in second else "C"
  return 200, {}, chat_reply(f"Reasoning first. Final verdict: [[{verdict}]]")


class JudgeServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.respond = prefers_good  # (body, request number) -> status, headers, json
    self.log = []
    self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):

  def do_POST(self):  # pylint: disable=invalid-name
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    self.server.log.append({"path": self.path, "body": body,
                            "auth": self.headers.get("Authorization")})
    answer = self.server.respond(body, len(self.server.log))
    if answer is None:  # hang up without a response
      self.close_connection = True
      return
    status, headers, payload = answer
    data = (payload if isinstance(payload, bytes)
            else json.dumps(payload).encode())
    try:
      self.send_response(status)
      for k, v in headers.items():
        self.send_header(k, v)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    except OSError:
      pass  # the client timed out and closed the connection

  def log_message(self, *args):  # quiet
    pass


@contextlib.contextmanager
def serve():
  """A running JudgeServer, shut down on exit."""
  srv = JudgeServer()
  thread = threading.Thread(target=srv.serve_forever, args=(0.05,),
                            daemon=True)
  thread.start()
  try:
    yield srv
  finally:
    srv.shutdown()
    srv.server_close()
