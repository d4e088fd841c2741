"""The path a GPU node runs, checked on the CPU: the plain transformers model, no compilation
unless asked (and then one graph), no host synchronisation per layer, the optimizer state
placed as torch places it on resume, a process-group timeout for the long waits, and chat
templates that refuse a system message."""

import datetime
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import checkpoints
import common
import judging
import distributed
import generation
import policy_model
from conftest import read_jsonl, run, run_here, write_jsonl

CONVS = [generation.user_turn(q) for q in ("Hi", "What is a longer question than the first one?", "Why?")]


def fake_device(monkeypatch, kind):
    """Make this process believe its device is `kind` (the stages ask distributed.device())."""
    monkeypatch.setattr(distributed, "device", lambda: torch.device(kind))


def test_a_gpu_runs_the_plain_model(tiny_model_dir, monkeypatch):
    """Off the CPU (a meta device stands in for CUDA), load_for_inference gives transformers'
    model as it is, and build_policy lays out nothing for speed."""
    fake_device(monkeypatch, "meta")
    model, _ = common.load_for_inference(str(tiny_model_dir))
    assert model.device.type == "meta" and model.config._attn_implementation == "sdpa"
    assert model.generate.__func__ is type(model).generate  # transformers' own generate, not cpu_speed's
    assert common.inference_path() == "plain meta"
    args = SimpleNamespace(
        model=str(tiny_model_dir), lora_rank=0, gradient_checkpointing=False, head_chunk=8, pack=False
    )
    policy = policy_model.build_policy(args, bf16=True)
    assert all(type(m) is torch.nn.Linear for m in policy.modules() if isinstance(m, torch.nn.Linear))


