"""LLM-as-a-judge evaluation: scores, HH_lambda and pairwise win rates, as in the paper's tables.

Answers the evaluation prompts with the model under test and, with --baseline, with the
model before SPA (greedy by default); a judge scores every answer 1..10 on the primary
objective and on helpfulness, and compares model and baseline in both orders (a win only
when both orders agree, otherwise a tie).

The judge (judging.py) is a local model (--judge) or an OpenAI-compatible chat-completions
endpoint (--judge-api-base, --judge-model, key in $OPENAI_API_KEY). Without either, only the
embedded model may judge itself: any other model under test needs one named.

    python evaluate.py --input data/eval_prompts.jsonl --model runs/x/model --baseline SmolLM2-135M-Instruct \
        --judge SmolLM2-135M-Instruct --output runs/x/eval

    torchrun --nproc_per_node 8 evaluate.py ...   (each GPU answers and judges a share)

Writes responses.jsonl, judgments.jsonl, report.md, report.json and result.svg (report.py);
resumes after a crash.
Under torchrun every rank answers and judges its share (an HTTP judge is asked by every
rank for its share); the report is computed once from the merged records.
"""

import argparse
from pathlib import Path

import chat_api
import common
import distributed
import generation
import judging
import jsonl
import report
import served
from resumable import Output


# ----------------------------------------------------------------------------- the agreement rule (pure)


def pairwise_outcome(model_first, model_second):
    """Agreement rule. model_first: the verdict with the model's answer as A; model_second:
    with the model's answer as B. 'win' only if both pick the model, 'lose' only if both
    pick the baseline, otherwise 'tie' (including unreadable verdicts)."""
    if model_first == "A" and model_second == "B":
        return "win"
    if model_first == "B" and model_second == "A":
        return "lose"
    return "tie"


def generate_responses(path, prompts, models, args):
    """responses.jsonl: one record per (model, prompt), id joined_id(model, prompt id). models:
    [(name, local folder or hub name, served.ServedModel or None)]. Under torchrun each rank
    answers its share; returns the merged file as {id: record} on every rank, and (model,
    tokenizer) of the model that is also the local judge if it was loaded (else None): that
    model answers last, so the judge reuses it instead of loading it again."""
    wanted = [
        dict(p, id=common.joined_id(name, p["id"]), prompt_id=p["id"], model=name)
        for name, _, _ in models
        for p in prompts
    ]
    settings = dict(
        models=[[n, m, chat_api.shown_url(s.api_base) if s else common.model_fingerprint(m)] for n, m, s in models],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        inference=common.inference_path(),
        prompts=common.prompts_fingerprint(),
    )
    local_judge = None if args.judge_api_base else args.judge
    judge_model = None
    with Output(path, wanted, settings, args.overwrite) as out:
        for name, model_path, server in sorted(models, key=lambda m: m[1] == local_judge and not m[2]):  # input order
            batches = out.batches(args.batch_size, where=lambda r: r["model"] == name)
            if not batches:
                continue
            judge_model = None  # model and baseline may be one directory: never two copies at once
            engine = server or generation.LocalModel(*common.load_for_inference(model_path))
            for batch in common.progress(batches, desc=f"answer {name}"):
                texts = engine.generate(
                    [generation.prompt_turns(r["prompt"]) for r in batch],
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    batch_size=len(batch),
                    seed=args.seed,
                    keys=[r["id"] for r in batch],
                    max_batch_tokens=args.max_batch_tokens,
                )
                out.write([dict(r, response=t) for r, t in zip(batch, texts)])
            judge_model = tuple(engine) if model_path == local_judge and not server else None  # others freed here
            del engine
    return {r["id"]: r for r in (rec for _, _, rec in jsonl.read_jsonl(path))}, judge_model


