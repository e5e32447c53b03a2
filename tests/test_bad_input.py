"""Bad input to every public function, on every backend: the exception NumPy would choose, a message that names the
argument, what was expected and what came (each one pinned here), and a library that still works afterwards.

Also: empty inputs where they make sense (zero tokens, zero batch, zero heads, no keys) give empty results of the
right shape, or zeros where a row has nothing to attend to.

``CASES`` is a table, one row per bad input: an id, the call (it receives the backend name), the exception and the
message pattern. ``len(CASES)`` is the count the issue's report asks for.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fastattn
from fastattn import oracle

f32, f64 = np.float32, np.float64
I64 = np.iinfo(np.int64)

TABLE = np.arange(15, dtype=f32).reshape(5, 3)  # V = 5, D = 3
X = np.zeros((2, 6, 4), f32)  # (B, N, D)
PE = np.zeros((8, 4), f32)  # (P, D)
Q = np.zeros((2, 4, 5, 8), f32)  # (B, Hq, L, E)
K = np.zeros((2, 4, 7, 8), f32)  # (B, H, S, E)
K3 = np.zeros((3, 4, 7, 8), f32)  # a batch of 3 against the query's 2
W = np.zeros((8, 8), f32)
XS = np.zeros((2, 5, 8), f32)  # self_attention's x (B, N, D)
PARAMS = fastattn.init_params(10, 8, 2, max_positions=4)
IDS = np.array([[1, 2, 3]])


def kv(h, s=7, e=8, dtype=f32):
    return np.zeros((2, h, s, e), dtype)


def sdpa(b, q=Q, k=K, v=K, **kw):
    return fastattn.scaled_dot_product_attention(q, k, v, backend=b, **kw)


def sa(b, x=XS, w_q=W, w_k=W, w_v=W, w_o=None, **kw):
    kw.setdefault("n_heads", 2)
    return fastattn.self_attention(x, w_q, w_k, w_v, w_o, backend=b, **kw)


def fwd(b, ids=IDS, params=PARAMS, **kw):
    return fastattn.forward(ids, params, backend=b, **kw)


def case(id_, call, exc, match):
    return pytest.param(call, exc, match, id=id_)


# fmt: off
CASES = [
    # ------------------------------------------------------------------------------------------- embed
    case("embed-table-1d", lambda b: fastattn.embed([0], np.ones(5), backend=b), ValueError,
         r"table must have 2 dimensions, got shape \(5,\)"),
    case("embed-table-3d", lambda b: fastattn.embed([0], np.ones((5, 3, 1)), backend=b), ValueError,
         r"table must have 2 dimensions, got shape \(5, 3, 1\)"),
    case("embed-table-int", lambda b: fastattn.embed([0], np.ones((5, 3), int), backend=b), TypeError,
         r"table must be a float32 or float64 array, got: table.dtype=int64; convert it with table.astype"),
    case("embed-table-complex", lambda b: fastattn.embed([0], np.ones((5, 3), complex), backend=b), TypeError,
         r"table.dtype=complex128"),
    case("embed-table-object", lambda b: fastattn.embed([0], np.ones((5, 3), object), backend=b), TypeError,
         r"table.dtype=object"),
    case("embed-table-strings", lambda b: fastattn.embed([0], np.array([["a", "b"]]), backend=b), TypeError,
         r"table.dtype=<U1"),
    case("embed-table-float16", lambda b: fastattn.embed([0], np.ones((5, 3), np.float16), backend=b), TypeError,
         r"table.dtype=float16; convert it with table.astype\(np.float32\)"),
    case("embed-table-none", lambda b: fastattn.embed([0], None, backend=b), TypeError,
         r"table must be a float32 or float64 array, got type NoneType"),
    case("embed-ids-float", lambda b: fastattn.embed([0.0, 1.0], TABLE, backend=b), TypeError,
         r"token_ids must be an integer array of token ids, got: token_ids.dtype=float64"),
    case("embed-ids-bool", lambda b: fastattn.embed(np.array([True]), TABLE, backend=b), TypeError,
         r"token_ids.dtype=bool"),
    case("embed-ids-complex", lambda b: fastattn.embed(np.array([1j]), TABLE, backend=b), TypeError,
         r"token_ids.dtype=complex128"),
    case("embed-ids-string", lambda b: fastattn.embed("1", TABLE, backend=b), TypeError,
         r"token_ids must be an integer array, got type str"),
    case("embed-ids-string-array", lambda b: fastattn.embed(["a"], TABLE, backend=b), TypeError,
         r"token_ids.dtype=<U1"),
    case("embed-ids-none", lambda b: fastattn.embed(None, TABLE, backend=b), TypeError,
         r"token_ids must be an integer array, got type NoneType"),
    case("embed-ids-ragged", lambda b: fastattn.embed([[1], [1, 2]], TABLE, backend=b), ValueError,
         r"token_ids must be a rectangular array, got a ragged nested sequence"),
    case("embed-ids-negative", lambda b: fastattn.embed([0, -1], TABLE, backend=b), IndexError,
         r"token_ids holds id -1, outside the vocabulary of size 5 \(ids must lie in \[0, 5\); negative ids do not"),
    case("embed-ids-equal-vocab", lambda b: fastattn.embed([[5]], TABLE, backend=b), IndexError,
         r"token_ids holds id 5, outside the vocabulary of size 5"),
    case("embed-ids-int64-max", lambda b: fastattn.embed(np.array([1, I64.max]), TABLE, backend=b), IndexError,
         r"id 9223372036854775807, outside the vocabulary of size 5"),
    case("embed-ids-int64-max-minus-1", lambda b: fastattn.embed(np.array([I64.max - 1]), TABLE, backend=b),
         IndexError, r"id 9223372036854775806, outside"),
    case("embed-ids-int64-min", lambda b: fastattn.embed(np.array([I64.min]), TABLE, backend=b), IndexError,
         r"id -9223372036854775808, outside"),
    case("embed-ids-uint64-max", lambda b: fastattn.embed(np.array([2**64 - 1], np.uint64), TABLE, backend=b),
         IndexError, r"id 18446744073709551615, outside"),
    case("embed-ids-beyond-int64", lambda b: fastattn.embed([1, 2**70], TABLE, backend=b), IndexError,
         r"id 1180591620717411303424, outside the vocabulary of size 5"),
    case("embed-ids-empty-vocab", lambda b: fastattn.embed([0], np.zeros((0, 3), f32), backend=b), IndexError,
         r"id 0, outside the vocabulary of size 0"),
    # ------------------------------------------------------------------------------------------- add_positions
    case("positions-x-1d", lambda b: fastattn.add_positions(np.zeros(4, f32), PE, backend=b), ValueError,
         r"x must have at least 2 dimensions, got shape \(4,\)"),
    case("positions-x-int", lambda b: fastattn.add_positions(X.astype(int), PE, backend=b), TypeError,
         r"x must be a float32 or float64 array, got: x.dtype=int64"),
    case("positions-table-1d", lambda b: fastattn.add_positions(X, np.zeros(4, f32), backend=b), ValueError,
         r"positions must have 2 dimensions, got shape \(4,\)"),
    case("positions-table-3d", lambda b: fastattn.add_positions(X, PE[None], backend=b), ValueError,
         r"positions must have 2 dimensions, got shape \(1, 8, 4\)"),
    case("positions-table-complex", lambda b: fastattn.add_positions(X, PE.astype(complex), backend=b), TypeError,
         r"positions.dtype=complex128"),
    case("positions-columns", lambda b: fastattn.add_positions(X, np.zeros((8, 5), f32), backend=b), ValueError,
         r"positions must have 4 columns to match x \(..., N, 4\), got shape \(8, 5\)"),
    case("positions-shorter-than-sequence", lambda b: fastattn.add_positions(X, PE[:3], backend=b), ValueError,
         r"positions has 3 rows but offset \+ N = 0 \+ 6 = 6 are needed"),
    case("positions-past-end-with-offset", lambda b: fastattn.add_positions(X, PE, offset=3, backend=b), ValueError,
         r"positions has 8 rows but offset \+ N = 3 \+ 6 = 9 are needed"),
    case("positions-offset-int64-max", lambda b: fastattn.add_positions(X, PE, offset=I64.max, backend=b),
         ValueError, r"offset \+ N = 9223372036854775807 \+ 6 = 9223372036854775813 are needed"),
    case("positions-offset-negative", lambda b: fastattn.add_positions(X, PE, offset=-1, backend=b), ValueError,
         r"offset must be >= 0, got -1"),
    case("positions-offset-float", lambda b: fastattn.add_positions(X, PE, offset=1.0, backend=b), TypeError,
         r"offset must be an integer, got float 1.0"),
    case("positions-mixed-dtypes", lambda b: fastattn.add_positions(X, PE.astype(f64), backend=b), TypeError,
         r"arrays must share one float dtype \(no silent promotion\), got: x.dtype=float32, positions.dtype=float64"),
    # ------------------------------------------------------------------------------------------- apply_rope
    case("rope-x-1d", lambda b: fastattn.apply_rope(np.zeros(4, f32), backend=b), ValueError,
         r"x must have at least 2 dimensions, got shape \(4,\)"),
    case("rope-x-complex", lambda b: fastattn.apply_rope(np.zeros((3, 4), complex), backend=b), TypeError,
         r"x.dtype=complex128"),
    case("rope-x-string", lambda b: fastattn.apply_rope("x", backend=b), TypeError,
         r"x must be a float32 or float64 array, got type str"),
    case("rope-odd-d", lambda b: fastattn.apply_rope(np.zeros((3, 5), f32), backend=b), ValueError,
         r"apply_rope needs an even last dimension d, got shape \(3, 5\)"),
    case("rope-offset-negative", lambda b: fastattn.apply_rope(X, offset=-2, backend=b), ValueError,
         r"offset must be >= 0, got -2"),
    case("rope-base-negative", lambda b: fastattn.apply_rope(X, base=-1.0, backend=b), ValueError,
         r"base must be a finite positive number, got -1.0"),
    case("rope-base-nan", lambda b: fastattn.apply_rope(X, base=float("nan"), backend=b), ValueError,
         r"base must be a finite positive number, got nan"),
    case("rope-interleaved-int", lambda b: fastattn.apply_rope(X, interleaved=1, backend=b), TypeError,
         r"interleaved must be True or False, got int 1"),
    # ------------------------------------------------------------------------------------------- sdpa: dimensions
    case("sdpa-query-1d", lambda b: sdpa(b, q=np.zeros(8, f32)), ValueError,
         r"query must have at least 2 dimensions, got shape \(8,\)"),
    case("sdpa-query-0d", lambda b: sdpa(b, q=f32(1.0)), ValueError,
         r"query must have at least 2 dimensions, got shape \(\)"),
    case("sdpa-key-1d", lambda b: sdpa(b, k=np.zeros(8, f32)), ValueError,
         r"key must have at least 2 dimensions, got shape \(8,\)"),
    case("sdpa-value-1d", lambda b: sdpa(b, v=np.zeros(8, f32)), ValueError,
         r"value must have at least 2 dimensions, got shape \(8,\)"),
    case("sdpa-E-mismatch", lambda b: sdpa(b, k=kv(4, e=3)), ValueError,
         r"query and key must share the last dimension E, got query \(2, 4, 5, 8\) and key \(2, 4, 7, 3\)"),
    case("sdpa-S-mismatch", lambda b: sdpa(b, v=kv(4, s=3)), ValueError,
         r"key and value must share the sequence dimension S, got key \(2, 4, 7, 8\) and value \(2, 4, 3, 8\)"),
    case("sdpa-heads-differ-without-gqa", lambda b: sdpa(b, k=kv(2), v=kv(2)), ValueError,
         r"query has 4 heads but key/value have 2: heads must match \(or be 1\) unless enable_gqa=True"),
    case("sdpa-gqa-not-a-multiple", lambda b: sdpa(b, k=kv(3), v=kv(3), enable_gqa=True), ValueError,
         r"enable_gqa needs the query heads \(4\) to be a multiple of the key/value heads \(3\)"),
    case("sdpa-gqa-zero-kv-heads", lambda b: sdpa(b, k=kv(0), v=kv(0), enable_gqa=True), ValueError,
         r"enable_gqa needs the query heads \(4\) to be a multiple of the key/value heads \(0\)"),
    case("sdpa-key-value-heads-differ", lambda b: sdpa(b, k=kv(4), v=kv(2)), ValueError,
         r"key and value must have the same number of heads, got key \(2, 4, 7, 8\) and value \(2, 2, 7, 8\)"),
    case("sdpa-batch-does-not-broadcast", lambda b: sdpa(b, k=K3, v=K3),
         ValueError, r"the leading \(batch/head\) dimensions of query, key and value do not broadcast: "
         r"got \(2,\), \(3,\), \(3,\)"),
    # ------------------------------------------------------------------------------------------- sdpa: kinds
    case("sdpa-query-int", lambda b: sdpa(b, q=Q.astype(np.int32)), TypeError,
         r"query must be a float32 or float64 array, got: query.dtype=int32; convert it with query.astype"),
    case("sdpa-key-complex", lambda b: sdpa(b, k=K.astype(np.complex64)), TypeError,
         r"key must be a float32 or float64 array, got: key.dtype=complex64"),
    case("sdpa-value-object", lambda b: sdpa(b, v=K.astype(object)), TypeError,
         r"value must be a float32 or float64 array, got: value.dtype=object"),
    case("sdpa-query-strings", lambda b: sdpa(b, q=np.array([["a", "b"]])), TypeError, r"query.dtype=<U1"),
    case("sdpa-query-string", lambda b: sdpa(b, q="query"), TypeError,
         r"query must be a float32 or float64 array, got type str"),
    case("sdpa-value-none", lambda b: sdpa(b, v=None), TypeError,
         r"value must be a float32 or float64 array, got type NoneType"),
    case("sdpa-query-bool", lambda b: sdpa(b, q=Q.astype(bool)), TypeError, r"query.dtype=bool"),
    case("sdpa-query-float16", lambda b: sdpa(b, q=Q.astype(np.float16)), TypeError,
         r"query.dtype=float16; convert it with query.astype\(np.float32\)"),
    case("sdpa-query-ragged", lambda b: sdpa(b, q=[[1.0], [1.0, 2.0]]), ValueError,
         r"query must be a rectangular array, got a ragged nested sequence"),
    case("sdpa-mixed-dtypes", lambda b: sdpa(b, v=K.astype(f64)), TypeError,
         r"got: query.dtype=float32, key.dtype=float32, value.dtype=float64; cast them to one dtype"),
    # ------------------------------------------------------------------------------------------- sdpa: masks
    case("sdpa-mask-wrong-shape", lambda b: sdpa(b, attn_mask=np.ones((5, 6), bool)), ValueError,
         r"attn_mask of shape \(5, 6\) does not broadcast to the scores' shape \(2, 4, 5, 7\)"),
    case("sdpa-mask-extra-dims", lambda b: sdpa(b, attn_mask=np.ones((1, 2, 4, 5, 7), bool)), ValueError,
         r"attn_mask of shape \(1, 2, 4, 5, 7\) does not broadcast to the scores' shape \(2, 4, 5, 7\)"),
    case("sdpa-mask-transposed", lambda b: sdpa(b, attn_mask=np.ones((7, 5), bool)), ValueError,
         r"attn_mask of shape \(7, 5\) does not broadcast"),
    case("sdpa-mask-int", lambda b: sdpa(b, attn_mask=np.ones((5, 7), np.int64)), TypeError,
         r"attn_mask must be a boolean \(True = takes part\) or float \(added to the scores\) array, "
         r"got: attn_mask.dtype=int64"),
    case("sdpa-mask-uint8", lambda b: sdpa(b, attn_mask=np.ones((5, 7), np.uint8)), TypeError,
         r"got: attn_mask.dtype=uint8"),
    case("sdpa-mask-complex", lambda b: sdpa(b, attn_mask=np.ones((5, 7), complex)), TypeError,
         r"got: attn_mask.dtype=complex128"),
    case("sdpa-mask-object", lambda b: sdpa(b, attn_mask=[[None] * 7] * 5), TypeError,
         r"got: attn_mask.dtype=object"),
    case("sdpa-mask-string", lambda b: sdpa(b, attn_mask="causal"), TypeError,
         r"attn_mask must be a boolean or float array, got type str"),
    case("sdpa-mask-ragged", lambda b: sdpa(b, attn_mask=[[True], [True, False]]), ValueError,
         r"attn_mask must be a rectangular array"),
    case("sdpa-mask-with-is-causal", lambda b: sdpa(b, attn_mask=np.ones((5, 7), bool), is_causal=True),
         ValueError, r"is_causal=True cannot be combined with attn_mask: pass one or the other"),
    # ------------------------------------------------------------------------------------------- sdpa: scalars
    case("sdpa-dropout", lambda b: sdpa(b, dropout_p=0.1), ValueError,
         r"dropout_p must be 0.0: fastattn is inference only, got 0.1"),
    case("sdpa-dropout-one", lambda b: sdpa(b, dropout_p=1), ValueError, r"dropout_p must be 0.0: .* got 1"),
    case("sdpa-dropout-nan", lambda b: sdpa(b, dropout_p=float("nan")), ValueError,
         r"dropout_p must be a finite number, got nan"),
    case("sdpa-dropout-none", lambda b: sdpa(b, dropout_p=None), TypeError,
         r"dropout_p must be a real number, got NoneType None"),
    case("sdpa-is-causal-string", lambda b: sdpa(b, is_causal="yes"), TypeError,
         r"is_causal must be True or False, got str 'yes'"),
    case("sdpa-is-causal-int", lambda b: sdpa(b, is_causal=1), TypeError,
         r"is_causal must be True or False, got int 1"),
    case("sdpa-enable-gqa-int", lambda b: sdpa(b, enable_gqa=1), TypeError,
         r"enable_gqa must be True or False, got int 1"),
    case("sdpa-scale-nan", lambda b: sdpa(b, scale=float("nan")), ValueError,
         r"scale must be a finite number, got nan"),
    case("sdpa-scale-inf", lambda b: sdpa(b, scale=float("inf")), ValueError,
         r"scale must be a finite number, got inf"),
    case("sdpa-scale-string", lambda b: sdpa(b, scale="0.5"), TypeError, r"scale must be a real number, got str '0.5'"),
    # ------------------------------------------------------------------------------------------- self_attention
    case("sa-x-1d", lambda b: sa(b, x=np.zeros(8, f32)), ValueError,
         r"x must have shape \(B, N, D\) or \(N, D\), got shape \(8,\)"),
    case("sa-x-4d", lambda b: sa(b, x=XS[None]), ValueError,
         r"x must have shape \(B, N, D\) or \(N, D\), got shape \(1, 2, 5, 8\)"),
    case("sa-x-int", lambda b: sa(b, x=XS.astype(int)), TypeError,
         r"x must be a float32 or float64 array, got: x.dtype"),
    case("sa-w_q-rows", lambda b: sa(b, w_q=np.zeros((7, 8), f32)), ValueError,
         r"w_q must have 8 rows \(applied as x @ w_q\), got shape \(7, 8\)"),
    case("sa-w_q-1d", lambda b: sa(b, w_q=np.zeros(8, f32)), ValueError,
         r"w_q must have 2 dimensions, got shape \(8,\)"),
    case("sa-w_q-none", lambda b: sa(b, w_q=None), TypeError,
         r"w_q must be a float32 or float64 array, got type NoneType"),
    case("sa-w_q-heads", lambda b: sa(b, n_heads=3), ValueError, r"w_q's 8 columns do not split into n_heads=3 heads"),
    case("sa-w_k-columns", lambda b: sa(b, n_kv_heads=1), ValueError,
         r"w_k must have 4 columns, got shape \(8, 8\)"),
    case("sa-w_v-heads", lambda b: sa(b, w_v=np.zeros((8, 5), f32)), ValueError,
         r"w_v's 5 columns do not split into n_kv_heads=2 heads"),
    case("sa-w_o-rows", lambda b: sa(b, w_o=np.zeros((6, 8), f32)), ValueError,
         r"w_o must have 8 rows \(applied as x @ w_o\), got shape \(6, 8\)"),
    case("sa-w_v-dtype", lambda b: sa(b, w_v=W.astype(f64)), TypeError,
         r"w_v.dtype=float64 differs from x.dtype=float32; cast them to one dtype"),
    case("sa-w_o-complex", lambda b: sa(b, w_o=W.astype(complex)), TypeError, r"w_o.dtype=complex128"),
    case("sa-b_q-shape", lambda b: sa(b, b_q=np.zeros(7, f32)), ValueError,
         r"b_q must have shape \(8,\), got shape \(7,\)"),
    case("sa-b_k-2d", lambda b: sa(b, b_k=np.zeros((1, 8), f32)), ValueError,
         r"b_k must have 1 dimension, got shape \(1, 8\)"),
    case("sa-b_o-dtype", lambda b: sa(b, w_o=W, b_o=np.zeros(8)), TypeError,
         r"b_o.dtype=float64 differs from x.dtype=float32"),
    case("sa-n_heads-zero", lambda b: sa(b, n_heads=0), ValueError, r"n_heads must be >= 1, got 0"),
    case("sa-n_heads-negative", lambda b: sa(b, n_heads=-2), ValueError, r"n_heads must be >= 1, got -2"),
    case("sa-n_heads-float", lambda b: sa(b, n_heads=2.0), TypeError, r"n_heads must be an integer, got float 2.0"),
    case("sa-n_heads-bool", lambda b: sa(b, n_heads=True), TypeError, r"n_heads must be an integer, got bool True"),
    case("sa-n_kv_heads-zero", lambda b: sa(b, n_kv_heads=0), ValueError, r"n_kv_heads must be >= 1, got 0"),
    case("sa-heads-not-a-multiple", lambda b: sa(b, n_heads=4, n_kv_heads=3), ValueError,
         r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
    case("sa-padding-mask-shape", lambda b: sa(b, key_padding_mask=np.zeros((2, 4), bool)), ValueError,
         r"key_padding_mask must have shape \(batch, keys\) = \(2, 5\), got shape \(2, 4\)"),
    case("sa-padding-mask-batch", lambda b: sa(b, key_padding_mask=np.zeros((3, 5), bool)), ValueError,
         r"key_padding_mask must have shape \(batch, keys\) = \(2, 5\), got shape \(3, 5\)"),
    case("sa-padding-mask-3d", lambda b: sa(b, key_padding_mask=np.zeros((2, 1, 5), bool)), ValueError,
         r"key_padding_mask must have shape \(batch, keys\) = \(2, 5\), got shape \(2, 1, 5\)"),
    case("sa-padding-mask-int", lambda b: sa(b, key_padding_mask=np.zeros((2, 5), int)), TypeError,
         r"key_padding_mask must be a boolean \(True = padding, ignored\) or float array, "
         r"got: key_padding_mask.dtype=int64"),
    case("sa-is-causal-string", lambda b: sa(b, is_causal="true"), TypeError,
         r"is_causal must be True or False, got str 'true'"),
    case("sa-rope-unknown-key", lambda b: sa(b, rope={"theta": 1.0}), ValueError,
         r"rope has unknown keys \['theta'\]; allowed: base, interleaved, offset"),
    case("sa-rope-string", lambda b: sa(b, rope="yes"), TypeError, r"rope must be None, True or a mapping .* got str"),
    case("sa-rope-odd-head", lambda b: sa(b, x=np.zeros((2, 5, 6), f32), w_q=np.zeros((6, 6), f32),
                                           w_k=np.zeros((6, 6), f32), w_v=np.zeros((6, 6), f32), rope=True),
         ValueError, r"rope needs an even head dimension, got d = 3"),
    case("sa-rope-offset-negative", lambda b: sa(b, rope={"offset": -1}), ValueError,
         r"rope\['offset'\] must be >= 0, got -1"),
    case("sa-rope-interleaved-int", lambda b: sa(b, rope={"interleaved": 1}), TypeError,
         r"rope\['interleaved'\] must be True or False, got int 1"),
    # ------------------------------------------------------------------------------------------- forward
    case("forward-ids-float", lambda b: fwd(b, ids=np.zeros((1, 3))), TypeError,
         r"token_ids must be an integer array of token ids, got: token_ids.dtype=float64"),
    case("forward-ids-negative", lambda b: fwd(b, ids=np.array([[1, -3]])), IndexError,
         r"token_ids holds id -3, outside the vocabulary of size 10"),
    case("forward-ids-equal-vocab", lambda b: fwd(b, ids=np.array([[1, 10]])), IndexError,
         r"token_ids holds id 10, outside the vocabulary of size 10"),
    case("forward-ids-int64-max", lambda b: fwd(b, ids=np.array([[I64.max]])), IndexError,
         r"token_ids holds id 9223372036854775807, outside"),
    case("forward-ids-3d", lambda b: fwd(b, ids=np.zeros((1, 1, 2), int)), ValueError,
         r"token_ids must have shape \(B, N\) or \(N,\), got shape \(1, 1, 2\)"),
    case("forward-ids-0d", lambda b: fwd(b, ids=np.int64(1)), ValueError,
         r"token_ids must have shape \(B, N\) or \(N,\), got shape \(\)"),
    case("forward-too-many-tokens", lambda b: fwd(b, ids=np.zeros((1, 5), int)), ValueError,
         r"token_ids has 5 tokens but params.positions has only 4 rows"),
    case("forward-params-dict", lambda b: fwd(b, params={"embedding": None}), TypeError,
         r"params must be a fastattn.Params \(see fastattn.init_params\), got dict"),
    case("forward-params-heads", lambda b: fwd(b, params=dataclasses.replace(PARAMS, n_heads=3)), ValueError,
         r"w_q's 8 columns do not split into n_heads=3 heads"),
    case("forward-params-embedding-none", lambda b: fwd(b, params=dataclasses.replace(PARAMS, embedding=None)),
         TypeError, r"params.embedding must be a float32 or float64 array, got type NoneType"),
    case("forward-params-positions-dtype",
         lambda b: fwd(b, params=dataclasses.replace(PARAMS, positions=PARAMS.positions.astype(f64))), TypeError,
         r"got: embedding.dtype=float32, positions.dtype=float64"),
    case("forward-params-positions-columns",
         lambda b: fwd(b, params=dataclasses.replace(PARAMS, positions=np.zeros((4, 6), f32))), ValueError,
         r"params.positions must have 8 columns, got shape \(4, 6\)"),
    case("forward-padding-mask-shape", lambda b: fwd(b, key_padding_mask=np.zeros((1, 4), bool)), ValueError,
         r"key_padding_mask must have shape \(batch, keys\) = \(1, 3\), got shape \(1, 4\)"),
    case("forward-is-causal-int", lambda b: fwd(b, is_causal=0), TypeError,
         r"is_causal must be True or False, got int 0"),
]

# Functions that take no backend: the same checks, run once.
PLAIN_CASES = [
    case("sinusoidal-n-negative", lambda: fastattn.sinusoidal_positions(-1, 4), ValueError,
         r"n_positions must be >= 0, got -1"),
    case("sinusoidal-n-float", lambda: fastattn.sinusoidal_positions(2.5, 4), TypeError,
         r"n_positions must be an integer, got float 2.5"),
    case("sinusoidal-d-zero", lambda: fastattn.sinusoidal_positions(4, 0), ValueError, r"d_model must be >= 1, got 0"),
    case("sinusoidal-d-negative", lambda: fastattn.sinusoidal_positions(4, -3), ValueError,
         r"d_model must be >= 1, got -3"),
    case("sinusoidal-d-bool", lambda: fastattn.sinusoidal_positions(4, True), TypeError,
         r"d_model must be an integer, got bool True"),
    case("sinusoidal-base-zero", lambda: fastattn.sinusoidal_positions(4, 4, base=0), ValueError,
         r"base must be a finite positive number, got 0.0"),
    case("sinusoidal-base-inf", lambda: fastattn.sinusoidal_positions(4, 4, base=float("inf")), ValueError,
         r"base must be a finite positive number, got inf"),
    case("sinusoidal-base-string", lambda: fastattn.sinusoidal_positions(4, 4, base="1e4"), TypeError,
         r"base must be a real number, got str '1e4'"),
    case("sinusoidal-dtype-int", lambda: fastattn.sinusoidal_positions(4, 4, dtype=np.int32), TypeError,
         r"dtype must be float32 or float64, got int32"),
    case("sinusoidal-dtype-nonsense", lambda: fastattn.sinusoidal_positions(4, 4, dtype="nonsense"), TypeError,
         r"dtype must be float32 or float64, got 'nonsense'"),
    case("init-vocab-zero", lambda: fastattn.init_params(0, 8, 2, max_positions=4), ValueError,
         r"vocab_size must be >= 1, got 0"),
    case("init-d-not-a-multiple", lambda: fastattn.init_params(10, 10, 4, max_positions=4), ValueError,
         r"d_model \(10\) must be a multiple of n_heads \(4\)"),
    case("init-heads-negative", lambda: fastattn.init_params(10, 8, -1, max_positions=4), ValueError,
         r"n_heads must be >= 1, got -1"),
    case("init-max-positions-zero", lambda: fastattn.init_params(10, 8, 2, max_positions=0), ValueError,
         r"max_positions must be >= 1, got 0"),
    case("init-dtype-int", lambda: fastattn.init_params(10, 8, 2, max_positions=4, dtype=int), TypeError,
         r"dtype must be float32 or float64, got int64"),
    case("set-num-threads-zero", lambda: fastattn.set_num_threads(0), ValueError, r"n must be >= 1, got 0"),
    case("set-num-threads-float", lambda: fastattn.set_num_threads(1.5), TypeError,
         r"n must be an integer, got float 1.5"),
    case("use-backend-unknown", lambda: fastattn.use_backend("fast").__enter__(), ValueError,
         r"unknown backend 'fast' \(given to use_backend\); known backends are 'numpy', 'numba', 'cython'"),
    case("use-backend-int", lambda: fastattn.use_backend(3).__enter__(), TypeError,
         r"backend must be a string such as 'numba' or None, got int 3"),
    case("warmup-unknown", lambda: fastattn.warmup(backends=["cuda"]), ValueError, r"unknown backend 'cuda'"),
]
# fmt: on

# Every public function that takes backend=, called correctly but for the backend.
BACKEND_CALLS = {
    "embed": lambda b: fastattn.embed([0], TABLE, backend=b),
    "add_positions": lambda b: fastattn.add_positions(X, PE, backend=b),
    "apply_rope": lambda b: fastattn.apply_rope(X, backend=b),
    "scaled_dot_product_attention": lambda b: sdpa(b),
    "self_attention": lambda b: sa(b),
    "forward": lambda b: fwd(b),
}


def still_works(backend):
    """A small call on the backend, checked against the oracle: nothing was left broken."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    np.testing.assert_allclose(got, oracle.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-10)
    np.testing.assert_array_equal(fastattn.embed([[4, 0]], TABLE, backend=backend), TABLE[[[4, 0]]])