def test_generate_never_compiles_unless_asked(tiny_model_dir, monkeypatch):
    """Every generate call of the stages says disable_compile, so transformers' auto-compilation,
    which a static cache on CUDA would trigger, stays off; the judge's ratings are one forward
    pass, no generate call."""
    from transformers import StaticCache

    monkeypatch.setenv("SPA_CPU_SPEED", "0")
    model, tok = common.load_for_inference(str(tiny_model_dir))
    seen, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["generation_config"]) or real(**kw))
    generation.generate(model, tok, CONVS, max_new_tokens=3, temperature=1.0)
    judging.rating_distribution(model, tok, [judging.judge_conversation("honesty", "q", "a")])
    assert len(seen) == 1 and all(c.disable_compile for c in seen)
    monkeypatch.setattr(
        type(model), "device", property(lambda self: torch.device("cuda"))
    )  # transformers' check, on "CUDA"
    cache = {"cache": StaticCache(config=model.config, max_cache_len=8)}
    assert not model._valid_auto_compile_criteria(cache, seen[0])
    seen[0].disable_compile = False
    assert model._valid_auto_compile_criteria(cache, seen[0])  # what it would have done


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators that read a tensor back to the host (a GPU would wait for them)."""

    SYNC = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.is_nonzero.default,
    }

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in self.SYNC
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("speed", ["0", "1"])
def test_no_host_read_per_layer_on_the_plain_path(tmp_path, tokenizer, monkeypatch, speed):
    """Sampling 6 tokens with 2 and with 4 decoder layers: the plain path reads the same number
    of values back to the host (transformers' own: a few a step), the CPU path more with
    more layers (its attention reads the cache's filled length: why it stays off GPUs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("SPA_CPU_SPEED", speed)
    counts = []
    for layers in (2, 4):
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / str(layers))
        tokenizer.save_pretrained(tmp_path / str(layers))
        model, tok = common.load_for_inference(str(tmp_path / str(layers)))
        generation.generate(model, tok, CONVS, max_new_tokens=6, temperature=1.0)  # warm-up
        with HostReads() as reads:
            generation.generate(model, tok, CONVS, max_new_tokens=6, temperature=1.0)
        counts.append(reads.n)
    assert (counts[0] == counts[1] <= 4 * (6 + 1)) if speed == "0" else counts[1] > counts[0]


def test_resume_places_the_optimizer_state_as_torch_does(tmp_path, monkeypatch):
    """A checkpoint of fused AdamW loaded back: it goes through Optimizer.load_state_dict, and
    every state tensor, step included, has the device, dtype and value that torch's own
    state_dict round trip gives it (the fused CUDA kernel wants step on the parameter's device)."""

    def fresh():
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
        return net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    net, opt, sched = fresh()
    sum(p.sum() for p in net.parameters()).backward()
    opt.step()
    sched.step()
    checkpoints.save_checkpoint(tmp_path, net, opt, sched, 1, {"plan": 1})
    ours_net, ours, ours_sched = fresh()
    loads = []
    real = torch.optim.Optimizer.load_state_dict
    counted = lambda self, state_dict: loads.append(1) or real(self, state_dict)  # noqa: E731
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", counted)
    assert checkpoints.load_checkpoint(tmp_path, ours_net, ours, ours_sched, {"plan": 1}) == 1 and loads
    _, theirs, _ = fresh()
    real(theirs, opt.state_dict())
    mine = [v for p in ours.param_groups[0]["params"] for _, v in sorted(ours.state[p].items())]
    want = [v for p in theirs.param_groups[0]["params"] for _, v in sorted(theirs.state[p].items())]
    assert len(mine) == len(want) == 6
    for a, b in zip(mine, want):
        assert (a.device, a.dtype, a.shape) == (b.device, b.dtype, b.shape) and torch.equal(a, b)
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    assert all(torch.equal(a, b) for a, b in zip(ours_net.parameters(), net.parameters()))


def test_the_process_group_waits_as_long_as_the_longest_barrier(monkeypatch):
    """torchrun's process group gets SPA_DIST_TIMEOUT (default two hours), not NCCL's ten minutes."""
    got = {}
    monkeypatch.setattr(distributed, "WORLD", 2)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: got.update(backend=backend, **kw))
    monkeypatch.delenv("SPA_DIST_TIMEOUT", raising=False)
    distributed.setup()
    assert got["timeout"] == datetime.timedelta(hours=2) > datetime.timedelta(minutes=10)
    monkeypatch.setenv("SPA_DIST_TIMEOUT", "86400")
    distributed.setup()
    assert got["timeout"] == datetime.timedelta(days=1)
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("SPA_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="SPA_DIST_TIMEOUT must be a positive number of seconds"):
            distributed.setup()
    monkeypatch.delenv("SPA_DIST_TIMEOUT")
    monkeypatch.setenv("SPA_STEP_TIMEOUT", "0")
    with pytest.raises(ValueError, match="SPA_STEP_TIMEOUT must be a positive number of seconds"):
        distributed.setup()


def test_spa_process_group_forms_a_group_for_one_process_under_torchrun(monkeypatch):
    got = {}
    monkeypatch.setattr(distributed, "WORLD", 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: got.update(backend=backend))
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    distributed.setup()
    assert not got  # one process, no group
    monkeypatch.setenv("SPA_PROCESS_GROUP", "1")
    with pytest.raises(ValueError, match="under torchrun"):
        distributed.setup()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    distributed.setup()
    assert got == {"backend": "gloo"}


NO_SYSTEM = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_a_template_without_a_system_role_gets_the_system_text_in_the_user_turn(tmp_path, tiny_model_dir):
    """Mistral-7B-Instruct v0.1's template raises on a system message: sample, score, refine,
    evaluate and train run on it, the system text folded into the first user turn, said once."""
    from transformers import AutoTokenizer

    model = tmp_path / "mistral-like"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = NO_SYSTEM
    tok.save_pretrained(model)
    system = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Hi?"}]
    assert generation.chat_text(tok, system) == generation.chat_text(
        tok, [{"role": "user", "content": "Be careful.\n\nHi?"}]
    )
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"Is thing {i} safe?"} for i in range(2)])
    p = run(
        "sample.py",
        "--input",
        prompts,
        "--output",
        tmp_path / "s.jsonl",
        "--model",
        model,
        "--num-candidates",
        3,
        "--max-new-tokens",
        3,
        "--systems",
        "careful",
        "honest",
        "default",
    )
    assert p.stdout.count("refuses a system message") == 1
    m, judge = ["--model", model], ["--mode", "logits", "--max-new-tokens", 3]
    for stage in (
        ["score.py", "--input", tmp_path / "s.jsonl", "--output", tmp_path / "sc.jsonl", *m, "--mode", "logits"],
        ["refine.py", "--input", tmp_path / "sc.jsonl", "--output", tmp_path / "r.jsonl", *m, *judge],
        [
            "evaluate.py",
            "--input",
            prompts,
            "--output",
            tmp_path / "ev",
            *m,
            "--baseline",
            tiny_model_dir,
            "--judge",
            model,
            *judge,
            "--judge-max-tokens",
            3,
        ],
    ):
        got = run_here(*stage)
        assert got.returncode == 0, got.stderr[-2000:]
    assert all(len(r["candidates"]) == 3 for r in read_jsonl(tmp_path / "r.jsonl"))
    assert len(read_jsonl(tmp_path / "ev" / "judgments.jsonl")) == 6
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "prompt": system,
                "chosen": [{"role": "assistant", "content": "Yes."}],
                "rejected": [{"role": "assistant", "content": "No."}],
            }
        ],
    )
    got = run_here("train.py", "--input", pairs, "--output", tmp_path / "m", *m, "--loss", "simpo", "--save-every", 0)
    assert got.returncode == 0, got.stderr[-2000:]
