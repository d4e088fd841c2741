"""score.py with an OpenAI-compatible judge on 127.0.0.1: concurrent, ordered, retried, resumed."""

import json
from functools import partial
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest


import common
import judging
import chat_api
import report
from conftest import (
    score_with_judge,
    http_server,
    read_jsonl,
    refused,
    ROOT,
    run,
    run_here,
    send_chat_reply,
    write_jsonl,
)

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
        text = " ".join(m["content"] for m in body["messages"])  # a logits mode ends with "Rating: " begun
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
    args = [
        ROOT / "score.py",
        "--input",
        inp,
        "--output",
        tmp_path / "judge_scored.jsonl",
        "--judge-api-base",
        endpoint,
        "--judge-model",
        "strong",
        "--judge-concurrency",
        4,
        "--backoff",
        0.01,
        "--batch-size",
        2,
    ]
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


def test_a_logits_mode_against_a_server_without_logprobs_names_generate(tmp_path, endpoint):
    records = [{"id": "a", "prompt": "q", "candidates": [{"text": "ANSWER-1"}]}]
    p = score_with_judge(tmp_path, endpoint, "--mode", "logits", records=records, runner=partial(run, check=False))
    assert p.returncode == 2 and "returned no logprobs" in p.stderr and "--mode generate" in p.stderr


PROBE_KEY = "sk-probe-secret-4242"


class Recorder(BaseHTTPRequestHandler):
    """Answers as a judge and records what reached it: path, Authorization header."""

    seen = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Recorder.seen.append((self.path, self.headers.get("Authorization")))
        send_chat_reply(self, "Rating: 9")

    def do_GET(self):
        self.do_POST()

    def log_message(self, *a):
        pass


