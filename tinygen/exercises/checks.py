"""One check per exercise: the learner's functions against tinygen's, in float64.

Each `check_NAME(m)` gets the learner's module and raises grading.Mismatch
at the first disagreement, in this order: forward values, backward against
tinygen's backward, backward against finite differences of the learner's
own forward, then properties (causality, roundtrips) on drawn sizes. The
tensor names are the stub docstrings' names. Calls into tinygen's model go
through `tinygen_block` and `tinygen_ends` only.
"""
import numpy as np

from .. import attention, layers, loss, model, optim, sampling
from ..config import GPTConfig
from ..parts import GPT2, make_context
from ..tokenizer import bpe
from .grading import Mismatch, expect, expect_equal, finite_differences, grads_tuple, property_holds

BLOCK_NAMES = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")
TEXT = (b"the cat sat on the mat; the hat is on the cat. that is that: a bat, a rat, a cat and a hat "
        b"sat at the mat and ate. aaaa abab bbbb")


def rng_for(name):
    return np.random.default_rng(sum(map(ord, name)))


# ---------------------------------------------------------------- layers
def check_linear(m):
    rng = rng_for("linear")
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    out, cache = m.linear_forward(x, w, b)
    want, tcache = layers.linear_forward(x, w, b)
    expect("out", out, want, "out = x @ w + b")
    dout = rng.standard_normal(want.shape)
    got = grads_tuple(m.linear_backward(dout, cache), 3, "linear_backward")
    hints = {"dx": "dx = dout @ w.T, with x's shape",
             "dw": "dw = x.T @ dout with both flattened to (M, C_in), (M, N)",
             "db": "b is added to every row: db is dout summed over every leading dimension (not averaged)"}
    for name, g, t in zip(hints, got, layers.linear_backward(dout, tcache)):
        expect(name, g, t, hints[name])
    finite_differences(m.linear_forward, m.linear_backward, [x, w, b], "x w b")


def check_embedding(m):
    rng = rng_for("embedding")
    ids = np.array([[1, 3, 1, 0], [3, 3, 5, 1]])  # repeated ids, and rows 2 and 4 never read
    w = rng.standard_normal((6, 3))
    out, cache = m.embedding_forward(ids, w)
    want, tcache = layers.embedding_forward(ids, w)
    expect("out", out, want, "out = w[ids]")
    dout = rng.standard_normal(want.shape)
    (dw,) = grads_tuple(m.embedding_backward(dout, cache), 1, "embedding_backward")
    expect("dw", dw, layers.embedding_backward(dout, tcache)[0],
           "a repeated id must add up all its rows: np.add.at(dw, ids, dout), not dw[ids] += dout")
    finite_differences(m.embedding_forward, m.embedding_backward, [ids, w], "w")


def check_layernorm(m):
    rng = rng_for("layernorm")
    x, w, b = rng.standard_normal((2, 3, 5)), 1 + rng.standard_normal(5), rng.standard_normal(5)
    out, cache = m.layernorm_forward(x, w, b)
    want, tcache = layers.layernorm_forward(x, w, b)
    expect("out", out, want, "the biased variance (divide by C), eps inside the square root")
    dout = rng.standard_normal(want.shape)
    got = grads_tuple(m.layernorm_backward(dout, cache), 3, "layernorm_backward")
    hints = {"dx": "dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * w: both means matter",
             "dw": "dw = sum of dout * xhat over every leading dimension", "db": "db = dout summed over every leading dimension"}
    for name, g, t in zip(hints, got, layers.layernorm_backward(dout, tcache)):
        expect(name, g, t, hints[name])
    finite_differences(m.layernorm_forward, m.layernorm_backward, [x, w, b], "x w b")


def check_gelu(m):
    x = np.linspace(-5.0, 5.0, 41).reshape(1, 41) * np.array([[1.0], [0.5]])  # (2, 41)
    out, cache = m.gelu_forward(x)
    want, tcache = layers.gelu_forward(x)
    expect("out", out, want, "GPT-2's tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), not erf")
    dout = np.random.default_rng(0).standard_normal(x.shape)
    (dx,) = grads_tuple(m.gelu_backward(dout, cache), 1, "gelu_backward")
    expect("dx", dx, layers.gelu_backward(dout, tcache)[0], "the product rule: d/dx [0.5 x (1 + tanh(u))]")
    finite_differences(m.gelu_forward, m.gelu_backward, [x], "x")