def judge_all(path, responses, models, args, loaded=None):
    """judgments.jsonl: scores per response (id joined_id('score', model, prompt id)), then
    pairwise verdicts (id joined_id('pairwise', prompt id)) when there is a baseline. Each rank
    judges its share; a local judge already `loaded` (model, tokenizer) is not loaded again."""
    obj = args.primary
    names = [n for n, _, _ in models]
    answer = lambda pid, n: responses[common.joined_id(n, pid)]
    wanted = [
        dict(r, id=common.joined_id("score", r["model"], r["prompt_id"]), kind="score") for r in responses.values()
    ]
    if len(models) == 2:
        base, test = names
        wanted += [
            {
                "id": common.joined_id("pairwise", pid),
                "prompt": answer(pid, test)["prompt"],
                "prompt_id": pid,
                "kind": "pairwise",
                "category": answer(pid, test).get("category"),
                "answers": [answer(pid, test)["response"], answer(pid, base)["response"]],
            }
            for pid in dict.fromkeys(r["prompt_id"] for r in responses.values())
        ]
    settings = dict(judging.judge_settings(args, args.judge), primary=obj)
    with Output(path, wanted, settings, args.overwrite) as out:
        # one kind per batch: a batch's verdicts, both orders, go to the judge in one call
        parts = [
            (kind, out.batches(args.batch_size, where=lambda w, k=kind: w["kind"] == k))
            for kind in ("score", "pairwise")
        ]
        judge = judging.from_args(args, args.judge, loaded) if any(b for _, b in parts) else None
        for kind, batches in parts:
            for batch in common.progress(batches, desc=f"judge {kind}"):
                if kind == "score":
                    items = [(w["prompt"], w["response"]) for w in batch]
                    a, b = ([s["score"] for s in judge.ratings(items, o)] for o in (obj, "helpfulness"))
                    out.write(
                        [
                            {
                                "id": w["id"],
                                "prompt": w["prompt"],
                                "kind": kind,
                                "model": w["model"],
                                "prompt_id": w["prompt_id"],
                                "category": w.get("category"),
                                "score_a": x,
                                "score_b": y,
                            }
                            for w, x, y in zip(batch, a, b)
                        ]
                    )
                    continue
                both = judge.verdicts(
                    [(w["prompt"], *w["answers"]) for w in batch] + [(w["prompt"], *w["answers"][::-1]) for w in batch],
                    obj,
                )
                first, second = both[: len(batch)], both[len(batch) :]
                out.write(
                    [
                        dict(
                            {k: v for k, v in w.items() if k != "answers"},
                            model_first=f,
                            model_second=s,
                            outcome=pairwise_outcome(f, s),
                        )
                        for w, f, s in zip(batch, first, second)
                    ]
                )
    if judge is not None:
        judge.check_readable(least=1)  # a table of nan from a judge that never answered is no result
    return [rec for _, _, rec in jsonl.read_jsonl(path)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="evaluation prompts (JSONL, as for sample.py)")
    p.add_argument("--output", required=True, help="evaluation directory")
    p.add_argument("--model", default=None, help="the model under test (a local folder; or --api-base/--api-model)")
    p.add_argument("--name", default=None, help="its name in the report (default: the directory's or served name)")
    p.add_argument("--baseline", default=None, help="the model to compare against, e.g. the model before SPA")
    p.add_argument("--baseline-api-model", default=None, help="the baseline as served by --api-base, by its name")
    p.add_argument("--baseline-name", default="Vanilla", help="its name in the report (default Vanilla)")
    judging.add_primary_arg(p)
    judging.add_judge_args(
        p, f"no default: a model other than {common.DEFAULT_MODEL} under test needs --judge or --judge-api-base"
    )
    common.add_prompt_args(p)
    p.add_argument("--max-new-tokens", type=common.positive_int, default=128, help="answer length cap (default 128)")
    p.add_argument("--temperature", type=common.non_negative, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--batch-size", type=common.positive_int, default=8, help="prompts per batch and per device (default 8)"
    )
    p.add_argument("--seed", type=common.seed_int, default=0, help="random seed (default 0)")
    p.add_argument("--limit", type=common.positive_int, default=None, help="only the first N prompts")
    p.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    common.add_inference_args(p)
    args = p.parse_args()
    common.use_chat_template(args.chat_template)
    server = served.from_args(args)
    if bool(server) == bool(args.model):
        raise common.InputError("name the model under test: --model (a local folder) or --api-base and --api-model")
    if args.baseline_api_model and not server:
        raise common.InputError("--baseline-api-model names a model of --api-base's server: give --api-base too")

    prompts = jsonl.read_prompts(args.input, args.prompt_field, args.limit, args.id_field, args.category_field)
    for m in filter(None, [args.model, args.baseline]):
        common.resolve_model(m)  # a missing directory fails here, before any work
    name = args.name or (args.api_model if server else Path(args.model.rstrip("/")).name)
    baseline_server = (
        server
        and args.baseline_api_model
        and served.ServedModel(args.api_base, args.baseline_api_model, args.api_concurrency)
    )
    models = [(name, args.api_model if server else args.model, server)]  # (name, model, served or None)
    if args.baseline or baseline_server:
        models.insert(0, (args.baseline_name, args.baseline or args.baseline_api_model, baseline_server or None))
    if len({n for n, _, _ in models}) < len(models):
        raise common.InputError(f"--name {name!r} equals --baseline-name; give them different names")
    if not (args.judge or args.judge_api_base):
        if args.model != common.DEFAULT_MODEL:
            raise common.InputError(
                f"name the judge of {args.model or args.api_model}: --judge MODEL (a local model) or "
                "--judge-api-base URL --judge-model NAME (an endpoint); only the embedded "
                f"{common.DEFAULT_MODEL} judges itself by default"
            )
        args.judge = common.DEFAULT_MODEL
    out = Path(args.output)
    local_judge = None if args.judge_api_base else args.judge
    local = [m for _, m, s in models if not s]
    common.refuse_overlap(
        reads=[args.input, *(common.model_folder(m) for m in local), local_judge and common.model_folder(local_judge)],
        writes=[out],
    )
    for model_path in local:  # every prompt checked against each local model's context before the first batch
        generation.check_all_fit(
            common.load_tokenizer(model_path),
            [generation.prompt_turns(p["prompt"]) for p in prompts],
            [p["id"] for p in prompts],
            args.max_new_tokens,
            model_path,
        )
    responses, judge_model = generate_responses(out / "responses.jsonl", prompts, models, args)
    judgments = judge_all(out / "judgments.jsonl", responses, models, args, judge_model)
    names = [n for n, _, _ in models]
    result = report.build_report(judgments, names, args.primary)
    if distributed.is_main():
        print(report.write(out, result, names))


if __name__ == "__main__":
    common.run_main(main)
