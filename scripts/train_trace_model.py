"""Train a small Mixtral on Python's own standard library for a few minutes and record a routing
trace from it: routing that is not random, to replay on synthetic stores (`bench --routing`).

Random weights route with no temporal locality, so cache and prefetch figures on a synthetic
store say little about a trained model. This script makes a trained one, with no downloads:
  1. text: the .py sources of the standard library of this Python (sysconfig's stdlib path);
     files are split by a hash of their path, 1 in 20 held out (never trained on);
  2. a byte-level BPE tokenizer trained on the training files (tokenizers library);
  3. transformers' MixtralForCausalLM (8 experts, top-2, with Mixtral's load-balancing loss,
     so the routers do not collapse onto a few experts), trained for --minutes on random
     windows of the training text, on --device (cuda if there is one, else cpu);
  4. save_pretrained (model and tokenizer), then `pack` (unquantized) into a store;
  5. the engine on that store records the routing of held-out text: a prompt of
     --prompt-tokens, then --decode-steps decode steps fed the text that follows (teacher
     forcing, as bench feeds its tokens; a tiny model's own samples would loop and show a
     locality that is the loop's, not the text's), with the lookahead at depth 2, width 2;
  6. prints each layer's locality (the share of a token's experts that the previous token also
     chose, against top_k/experts for independent routing) and the lookahead's recall.

    python scripts/train_trace_model.py --minutes 5 --out /tmp/trace-model \
        [--trace scripts/traces/mixtral-tiny-stdlib.trace.jsonl] [--device cpu|cuda] [--layers 8]

The trace's header records how it was made (settings, steps, tokens seen, losses, the held-out
file). Everything is seeded; the training's length in steps depends on the machine's speed."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

from coordinator.runtime.engine import Engine
from coordinator.runtime.routing_trace import locality, render_locality
from coordinator.tools.pack import pack_checkpoint
from coordinator.tools.tiny_model import build_tokenizer

HELD_OUT_EVERY = 20  # one file in 20, by a hash of its path


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): the stdlib's .py sources, tests and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"test", "tests", "site-packages", "idle_test", "__pycache__"} & set(p.relative_to(root).parts))
    train, held = [], []
    for path in files:
        digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
        (held if digest[0] % HELD_OUT_EVERY == 0 else train).append(path)
    return train, held


def read_texts(files: list[Path], limit_bytes: int) -> list[str]:
    texts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def make_model(vocab_size: int, args):
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=args.balance_loss)
    return transformers.MixtralForCausalLM(config)


def train(model, data: torch.Tensor, args, device: torch.device) -> dict:
    """Random windows of `data` for args.minutes; AdamW, warm-up then cosine on the time left."""
    generator = torch.Generator().manual_seed(0)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    seq, budget = args.seq_len, args.minutes * 60
    started, step, losses = time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - started) < budget:
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, data.numel() - seq - 1, (args.batch,), generator=generator)
        batch = torch.stack([data[s:s + seq] for s in starts.tolist()]).to(device)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        step += 1
        if step % 20 == 0:
            print(f"step {step}, {elapsed:.0f} s, loss {sum(losses[-20:]) / 20:.3f} (with the balance loss)", flush=True)
    model.eval()
    return {"steps": step, "tokens_seen": step * args.batch * seq, "seconds": round(time.perf_counter() - started),
            "first_loss": round(losses[0], 3), "last_loss": round(sum(losses[-20:]) / min(20, len(losses)), 3)}


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor, args, device: torch.device) -> float:
    seq = args.seq_len
    windows = [data[s:s + seq] for s in range(0, min(data.numel() - seq, 32 * seq), seq)]
    losses = [float(model(input_ids=w[None].to(device), labels=w[None].to(device)).loss) for w in windows]
    return sum(losses) / len(losses)


def record_trace(store: Path, ids: list[int], args, made_by: dict):
    """The held-out ids through the engine: a prompt, then one decode step per following token."""
    prompt, follow = ids[:args.prompt_tokens], ids[args.prompt_tokens:args.prompt_tokens + args.decode_steps]
    with Engine.open(store, device="cpu", cache_experts=4, prefetch_depth=2, prefetch_width=2) as engine:
        recorder = engine.record_routing(made_by=made_by)
        with engine.forced_decode(prompt, len(follow)) as run:
            run.prefill()
            for token in follow:
                run.step(token)
        engine.stop_routing_trace()
        return recorder.trace()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder: checkpoint/, store/ and the trace go here")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trace", type=Path, help="where to write the trace (default OUT/routing.trace.jsonl)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--balance-loss", type=float, default=0.02,
                        help="Mixtral's router load-balancing loss coefficient (default 0.02, Mixtral's own)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (on a busy machine 1 is faster)")
    parser.add_argument("--train-mb", type=float, default=8.0, help="stdlib text to train on, in MB (default 8)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=448)
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out}: exists and is not empty")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    train_files, held_files = stdlib_files()
    texts = read_texts(train_files, int(args.train_mb * 1e6))
    print(f"{len(train_files)} training files ({sum(map(len, texts)) / 1e6:.1f} MB read), {len(held_files)} held out")
    tokenizer = build_tokenizer(args.vocab, texts)
    data = torch.tensor([t for text in texts for t in tokenizer(text).input_ids[1:] + [2]], dtype=torch.long)
    held_path = max(held_files, key=lambda p: p.stat().st_size)  # the longest held-out file, for the trace
    held_ids = tokenizer(held_path.read_text(encoding="utf-8")).input_ids
    held_data = torch.tensor(held_ids[1:], dtype=torch.long)
    print(f"{data.numel()} training tokens, vocabulary {len(tokenizer)}; held-out prompt from {held_path.name}")

    model = make_model(len(tokenizer), args)
    log = train(model, data, args, device)
    log["held_out_loss"] = round(held_out_loss(model, held_data, args, device), 3)
    print(json.dumps(log))

    checkpoint, store = args.out / "checkpoint", args.out / "store"
    model.to("cpu").save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    pack_checkpoint(model_dir=checkpoint, out=store, expert_bits=16, dense_bits=16, progress=False)

    made_by = {
        "model": f"mixtral-tiny-stdlib ({args.layers} layers, hidden {args.hidden}, 8 experts, top-2, "
                 f"vocab {len(tokenizer)})",
        "script": "scripts/train_trace_model.py", "argv": sys.argv[1:] if argv is None else argv,
        "corpus": f"Python {platform.python_version()} stdlib .py sources, 1 file in {HELD_OUT_EVERY} held out",
        "training": {**log, "device": str(device), "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr,
                     "router_aux_loss_coef": args.balance_loss},
        "prompt": f"held-out {held_path.name}, its first {args.prompt_tokens} tokens",
        "decode": f"the next {args.decode_steps} tokens of that file fed one per decode step (teacher forcing)",
        "store": "packed unquantized (16-bit experts and attention)",
        "recorded": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    trace = record_trace(store, held_ids, args, made_by)
    path = args.trace or args.out / "routing.trace.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    trace.write(path)
    rows = locality(trace)
    print(f"trace: {path} ({path.stat().st_size / 1e3:.0f} kB, {trace.prompt_tokens} prompt tokens, "
          f"{trace.decode_steps} decode steps)")
    print(render_locality(trace))
    mean_reuse = sum(r.reuse for r in rows) / len(rows)
    print(f"mean reuse {mean_reuse:.2f} against {rows[0].random_reuse:.2f} for independent routing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