def check_dropout(m):
    rng = rng_for("dropout")
    x, p = rng.standard_normal((3, 4)), 0.25
    keep = rng.random((3, 4)) >= p
    out, cache = m.dropout_forward(x, keep, p)
    want, tcache = layers.dropout_forward(x, mask=keep * (1.0 / (1.0 - p)))
    expect("out", out, want, "inverted dropout divides the kept values by 1 - p, so E[out] = x")
    dout = rng.standard_normal(x.shape)
    (dx,) = grads_tuple(m.dropout_backward(dout, cache), 1, "dropout_backward")
    expect("dx", dx, layers.dropout_backward(dout, tcache)[0], "dx = dout * mask, the same mask as the forward")
    finite_differences(m.dropout_forward, m.dropout_backward, [x, keep, p], "x")


# ---------------------------------------------------------------- attention
def check_attention(m):
    rng = rng_for("attention")
    x = rng.standard_normal((3, 5))
    expect("softmax", m.softmax(x), layers.softmax(x.copy()), "exp(x - max) / sum(exp(x - max)) over the last axis")
    big = 1000.0 * x
    expect("softmax (inputs of 1e3)", m.softmax(big), layers.softmax(big.copy()),
           "exp(1000) is inf: subtract each row's max before exp")
    qkv, H = rng.standard_normal((2, 5, 3 * 6)), 2
    y, cache = m.causal_attention_forward(qkv, H)
    want, tcache = attention.causal_attention_forward(qkv, H)
    expect("y", y, want, "scores q k^T / sqrt(D), -inf above the diagonal (the future), softmax over the keys")
    dy = rng.standard_normal(want.shape)
    (dqkv,) = grads_tuple(m.causal_attention_backward(dy, cache), 1, "causal_attention_backward")
    expect("dqkv", dqkv, attention.causal_attention_backward(dy, tcache)[0],
           "the softmax backward att * (datt - sum(datt * att)), and the 1/sqrt(D) on dq and dk")
    finite_differences(m.causal_attention_forward, m.causal_attention_backward, [qkv], "qkv", {"n_head": H})

    def causal(rng, B, T, H, D):  # y at positions <= t never depends on positions > t
        qkv = rng.standard_normal((B, T, 3 * H * D))
        t = int(rng.integers(T))
        other = qkv.copy()
        other[:, t + 1:] = rng.standard_normal(other[:, t + 1:].shape)
        a, b = m.causal_attention_forward(qkv, H)[0], m.causal_attention_forward(other, H)[0]
        expect("y (causality)", np.asarray(b)[:, :t + 1], np.asarray(a)[:, :t + 1])

    property_holds(causal, "position t saw a later position: mask every key j > t with -inf",
                   B=(1, 2), T=(1, 6), H=(1, 3), D=(1, 4))


def check_cross_entropy(m):
    rng = rng_for("cross_entropy")
    logits = 3.0 * rng.standard_normal((2, 4, 7))
    targets = rng.integers(0, 7, (2, 4))
    targets[1, 2] = -1
    value, cache = m.cross_entropy_forward(logits, targets)
    want, tcache = loss.cross_entropy_forward(logits, targets)
    expect("loss", value, want, "the mean over counted positions (targets != -1) of logsumexp - the target's logit")
    (dlogits,) = grads_tuple(m.cross_entropy_backward(1.0, cache), 1, "cross_entropy_backward")
    expect("dlogits", dlogits, loss.cross_entropy_backward(1.0, tcache)[0],
           "(probs - onehot) / n at counted positions, 0 at ignored ones: the loss is a mean, so divide by n")
    big = 1000.0 * logits
    expect("loss (logits of 1e3)", m.cross_entropy_forward(big, targets)[0], loss.cross_entropy_forward(big, targets)[0],
           "logsumexp(z) = m + log(sum(exp(z - m))) with m the row max")
    finite_differences(lambda z, t: m.cross_entropy_forward(z, t), lambda d, c: m.cross_entropy_backward(d, c),
                       [logits, targets], "logits")


