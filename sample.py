"""Step 1 of SPA: diverse sampling.

For every prompt, draw n candidate answers at high temperature under alternative system
prompts (prompts/systems.json). Candidate k uses system variant k mod V and temperature
(k + k div V) mod T of the lists given, so a small n already spreads over both.

    python sample.py --input data/train_prompts.jsonl --output runs/x/samples.jsonl --num-candidates 4
    torchrun --nproc_per_node 8 sample.py ...     (one process per GPU, each a share of the prompts)
    python sample.py ... --api-base http://127.0.0.1:8000/v1 --api-model M   (a served model: served.py)

Adds to each prompt record: candidates = [{"text", "system", "temperature"}, ...]. Candidate
k of prompt x draws its randomness from (--seed, x's id, k) only: the same samples at any
batch size and on any number of GPUs.
"""

import argparse
import json

import common
import jsonl
import distributed
import generation
import served
from resumable import Output


def candidate_variants(n, systems, temperatures):
    """[(system_name, temperature)] for candidates 0..n-1, spread over both lists."""
    V, T = len(systems), len(temperatures)
    variants = []
    for k in range(n):
        c = k % (V * T)
        variants.append((systems[c % V], temperatures[(c + c // V) % T]))
    return variants


def sample_batch(engine, batch, variants, system_texts, args):
    """Candidates for a batch of prompt records, all in one call of the model (local or served):
    a row per (prompt, candidate), each with its own system prompt, temperature and random stream."""
    convs = [generation.prompt_turns(r["prompt"], system_texts[s]) for r in batch for s, _ in variants]
    temps = [t for _ in batch for _, t in variants]
    keys = [f"{r['id']}/{k}" for r in batch for k in range(len(variants))]
    texts = engine.generate(
        convs,
        max_new_tokens=args.max_new_tokens,
        temperature=temps,
        top_p=args.top_p,
        batch_size=len(convs),
        seed=args.seed,
        keys=keys,
        max_batch_tokens=args.max_batch_tokens,
    )
    n = len(variants)
    return [
        dict(
            rec,
            candidates=[{"text": texts[r * n + k], "system": s, "temperature": t} for k, (s, t) in enumerate(variants)],
        )
        for r, rec in enumerate(batch)
    ]


def main():
    p = common.add_common_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    common.add_prompt_args(p)
    p.add_argument(
        "--num-candidates",
        type=common.number(int, low=2, name="count"),
        default=4,
        help="candidates per prompt, n >= 2: denoising needs a covariance (default 4)",
    )
    p.add_argument(
        "--temperatures",
        type=common.non_negative,
        nargs="+",
        default=[0.8, 1.1],
        help="sampling temperatures to spread candidates over (default 0.8 1.1)",
    )
    p.add_argument(
        "--top-p",
        type=common.number(float, above=0, high=1, name="top_p"),
        default=1.0,
        help="nucleus sampling threshold (default 1.0: off)",
    )
    p.add_argument(
        "--systems", nargs="+", default=None, help="system-prompt variants from prompts/systems.json (default: all)"
    )
    p.add_argument(
        "--max-new-tokens", type=common.positive_int, default=128, help="answer length cap in tokens (default 128)"
    )
    p.add_argument(
        "--truncate-prompts",
        action="store_true",
        help="cut prompts that do not fit the model's context with the answer budget (keeping their "
        "beginning; counted, and marked prompt_truncated) instead of refusing them",
    )
    args = p.parse_args()
    common.use_chat_template(args.chat_template)
    server = served.from_args(args)  # None: the local --model

    system_texts = json.loads(common.load_prompt("systems.json"))
    systems = args.systems or list(system_texts)
    unknown = [s for s in systems if s not in system_texts]
    if unknown:
        raise common.InputError(f"unknown system variant {unknown[0]!r}; known: {', '.join(system_texts)}")
    variants = candidate_variants(args.num_candidates, systems, args.temperatures)
    settings = dict(
        **(served.settings(args) if server else common.model_settings(args.model)),
        seed=args.seed,
        num_candidates=args.num_candidates,
        systems=systems,
        temperatures=args.temperatures,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        truncate_prompts=args.truncate_prompts,
    )

    records = jsonl.read_prompts(args.input, args.prompt_field, args.limit, args.id_field, args.category_field)
    cut = 0
    if server and args.truncate_prompts:
        raise common.InputError("--truncate-prompts needs the model's tokenizer: a local --model, not --api-base")
    if not server:  # the server checks the context of what it is sent; here every prompt before the first batch
        tok = common.load_tokenizer(args.model)
        if args.truncate_prompts:
            context = common.model_config(args.model).max_position_embeddings
            records, cut = generation.truncate_prompts(
                tok, records, [system_texts[s] for s in systems], args.max_new_tokens, context
            )
        overhead = lambda s: len(tok(generation.chat_text(tok, generation.user_turn("", s)))["input_ids"])
        longest = max((system_texts[s] for s in systems), key=overhead)
        generation.check_all_fit(
            tok,
            [generation.prompt_turns(r["prompt"], longest) for r in records],
            [r["id"] for r in records],
            args.max_new_tokens,
            args.model,
            "; rerun with --truncate-prompts to cut them (counted and marked)",
        )
    reads = [args.input, None if server else common.model_folder(args.model)]
    with Output(args.output, records, settings, args.overwrite, reads=reads) as out:
        batches = out.batches(args.batch_size)
        if batches:
            engine = server or generation.LocalModel(*common.load_for_inference(args.model))
        for batch in common.progress(batches, desc="sample", unit="batch"):
            out.write(sample_batch(engine, batch, variants, system_texts, args))
    new = int(distributed.all_sum([out.new])[0])
    common.log(
        f"sample: {len(records)} prompts x {args.num_candidates} candidates -> {args.output} "
        f"({new} new, {len(records) - new} resumed{f', {cut} prompts truncated' if cut else ''})"
    )


if __name__ == "__main__":
    common.run_main(main)
