"""Training GPT-2 on fastattn against PyTorch: loss and gradients, AdamW, checkpoints, the train command.

A small random GPT-2 is built with transformers and saved locally. ``GPT2Model.loss_and_grads`` must give the loss
and the gradient of every tensor of ``GPT2LMHeadModel(...)(ids, labels=...).loss.backward()``: in float64 within
1e-9 relative per tensor, in float32 within 1e-4 of each tensor's norm, with and without padding, on every backend
that has the attention backward. Hugging Face's loss function rounds the logits to float32 before the
cross-entropy (``ForCausalLMLoss`` calls ``logits.float()``), so the float64 reference takes the same
cross-entropy of the float64 logits with ``torch.nn.functional.cross_entropy``; HF's own ``.loss`` is checked
too, at float32's precision.

Ten AdamW steps with clipping and the warm-up + cosine schedule follow ``torch.optim.AdamW`` within 1e-6
relative in float64. Bad input raises naming the argument and leaves the weights and the optimizer state as they
were. torch, transformers and safetensors are test-only peers: the module skips without them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKENDS

import fastattn.models
from fastattn.models import GPT2Model
from fastattn.optim import AdamW, clip_grad_norm, warmup_cosine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


TRAIN_BACKENDS = BACKENDS  # every backend has the backward kernels (tests/test_layout.py checks it)
VOCAB, POSITIONS, WIDTH, LAYERS, HEADS = 61, 24, 16, 2, 2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT-2 (2 layers x 16, vocabulary 61) saved by transformers, with non-trivial LayerNorm and biases."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=WIDTH, n_layer=LAYERS,
                                  n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("gpt2-train")
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def hf_model(path, dtype=torch.float64):
    model = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").to(dtype)
    return model.eval()  # no dropout (the config has none either)


def hf_loss_and_grads(model, ids, labels, mask):
    """The float64 reference: HF's forward, the shifted mean cross-entropy in the logits' dtype, its backward."""
    model.zero_grad()
    out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    lab = torch.tensor(ids if labels is None else labels)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), lab[:, 1:].reshape(-1),
                                             ignore_index=-100)  # fmt: skip
    loss.backward()
    grads = {name.removeprefix("transformer."): p.grad.numpy().copy() for name, p in model.named_parameters()}
    return loss.item(), grads


def batch(padded: bool):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (3, 13))
    if not padded:
        return ids, None, None
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding: the padded positions predict nothing (-100) and are never attended to
    mask[2, 4:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[0, 5] = -100  # and an ignored label in a full row
    return ids, labels, mask


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
def test_loss_and_grads_match_transformers(hf_dir, backend, dtype, padded):
    ids, labels, mask = batch(padded)
    want_loss, want = hf_loss_and_grads(hf_model(hf_dir), ids, labels, mask)
    model = fastattn.models.load(hf_dir, backend=backend, dtype=dtype)
    loss, grads = model.loss_and_grads(ids, labels, attention_mask=mask)
    assert set(grads) == set(want) == set(model.parameters())
    rel = 1e-9 if dtype == np.float64 else 1e-4
    assert abs(loss - want_loss) <= rel * abs(want_loss)
    for name, g in want.items():
        assert grads[name].shape == g.shape and grads[name].dtype == dtype, name
        err = np.linalg.norm(grads[name].astype(np.float64) - g)
        assert err <= rel * np.linalg.norm(g), f"{name}: relative error {err / np.linalg.norm(g):.2e}"


def test_loss_matches_hugging_face_loss_and_default_labels(hf_dir):
    """HF's own ``.loss`` (its cross-entropy in float32) and the default labels (= input_ids)."""
    ids, labels, mask = batch(True)
    model = fastattn.models.load(hf_dir, backend=TRAIN_BACKENDS[0], dtype=np.float64)
    hf = hf_model(hf_dir)
    with torch.no_grad():
        for lab, m in ((labels, mask), (None, None)):
            want = hf(torch.tensor(ids), attention_mask=None if m is None else torch.tensor(m),
                      labels=torch.tensor(ids if lab is None else lab)).loss.item()  # fmt: skip
            loss, _ = model.loss_and_grads(ids, lab, attention_mask=m)
            assert abs(loss - want) <= 1e-6 * want
    loss_1d, grads_1d = model.loss_and_grads(ids[0])
    loss_2d, grads_2d = model.loss_and_grads(ids[:1])
    assert loss_1d == loss_2d and all(np.array_equal(grads_1d[n], grads_2d[n]) for n in grads_1d)