@pytest.mark.parametrize("call, exc, match", CASES)
def test_bad_input(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backend)
    still_works(backend)


@pytest.mark.parametrize("call, exc, match", PLAIN_CASES)
def test_bad_input_no_backend(call, exc, match):
    threads = fastattn.get_num_threads()
    with pytest.raises(exc, match=match):
        call()
    assert fastattn.get_num_threads() == threads
    for backend in fastattn.available_backends():
        still_works(backend)


def test_case_count():
    """The report's number: every row of the tables is a distinct bad input (ids are unique)."""
    ids = [p.id for p in CASES + PLAIN_CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 100 and len(PLAIN_CASES) >= 20


@pytest.mark.parametrize("name", sorted(BACKEND_CALLS))
@pytest.mark.parametrize("bad", ["cuda", "", "numba2"])
def test_unknown_backend_in_every_function(name, bad):
    with pytest.raises(
        ValueError,
        match=rf"unknown backend '{bad}' \(given as backend=\); known backends are "
        r"'numpy', 'numba', 'cython', available here: '",
    ):
        BACKEND_CALLS[name](bad)
    with pytest.raises(TypeError, match=r"backend must be a string such as 'numba' or None, got float 1.0"):
        BACKEND_CALLS[name](1.0)


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"unknown backend 'gpu' \(from the environment variable FASTATTN_BACKEND\)"):
        fastattn.embed([0], TABLE)
    monkeypatch.delenv("FASTATTN_BACKEND")
    np.testing.assert_array_equal(fastattn.embed([1], TABLE), TABLE[[1]])


