"""The model stages against an OpenAI-compatible server (--api-base, --api-model): a stand-in
server on 127.0.0.1 records each request; seeds, temperatures and system variants are the
local path's, resume works, the logits modes read top_logprobs."""

import hashlib
import json
import math
from http.server import BaseHTTPRequestHandler

import pytest
import torch

import generation
import judging
from conftest import (
    score_with_judge,
    PROMPTS,
    http_server,
    read_jsonl,
    refused,
    run,
    run_here,
    send_chat_reply,
    write_jsonl,
)

# the rating distribution the stand-in judge serves: P(1..10)
DIST = [0.02, 0.03, 0.05, 0.1, 0.3, 0.2, 0.15, 0.08, 0.05, 0.02]


class Server(BaseHTTPRequestHandler):
    """Answers as a served model: a text that depends on the request's messages, seed and
    temperature; with logprobs asked, the first token's top_logprobs of DIST (as SmolLM's
    vocabulary spells it: '10' is '1' then '0'). /nologprobs leaves logprobs out."""

    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Server.seen.append((self.path, body))
        if body.get("logprobs") and "nologprobs" not in self.path:
            prefill = body["messages"][-1]["content"]
            if prefill.endswith("Rating: 1"):  # P('0' | '1') = P(10) / (P(1) + P(10))
                p0 = DIST[9] / (DIST[0] + DIST[9])
                top = [("0", p0), (".", 1 - p0)]
            elif "nocontinue" in self.path:  # a new answer instead of the continued turn
                top = [("R", 0.8), ("1", 0.1), ("The", 0.1)]
            else:
                top = [(str(k), DIST[k - 1]) for k in range(2, 10)] + [("1", DIST[0] + DIST[9])]
            choice = {
                "message": {"role": "assistant", "content": top[0][0]},
                "finish_reason": "length",
                "logprobs": {
                    "content": [
                        {
                            "token": top[0][0],
                            "logprob": math.log(top[0][1]),
                            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top],
                        }
                    ]
                },
            }
            data = json.dumps({"choices": [choice]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        key = json.dumps([body["messages"], body.get("seed"), body.get("temperature")], sort_keys=True)
        send_chat_reply(self, "served answer " + hashlib.sha256(key.encode()).hexdigest()[:8])

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    Server.seen = []
    with http_server(Server) as base:
        yield base + "/v1"


def test_each_candidate_is_one_request_with_the_local_paths_seed_temperature_and_system(tmp_path, server):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = [
        "--input",
        prompts,
        "--output",
        tmp_path / "s.jsonl",
        "--api-base",
        server,
        "--api-model",
        "m",
        "--num-candidates",
        4,
        "--max-new-tokens",
        7,
        "--seed",
        3,
        "--top-p",
        0.9,
    ]
    assert run_here("sample.py", *args).returncode == 0
    systems = json.loads((generation.common.PROMPTS_DIR / "systems.json").read_text())
    recs = read_jsonl(tmp_path / "s.jsonl")
    asked = {(b["messages"][-1]["content"], b["seed"]): b for _, b in Server.seen}
    assert len(Server.seen) == 12
    for r in recs:
        for k, c in enumerate(r["candidates"]):
            body = asked[(r["prompt"], generation.row_seed(3, f"{r['id']}/{k}"))]
            assert body["temperature"] == c["temperature"] and body["top_p"] == 0.9 and body["max_tokens"] == 7
            system = systems[c["system"]]  # None: the template's own default, no system message
            want = [{"role": "system", "content": system}] if system else []
            assert body["model"] == "m" and body["messages"] == [*want, {"role": "user", "content": r["prompt"]}]
            assert c["text"].startswith("served answer ")


def test_a_served_run_killed_mid_way_resumes_to_the_same_file(tmp_path, server):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = [
        "--input",
        prompts,
        "--api-base",
        server,
        "--api-model",
        "m",
        "--num-candidates",
        2,
        "--max-new-tokens",
        5,
        "--batch-size",
        1,
    ]
    run("sample.py", *args, "--output", tmp_path / "straight.jsonl")
    assert (
        run("tests/crash_after.py", 1, "sample.py", *args, "--output", tmp_path / "r.jsonl", check=False).returncode
        == 3
    )
    run("sample.py", *args, "--output", tmp_path / "r.jsonl")
    assert (tmp_path / "r.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    # a served run finished: a rerun with another model name or server is refused, naming it
    refused(
        run("sample.py", *args, "--output", tmp_path / "r.jsonl", "--api-model", "other", check=False),
        "--api-model 'm' (now 'other')",
    )
    refused(
        run(
            "sample.py",
            *args,
            "--output",
            tmp_path / "r.jsonl",
            "--api-base",
            server.replace("/v1", "/v2"),
            check=False,
        ),
        "--api-base",
    )


def test_the_logits_mode_reads_top_logprobs_to_the_local_expected_rating(server):
    """The same distribution read locally (judging.ratings_from_distribution) and from a
    server's top_logprobs, '10' as two tokens: the same expected and most likely rating."""
    judge = judging.HttpJudge(api_base=server, model="m", mode="logits-expected", backoff=0.01)
    got = judge.ratings([("q", "a"), ("q2", "b")], "harmlessness")
    want = judging.ratings_from_distribution(torch.tensor([DIST, DIST], dtype=torch.float64), "logits-expected")
    assert [g["score"] for g in got] == [w["score"] for w in want]
    assert [g["expected"] for g in got] == pytest.approx([w["expected"] for w in want], abs=1e-4)
    assert all(b["max_tokens"] == 1 and b["top_logprobs"] >= 10 for _, b in Server.seen)


def test_a_server_without_logprobs_gets_a_clear_error(tmp_path, server):
    p = score_with_judge(
        tmp_path, server.replace("/v1", "/nologprobs/v1"), "--mode", "logits-expected", "--backoff", 0.01
    )
    refused(p, "returned no logprobs")
    assert "--mode generate" in p.stderr


def test_a_server_that_does_not_continue_the_rating_turn_gets_a_clear_error(server):
    """llama-cpp-python's server answers anew after an assistant message (measured: 'R' of
    'Rating' and 'The' above any digit): the ratings' share of the next token is too small to be
    the continued turn, and the run stops instead of reading ratings of 1."""
    judge = judging.HttpJudge(api_base=server.replace("/v1", "/nocontinue/v1"), model="m", mode="logits")
    with pytest.raises(judging.common.InputError, match="did not continue the assistant turn"):
        judge.ratings([("q", "a")], "harmlessness")


class NoSystem(BaseHTTPRequestHandler):
    """A server whose template refuses a system role (as vLLM answers for Mistral-7B-Instruct): 400."""

    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        NoSystem.seen.append(body["messages"])
        if body["messages"][0]["role"] == "system":
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        send_chat_reply(self, "fine", "length")  # cut at max_tokens: still an answer when sampling

    def log_message(self, *a):
        pass


def test_a_served_template_without_a_system_role_gets_the_system_text_folded(tmp_path):
    NoSystem.seen = []
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    with http_server(NoSystem) as base:
        p = run_here(
            "sample.py",
            "--input",
            prompts,
            "--output",
            tmp_path / "s.jsonl",
            "--api-base",
            base + "/v1",
            "--api-model",
            "m",
            "--num-candidates",
            2,
            "--systems",
            "careful",
            "--api-concurrency",
            1,
        )
    assert p.returncode == 0, p.stderr[-800:]
    careful = json.loads((generation.common.PROMPTS_DIR / "systems.json").read_text())["careful"]
    assert NoSystem.seen[0][0]["role"] == "system"  # asked once as it is, refused
    assert NoSystem.seen[-1] == [{"role": "user", "content": f"{careful}\n\n{PROMPTS[0]['prompt']}"}]
    assert [c["text"] for c in read_jsonl(tmp_path / "s.jsonl")[0]["candidates"]] == ["fine", "fine"]


def test_a_bad_served_url_is_refused_naming_api_base(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    for url, message in (
        ("http://user:pw@127.0.0.1:9/v1", "--api-base http://127.0.0.1:9/v1: holds credentials"),
        ("http://[::1/v1", "--api-base: not a URL that can be used"),
    ):
        p = run_here(
            "sample.py", "--input", prompts, "--output", tmp_path / "s.jsonl", "--api-base", url, "--api-model", "m"
        )
        refused(p, message)
        assert not (tmp_path / "s.jsonl").exists()
