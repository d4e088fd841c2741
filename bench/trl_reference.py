"""The same training measurement with TRL's SimPO trainer, for comparison with train_throughput.py.

TRL is not a dependency of SPA: run this in a separate environment,

    python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 transformers==5.23.0 trl==1.16.0
    /tmp/trl/bin/python bench/trl_reference.py

It trains TRL's CPOTrainer with loss_type "simpo" (cpo_alpha 0, so no SFT term) on the 16
pairs of train_throughput.py, micro-batch 4 x accumulation 2, gradient checkpointing on,
float32, in their order after one untimed warm-up step on 8 other pairs, and prints pairs/s over the
timed steps and the process's peak RSS. Measures, never asserts.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from train_throughput import matmul_peak, synthetic_texts  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    args = p.parse_args()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    path = common.resolve_model(args.model)
    tok = common.load_tokenizer(args.model)
    peak = matmul_peak()
    texts = synthetic_texts(tok, 8, seed=1) + synthetic_texts(tok, 16)  # warm-up step, then the bench's pairs
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            }
            for q, c, r, _ in texts
        ]
    )
    ticks = []

    class Tick(TrainerCallback):
        def on_step_end(self, *a, **k):
            ticks.append(time.time())

    cfg = CPOConfig(
        output_dir="/tmp/trl_reference",
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=2.5,
        simpo_gamma=1.375,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        learning_rate=1e-6,
        num_train_epochs=1,
        max_length=1024,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        train_sampling_strategy="sequential",
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    CPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Tick()]).train()
    pairs = 8 * (len(ticks) - 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"TRL CPOTrainer (simpo): pairs/s {pairs / (ticks[-1] - ticks[0]):.3f} over the last {pairs} pairs; "
        f"peak memory (max RSS) {rss:.2f} GiB; measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