def test_too_many_threads_is_refused_and_changes_nothing():
    """More threads than Numba started with: refused at once, not on the Numba backend's first later use."""
    before = fastattn.get_num_threads()
    if "numba" in fastattn.available_backends():
        with pytest.raises(ValueError, match=r"NUMBA_NUM_THREADS"):
            fastattn.set_num_threads(10_000)
    else:  # nothing bounds the count without Numba
        fastattn.set_num_threads(before)
    assert fastattn.get_num_threads() == before
    for backend in fastattn.available_backends():
        still_works(backend)


def test_use_backend_is_restored_after_an_error_inside():
    with pytest.raises(IndexError):
        with fastattn.use_backend("numpy"):
            fastattn.embed([9], TABLE)
    from fastattn import _backends

    assert _backends._chosen.get() is None


# ------------------------------------------------------------------------------------------------ empty inputs
def test_empty_embed(backend):
    assert fastattn.embed(np.zeros(0, int), TABLE, backend=backend).shape == (0, 3)
    assert fastattn.embed(np.zeros((2, 0), int), TABLE, backend=backend).shape == (2, 0, 3)
    assert fastattn.embed(np.zeros((0, 4), int), TABLE, backend=backend).shape == (0, 4, 3)
    assert fastattn.embed([], TABLE, backend=backend).shape == (0, 3)  # [] is float64 to NumPy: still no ids
    assert fastattn.embed(np.zeros(3, int), np.zeros((5, 0), f32), backend=backend).shape == (3, 0)


