"""Pictures of a model at work: one self-contained HTML page about one prompt.

    tinygen explain --model RUN_DIR --prompt "def add(a, b):" --out page.html

The page shows, for the prompt:
- its BPE tokens;
- the loss of each token (how surprised the model is by it, given the ones before);
- at each position, the top-5 next tokens with their probabilities;
- the logit lens: what the residual stream after each layer would predict if
  it went straight through ln_f and the tied head (the last layer's row is the
  model's real prediction);
- for each layer and head, the attention probabilities as a heatmap
  (row = query position, column = key position; only the past is coloured).

Inline SVG and CSS only: no script, no font, no image, nothing fetched from
anywhere. `trace` is the only function that looks inside the model (the
forward's caches); the rest draws arrays. Works on every run directory:
pretrained, fine-tuned by every method (prompt tuning's virtual tokens show
in the heatmaps as v0, v1, ...), and a Hugging Face GPT-2 checkpoint.

Shapes: T prompt tokens, n virtual prompt tokens, V vocabulary, H heads, L layers.
"""
import dataclasses
import html
import math
import os
from typing import NamedTuple

import numpy as np

from .attention import attention_probs
from .errors import TinygenError
from .gpt import GPT
from .model import gpt_forward
from .plumbing.fileio import atomic_write_text
from .runs import load_tokenizer


class Trace(NamedTuple):
    attention: list  # per layer, (H, n + T, n + T) attention probabilities (zeros in the future)
    lens: list  # per layer, (T, V) next-token probabilities from that layer's residual stream
    virtual: int  # n, virtual prompt tokens in front (prompt tuning), else 0


def trace(model, ids) -> Trace:
    """Run the model (a tinygen.gpt.GPT, with whatever parts it carries) on one sequence and
    collect what the page shows.

    Reads each block's attention part cache, cache.blocks[i].attn, whose
    .attn is the AttentionCache the probabilities come from (attention_probs),
    and cache.extra, the virtual tokens the embed part put in front. The
    logit lens of layer l is the logits of the model cut after its first l
    blocks (gpt_forward with n_layer = l), which is exactly
    ln_f(residual after block l) @ wte^T.
    """
    idx = np.asarray(ids, dtype=np.int64)[None, :]  # (1, T)
    logits, cache = gpt_forward(model.params, idx, model.config, model.parts)
    attention = [attention_probs(block.attn.attn)[0].astype(np.float64) for block in cache.blocks]  # (H, n+T, n+T)
    lens = []
    for layer in range(1, model.config.n_layer):
        cut = dataclasses.replace(model.config, n_layer=layer)
        lens.append(gpt_forward(model.params, idx, cut, model.parts)[0][0])  # (T, V)
    lens.append(logits[0])
    return Trace(attention, [softmax64(z) for z in lens], cache.extra)


def softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def load(run_dir, adapter=None, base=None):
    """(model, tokenizer) of any run directory: pretrained, fine-tuned by any method, a GPT-2
    checkpoint or a PEFT adapter directory (tinygen.runs, as `tinygen sample` loads them),
    with an optional adapter on it and the base's new place if it moved."""
    model = GPT.from_pretrained(run_dir, adapter=adapter, base=base)
    return model, load_tokenizer(run_dir, adapter=adapter, base=base)


def encode_prompt(tokenizer, model, text):
    if not text:
        raise TinygenError("--prompt is empty: give the text to explain")
    ids = tokenizer.encode(text, allowed_special="all")
    virtual = model.n_prefix  # positions the embed part puts in front (prompt tuning's virtual tokens)
    if len(ids) + virtual > model.config.block_size:
        raise TinygenError(f"--prompt is {len(ids)} tokens; the model sees at most {model.config.block_size - virtual}")
    if max(ids) >= model.config.vocab_size:
        raise TinygenError(f"the tokenizer's id {max(ids)} is outside the model's vocabulary of "
                           f"{model.config.vocab_size}: are the model and tokenizer from the same run?")
    return ids


