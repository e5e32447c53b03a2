"""GGUF files: random weights written with the gguf package's writer (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)
load to the tensors transformers' own GGUF loader gives, and the model's logits agree with transformers' on them.

llama.cpp's converter permutes the q/k rows of llama models; the writer here does the same, so that both loaders
must undo it. The K-quant types have no quantizer in the gguf package: their blocks are random bytes with small
fixed scales (any block dequantizes to finite values), which is all a loader comparison needs.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS

import fastattn.models

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

from fastattn.models.gguf_file import GGUFStore, gguf_name  # noqa: E402

SCALE_RTOL = 1e-5
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ c", "a t", "Ġc at"]
#: tensor types beyond F32, by llama.cpp name
TYPES = {
    "token_embd.weight": Q.F16,
    "blk.0.attn_q.weight": Q.Q8_0,
    "blk.0.attn_k.weight": Q.Q4_0,
    "blk.0.attn_v.weight": Q.Q4_1,
    "blk.1.attn_q.weight": Q.BF16,
    "blk.0.ffn_down.weight": Q.Q4_K,
    "blk.1.ffn_down.weight": Q.Q6_K,
}


def _tokens():
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return alphabet + [m.replace(" ", "") for m in MERGES] + ["<s>", "</s>"]


def _permute(w, heads):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of what the loaders undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _kquant(rng, rows, cols, qtype):
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (float16) lead the block
        raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    else:  # Q6_K: d (float16) ends the block
        raw[..., size - 2 :] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path, arch, state, *, heads, kv_heads, head_dim=None, types=TYPES, skip=(), arch_name=None):
    """Write a Hugging Face state dict (numpy) as a GGUF file the way llama.cpp's converter lays it out."""
    tokens = _tokens()
    w = gguf.GGUFWriter(str(path), arch_name or arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(96)
    w.add_block_count(2)
    w.add_feed_forward_length(256)
    w.add_embedding_length(64)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(5000.0)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(MERGES)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(True)
    rng = np.random.default_rng(1)
    for key, a in state.items():
        name = gguf_name(key.removeprefix("model."))
        if name is None or name in skip:
            continue
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            a = _permute(a, heads if ".attn_q." in name else kv_heads)
        kind = types.get(name, Q.F32)
        if kind == Q.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif kind == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        elif kind in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, _kquant(rng, a.shape[0], a.shape[1], kind), raw_dtype=kind)
        else:
            w.add_tensor(name, quants.quantize(a.astype(np.float32), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _hf_state(arch):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    V = len(_tokens())
    config = cls[arch](
        vocab_size=V, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=96, tie_word_embeddings=arch != "llama", rms_norm_eps=1e-6,
        rope_theta=5000.0, bos_token_id=V - 2, eos_token_id=V - 1, **({"head_dim": 128} if arch == "qwen3" else {}),
    )  # fmt: skip
    torch.manual_seed(len(arch))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.25)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def gguf_model(request, tmp_path_factory):
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    arch = request.param
    directory = tmp_path_factory.mktemp(f"gguf-{arch}")
    write_gguf(directory / "model.gguf", arch, _hf_state(arch), heads=4, kv_heads=2,
               head_dim=128 if arch == "qwen3" else None)  # fmt: skip
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file="model.gguf", dtype=torch.float32)
    return arch, directory, ref.eval()


def test_gguf_loads_the_tensors_transformers_loads(gguf_model):
    arch, directory, ref = gguf_model
    model = fastattn.models.load(directory / "model.gguf", backend="numpy")
    assert isinstance(model, fastattn.models.LlamaModel) and model.config.model_type == arch
    reader = gguf.GGUFReader(str(directory / "model.gguf"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert {types[n] for n in TYPES} == set(TYPES.values())  # every type is in the file
    store = GGUFStore(str(directory / "model.gguf"), reader, arch, 4, 2)
    for name, tensor in ref.state_dict().items():
        if name == "lm_head.weight" and ref.config.tie_word_embeddings:
            continue
        store.prefix = "" if name.startswith("lm_head") else "model."
        got = store.get(name.removeprefix(store.prefix), tuple(tensor.shape), np.float32)
        np.testing.assert_array_equal(got, tensor.numpy(), err_msg=name)


def test_gguf_logits_match_transformers(gguf_model):
    arch, directory, ref = gguf_model
    ids = np.random.default_rng(3).integers(0, ref.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits.numpy()
    for backend in BACKENDS:
        got = fastattn.models.load(directory / "model.gguf", backend=backend)(ids).logits
        err = np.abs(got - expected).max()
        assert err <= SCALE_RTOL * np.abs(expected).max(), (arch, backend, err)


def test_gguf_tokenizer_matches_transformers(gguf_model):
    arch, directory, _ = gguf_model
    ref = transformers.AutoTokenizer.from_pretrained(directory, gguf_file="model.gguf")
    model = fastattn.models.load(directory / "model.gguf", backend="numpy")
    for text in ("the cat in a hat", "a cat, the hat!"):
        assert model.tokenizer.encode(text) == ref(text)["input_ids"], text
    assert model.config.eos_token_id == (len(_tokens()) - 1,)
    assert isinstance(model.generate_text("the cat", max_new_tokens=3, eos_token_id=None), str)


def test_bad_gguf_files_name_what_is_wrong(tmp_path):
    state = _hf_state("llama")
    write_gguf(tmp_path / "arch.gguf", "llama", state, heads=4, kv_heads=2, arch_name="falcon")
    with pytest.raises(fastattn.models.CheckpointError, match=r"holds architecture 'falcon'; fastattn reads GGUF"):
        fastattn.models.load(tmp_path / "arch.gguf")
    write_gguf(tmp_path / "type.gguf", "llama", state, heads=4, kv_heads=2,
               types={**TYPES, "blk.1.attn_v.weight": Q.Q5_0})  # fmt: skip
    with pytest.raises(fastattn.models.CheckpointError, match=r"'blk\.1\.attn_v\.weight' has type Q5_0, which "):
        fastattn.models.load(tmp_path / "type.gguf")
    write_gguf(tmp_path / "missing.gguf", "llama", state, heads=4, kv_heads=2, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(fastattn.models.CheckpointError, match=r"missing the tensor 'blk\.1\.ffn_up\.weight' "):
        fastattn.models.load(tmp_path / "missing.gguf")
    write_gguf(tmp_path / "shape.gguf", "llama", state, heads=4, kv_heads=1)  # k is (32, 64), not (16, 64)
    with pytest.raises(fastattn.models.CheckpointError, match=r"'blk\.0\.attn_k\.weight' has shape \(32, 64\) but"):
        fastattn.models.load(tmp_path / "shape.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(fastattn.models.CheckpointError, match=r"is not a readable GGUF file"):
        fastattn.models.load(tmp_path / "junk.gguf")