# ---------------------------------------------------------------- the model's parts
def tinygen_block(x, p, n_head):
    """tinygen's block 0 (plain GPT-2 parts, no dropout) on the learner's parameter names:
    (out, backward(dout) -> (dx, grads))."""
    B, T, C = x.shape
    config = GPTConfig(vocab_size=5, block_size=T, n_layer=1, n_head=n_head, n_embd=C, dtype="float64")
    params = {"h.0." + k: v for k, v in p.items()}
    out, cache = model.block_forward(x, params, 0, make_context(config, GPT2))

    def backward(dout):
        dx, g = model.block_backward(dout, cache)
        return dx, {k: g["h.0." + k] for k in p}

    return out, backward


def check_block(m):
    rng = rng_for("block")
    B, T, C, H = 2, 5, 8, 2
    shapes = model.param_shapes(GPTConfig(vocab_size=5, block_size=T, n_layer=1, n_head=H, n_embd=C))
    p = {k: 0.5 * rng.standard_normal(shapes["h.0." + k]) for k in BLOCK_NAMES}
    for k in ("ln_1.weight", "ln_2.weight"):
        p[k] += 1.0
    x = rng.standard_normal((B, T, C))
    out, cache = m.block_forward(x, dict(p), H)
    want, backward = tinygen_block(x, p, H)
    expect("out", out, want, "block_forward is given: exercises 1, 3, 4 and 6 must pass first")
    dout = rng.standard_normal(want.shape)
    got = m.block_backward(dout, cache)
    if not isinstance(got, (tuple, list)) or len(got) != 2 or not isinstance(got[1], dict):
        raise Mismatch("block_backward's return value", None, "expected (dx, grads) with grads a dict by name")
    dx, grads = got
    tdx, tgrads = backward(dout)
    expect("dx", dx, tdx, "dx = da + (the attention branch's part): the residual passes the gradient straight through")
    for k in BLOCK_NAMES:
        if k not in grads:
            raise Mismatch(f"grads[{k!r}]", None, "missing: return a gradient for every name of NAMES")
        expect(f"grads[{k!r}]", grads[k], tgrads[k], "call each backward with its own cache field, in reverse order")

    def forward(x, *weights):
        return m.block_forward(x, dict(zip(BLOCK_NAMES, weights)), H)

    def block_backward(dout, cache):
        dx, g = m.block_backward(dout, cache)
        return (dx, *(g[k] for k in BLOCK_NAMES))

    finite_differences(forward, block_backward, [x, *p.values()], "x " + " ".join(BLOCK_NAMES))


def tinygen_ends(idx, wte, wpe, w, b):
    """tinygen's GPT-2 with one block whose two branches output 0 (c_proj weights and biases zero),
    so it computes ln_f(wte[idx] + wpe) @ wte^T: (logits, backward(dlogits) -> (dwte, dwpe, dw, db))."""
    config = GPTConfig(vocab_size=wte.shape[0], block_size=wpe.shape[0], n_layer=1, n_head=1,
                       n_embd=wte.shape[1], dtype="float64")
    params = model.init_params(config, np.random.default_rng(0))
    for k in ("h.0.attn.c_proj.weight", "h.0.attn.c_proj.bias", "h.0.mlp.c_proj.weight", "h.0.mlp.c_proj.bias"):
        params[k][...] = 0.0
    params.update({"wte.weight": wte, "wpe.weight": wpe, "ln_f.weight": w, "ln_f.bias": b})
    logits, cache = model.gpt_forward(params, idx, config, GPT2)

    def backward(dlogits):
        g = model.gpt_backward(dlogits, cache)
        return g["wte.weight"], g["wpe.weight"], g["ln_f.weight"], g["ln_f.bias"]

    return logits, backward


