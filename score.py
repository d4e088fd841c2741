"""Step 2 of SPA: self-evaluation against the constitution.

The model judges every candidate answer on the primary objective G_a (harmlessness or
honesty) and on helpfulness G_b, each an integer 1..10, greedily, so the same answer always
gets the same rating; how it is asked and read (the modes generate, logits, logits-expected)
is judging.py's.

    python score.py --input runs/x/samples.jsonl --output runs/x/scored.jsonl --primary harmlessness
    torchrun --nproc_per_node 8 score.py ...      (one process per GPU, each a share of the prompts)

Adds score_a, score_b to every candidate and objectives = [primary, "helpfulness"].
"""

import argparse

import common
import distributed
import judging
import jsonl
import records
from resumable import Output


def main():
    p = common.add_common_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
        seed=False,
        served=False,
    )
    judging.add_primary_arg(p)
    judging.add_judge_args(p, "default: the --model itself, as the method does")
    args = p.parse_args()
    common.use_chat_template(args.chat_template)
    objectives = [args.primary, "helpfulness"]

    prompts = jsonl.read_records(args.input, ["candidates"], args.limit, "run sample.py first")
    records.check_candidates(args.input, prompts)
    judge_name = args.judge or args.model
    settings = dict(judging.judge_settings(args, judge_name), primary=args.primary)
    reads = [args.input, None if args.judge_api_base else common.model_folder(judge_name)]
    with Output(args.output, prompts, settings, args.overwrite, reads) as out:
        batches = out.batches(args.batch_size)
        judge = judging.from_args(args, judge_name) if batches else None
        nulls = total = 0
        for batch in common.progress(batches, desc="score", unit="batch"):
            items = [(r["prompt"], c["text"]) for r in batch for c in r["candidates"]]
            ratings = iter(judge.rate_objectives(items, objectives))
            done = []
            for r in batch:
                cands = [dict(c, **next(ratings)) for c in r["candidates"]]
                nulls += sum(c["score_a"] is None for c in cands) + sum(c["score_b"] is None for c in cands)
                total += 2 * len(cands)
                done.append(dict(r, candidates=cands, objectives=objectives))
            out.write(done)
    total, nulls = map(int, distributed.all_sum([total, nulls]))
    common.log(f"score: {len(prompts)} prompts -> {args.output}; {total} new judgements, {nulls} unreadable (null)")


if __name__ == "__main__":
    common.run_main(main)
