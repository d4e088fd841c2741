"""Reward Soups (Rame et al., 2023): interpolate the weights of models fine-tuned from one
start on different rewards, theta = lam * theta_1 + (1 - lam) * theta_2.

    python oracle/soup.py --first runs/oracle/primary-only/model --second runs/oracle/helpfulness-only/model \
        --weight 0.7 --output runs/oracle/soup-7-3
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import resumable  # noqa: E402


def soup(first, second, weight):
    """lam * first + (1 - lam) * second, key by key (state dicts with the same keys and shapes)."""
    if first.keys() != second.keys():
        raise common.InputError("the two models have different parameter names")
    differ = [k for k in first if first[k].shape != second[k].shape]
    if differ:
        raise common.InputError(
            f"the two models differ in shape at {differ[0]} ({tuple(first[differ[0]].shape)} and "
            f"{tuple(second[differ[0]].shape)}): a soup needs one architecture"
        )
    return {k: weight * first[k].float() + (1 - weight) * second[k].float() for k in first}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first", required=True, help="model trained on the first reward (the primary objective)")
    p.add_argument("--second", required=True, help="model trained on the second reward (helpfulness)")
    p.add_argument("--weight", type=common.fraction, required=True, help="lam, the first model's share (0..1)")
    p.add_argument("--output", required=True, help="output model directory")
    args = p.parse_args()
    common.refuse_overlap(
        reads=[common.model_folder(args.first), common.model_folder(args.second)], writes=[args.output]
    )
    if Path(args.output).exists() and any(Path(args.output).iterdir()):  # as train.py: never over a model
        raise common.InputError(f"{args.output}: exists and is not empty; choose another --output")
    with resumable.one_writer(Path(args.output)):
        a, tok = common.load_model(args.first)
        b = common.load_weights(args.second)
        a.load_state_dict(soup(a.state_dict(), b.state_dict(), args.weight))
        a.save_pretrained(args.output)
        tok.save_pretrained(args.output)
    print(f"soup: {args.weight:g} x {args.first} + {1 - args.weight:g} x {args.second} -> {args.output}")


if __name__ == "__main__":
    common.run_main(main)
