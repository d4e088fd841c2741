"""The model being trained, as one module whose forward returns the summed log-probs of the
answer tokens: the vocabulary head applied at answer positions only, padded or packed
micro-batches, gradient checkpointing, LoRA, and FSDP2 sharding under torchrun.

Packing (--pack; train.py's default where cpu_speed.py says so, on the CPU): a micro-batch's
chosen and rejected sequences are laid end to end in one row of N tokens, positions
restarting at 0 for each, and attention runs causally within each sequence (one SDPA call
per sequence), so no padding token is computed. The padded layout (2B rows of the longest
length, the default on a GPU) gives the same log-probs to float tolerance (tests/test_train.py).
"""

import hashlib
import math
from functools import partial

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

import common
import distributed
import lora
import preference_data

HEAD_CHUNK = 512  # answer positions per pass of the vocabulary head (--head-chunk)
PACKED = "spa_packed"  # the attention implementation registered below


def packed_attention(module, query, key, value, attention_mask, lengths=None, **kwargs):
    """Causal attention within each of the sequences packed one after another in a row.
    query: (1, heads, N, d), key/value: (1, kv_heads, N, d); lengths: the sequences' token
    counts (sum N). Returns ((1, N, heads, d), None), as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if lengths is None:
        raise ValueError(f"the {PACKED} attention needs the packed sequences' lengths")
    outs, s = [], 0
    for n in lengths:
        o, _ = sdpa_attention_forward(
            module, query[:, :, s : s + n], key[:, :, s : s + n], value[:, :, s : s + n], None, is_causal=True, **kwargs
        )
        outs.append(o)
        s += n
    return torch.cat(outs, dim=1), None


def token_logps(lm_head, hidden, targets):
    """log pi(target | position) at N positions: hidden (N, H), targets (N,) -> (N,) float32."""
    logits = lm_head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def answer_logps(hidden, lm_head, input_ids, answer_mask, chunk=HEAD_CHUNK, lengths=None):
    """Summed log-probabilities of the answer tokens of each sequence, and their counts.
    hidden: (R, T, H) final hidden states; lm_head: (N, H) -> (N, V), the vocabulary projection;
    input_ids: (R, T); answer_mask: (R, T), True where the token is an answer token;
    lengths: None, each row one sequence (S = R); or packed, one row (R = 1) holding S
    sequences of these lengths. The projection runs only at the positions that predict an
    answer token, `chunk` of them at a time (0: all at once); with gradients on, each
    chunk's (chunk, V) float32 logits are recomputed in backward instead of kept.
    Returns (logp (S,), n_tokens (S,))."""
    if lengths is None:
        n_seqs = len(input_ids)
        seq = torch.arange(n_seqs, device=input_ids.device)[:, None].expand_as(input_ids)
    else:
        n_seqs = len(lengths)
        seq = torch.arange(n_seqs).repeat_interleave(torch.tensor(lengths))[None].to(input_ids.device)
    mask = answer_mask[:, 1:]  # token t is predicted at position t - 1 (a sequence's first token is never an answer)
    owner = seq[:, 1:][mask]
    h, targets = hidden[:, :-1][mask], input_ids[:, 1:][mask]
    chunk = chunk or len(h)
    recompute = torch.is_grad_enabled() and h.requires_grad
    head = partial(checkpoint, token_logps, use_reentrant=False) if recompute else token_logps
    lp = torch.cat([head(lm_head, h[s : s + chunk], targets[s : s + chunk]) for s in range(0, len(h), chunk)])
    total = torch.zeros(n_seqs, device=hidden.device).index_add(0, owner, lp)
    return total, torch.bincount(owner, minlength=n_seqs)


class Policy(nn.Module):
    """The language model as one module whose forward returns the summed answer log-probs:
    FSDP2 gathers a module's parameters around its forward, so the decoder and the
    vocabulary head (applied only at answer positions) must run inside one forward."""

    def __init__(self, lm, head_chunk=HEAD_CHUNK, bf16_autocast=False, pack=False):
        super().__init__()
        self.lm, self.head_chunk, self.bf16_autocast, self.pack = lm, head_chunk, bf16_autocast, pack
        if pack:
            from transformers import AttentionInterface

            AttentionInterface.register(PACKED, packed_attention)
            lm.set_attn_implementation(PACKED)

    def forward(self, input_ids, answer_mask, attention_mask=None, position_ids=None, lengths=None):
        """A batch from preference_data.collate -> (logp, n_tokens), each (sequences,)."""
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast):
            extra = {"lengths": lengths} if lengths is not None else {}
            hidden = self.lm.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra
            ).last_hidden_state
            return answer_logps(
                hidden, self.lm.get_output_embeddings(), input_ids, answer_mask, self.head_chunk, lengths
            )


def check_lora_targets(model_name, targets):
    """--lora-targets checked against the model's linear layers, from its config alone (the
    model is built on the meta device: no weight is read), before any work."""
    lm = meta_model(model_name)
    known = sorted({n.split(".")[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise common.InputError(
            f"--lora-targets {' '.join(unknown)}: no linear layer of {model_name} has that "
            f"name; its linear layers: {' '.join(known)}"
        )


def build_policy(args, bf16):
    """Load the starting model in float32 (a LoRA base in bf16 when computing in bf16), add
    LoRA adapters if asked, turn on checkpointing, and shard it with FSDP2 under a process
    group: each decoder layer, then the root; bf16 compute there via MixedPrecisionPolicy.
    Sharded, no rank but rank 0 holds the whole model: every rank builds it on the meta device
    (no memory), shards it and allocates only its shards; rank 0 alone reads the weights, in
    the files' dtype, and broadcasts them tensor by tensor (distributed.load_from_main). On the CPU in float32,
    cpu_speed.prepare_training lays the products out for speed."""
    sharded = distributed.sharded()
    dtype = torch.bfloat16 if args.lora_rank and bf16 else torch.float32
    if not sharded:
        lm = full = common.load_weights(args.model, dtype)
    else:  # rank 0's copy in the files' own dtype (bf16 for an 8B model: half of float32), cast as it is loaded
        full = common.load_weights(args.model, "auto", to_device=False) if distributed.is_main() else None
        lm = meta_model(args.model, dtype)
    for m in {id(m): m for m in (full, lm) if m is not None}.values():  # the same adapters on both
        m.config.use_cache = False
        if args.lora_rank:
            lora.apply(m, args.lora_rank, args.lora_alpha, args.lora_targets)
    speed = common.cpu_speed_module()
    if speed and not bf16:
        speed.prepare_training(lm)
    if args.gradient_checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(lm, args.head_chunk, bf16_autocast=bf16 and not sharded, pack=args.pack)
    if sharded:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        mesh = distributed.step_mesh()
        for layer in lm.get_decoder().layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(policy, mesh=mesh, mp_policy=mp)
        distributed.load_from_main(lm, full)
        if full is not None:  # rank 0 saves the final model: with the files' generation settings
            lm.generation_config = full.generation_config
    return policy.train()


def meta_model(name, dtype=torch.float32):
    """The model's modules from its config on the meta device: shapes, no memory, no weights read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(common.model_config(name), dtype=dtype)