def test_ten_adamw_steps_match_torch(hf_dir):
    """Ten steps of loss, backward, clip_grad_norm(0.5), warm-up + cosine lr, AdamW: losses and weights as torch's."""
    ids, labels, mask = batch(True)
    max_lr, warmup, total = 3e-2, 3, 10
    hf = hf_model(hf_dir)
    topt = torch.optim.AdamW(hf.parameters(), lr=max_lr, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        topt, lambda s: warmup_cosine(s, max_lr=max_lr, warmup_steps=warmup, total_steps=total) / max_lr
    )
    model = fastattn.models.load(hf_dir, backend=TRAIN_BACKENDS[0], dtype=np.float64)
    opt = AdamW(model.parameters(), lr=max_lr, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(total):
        want_loss, _ = hf_loss_and_grads(hf, ids, labels, mask)
        want_norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5).item()
        topt.step()
        sched.step()
        loss, grads = model.loss_and_grads(ids, labels, attention_mask=mask)
        norm = clip_grad_norm(grads, 0.5)
        opt.lr = warmup_cosine(step, max_lr=max_lr, warmup_steps=warmup, total_steps=total)
        opt.step(grads)
        assert abs(loss - want_loss) <= 1e-6 * want_loss, step
        assert abs(norm - want_norm) <= 1e-6 * want_norm, step
    params = model.parameters()
    for name, p in hf.named_parameters():
        mine = params[name.removeprefix("transformer.")]
        ref = p.detach().numpy()
        assert np.linalg.norm(mine - ref) <= 1e-6 * np.linalg.norm(ref), name


# ----------------------------------------------------------------------------------------------------------------
# The optimizer on its own (no model)
# ----------------------------------------------------------------------------------------------------------------
def random_problem(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((4, 3)).astype(dtype), "b": rng.standard_normal(3).astype(dtype)}
    grads = [{n: rng.standard_normal(p.shape).astype(dtype) * 3 for n, p in params.items()} for _ in range(12)]
    return params, grads


def test_adamw_clipping_and_schedule_match_torch_and_state_round_trips():
    params, grads = random_problem()
    tparams = {n: torch.tensor(p.copy(), requires_grad=True) for n, p in params.items()}
    topt = torch.optim.AdamW(list(tparams.values()), lr=0.05, weight_decay=0.3)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: warmup_cosine(s, max_lr=1.0, warmup_steps=4,
                                                                             total_steps=12, min_lr=0.1))  # fmt: skip
    opt = AdamW(params, lr=0.05, weight_decay=0.3)
    for step, g in enumerate(grads):
        for n, t in tparams.items():
            t.grad = torch.tensor(g[n].copy())
        want = torch.nn.utils.clip_grad_norm_(list(tparams.values()), 2.0).item()
        topt.step()
        sched.step()
        g = {n: a.copy() for n, a in g.items()}
        assert abs(clip_grad_norm(g, 2.0) - want) <= 1e-12 * want
        opt.lr = 0.05 * warmup_cosine(step, max_lr=1.0, warmup_steps=4, total_steps=12, min_lr=0.1)
        if step == 6:  # a fresh optimizer restored from the state behaves as the old one
            opt2 = AdamW({n: p for n, p in params.items()}, lr=1.0)
            opt2.load_state_dict(opt.state_dict())
            opt = opt2
        opt.step(g)
        for n, t in tparams.items():
            np.testing.assert_allclose(params[n], t.detach().numpy(), rtol=1e-12, atol=1e-15)
    assert opt.state_dict()["step"] == 12


def test_clip_grad_norm_leaves_small_gradients_and_scales_large_ones():
    g = {"a": np.array([3.0, 4.0])}
    assert clip_grad_norm(g, 10.0) == 5.0 and g["a"].tolist() == [3.0, 4.0]
    assert clip_grad_norm(g, 1.0) == 5.0
    np.testing.assert_allclose(np.linalg.norm(g["a"]), 1.0, rtol=1e-6)
    assert clip_grad_norm({"a": np.array([-7.0, 2.0])}, 1.0, norm_type=math.inf) == 7.0


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, max_lr=1.0, warmup_steps=5, total_steps=25, min_lr=0.1) for s in range(30)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == 1.0 and lrs[15] == pytest.approx(0.55) and lrs[25:] == [0.1] * 5
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))


def snapshot(opt):
    return {n: p.copy() for n, p in opt.params.items()}, opt.state_dict()


