"""Step 3 of SPA: self-refinement.

The model sees the prompt, the constitution and all candidates with their scores, and
writes one improved answer; that answer is then scored exactly as score.py scores the
candidates (same objectives, same mode, same functions).

    python refine.py --input runs/x/scored.jsonl --output runs/x/refined.jsonl
    torchrun --nproc_per_node 8 refine.py ...     (one process per GPU, each a share of the prompts)

Adds refined = {"text", "score_a", "score_b"} to each record.
"""
import argparse

import common
import jsonl
import generation
import score
from resumable import Output

ADJECTIVE = {"harmlessness": "harmless", "honesty": "honest"}


def refine_conversation(rec):
    """The refinement prompt for one scored record (prompts/refine.txt)."""
    obj_a, obj_b = rec["objectives"]
    block = "\n".join(common.load_prompt("refine_candidate.txt").format(
        index=i + 1, objective_a=obj_a, objective_b=obj_b, score_a=c["score_a"] or "?",
        score_b=c["score_b"] or "?", text=c["text"]) for i, c in enumerate(rec["candidates"]))
    text = common.load_prompt("refine.txt").format(
        constitution=common.load_prompt("constitution.txt").strip(), prompt=rec["prompt"],
        objective_a=obj_a, objective_b=obj_b, objective_a_adj=ADJECTIVE[obj_a], candidates=block)
    return generation.user_turn(text)


def check_objectives(path, records):
    """All records must name the same known objectives; returns them."""
    first = records[0]["objectives"]
    for i, r in enumerate(records, 1):
        obj = r["objectives"]
        if not (isinstance(obj, list) and len(obj) == 2 and obj[0] in ADJECTIVE and obj[1] == "helpfulness"):
            raise common.InputError(f"{path}: record {i} (id {r['id']}): unknown objectives {obj!r}; "
                                    "expected [harmlessness|honesty, helpfulness]")
        if obj != first:
            raise common.InputError(f"{path}: record {i} (id {r['id']}): objectives {obj} differ from "
                                    f"the first record's {first}; score the file in one run")
    return first


def main():
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter))
    score.add_judge_args(p)
    p.add_argument(
        "--max-new-tokens", type=common.positive_int, default=160, help="refined answer cap in tokens (default 160)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    args = p.parse_args()

    records = jsonl.read_records(args.input, ["candidates", "objectives"], args.limit, "run score.py first")
    score.check_candidates(args.input, records)
    objectives = check_objectives(args.input, records)
    settings = dict(
        **common.model_settings(args.model, args.compile),
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        **score.judge_settings(args, args.judge or args.model),
    )
    reads = [args.input, common.model_folder(args.model), args.judge and common.model_folder(args.judge)]
    with Output(args.output, records, settings, args.overwrite, reads) as out:
        batches = out.batches(args.batch_size)
        if batches:
            model, tok = common.load_for_inference(args.model, args.compile)
            judge = score.Judge(args, args.model, model, tok) if not args.judge else score.Judge(args, args.judge)
        for batch in common.progress(batches, desc="refine", unit="batch"):
            texts = generation.generate(model, tok, [refine_conversation(r) for r in batch],
                                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        batch_size=len(batch), seed=args.seed, keys=[r["id"] for r in batch],
                                        compile=args.compile)
            scores = judge.score_objectives([(r["prompt"], t) for r, t in zip(batch, texts)], objectives)
            out.write([dict(r, refined=dict(text=t, **s)) for r, t, s in zip(batch, texts, scores)])
    common.log(f"refine: {len(records)} prompts -> {args.output}")


if __name__ == "__main__":
    common.run_main(main)
