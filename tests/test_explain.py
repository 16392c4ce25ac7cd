"""`tinygen explain`: the page's structure and numbers on every kind of run directory, and a real browser.

The structure checks always run: the HTML parses, there is one heatmap per
layer and head, each position's top-5 probabilities are the model's and sum
to at most 1, the logit lens agrees with an independent forward cut after
each layer, and nothing in the page points outside it. The browser test
renders the page in headless Chromium (skipped when it is not installed),
checks that the screenshot is not blank and that the page fetched nothing.
"""
import json
import math
import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pytest

from tinygen import GPT, GPTConfig
from tinygen.bug_checks import reference_logits
from tinygen.cli import main
from tinygen.explain import load, page, softmax64, trace
from tinygen.finetuning.finetune import FinetuneConfig, run as finetune
from tinygen.finetuning.tasks import Example, write_jsonl
from tinygen.parts import GPT2
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 10
PROMPT = "def add(a, b):\n    return"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def gpt2_files(tok, folder):
    """vocab.json + merges.txt in GPT-2's format (OpenAI's bytes_to_unicode)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:] + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    chars = dict(zip(bs, map(chr, cs)))
    show = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    vocab = {show(tok.id_to_bytes(i)): i for i in range(256 + len(tok.merges))}
    vocab[ENDOFTEXT] = tok.eot_id
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = ["#version: 0.2"] + [f"{show(a)} {show(b)}" for a, b in tok.merges]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{kind: run directory}: pretrained, fine-tuned by each method, and a Hugging Face GPT-2 checkpoint."""
    root = tmp_path_factory.mktemp("explain")
    tok = Tokenizer.train(TEXT, 280, pattern="gpt2", special_tokens=[ENDOFTEXT])
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config, seed=0)
    for p in model.params.values():
        if p.ndim == 2:
            p *= 10.0  # a random model with opinions: attention that is not uniform
    model.save_pretrained(root / "base")
    tok.save(root / "base" / "tokenizer.json")
    runs = {"pretrained": root / "base"}
    data = root / "tasks.jsonl"
    write_jsonl(data, [Example(f"{w}:", f" {w[::-1]}", "rev") for w in ("add", "point", "int", "class")])
    for method in ("full", "lora", "adapter", "prompt"):
        fc = FinetuneConfig(method=method, batch_size=4, max_steps=1, warmup_steps=0, eval_interval=1,
                            checkpoint_interval=1, eval_examples=1, n_virtual=3, lora_rank=2, adapter_size=4)
        finetune(root / "base", str(data), root / method, fc, progress=False, log=lambda m: None)
        runs[method] = root / method
    hf = root / "hf-gpt2"
    hf.mkdir()
    shutil.copyfile(root / "base" / "config.json", hf / "config.json")
    from tinygen.plumbing.safetensors import save_file
    tensors = {"transformer." + k: v for k, v in model.params.items()}
    tensors["lm_head.weight"] = model.params["wte.weight"]
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    gpt2_files(tok, hf)
    runs["hf-gpt2"] = hf
    return runs


class Page(HTMLParser):
    """What the structure checks read: heatmaps, top-5 rows, lens rows, loss bars, every attribute value."""

    def __init__(self):
        super().__init__()
        self.heatmaps, self.top5, self.lens, self.losses, self.attributes, self.tags = [], [], [], [], [], []
        self.row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attributes += [v or "" for v in a.values()]
        if tag == "svg" and a.get("class") == "heatmap":
            self.heatmaps.append((int(a["data-layer"]), int(a["data-head"])))
        if tag == "tr" and a.get("class") in ("top5", "lens"):
            self.row = []
            (self.top5 if a["class"] == "top5" else self.lens).append(self.row)
        if tag == "td" and self.row is not None and "data-prob" in a:
            self.row.append(float(a["data-prob"]))
        if tag == "rect" and a.get("class") == "loss":
            self.losses.append(float(a["data-loss"]))


def parse(text):
    p = Page()
    p.feed(text)
    p.close()
    return p


