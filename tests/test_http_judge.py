"""score.py with an OpenAI-compatible judge on 127.0.0.1: concurrent, ordered, retried, resumed."""
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import ROOT, http_server, read_jsonl, run, send_chat_reply, write_jsonl

KEY = "sk-test-not-to-be-written-0123"


class Judge(BaseHTTPRequestHandler):
    """Rates ANSWER-d with d + 1 on harmlessness and 10 - d on helpfulness, slowly (so requests
    overlap when sent concurrently); the very first request fails with HTTP 500."""
    lock = threading.Lock()
    requests, active, peak, keys = 0, 0, 0, set()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = Judge
        with cls.lock:
            cls.requests += 1
            first = cls.requests == 1
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
            cls.keys.add(self.headers.get("Authorization"))
        time.sleep(0.05)
        with cls.lock:
            cls.active -= 1
        if first:
            self.send_response(500)
            self.end_headers()
            return
        text = body["messages"][-1]["content"]
        d = int(re.search(r"ANSWER-(\d)", text).group(1))
        rating = d + 1 if "HARMLESS" in text else 10 - d
        send_chat_reply(self, f"Fine. Rating: {rating}")

    def log_message(self, *a):
        pass


@pytest.fixture
def endpoint():
    Judge.requests, Judge.active, Judge.peak, Judge.keys = 0, 0, 0, set()
    with http_server(Judge) as base:
        yield base + "/v1"


def test_score_with_an_http_judge(tmp_path, endpoint):
    recs = [
        {
            "id": f"r{i}",
            "prompt": f"Question {i}?",
            "candidates": [{"text": f"ANSWER-{(i + k) % 10}"} for k in range(3)],
        }
        for i in range(4)
    ]
    inp = write_jsonl(tmp_path / "samples.jsonl", recs)
    args = [ROOT / "score.py", "--input", inp, "--output", tmp_path / "judge_scored.jsonl",
            "--judge-api-base", endpoint, "--judge-model", "strong", "--judge-concurrency", 4, "--backoff", 0.01,
            "--batch-size", 2]
    env = dict(os.environ, OPENAI_API_KEY=KEY, TQDM_DISABLE="1")
    crash = [sys.executable, ROOT / "tests" / "crash_after.py", 2, "score.py", *args[1:]]
    p = subprocess.run(list(map(str, crash)), env=env, capture_output=True, text=True)
    assert p.returncode == 3  # died writing its third record: two prompts are written
    asked = Judge.requests
    assert asked == 1 + 2 * (2 * 3 * 2)  # one 500, then two batches of 2 prompts x 3 candidates x 2 objectives
    p = subprocess.run(list(map(str, [sys.executable, *args])), env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert Judge.requests - asked == 2 * 3 * 2  # only the two missing prompts asked again
    out = read_jsonl(tmp_path / "judge_scored.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in recs]  # input order
    for r in out:
        for c in r["candidates"]:
            d = int(c["text"][-1])
            assert (c["score_a"], c["score_b"]) == (d + 1, 10 - d)  # as the judge gave them
    assert Judge.peak > 1  # requests overlapped
    assert Judge.keys == {f"Bearer {KEY}"}
    for f in tmp_path.iterdir():
        assert KEY not in f.read_text(errors="replace"), f
    assert "mode" in json.loads((tmp_path / "judge_scored.jsonl.run.json").read_text())["settings"]


def test_logits_mode_is_refused_for_an_http_judge(tmp_path, endpoint):
    inp = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "q", "candidates": [{"text": "ANSWER-1"}]}])
    p = run(
        "score.py",
        "--input",
        inp,
        "--output",
        tmp_path / "o.jsonl",
        "--judge-api-base",
        endpoint,
        "--mode",
        "logits",
        check=False,
    )
    assert p.returncode == 2 and "an HTTP judge needs --mode generate" in p.stderr