def test_empty_positions_and_rope(backend):
    for shape in [(0, 6, 4), (2, 0, 4), (2, 6, 0), (0, 4)]:
        x = np.zeros(shape, f32)
        pe = np.zeros((8, shape[-1]), f32)
        assert fastattn.add_positions(x, pe, backend=backend).shape == shape
        assert fastattn.apply_rope(x, backend=backend).shape == shape
    assert fastattn.sinusoidal_positions(0, 4).shape == (0, 4)


@pytest.mark.parametrize("dtype", [f32, f64])
def test_empty_attention(backend, dtype):
    def run(qs, ks, vs, **kw):
        q, k, v = np.ones(qs, dtype), np.ones(ks, dtype), np.ones(vs, dtype)
        out = fastattn.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
        assert out.dtype == dtype
        return out

    assert run((0, 4, 5, 8), (0, 4, 7, 8), (0, 4, 7, 3)).shape == (0, 4, 5, 3)  # zero batch
    assert run((2, 0, 5, 8), (2, 0, 7, 8), (2, 0, 7, 3)).shape == (2, 0, 5, 3)  # zero heads
    assert run((2, 4, 0, 8), (2, 4, 7, 8), (2, 4, 7, 3)).shape == (2, 4, 0, 3)  # zero queries
    assert run((2, 4, 5, 8), (2, 4, 7, 8), (2, 4, 7, 0)).shape == (2, 4, 5, 0)  # zero value width
    assert run((1, 1, 5, 8), (1, 0, 7, 8), (1, 0, 7, 3)).shape == (1, 0, 5, 3)  # one query head over zero kv heads
    for kw in ({}, {"is_causal": True}, {"attn_mask": np.ones((5, 0), bool)}):
        out = run((2, 4, 5, 8), (2, 4, 0, 8), (2, 4, 0, 3), **kw)  # no key at all: every row attends to nothing
        assert out.shape == (2, 4, 5, 3)
        np.testing.assert_array_equal(out, 0.0)
    # E = 0: every score is an empty sum, 0, so the weights are uniform (as PyTorch): the mean of the visible values
    v = np.arange(6, dtype=dtype).reshape(1, 3, 2)
    out = fastattn.scaled_dot_product_attention(
        np.ones((1, 2, 0), dtype), np.ones((1, 3, 0), dtype), v, is_causal=True, backend=backend
    )
    np.testing.assert_allclose(out, [[[0.0, 1.0], [1.0, 2.0]]], rtol=1e-6)


def test_empty_self_attention_and_forward(backend):
    w = np.zeros((8, 8), f32)
    for shape in [(0, 5, 8), (2, 0, 8), (0, 8)]:
        out = fastattn.self_attention(np.zeros(shape, f32), w, w, w, w, n_heads=2, is_causal=True, backend=backend)
        assert out.shape == shape
    assert fwd(backend, ids=np.zeros((0, 3), int)).shape == (0, 3, 8)
    assert fwd(backend, ids=np.zeros((2, 0), int)).shape == (2, 0, 8)
    assert fwd(backend, ids=np.zeros(0, int)).shape == (0, 8)