def check_embed_and_head(m):
    rng = rng_for("embed_and_head")
    V, T_max, C = 7, 8, 6
    idx = np.array([[1, 4, 1, 0, 6], [4, 4, 2, 1, 3]])
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((T_max, C))
    w, b = 1 + rng.standard_normal(C), rng.standard_normal(C)
    logits, cache = m.ends_forward(idx, wte, wpe, w, b)
    want, backward = tinygen_ends(idx, wte, wpe, w, b)
    expect("logits", logits, want, "ends_forward is given: exercise 3 (layer norm) must pass first")
    dlogits = rng.standard_normal(want.shape)
    got = grads_tuple(m.ends_backward(dlogits, cache), 4, "ends_backward")
    hints = {"dwte": "wte is used twice: the head's dlogits^T @ h PLUS the lookup's scatter-add of dx",
             "dwpe": "every sequence uses wpe[0..T-1]: sum dx over the batch (not the mean); rows past T get 0",
             "dln_f_weight": "ln_f's dw: sum of dh * xhat", "dln_f_bias": "ln_f's db: dh summed"}
    for name, g, t in zip(hints, got, backward(dlogits)):
        expect(name, g, t, hints[name])
    finite_differences(m.ends_forward, m.ends_backward, [idx, wte, wpe, w, b], "wte wpe ln_f_weight ln_f_bias")


# ---------------------------------------------------------------- the optimizer
def check_adamw(m):
    rng = rng_for("adamw")
    p0 = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(3)]
    hp = dict(lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    params = {"w": p0.copy()}
    opt = optim.AdamW(params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], weight_decay=hp["weight_decay"])
    p, mom, vel = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, 1):
        inputs = (p, g, mom, vel)
        copies = [a.copy() for a in inputs]
        p, mom, vel = grads_tuple(m.adamw_step(p, g, mom, vel, t, **hp), 3, "adamw_step")
        if not all(np.array_equal(a, c) for a, c in zip(inputs, copies)):
            raise Mismatch("p, g, m, v (modified)", None, "adamw_step returns new arrays and leaves its inputs alone")
        opt.step({"w": g})
        expect(f"p (step {t})", p, params["w"],
               "bias correction: mhat = m / (1 - beta1^t), vhat = v / (1 - beta2^t); decay p by (1 - lr wd) first")
        expect(f"m (step {t})", mom, opt.m.reshape(p0.shape), "m = beta1 m + (1 - beta1) g")
        expect(f"v (step {t})", vel, opt.v.reshape(p0.shape), "v = beta2 v + (1 - beta2) g^2")


# ---------------------------------------------------------------- the tokenizer
def _chunks(text):
    """{chunk: count} of a text split at spaces (the space kept with the next word)."""
    counts = {}
    for i, word in enumerate(text.split(b" ")):
        chunk = word if i == 0 else b" " + word
        counts[chunk] = counts.get(chunk, 0) + 1
    return counts


def _merge_word(word, pair, new):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _merges_agree(m, chunk_counts, n):
    merges, _ = bpe.train_merges(chunk_counts, 256 + n)
    words = {tuple(c): k for c, k in chunk_counts.items()}
    for i, want in enumerate(merges):
        before = dict(words)
        got = m.merge_step(words, 256 + i)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Mismatch("merge_step's return value", None, "expected (pair, new words)")
        pair, new = got
        expect_equal(f"pair (merge {i + 1})", tuple(pair) if isinstance(pair, (tuple, list)) else pair, want,
                     "count pairs weighted by each word's count; ties go to the smallest (left, right)")
        if words != before:
            raise Mismatch("words (modified)", None, "merge_step must not modify its input")
        expect_equal(f"words (merge {i + 1})", {tuple(w): k for w, k in dict(new).items()},
                     {_merge_word(w, want, 256 + i): k for w, k in words.items()},
                     "replace occurrences left to right without overlap: (a, a, a) -> (new, a)")
        words = new


def check_bpe_merge(m):
    _merges_agree(m, _chunks(TEXT), 8)

    def agrees(rng, n_words, length):
        counts = {}
        for _ in range(n_words):
            word = bytes(rng.choice(list(b"ab "), size=int(rng.integers(2, length + 1))))
            counts[word] = counts.get(word, 0) + int(rng.integers(1, 4))
        _merges_agree(m, counts, 3)

    property_holds(agrees, "", n_words=(1, 6), length=(2, 8))