def redirecting(target, code):
    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(code)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    return Redirect


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_key_stays(tmp_path, monkeypatch, code):
    monkeypatch.setenv("OPENAI_API_KEY", PROBE_KEY)
    Recorder.seen = []
    with http_server(Recorder) as other:
        with http_server(redirecting(other.replace("127.0.0.1", "localhost"), code)) as base:
            p = score_with_judge(tmp_path, base + "/v1", "--backoff", 0.01)
    refused(p, f"HTTP {code}, a redirect to http://localhost")
    assert Recorder.seen == [] and PROBE_KEY not in p.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_no_proxy_for_http_and_no_credentials_in_the_url(tmp_path, monkeypatch):
    """An HTTP_PROXY from the environment would see the key of a plain-http endpoint: not used.
    Credentials written into --judge-api-base are refused, and a query (which may hold a key)
    is shown and recorded as a hash of it."""
    monkeypatch.setenv("OPENAI_API_KEY", PROBE_KEY)
    Recorder.seen = []
    with http_server(Recorder) as proxy, http_server(Recorder) as judge:
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.setenv("http_proxy", proxy)
        assert chat_api.chat_completion(judge + "/v1", "m", [], backoff=0.01) == "Rating: 9"
        assert Recorder.seen == [("/v1/chat/completions", f"Bearer {PROBE_KEY}")]  # the judge alone, once
        inp = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "q", "candidates": [{"text": "x"}]}])
        host = judge.split("//")[1]
        p = run_here(
            "score.py",
            "--input",
            inp,
            "--output",
            tmp_path / "o.jsonl",
            "--judge-api-base",
            f"http://user:pw-{PROBE_KEY}@{host}/v1",
        )
        refused(p, "holds credentials")
        assert PROBE_KEY not in p.stderr and not list(tmp_path.glob("o.jsonl*"))  # refused before anything was written
        p = run_here(
            "score.py",
            "--input",
            inp,
            "--output",
            tmp_path / "o.jsonl",
            "--judge-api-base",
            f"{judge}/v1?api-key={PROBE_KEY}",
            "--backoff",
            0.01,
        )
        assert p.returncode == 0, p.stderr
    assert read_jsonl(tmp_path / "o.jsonl")[0]["candidates"][0]["score_a"] == 9
    for f in tmp_path.iterdir():
        assert PROBE_KEY not in f.read_text(), f
    recorded = json.loads((tmp_path / "o.jsonl.run.json").read_text())["settings"]["judge_api_base"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1\?[0-9a-f]{8}", recorded)  # the query as a hash, never itself


class Broken(BaseHTTPRequestHandler):
    """/cut: a body that breaks off; /nested: JSON nested 100k deep; /spaces: a rating after 1 MB of white space."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        kind = self.path.split("/")[1]
        if kind == "spaces":
            send_chat_reply(self, " " * 1_000_000 + "Rating: 6" + " " * 1_000_000)
            return
        body = (
            b"[" * 100_000
            if kind == "nested"
            else b'{"choices": [{"message": {"content": "Rating: 5"}, "finish_reason": "stop"}]}'
        )
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (100 if kind == "cut" else 0)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.connection.close()

    def log_message(self, *a):
        pass


def test_a_judge_that_breaks_off_stops_the_run(tmp_path):
    inp = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "q", "candidates": [{"text": "x"}]}])
    with http_server(Broken) as base:
        for kind in ("cut", "nested"):
            p = run_here(
                "score.py",
                "--input",
                inp,
                "--output",
                tmp_path / f"{kind}.jsonl",
                "--judge-api-base",
                f"{base}/{kind}",
                "--backoff",
                0.01,
            )
            refused(p, "failed after 4 tries")
            assert not (tmp_path / f"{kind}.jsonl").exists()
        t = time.time()
        assert chat_api.chat_completion(f"{base}/spaces", "m", [], timeout=5).strip() == "Rating: 6"
        assert judging.parse_rating(" " * 1_000_000 + "Rating: 6" + " " * 1_000_000) == 6
        assert judging.parse_verdict("Winner" + " " * 1_000_000) is None
        assert time.time() - t < 5


class Awkward(BaseHTTPRequestHandler):
    """A judge that misbehaves by path: /trickle sends a byte a second, /empty a JSON [] body,
    /number content 7, /raw a reply that is not HTTP."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        kind = self.path.split("/")[1]
        if kind == "raw":
            self.wfile.write(b"this is not HTTP\r\n\r\n")
            return
        body = {
            "empty": b"[]",
            "number": json.dumps({"choices": [{"message": {"content": 7}}]}).encode(),
            "trickle": b'{"choices": [{"message": {"content": "Rating: 5"}, "finish_reason": "stop"}]}',
        }[kind]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                if kind == "trickle":
                    time.sleep(1)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on the trickle, as it should
            pass

    def log_message(self, *a):
        pass


def test_deadline_and_malformed_replies(tmp_path):
    msg = [{"role": "user", "content": "hi"}]
    with http_server(Awkward) as base:
        t = time.time()
        with pytest.raises(common.InputError, match="no complete reply within 0.5 s"):
            chat_api.chat_completion(base + "/trickle", "m", msg, timeout=0.5, retries=2, backoff=0.01)
        assert time.time() - t < 5
        for kind in ("empty", "number", "raw"):  # a broken endpoint, not an opinion: retried, then an error
            with pytest.raises(common.InputError, match="failed after 2 tries"):
                chat_api.chat_completion(f"{base}/{kind}", "m", msg, timeout=2, retries=2, backoff=0.01)
    judged = [{"kind": "score", "model": m, "score_a": 5, "score_b": 5} for m in ("V", "S")]
    judged += [
        {"kind": "pairwise", "outcome": "tie", "model_first": None, "model_second": "B"},
        {"kind": "pairwise", "outcome": "win", "model_first": "A", "model_second": "B"},
    ]
    rep = report.build_report(judged, ["V", "S"], "harmlessness")
    assert rep["pairwise"]["unreadable"] == 1
    assert "Pairwise (S): 1 of 2 comparisons had an unreadable verdict" in report.report_markdown(rep, ["V", "S"])
