"""Incremental decoding with a static KV cache: greedy or temperature / top-k / top-p sampling.

`generate` is a Python generator that yields the next token of every sequence, one step at a time,
so callers can stream. It works for the plain `CausalLM` and for `LayerRoute` (router.py), which
both provide `hidden(input_ids, attention_mask, position_ids, cache)`, `lm_head` and
`new_cache(max_len)`: LayerRoute decides its gates once at prefill and then never computes, nor
caches, a skipped block.

Prompts of different lengths are left-padded; positions are then counted over real tokens only
(cumsum of the mask), so a padded prompt decodes like the same prompt alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax when temperature is 0, else filtered sampling.

    Any temperature > 0 works: the logits are shifted to a maximum of 0 and divided in float64, so a
    tiny one (1e-45) gives the argmax (ties shared) instead of inf / inf = NaN probabilities, and a
    huge one uniform.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.double()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    cache=None,
) -> Iterator[torch.Tensor]:
    """Yield (B,) next-token tensors until every row has emitted an eos id or max_new_tokens are
    done.

    Rows that have finished yield `pad_id`. Pass `cache` (from `model.new_cache`) to inspect it
    after.
    """
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = cache if cache is not None else model.new_cache(T + max_new_tokens)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    eos = torch.tensor(list(eos_ids), device=input_ids.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    ids, mask, pos = input_ids, attention_mask, positions
    for _ in range(max_new_tokens):
        h = model.hidden(ids, mask, pos, cache)[:, -1]  # (B, d)
        nxt = sample_next(model.lm_head(h), temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        yield nxt
        done = done | torch.isin(nxt, eos)
        if bool(done.all()):
            return
        ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        pos = pos[:, -1:] + 1


def generate_ids(model, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """All new tokens as one (B, n) tensor (n <= max_new_tokens)."""
    steps = list(generate(model, input_ids, max_new_tokens, **kwargs))
    return torch.stack(steps, dim=1) if steps else input_ids.new_empty(input_ids.shape[0], 0)


# ----------------------------------------------------------------------------- routed chat command


def chat_main(argv=None):
    """python -m minroute.evaluation.generate --ckpt RUN [--model ID] [--prompt TEXT] [--tools F]
    python -m minroute.evaluation.generate --model ID_OR_PATH --prompt TEXT  (the plain model)

    Streams the answer; after each turn prints the gate pattern (1 = block ran) and tokens/s.
    Without --prompt it is interactive (empty line or Ctrl-D quits). The chat is rendered with the
    model's own conventions (default system prompt, stop tokens) read from its tokenizer_config /
    generation_config. Every number is checked up front (any --temperature > 0 samples; a vanishing
    one is the argmax); text that is not UTF-8 (stdin, --prompt, --system, --tools) is refused by
    name.
    """
    import argparse
    import json
    import sys
    import time

    from minroute.run.chat import render
    from minroute.run.checkpoint import load_layerroute
    from minroute.run.load import load_tokenizer
    from minroute.run.safety import (
        ArgumentParser,
        UserError,
        default_device,
        device,
        fraction,
        nonneg_float,
        nonneg_int,
        positive_int,
    )

    ap = ArgumentParser(
        prog="python -m minroute.evaluation.generate",
        description=chat_main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--ckpt", help="train.py run folder or ckpt-* folder (omit it to chat with --model alone)"
    )
    ap.add_argument("--which", choices=["latest", "best"], default="latest")
    ap.add_argument("--model", help="base model (default: the one the checkpoint was trained on)")
    ap.add_argument("--prompt", help="one user turn, then exit")
    ap.add_argument("--tools", help="JSON file with a list of tool schemas for the system turn")
    ap.add_argument(
        "--system", help="system prompt (default: the model's own, from its chat template)"
    )
    ap.add_argument("--max-new-tokens", type=positive_int, default=256)
    ap.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=fraction, default=1.0)
    ap.add_argument("--top-k", type=nonneg_int, default=0)
    ap.add_argument("--all-open", action="store_true", help="ignore the routers: run every block")
    ap.add_argument("--device", type=device, default=default_device(), help="cpu, cuda or cuda:N")
    a = ap.parse_args(argv)
    if not a.ckpt and not a.model:
        ap.error(
            "pass --ckpt RUN_DIR (a trained LayerRoute run) or --model ID_OR_PATH (the plain model)"
        )
    for name in ("prompt", "system"):
        if getattr(a, name) is not None:
            utf8_text(getattr(a, name), f"--{name}")
    tools = None
    if a.tools:  # checked before the model is loaded
        try:
            tools = json.loads(Path(a.tools).read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"--tools {a.tools}: cannot read it ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--tools {a.tools}: not valid JSON ({e})") from None
        if not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise UserError(f"--tools {a.tools} must hold a JSON list of tool objects")
        utf8_text(json.dumps(tools, ensure_ascii=False), f"--tools {a.tools}")  # "\ud800" escapes
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if a.ckpt:
        route, meta = load_layerroute(a.ckpt, a.which, model=a.model, device=a.device, dtype=dtype)
    else:
        from minroute.core.router import LayerRoute
        from minroute.run.load import load_model

        route = LayerRoute(load_model(a.model, dtype=dtype, device=a.device)).eval()
        a.all_open, meta = True, {"args": {"model": a.model}}  # untrained routers: every block runs
    tok = load_tokenizer(a.model or meta["args"]["model"])
    L = route.config.num_hidden_layers
    context = route.config.max_position_embeddings
    messages = [{"role": "system", "content": a.system}] if a.system else []
    gen = torch.Generator(device=a.device).manual_seed(0)

    def turn(user: str):
        messages.append({"role": "user", "content": user})
        ids = torch.tensor(
            [
                tok.tokenizer.encode(
                    render(messages, tools, add_generation_prompt=True, fmt=tok.chat),
                    add_special_tokens=False,
                ).ids
            ],
            device=a.device,
        )
        if ids.shape[1] >= context:
            raise UserError(
                f"the conversation is {ids.shape[1]} tokens, the model's context is {context}"
            )
        room = context - ids.shape[1]
        if a.max_new_tokens > room:
            print(
                f"[note: --max-new-tokens {a.max_new_tokens} capped at {room}, the context left]",
                flush=True,
            )
        out, shown, t0 = [], "", time.perf_counter()
        with route.forcing(torch.ones(L, dtype=torch.bool) if a.all_open else None):
            for nxt in generate(
                route,
                ids,
                min(a.max_new_tokens, room),
                eos_ids=tok.eos_ids,
                pad_id=tok.pad_id,
                temperature=a.temperature,
                top_k=a.top_k,
                top_p=a.top_p,
                generator=gen,
            ):
                t = int(nxt[0])
                if t in tok.eos_ids:
                    break
                out.append(t)
                text = tok.tokenizer.decode(out, skip_special_tokens=False)
                print(text[len(shown) :], end="", flush=True)
                shown = text
        dt = time.perf_counter() - t0
        gates = route.last.hard[0]
        pattern = "".join("1" if g else "0" for g in gates.tolist())
        print(
            f"\n[gates {pattern} | {int(gates.sum())}/{L} blocks ran | {len(out)} tokens in"
            f" {dt:.2f}s = {len(out) / max(dt, 1e-9):.1f} tok/s]",
            flush=True,
        )
        messages.append({"role": "assistant", "content": shown})

    if a.prompt is not None:
        turn(a.prompt)
        return 0
    # bytes, so that what is not UTF-8 is named, whatever the locale
    for n, raw in enumerate(sys.stdin.buffer, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"stdin line {n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte"
                f" {e.start + 1}); send UTF-8 text"
            ) from None
        if not line.strip():
            break
        turn(line.rstrip("\r\n"))
    return 0


def utf8_text(text: str, where: str) -> str:
    """Refuse text that cannot be UTF-8 (bytes a non-UTF-8 locale smuggled in as surrogates, lone
    surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        from minroute.run.safety import UserError

        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        raise UserError(
            f"{where}: not valid UTF-8 ({what} at character {e.start + 1}); pass UTF-8 text"
        ) from None
    return text


if __name__ == "__main__":
    from minroute.run.safety import run_cli

    raise SystemExit(run_cli(chat_main))
