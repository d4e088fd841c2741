"""Step 1 of SPA: diverse sampling.

For every prompt, draw n candidate answers at high temperature under alternative system
prompts (prompts/systems.json). Candidate k uses system variant k mod V and temperature
(k + k div V) mod T of the lists given, so a small n already spreads over both.

    python sample.py --input data/train_prompts.jsonl --output runs/x/samples.jsonl --n 4

Adds to each prompt record: candidates = [{"text", "system", "temperature"}, ...].
"""
import argparse
import json
from tqdm import tqdm

import common


def candidate_plan(n, systems, temperatures):
    """[(system_name, temperature)] for candidates 0..n-1, spread over both lists."""
    V, T = len(systems), len(temperatures)
    plan = []
    for k in range(n):
        c = k % (V * T)
        plan.append((systems[c % V], temperatures[(c + c // V) % T]))
    return plan


def sample_batch(model, tok, batch, plan, system_texts, args, seed):
    """Candidates for a batch of prompt records, all in one generate call: a row per
    (prompt, candidate), each with its own system prompt and temperature."""
    convs = [common.user_turn(r["prompt"], system_texts[s]) for r in batch for s, _ in plan]
    temps = [t for _ in batch for _, t in plan]
    texts = common.generate(model, tok, convs, max_new_tokens=args.max_new_tokens, temperature=temps,
                            top_p=args.top_p, batch_size=len(convs), seed=seed)
    n = len(plan)
    return [dict(rec, candidates=[{"text": texts[r * n + k][0], "system": s, "temperature": t}
                                  for k, (s, t) in enumerate(plan)]) for r, rec in enumerate(batch)]


def main():
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--prompt-field", default=None,
                   help="field holding the prompt (default: prompt, instruction or question)")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt (default 4)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.8, 1.1],
                   help="sampling temperatures to spread candidates over (default 0.8 1.1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--systems", nargs="+", default=None,
                   help="system-prompt variants from prompts/systems.json (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap in tokens (default 128)")
    args = p.parse_args()

    system_texts = json.loads(common.load_prompt("systems.json"))
    systems = args.systems or list(system_texts)
    unknown = [s for s in systems if s not in system_texts]
    if unknown:
        raise common.InputError(f"unknown system variant {unknown[0]!r}; known: {', '.join(system_texts)}")
    if args.n < 2:
        raise common.InputError("--n must be at least 2 (denoising needs a covariance)")
    plan = candidate_plan(args.n, systems, args.temperatures)

    records = common.by_length(common.read_prompts(args.input, args.prompt_field, args.limit))
    common.seed_everything(args.seed)
    with common.ResumableWriter(args.output, records, args.overwrite) as out:
        todo = list(common.pending_batches(records, out.done, args.batch_size))
        if todo:
            model, tok = common.load_for_inference(args.model)
        written = len(out.done)
        for b, batch in tqdm(todo, desc="sample", unit="batch"):
            out.write([r for r in sample_batch(model, tok, batch, plan, system_texts, args, args.seed + b)
                       if r["id"] not in out.done])
    print(f"sample: {len(records)} prompts x {args.n} candidates -> {args.output} "
          f"({len(records) - written} new, {written} resumed)")


if __name__ == "__main__":
    common.run_main(main)