def show(tokenizer, i) -> str:
    """A token as visible text: spaces as ␣, newlines as ↵, tabs as ⇥, bad UTF-8 as \\xNN."""
    text = tokenizer.decode_bytes([i]).decode("utf-8", errors="backslashreplace")
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") or "∅"


# ---------------------------------------------------------------- the page
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.tok { display: inline-block; font-family: monospace; border: 1px solid #99b; border-radius: 3px;
       padding: 1px 4px; margin: 2px; background: #eef; }
.tok small { color: #669; margin-left: 3px; }
table { border-collapse: collapse; font-family: monospace; font-size: 12px; }
td, th { border: 1px solid #ddd; padding: 2px 5px; white-space: nowrap; }
th { background: #f4f4f4; }
.heads { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figcaption { font-size: 12px; text-align: center; }
svg text { font-family: monospace; font-size: 9px; fill: #333; }
.note { color: #555; max-width: 60em; }
"""


def cell_color(p):
    """White to blue as the probability goes from 0 to 1."""
    return f"rgba(40, 90, 200, {0.08 + 0.85 * float(p):.3f})" if p > 0 else "#fff"


def token_strip(tokenizer, ids):
    chips = "".join(f'<span class="tok" title="id {i}">{html.escape(show(tokenizer, i))}<small>{i}</small></span>'
                    for i in ids)
    return f'<p class="tokens">{chips}</p>'


def loss_chart(tokenizer, ids, probs):
    """One bar per prompt token after the first: -log p(token | the tokens before it)."""
    losses = [-math.log(max(float(probs[t, ids[t + 1]]), 1e-300)) for t in range(len(ids) - 1)]
    if not losses:
        return '<p class="note">One token: nothing before it to predict it from.</p>', []
    top, w, h = max(max(losses), 1e-9), 44, 154  # bars of up to 110 px standing on y = 132
    bars = []
    for t, value in enumerate(losses):
        bh = 110 * value / top
        label = html.escape(show(tokenizer, ids[t + 1])[:6])
        bars.append(f'<rect class="loss" data-loss="{value:.6f}" x="{t * w + 4}" y="{132 - bh:.1f}" width="{w - 8}" '
                    f'height="{bh:.1f}" fill="#c55"><title>{label}: {value:.3f} nats</title></rect>'
                    f'<text x="{t * w + 4}" y="146">{label}</text><text x="{t * w + 4}" y="{128 - bh:.1f}">{value:.2f}</text>')
    mean = sum(losses) / len(losses)
    svg = f'<svg class="losses" width="{len(losses) * w + 10}" height="{h}" role="img">{"".join(bars)}</svg>'
    return f'<p class="note">Mean {mean:.3f} nats per token (ln V = {math.log(probs.shape[1]):.3f} is a uniform guess).</p>' + svg, losses


def top5_table(tokenizer, ids, probs, k=5):
    rows = ["<tr><th>pos</th><th>token</th>" + "".join(f"<th>#{j + 1}</th>" for j in range(k)) + "</tr>"]
    for t, i in enumerate(ids):
        best = np.argsort(-probs[t], kind="stable")[:k]
        cells = "".join(f'<td class="p" data-prob="{probs[t, j]:.6f}" style="background:{cell_color(probs[t, j])}">'
                        f'{html.escape(show(tokenizer, j))} {probs[t, j]:.3f}</td>' for j in best)
        rows.append(f'<tr class="top5"><td>{t}</td><td>{html.escape(show(tokenizer, i))}</td>{cells}</tr>')
    return f'<table class="top5">{"".join(rows)}</table>'


def lens_table(tokenizer, ids, lens):
    rows = ["<tr><th>after</th>" + "".join(f"<th>{html.escape(show(tokenizer, i))}</th>" for i in ids) + "</tr>"]
    for layer, probs in enumerate(lens):
        cells = []
        for t in range(len(ids)):
            j = int(np.argmax(probs[t]))
            cells.append(f'<td data-prob="{probs[t, j]:.6f}" style="background:{cell_color(probs[t, j])}">'
                         f'{html.escape(show(tokenizer, j))} {probs[t, j]:.2f}</td>')
        rows.append(f'<tr class="lens"><th>layer {layer}</th>{"".join(cells)}</tr>')
    return f'<table class="lens">{"".join(rows)}</table>'


def heatmap(att, labels, layer, head, cell=14):
    """(N, N) probabilities as an SVG: row = query, column = key; cells below 0.005 are left white."""
    N = att.shape[0]
    pad = 8 + 7 * min(max(map(len, labels), default=1), 8)
    size = pad + N * cell
    parts = [f'<svg class="heatmap" data-layer="{layer}" data-head="{head}" width="{size}" height="{size}" role="img">',
             f'<rect x="{pad}" y="0" width="{N * cell}" height="{N * cell}" fill="#fff" stroke="#ccc"/>']
    for q in range(N):
        for k in range(q + 1):
            p = att[q, k]
            if p >= 0.005:
                parts.append(f'<rect x="{pad + k * cell}" y="{q * cell}" width="{cell}" height="{cell}" '
                             f'fill="rgb(40,90,200)" fill-opacity="{p:.3f}"/>')
    step = max(1, N // 24)
    for i in range(0, N, step):
        text = html.escape(labels[i][:8])
        parts.append(f'<text x="{pad - 3}" y="{i * cell + cell - 3}" text-anchor="end">{text}</text>')
        parts.append(f'<text transform="translate({pad + i * cell + cell - 4},{N * cell + 4}) rotate(90)">{text}</text>')
    parts.append("</svg>")
    return "".join(parts)


def page(model, tokenizer, text, title="tinygen explain") -> str:
    """The whole HTML page for one prompt, as a string."""
    ids = encode_prompt(tokenizer, model, text)
    tr = trace(model, ids)
    final = tr.lens[-1]  # (T, V) the model's own next-token probabilities
    labels = [f"v{j}" for j in range(tr.virtual)] + [show(tokenizer, i) for i in ids]
    loss_html, _ = loss_chart(tokenizer, ids, final)
    c = model.config
    maps = []
    for layer, att in enumerate(tr.attention):
        figures = "".join(f"<figure>{heatmap(att[h], labels, layer, h)}<figcaption>layer {layer}, head {h}</figcaption></figure>"
                          for h in range(att.shape[0]))
        maps.append(f'<h3>layer {layer}</h3><div class="heads">{figures}</div>')
    virtual = f", {tr.virtual} virtual prompt tokens (v0, v1, ... in the heatmaps)" if tr.virtual else ""
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, vocabulary {c.vocab_size}, '
        f"context {c.block_size}{virtual}. Prompt: {len(ids)} tokens.</p>",
        "<h2>The prompt as BPE tokens</h2>", token_strip(tokenizer, ids),
        "<h2>Loss of each token</h2>", loss_html,
        "<h2>Top-5 next tokens at each position</h2>", top5_table(tokenizer, ids, final),
        "<h2>Logit lens</h2>",
        '<p class="note">The residual stream after each layer, sent through ln_f and the tied head: the most '
        "likely next token and its probability. The last row is the model's prediction.</p>",
        lens_table(tokenizer, ids, tr.lens),
        "<h2>Attention</h2>",
        '<p class="note">Row = the position that attends, column = the position it attends to; darker = more '
        "probability. Causal: nothing right of the diagonal.</p>",
        *maps,
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def explain(run_dir, text, out, adapter=None, base=None) -> str:
    """Write the page for `text` on the model of `run_dir` (with `adapter` on it) to `out`; returns out."""
    model, tokenizer = load(run_dir, adapter, base)
    atomic_write_text(out, page(model, tokenizer, text, f"tinygen explain: {os.path.basename(os.path.normpath(run_dir))}"))
    return out