@pytest.mark.parametrize("kind", ["pretrained", "full", "lora", "adapter", "prompt", "hf-gpt2"])
def test_page_structure_on_every_run_kind(runs, kind):
    model, tok = load(runs[kind])
    text = page(model, tok, PROMPT)
    p = parse(text)
    ids = tok.encode(PROMPT)
    L, H = model.config.n_layer, model.config.n_head
    assert sorted(p.heatmaps) == [(i, h) for i in range(L) for h in range(H)]
    assert len(p.top5) == len(ids) and all(len(r) == 5 for r in p.top5)
    probs = softmax64(model.forward(np.array([ids]))[0])  # (T, V) the model's own predictions
    for t, row in enumerate(p.top5):
        assert all(0 <= q <= 1 for q in row) and sum(row) <= 1 + 1e-5
        np.testing.assert_allclose(row, np.sort(probs[t])[::-1][:5], atol=1e-6)
    assert len(p.lens) == L and all(len(r) == len(ids) for r in p.lens)
    want = [-math.log(probs[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    np.testing.assert_allclose(p.losses, want, rtol=1e-5)
    virtual = 3 if kind == "prompt" else 0
    assert (">v0<" in text) == bool(virtual)
    # a run of a method with parts of its own is loaded with them, and the trace sees them
    assert (model.parts != GPT2) == (kind in ("lora", "adapter", "prompt"))
    tr = trace(model, ids)
    assert tr.virtual == model.n_prefix == virtual
    assert [a.shape for a in tr.attention] == [(H, virtual + len(ids), virtual + len(ids))] * L
    assert text.count('fill="rgb(40,90,200)"') > 0
    # self-contained: no script, no external reference of any kind
    assert "script" not in p.tags and "img" not in p.tags and "link" not in p.tags
    assert "http:" not in text and "https:" not in text and "url(" not in text and "@import" not in text
    assert not any(v.startswith(("http", "//")) for v in p.attributes)


def test_trace_matches_an_independent_forward(runs):
    """Attention rows are distributions over the past; lens layer l = the textbook forward cut after l blocks."""
    model, tok = load(runs["pretrained"])
    model = GPT(replace(model.config, dtype="float64"), params=model.params)
    ids = tok.encode(PROMPT)
    tr = trace(model, ids)
    T = len(ids)
    for att in tr.attention:
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-12)
        assert not np.triu(att, 1).any()
    for layer, probs in enumerate(tr.lens, 1):
        cut = replace(model.config, n_layer=layer)
        want = softmax64(reference_logits(model.params, np.array([ids]), cut)[0])
        np.testing.assert_allclose(probs, want, atol=1e-10)
    assert len(tr.lens) == model.config.n_layer and tr.lens[0].shape == (T, model.config.vocab_size)


def test_cli_writes_the_page_and_rejects_bad_input(runs, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["explain", "--model", str(runs["lora"]), "--prompt", PROMPT, "--out", str(out)]) == 0
    assert parse(out.read_text()).heatmaps
    assert main(["explain", "--model", str(runs["lora"]), "--prompt", "", "--out", str(out)]) == 2
    assert main(["explain", "--model", str(runs["lora"]), "--prompt", "x" * 500, "--out", str(out)]) == 2
    assert main(["explain", "--model", str(tmp_path / "nope"), "--prompt", "a", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("tinygen explain: error:") == 3 and "Traceback" not in err


# ---------------------------------------------------------------- a real browser
def png_pixels(path):
    """(height, width, channels) uint8 pixels of an 8-bit, non-interlaced RGB or RGBA PNG."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    assert depth == 8 and color in (2, 6) and interlace == 0
    c = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c)
    out = np.zeros((h, w * c), np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        up = out[y - 1] if y else np.zeros(w * c, np.int32)
        if f == 0:
            out[y] = line
        elif f == 2:
            out[y] = (line + up) % 256
        else:  # filters 1, 3, 4 depend on the left neighbour: byte by byte
            row = np.zeros(w * c, np.int32)
            for i in range(w * c):
                a = row[i - c] if i >= c else 0
                b, d = up[i], (up[i - c] if i >= c else 0)
                if f == 1:
                    pred = a
                elif f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - d
                    pred = min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - d), 2, d))[2]
                row[i] = (line[i] + pred) % 256
            out[y] = row
    return out.reshape(h, w, c).astype(np.uint8)


def render(html_path, tmp_path):
    """Screenshot an HTML file in headless Chromium, every host unresolvable, with a net log.
    Returns (pixels, [URLs the page asked for])."""
    shot, netlog = tmp_path / "shot.png", tmp_path / "net.json"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
           f"--log-net-log={netlog}", "--window-size=1000,2400", f"--screenshot={shot}", f"file://{html_path}"]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    # the browser's own background requests carry no page origin ("not an origin"); the page's do
    jobs = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    asked = [j["url"] for j in jobs if "url" in j and j.get("initiator") != "not an origin"
             and not j["url"].startswith(("file:", "data:"))]
    return png_pixels(shot), asked


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium_and_fetches_nothing(runs, tmp_path):
    model, tok = load(runs["prompt"])
    path = tmp_path / "page.html"
    path.write_text(page(model, tok, PROMPT), encoding="utf-8")
    pixels, asked = render(path, tmp_path / "a")
    assert asked == []
    rgb = pixels[..., :3].astype(int)
    inked = (rgb.sum(-1) < 720).mean()  # not (nearly) white
    blue = ((rgb[..., 2] - rgb[..., 0]) > 60).mean()  # the heatmaps' and tables' blue
    assert inked > 0.02 and blue > 0.0005, (inked, blue)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20
    if os.environ.get("TINYGEN_KEEP_SCREENSHOT"):
        shutil.copyfile(tmp_path / "a" / "shot.png", os.environ["TINYGEN_KEEP_SCREENSHOT"])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_fetch_check_sees_a_page_that_fetches(tmp_path):
    """The control: a page with an external image is caught by the same net-log check."""
    path = tmp_path / "fetching.html"
    path.write_text('<!DOCTYPE html><html><body><p>x</p><img src="http://tinygen-test.invalid/a.png"></body></html>')
    _, asked = render(path, tmp_path / "b")
    assert asked == ["http://tinygen-test.invalid/a.png"]


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_cli_explains_a_peft_adapter_over_its_base(runs, tmp_path, method):
    """The run's PEFT files alone (as peft writes them), put on the base with --adapter: the same
    page as the tinygen run itself, since both hold the same weights."""
    from tinygen.plumbing.rundir import PEFT_CONFIG, PEFT_WEIGHTS

    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        shutil.copyfile(runs[method] / name, peft_dir / name)
    via_peft, via_run = tmp_path / "peft.html", tmp_path / "run.html"
    assert main(["explain", "--model", str(runs["pretrained"]), "--adapter", str(peft_dir), "--prompt", PROMPT,
                 "--out", str(via_peft)]) == 0
    assert main(["explain", "--model", str(runs[method]), "--prompt", PROMPT, "--out", str(via_run)]) == 0
    a, b = parse(via_peft.read_text()), parse(via_run.read_text())
    assert a.heatmaps == b.heatmaps and np.allclose(a.losses, b.losses, atol=1e-5)
