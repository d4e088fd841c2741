"""A judge's reply counts only when complete; the request follows --judge-max-tokens; the URL's query goes with it."""

import json
from http.server import BaseHTTPRequestHandler
import pytest
import chat_api
from conftest import score_with_judge, http_server, refused, run_here, send_chat_reply, write_jsonl


class Scripted(BaseHTTPRequestHandler):
    """Answers every request with Scripted.reply (content, finish_reason, extra message fields)
    and records (path with query, request body)."""

    reply = ("Rating: 7", "stop", {})
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Scripted.seen.append((self.path, body))
        content, finish, extra = Scripted.reply
        send_chat_reply(self, content, finish, **extra)

    def log_message(self, *a):
        pass


TOOL_CALL = {"tool_calls": [{"id": "1", "type": "function", "function": {"name": "rate", "arguments": "{}"}}]}


@pytest.mark.parametrize(
    "reply",
    [
        ("A long reason ... Rating: 1", "length", {}),  # cut off at max_tokens: its last rating is not the answer
        (None, "content_filter", {}),
        (None, "tool_calls", TOOL_CALL),
        ("Rating: 8", None, {}),  # beyond: no finish_reason at all is no complete reply either
    ],
)
def test_a_reply_that_is_not_a_complete_answer_is_no_score(tmp_path, reply):
    Scripted.reply, Scripted.seen = reply, []
    with http_server(Scripted) as base:
        assert chat_api.chat_completion(base + "/v1", "m", [], backoff=0.01) is None
        cands = [{"text": f"answer {k}"} for k in range(4)]
        records = [{"id": f"p{i}", "prompt": "q", "candidates": cands} for i in range(3)]
        p = score_with_judge(tmp_path, base + "/v1", "--backoff", 0.01, "--batch-size", 3, records=records)
    refused(p, "of the 24 ratings asked so far got no readable reply")
    assert not (tmp_path / "o.jsonl").exists()


def test_evaluate_stops_when_no_judge_reply_is_readable(tmp_path, tiny_model_dir):
    Scripted.reply, Scripted.seen = (None, "content_filter", {}), []
    prompts = write_jsonl(tmp_path / "e.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}?"} for i in range(8)])
    with http_server(Scripted) as base:
        p = run_here(
            "evaluate.py",
            "--input",
            prompts,
            "--output",
            tmp_path / "ev",
            "--model",
            tiny_model_dir,
            "--judge-api-base",
            base + "/v1",
            "--backoff",
            0.01,
            "--max-new-tokens",
            2,
        )
    refused(p, "got no readable reply")
    assert not (tmp_path / "ev" / "report.md").exists()


def test_the_request_follows_judge_max_tokens_and_keeps_the_query(tmp_path):
    Scripted.reply, Scripted.seen = ("Rating: 7", "stop", {}), []
    inp = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "q", "candidates": [{"text": "x"}]}])
    with http_server(Scripted) as base:
        args = ["--input", inp, "--backoff", 0.01, "--judge-api-base"]
        assert run_here("score.py", *args, base + "/v1", "--output", tmp_path / "a.jsonl").returncode == 0
        assert [b["max_tokens"] for _, b in Scripted.seen] == [256, 256]  # the endpoint's default
        Scripted.seen = []
        azure = base + "/v1?api-version=2024-02-01"
        out = ["--output", tmp_path / "b.jsonl", "--judge-max-tokens", 77]
        assert run_here("score.py", *args, azure, *out, "--limit", 1).returncode == 0
        assert Scripted.seen[0][0] == "/v1/chat/completions?api-version=2024-02-01"
        assert [b["max_tokens"] for _, b in Scripted.seen] == [77, 77]
        # another deployment behind another query is another judge: the resume is refused
        refused(run_here("score.py", *args, base + "/v1?deployment=judge-B", *out), "--judge-api-base")
        port = int(base.rsplit(":", 1)[1])
        for bad, message in [
            (base + "/v1#x", "has a fragment"),
            (f"http://127.0.0.1:{port + 65536}/v1", "not a URL that can be used"),
            ("http://[::1/v1", "not a URL that can be used"),
        ]:
            refused(run_here("score.py", *args, bad, "--output", tmp_path / "c.jsonl"), message)
            assert not (tmp_path / "c.jsonl").exists()