def sequence_logps(policy, examples, pad_id):
    """Summed answer log-probs and counts for chosen and rejected: 4 tensors of shape (B,)."""
    batch = preference_data.collate(examples, pad_id, pack=policy.pack)
    logp, n = policy(**{k: v.to(common.device()) if torch.is_tensor(v) else v for k, v in batch.items()})
    B = len(examples)
    return logp[:B], logp[B:], n[:B], n[B:]


@torch.no_grad()
def reference_forward(policy, examples, pad_id):
    """Summed answer log-probs of chosen and rejected without gradients (dpo's reference)."""
    chosen_logps, rejected_logps, _, _ = sequence_logps(policy, examples, pad_id)
    if hasattr(policy, "reshard"):  # FSDP2 keeps the root's parameters gathered after a no-grad forward
        policy.reshard()
    return chosen_logps, rejected_logps


@torch.no_grad()
def reference_logps(policy, examples, batch_size, pad_id):
    """Summed log-probs of chosen and rejected under the starting model: (N, 2), for dpo.
    Every rank computes its share (pairs rank, rank + world, ...), all gathered once."""
    policy.eval()
    mine = distributed.share(list(range(len(examples))))
    n_batches = math.ceil(math.ceil(len(examples) / distributed.WORLD) / batch_size)  # equal on every rank
    got = []
    for b in common.progress(range(n_batches), desc="reference log-probs"):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        chosen_logps, rejected_logps = reference_forward(policy, [examples[i] for i in idx or [0]], pad_id)
        got += list(zip(idx, chosen_logps.float().tolist(), rejected_logps.float().tolist()))
    out = torch.zeros(len(examples), 2)
    for part in distributed.all_gather(got):
        for i, c, r in part:
            out[i] = torch.tensor([c, r])
    policy.train()
    return out


def dpo_reference(out, policy, examples, eval_examples, args, pad_id):
    """Reference log-probs for dpo, of the training and the held-out pairs, computed once by the
    starting model and kept (safetensors) for --resume with what they were computed from (the
    model's files, every pair's tokens) in the file's metadata: a resume whose model or pairs
    differ computes them again. (None, None) with LoRA or another loss."""
    if args.loss != "dpo" or args.lora_rank:
        return None, None
    path = out / "reference_logps.safetensors"
    computed_from = hashlib.sha256(
        repr(
            [
                common.model_fingerprint(args.model),
                [(e["chosen"], e["rejected"]) for e in examples],
                [(e["chosen"], e["rejected"]) for e in eval_examples or []],
            ]
        ).encode()
    ).hexdigest()
    if args.resume and path.exists():
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("computed_from") == computed_from:
                saved = {k: f.get_tensor(k) for k in f.keys()}
                return saved["logps"], saved.get("eval_logps")
    refs = {"logps": reference_logps(policy, examples, args.batch_size, pad_id)}
    if eval_examples:
        refs["eval_logps"] = reference_logps(policy, eval_examples, args.batch_size, pad_id)
    if distributed.is_main():
        save_file(refs, path, metadata={"computed_from": computed_from})
    return refs["logps"], refs.get("eval_logps")
