"""A minimal webhook receiver that verifies the signature: a starting point for a site's
integration (standard library only).

    WEBHOOK_SECRET=<secret shown at registration> python docs/webhook_receiver.py 8099

It prints each verified event and answers 204; a bad or stale signature gets 401.
"""

import hashlib
import hmac
import http.server
import json
import os
import sys
import time

SECRET = os.environ["WEBHOOK_SECRET"].encode()
TOLERANCE_S = 300  # refuse replays of old deliveries


def verified(header: str, body: bytes) -> bool:
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = hmac.new(SECRET, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - timestamp) <= TOLERANCE_S
    return fresh and hmac.compare_digest(expected, parts.get("v1", ""))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not verified(self.headers.get("X-Webhook-Signature", ""), body):
            self.send_response(401)
            self.end_headers()
            return
        event = json.loads(body)
        # The same X-Webhook-Delivery can arrive twice (a retry): process it once.
        print(self.headers["X-Webhook-Delivery"], event["event"], json.dumps(event["case"]))
        sys.stdout.flush()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8099
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
