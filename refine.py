"""Step 3 of SPA: self-refinement.

The model sees the prompt, the constitution and all candidates with their scores, and
writes one improved answer; that answer is then scored exactly as score.py scores the
candidates (same objectives, same mode, same functions).

    python refine.py --input runs/x/scored.jsonl --output runs/x/refined.jsonl

Adds refined = {"text", "score_a", "score_b"} to each record.
"""
import argparse

from tqdm import tqdm

import common
import score

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
    return common.user_turn(text)


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
    p.add_argument("--max-new-tokens", type=int, default=160, help="refined answer cap in tokens (default 160)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    args = p.parse_args()

    records = common.read_records(args.input, ["candidates", "objectives"], args.limit, "run score.py first")
    objectives = check_objectives(args.input, records)
    with common.ResumableWriter(args.output, records, args.overwrite) as out:
        todo = list(common.pending_batches(records, out.done, args.batch_size))
        if todo:
            model, tok = common.load_for_inference(args.model)
        for b, batch in tqdm(todo, desc="refine", unit="batch"):
            texts = common.generate(model, tok, [refine_conversation(r) for r in batch],
                                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    batch_size=len(batch), seed=args.seed + b)
            scores = score.score_objectives(model, tok, [(r["prompt"], t) for r, (t,) in zip(batch, texts)],
                                            objectives, args.mode, args.judge_batch_size, args.judge_max_tokens)
            refined = [dict(r, refined=dict(text=t, **s)) for r, (t,), s in zip(batch, texts, scores)]
            out.write([r for r in refined if r["id"] not in out.done])
    print(f"refine: {len(records)} prompts -> {args.output}")


if __name__ == "__main__":
    common.run_main(main)