def assert_unchanged(opt, before):
    params, state = before
    after = opt.state_dict()
    assert all(np.array_equal(opt.params[n], params[n]) for n in params)
    assert after["step"] == state["step"] and after["lr"] == state["lr"]
    assert all(np.array_equal(after["exp_avg"][n], state["exp_avg"][n]) for n in params)
    assert all(np.array_equal(after["exp_avg_sq"][n], state["exp_avg_sq"][n]) for n in params)


def test_optimizer_bad_input_changes_nothing():
    params, grads = random_problem()
    opt = AdamW(params)
    opt.step(grads[0])
    before = snapshot(opt)
    bad = [
        ({"w": grads[1]["w"]}, KeyError, "missing"),
        ({**grads[1], "x": grads[1]["b"]}, KeyError, "unknown"),
        ({**grads[1], "b": np.zeros(4)}, ValueError, "shape"),
        ({**grads[1], "b": grads[1]["b"].astype(np.float32)}, ValueError, "dtype"),
        ({**grads[1], "w": np.full((4, 3), np.nan)}, ValueError, "NaN"),
        ([grads[1]["w"]], TypeError, "dict"),
    ]
    for g, exc, match in bad:
        with pytest.raises(exc, match=match):
            opt.step(g)
        assert_unchanged(opt, before)
    opt.lr = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step(grads[1])
    opt.lr = before[1]["lr"]
    assert_unchanged(opt, before)
    state = opt.state_dict()
    state["exp_avg"] = {"w": state["exp_avg"]["w"]}
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(state)
    with pytest.raises(KeyError, match="step"):
        opt.load_state_dict({k: v for k, v in opt.state_dict().items() if k != "step"})
    assert_unchanged(opt, before)
    g = {n: a.copy() for n, a in grads[2].items()}
    g["b"][0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        clip_grad_norm(g, 1.0)
    assert g["w"].tolist() == grads[2]["w"].tolist()
    for args, exc in (((grads[2], 0.0), ValueError), ((grads[2], float("nan")), ValueError), (([1.0], 1.0), TypeError)):
        with pytest.raises(exc, match="max_norm|grads"):
            clip_grad_norm(*args)
    with pytest.raises(ValueError, match="betas"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(params, lr=-1.0)
    with pytest.raises(TypeError, match="params"):
        AdamW({"w": [1.0, 2.0]})
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(0, max_lr=1.0, warmup_steps=5, total_steps=2)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, initialisation, live parameters
# ----------------------------------------------------------------------------------------------------------------
TINY = {"vocab_size": VOCAB, "n_positions": POSITIONS, "n_embd": WIDTH, "n_layer": LAYERS, "n_head": HEADS}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_save_pretrained_loads_in_transformers_and_back_bitwise(tmp_path, dtype):
    model = GPT2Model.init(TINY, seed=3, dtype=dtype)
    model.save_pretrained(tmp_path)
    again = fastattn.models.load(tmp_path, dtype=dtype)
    mine, theirs = model.parameters(), again.parameters()
    assert set(mine) == set(theirs)
    assert all(mine[n].tobytes() == theirs[n].tobytes() for n in mine)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = model(ids).logits
    assert np.abs(got - want).max() <= (1e-10 if dtype == np.float64 else 1e-4) * np.abs(want).max()
    with open(os.path.join(tmp_path, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model_type"] == "gpt2"


def test_init_follows_gpt2(tmp_path):
    cfg = dict(TINY, n_embd=64, n_layer=4, n_head=4, vocab_size=500, n_positions=64)
    params = GPT2Model.init(cfg, seed=0).parameters()
    assert params["wte.weight"].std() == pytest.approx(0.02, rel=0.05)
    assert params["h.0.attn.c_attn.weight"].std() == pytest.approx(0.02, rel=0.05)
    for name in ("h.1.attn.c_proj.weight", "h.3.mlp.c_proj.weight"):
        assert params[name].std() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert np.all(params["h.2.ln_1.weight"] == 1) and np.all(params["h.2.mlp.c_fc.bias"] == 0)
    again = GPT2Model.init(cfg, seed=0).parameters()
    other = GPT2Model.init(cfg, seed=1).parameters()
    assert np.array_equal(again["wte.weight"], params["wte.weight"])
    assert not np.array_equal(other["wte.weight"], params["wte.weight"])
    assert GPT2Model.from_config is GPT2Model.init or GPT2Model.from_config.__func__ is GPT2Model.init.__func__


def test_parameters_are_live():
    model = GPT2Model.init(TINY, seed=0)
    ids = np.array([[1, 2, 3]])
    before = model(ids).logits.copy()
    params = model.parameters()
    params["h.1.mlp.c_fc.bias"] += 0.5
    params["wte.weight"][5] += 1.0
    assert not np.allclose(model(ids).logits, before)
    assert model.parameters()["wte.weight"] is params["wte.weight"]


def test_loss_and_grads_bad_input_changes_nothing():
    model = GPT2Model.init(TINY, seed=0)
    params = {n: p.copy() for n, p in model.parameters().items()}
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 6))
    cases = [
        ((ids, ids[:, :5]), {}, ValueError, "labels must have the shape"),
        ((ids, ids.astype(float)), {}, TypeError, "labels"),
        ((ids, np.full_like(ids, VOCAB)), {}, IndexError, "labels holds 61"),
        ((ids, np.full_like(ids, -5)), {}, IndexError, "ignore index"),
        ((ids, np.full_like(ids, -100)), {}, ValueError, "no position"),
        ((ids + VOCAB,), {}, IndexError, "input_ids holds"),
        ((np.zeros((0, 4), np.int64),), {}, ValueError, "input_ids is empty"),
        ((np.zeros((1, POSITIONS + 1), np.int64),), {}, ValueError, "n_positions"),
        ((ids,), {"attention_mask": np.ones((2, 5))}, ValueError, "attention_mask"),
        ((ids[:, :1],), {}, ValueError, "no position"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            model.loss_and_grads(*args, **kwargs)
    assert all(np.array_equal(p, params[n]) for n, p in model.parameters().items())


# ----------------------------------------------------------------------------------------------------------------
# python -m fastattn train
# ----------------------------------------------------------------------------------------------------------------
def run_train(tmp_path, *extra):
    data = tmp_path / "text.txt"
    if not data.exists():
        rng = np.random.default_rng(0)
        words = ["alpha", "beta", "gamma", "delta", "attention", "kernel", "numpy", "\n"]
        data.write_text(" ".join(rng.choice(words, 4000)))
    cmd = [sys.executable, "-m", "fastattn", "train", "--data", str(data), "--layers", "1", "--width", "16",
           "--heads", "2", "--seq-len", "16", "--batch", "4", "--steps", "6", "--eval-every", "3",
           "--samples", "1", "--backend", TRAIN_BACKENDS[0], "--threads", "1", *extra]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def losses(path):
    with open(path / "losses.csv", encoding="utf-8") as f:
        return f.read()


def test_train_command_checkpoint_loads_in_transformers_and_resume_repeats_the_run(tmp_path):
    full = tmp_path / "full"
    stdout = run_train(tmp_path, "--out", str(full))
    assert "held-out loss" in stdout and "tokens/s" in stdout and "sample 1" in stdout
    model = fastattn.models.load(full)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 10))
    hf = transformers.GPT2LMHeadModel.from_pretrained(full).eval()
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(model(ids).logits - want).max() <= 1e-4 * np.abs(want).max()
    part = tmp_path / "part"
    run_train(tmp_path, "--out", str(part), "--stop-after", "4")
    assert losses(part).count("\n") == 5  # header + 4 steps
    run_train(tmp_path, "--resume", str(part))
    assert losses(part) == losses(full)
    a, b = fastattn.models.load(full).parameters(), fastattn.models.load(part).parameters()
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_default_text_needs_no_download():
    from fastattn.tools import train

    text = train.default_text()
    assert len(text) > 100_000 and b"def " in text


def test_untied_lm_head_gets_its_own_gradient(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=WIDTH, n_layer=1, n_head=HEADS,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  tie_word_embeddings=False)  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    ids, labels, mask = batch(True)
    want_loss, want = hf_loss_and_grads(hf_model(tmp_path), ids, labels, mask)
    model = fastattn.models.load(tmp_path, backend=TRAIN_BACKENDS[0], dtype=np.float64)
    loss, grads = model.loss_and_grads(ids, labels, attention_mask=mask)
    assert "lm_head.weight" in grads and set(grads) == set(want)
    assert abs(loss - want_loss) <= 1e-9 * want_loss
    for name, g in want.items():
        assert np.linalg.norm(grads[name] - g) <= 1e-9 * np.linalg.norm(g), name
    params = model.parameters()
    before = model(ids[:1]).logits.copy()
    params["lm_head.weight"][3] *= 2.0  # live: the forward's head is a view of it
    assert not np.allclose(model(ids[:1]).logits[..., 3], before[..., 3])