def check_bpe_encode(m):
    _, token_bytes = bpe.train_merges(_chunks(TEXT), 330)
    ranks = {b: i for i, b in enumerate(token_bytes)}
    for piece in sorted(_chunks(TEXT))[:40] + [b" thathat", b"aaaaaaa", b"\xff\x00 cat"]:
        got = m.encode_chunk(piece, dict(ranks))
        expect_equal(f"ids of {piece!r}", list(got) if isinstance(got, (list, tuple)) else got,
                     bpe.encode_piece(piece, ranks),
                     "merge the adjacent pair of lowest rank, the leftmost first, until none is a token")

    def roundtrip(rng, length):
        piece = bytes(rng.choice(list(b"the cat"), size=length))
        ids = list(m.encode_chunk(piece, ranks))
        expect_equal("ids (roundtrip)", b"".join(token_bytes[i] for i in ids), piece,
                     "the tokens' bytes must spell the chunk again")
        expect_equal("ids", ids, bpe.encode_piece(piece, ranks), "lowest rank first, leftmost among equals")

    property_holds(roundtrip, "", length=(1, 30))


# ---------------------------------------------------------------- sampling
def check_top_p(m):
    rng = rng_for("top_p")
    logits = rng.standard_normal((4, 10))
    logits[1] = 0.0  # all tied
    logits[2, :4] = 2.0
    for p in (0.1, 0.5, 0.9, 1.0):
        got = m.top_p_filter(logits.copy(), p)
        expect(f"filtered logits (p={p})", got, sampling.top_p_filter(logits, p),
               "sort ascending (stable), cumulative softmax, drop where it is <= 1 - p, keep the last")

    def keeps_enough(rng, V, percent):
        p = percent / 100
        z = rng.standard_normal((1, V)) * 3
        got = np.asarray(m.top_p_filter(z.copy(), p), dtype=np.float64)
        kept = np.isfinite(got)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if not kept[0, z.argmax()] or probs[kept].sum() < p - 1e-12:
            raise Mismatch("filtered logits (kept mass)", None, "the kept tokens' probabilities must add up to >= p")
        expect("filtered logits", got, sampling.top_p_filter(z, p))

    property_holds(keeps_enough, "", V=(1, 12), percent=(1, 100))


def check_kv_step(m):
    rng = rng_for("kv_step")
    B, T, H, D = 2, 6, 2, 3
    qkv = rng.standard_normal((B, T, 3 * H * D))
    full, _ = attention.causal_attention_forward(qkv, H)  # (B, T, C): row n is what step n must give
    k_cache, v_cache = np.zeros((B, H, T + 2, D)), np.zeros((B, H, T + 2, D))
    for n in range(T):
        y = m.kv_attention_step(qkv[:, n].copy(), k_cache, v_cache, n, H)
        expect(f"y (position {n})", y, full[:, n],
               "write k, v at n first, then attend to positions 0..n (all of them: no mask), scores / sqrt(D)")
    _, k, v = attention.split_heads(qkv, H)
    expect("k_cache", k_cache[:, :, :T], k, "write the new key at k_cache[:, :, n]")
    expect("v_cache", v_cache[:, :, :T], v, "write the new value at v_cache[:, :, n]")


CHECKS = {
    "linear": check_linear, "embedding": check_embedding, "layernorm": check_layernorm, "gelu": check_gelu,
    "dropout": check_dropout, "attention": check_attention, "cross_entropy": check_cross_entropy,
    "block": check_block, "embed_and_head": check_embed_and_head, "adamw": check_adamw,
    "bpe_merge": check_bpe_merge, "bpe_encode": check_bpe_encode, "top_p": check_top_p, "kv_step": check_kv_step,
}
HINTS = {  # what to read when an exercise fails without a tensor (an exception, a wrong return value)
    "linear": "docs/layers.md, Linear", "embedding": "docs/layers.md, Embedding and position embedding", "layernorm": "docs/layers.md, Layer norm",
    "gelu": "docs/layers.md, GELU", "dropout": "docs/layers.md, Dropout", "attention": "docs/attention.md",
    "cross_entropy": "docs/layers.md, Softmax and cross-entropy", "block": "docs/one-step.md, the backward of a block",
    "embed_and_head": "docs/one-step.md, the backward of the whole model", "adamw": "docs/optimizer.md",
    "bpe_merge": "docs/tokenizer.md", "bpe_encode": "docs/tokenizer.md", "top_p": "docs/sampling.md",
    "kv_step": "docs/sampling.md",
}
