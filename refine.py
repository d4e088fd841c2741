"""Step 3 of SPA: self-refinement.

The model sees the prompt, the constitution and all candidates with their scores, and
writes one improved answer; that answer is then rated exactly as score.py rated the
candidates, on the objectives the scored file names (judging.py).

    python refine.py --input runs/x/scored.jsonl --output runs/x/refined.jsonl
    torchrun --nproc_per_node 8 refine.py ...     (one process per GPU, each a share of the prompts)

Adds refined = {"text", "score_a", "score_b"} to each record.
"""

import argparse

import common
import generation
import judging
import jsonl
import records
import served
from resumable import Output

ADJECTIVE = {"harmlessness": "harmless", "honesty": "honest"}


def refine_conversation(rec):
    """The refinement prompt for one scored record (prompts/refine.txt)."""
    obj_a, obj_b = rec["objectives"]
    block = "\n".join(
        common.load_prompt("refine_candidate.txt").format(
            index=i + 1,
            objective_a=obj_a,
            objective_b=obj_b,
            score_a=c["score_a"] or "?",
            score_b=c["score_b"] or "?",
            text=c["text"],
        )
        for i, c in enumerate(rec["candidates"])
    )
    text = common.load_prompt("refine.txt").format(
        constitution=common.load_prompt("constitution.txt").strip(),
        prompt=generation.prompt_text(rec["prompt"]),
        objective_a=obj_a,
        objective_b=obj_b,
        objective_a_adj=ADJECTIVE[obj_a],
        candidates=block,
    )
    return generation.user_turn(text)


def main():
    p = common.add_common_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    judging.add_judge_args(p, "default: the --model itself, as the method does")
    p.add_argument(
        "--max-new-tokens", type=common.positive_int, default=160, help="refined answer cap in tokens (default 160)"
    )
    p.add_argument("--temperature", type=common.non_negative, default=0.0, help="0 = greedy (default)")
    args = p.parse_args()
    common.use_chat_template(args.chat_template)
    server = served.from_args(args)  # None: the local --model
    if server and not (args.judge or args.judge_api_base):  # the model judges itself: through its server
        args.judge_api_base, args.judge_model = args.api_base, args.api_model

    scored = jsonl.read_records(args.input, ["candidates", "objectives"], args.limit, "run score.py first")
    records.check_candidates(args.input, scored)
    objectives = records.check_objectives(args.input, scored)  # the refined answer is rated on these
    judge_name = args.judge or args.model
    settings = dict(
        **(served.settings(args) if server else common.model_settings(args.model)),
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        **judging.judge_settings(args, judge_name),
    )
    local = None if server else args.model
    reads = [args.input, local and common.model_folder(local), args.judge and common.model_folder(args.judge)]
    if local:  # every refinement prompt checked against the context before the first batch
        generation.check_all_fit(
            common.load_tokenizer(local),
            [refine_conversation(r) for r in scored],
            [r["id"] for r in scored],
            args.max_new_tokens,
            local,
        )
    with Output(args.output, scored, settings, args.overwrite, reads) as out:
        batches = out.batches(args.batch_size)
        if batches:
            engine = server or generation.LocalModel(*common.load_for_inference(args.model))
            same = server is None and not args.judge and not args.judge_api_base
            judge = judging.from_args(args, judge_name, loaded=tuple(engine) if same else None)
        for batch in common.progress(batches, desc="refine", unit="batch"):
            texts = engine.generate(
                [refine_conversation(r) for r in batch],
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                batch_size=len(batch),
                seed=args.seed,
                keys=[r["id"] for r in batch],
                max_batch_tokens=args.max_batch_tokens,
            )
            ratings = judge.rate_objectives([(r["prompt"], t) for r, t in zip(batch, texts)], objectives)
            out.write([dict(r, refined=dict(text=t, **s)) for r, t, s in zip(batch, texts, ratings)])
    common.log(f"refine: {len(scored)} prompts -> {args.output}")


if __name__ == "__main__":
    common.run_main(main)
