#!/usr/bin/env python3
"""Write a random-weight MoE GGUF of real shapes directly in K-quants, for timing llama.cpp beside
bench (scripts/peer_bench.sh gguf). usage: peer_gguf.py {mixtral|qwen3moe} OUT.gguf --qtype Q4_K|Q2_K
[--layers N] [--tiny] --vocab VOCAB.gguf. Weights are valid K-quant blocks with small finite fp16
scales: for speed only, their outputs mean nothing."""
import sys, argparse, numpy as np

import gguf
from gguf import GGUFWriter, GGUFReader, GGMLQuantizationType as QT, GGML_QUANT_SIZES

ap = argparse.ArgumentParser()
ap.add_argument('arch'); ap.add_argument('out'); ap.add_argument('--qtype', default='Q4_K')
ap.add_argument('--layers', type=int, default=None); ap.add_argument('--tiny', action='store_true')
ap.add_argument('--vocab', required=True)
a = ap.parse_args()
rng = np.random.default_rng(0)
EXP_QT = QT[a.qtype]
ATT_QT = QT.Q4_K if a.qtype == 'Q4_K' else QT.Q3_K if False else QT.Q4_K   # attention kept Q4_K in both
OUT_QT = QT.Q6_K

def blocks(qt, nblk):
    bs, ts = GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, size=(min(nblk, 65536), ts), dtype=np.uint8)
    h = lambda v: np.frombuffer(np.float16(v).tobytes(), np.uint8)
    if qt == QT.Q4_K:  b[:, 0:2] = h(2e-4); b[:, 2:4] = h(1e-4)       # d, dmin first
    elif qt == QT.Q2_K: b[:, 80:82] = h(2e-3); b[:, 82:84] = h(1e-3)  # d, dmin last
    elif qt == QT.Q6_K: b[:, 208:210] = h(1e-4)                        # d last
    else: raise SystemExit(f'unsupported {qt}')
    return np.resize(b, (nblk, ts)) if nblk > b.shape[0] else b

if a.arch == 'mixtral':
    A = 'llama'; H, L, NE, K, FF, NH, NKV, HD = 4096, 32, 8, 2, 14336, 32, 8, 128
    if a.tiny: H, L, FF, NH, NKV = 256, 2, 512, 2, 1
else:
    A = 'qwen3moe'; H, L, NE, K, FF, NH, NKV, HD = 2048, 48, 128, 8, 768, 32, 4, 128
    if a.tiny: H, L, NE, FF, NH, NKV = 256, 2, 16, 256, 2, 1
L = a.layers or L
vr = GGUFReader(a.vocab)
toks = vr.fields['tokenizer.ggml.tokens']; V = len(toks.data)

w = GGUFWriter(a.out, A)
w.add_name(f'synthetic-{a.arch}-{a.qtype}'); w.add_context_length(32768 if A=='llama' else 40960)
w.add_embedding_length(H); w.add_block_count(L); w.add_head_count(NH); w.add_head_count_kv(NKV)
w.add_layer_norm_rms_eps(1e-5 if A=='llama' else 1e-6); w.add_rope_freq_base(1e6)
w.add_expert_count(NE); w.add_expert_used_count(K); w.add_vocab_size(V)
if A == 'llama':
    w.add_feed_forward_length(FF); w.add_rope_dimension_count(H // NH)
else:
    w.add_feed_forward_length(6144); w.add_expert_feed_forward_length(FF)
    w.add_key_length(HD); w.add_value_length(HD)
# copy tokenizer KV verbatim from the vocab-only GGUF shipped in llama.cpp/models/
for k, f in vr.fields.items():
    if not k.startswith('tokenizer.'): continue
    vt = f.types[0]
    if vt == gguf.GGUFValueType.ARRAY:
        et = f.types[-1]
        vals = [bytes(f.parts[i]).decode('utf-8', 'replace') if et == gguf.GGUFValueType.STRING else f.parts[i][0].item() for i in f.data]
        w.add_key_value(k, vals, vt, sub_type=et)
    elif vt == gguf.GGUFValueType.STRING:
        w.add_key_value(k, bytes(f.parts[f.data[0]]).decode(), vt)
    else:
        w.add_key_value(k, f.parts[f.data[0]][0].item(), vt)

hd = HD if A == 'qwen3moe' else H // NH
T = []  # (name, numpy_shape (outer..., ne0), qtype or None for f32)
T.append(('token_embd.weight', (V, H), ATT_QT)); T.append(('output_norm.weight', (H,), None)); T.append(('output.weight', (V, H), OUT_QT))
for i in range(L):
    p = f'blk.{i}.'
    T += [(p+'attn_norm.weight', (H,), None), (p+'attn_q.weight', (NH*hd, H), ATT_QT), (p+'attn_k.weight', (NKV*hd, H), ATT_QT),
          (p+'attn_v.weight', (NKV*hd, H), ATT_QT), (p+'attn_output.weight', (H, NH*hd), ATT_QT), (p+'ffn_norm.weight', (H,), None),
          (p+'ffn_gate_inp.weight', (NE, H), None),
          (p+'ffn_gate_exps.weight', (NE, FF, H), EXP_QT), (p+'ffn_down_exps.weight', (NE, H, FF), EXP_QT), (p+'ffn_up_exps.weight', (NE, FF, H), EXP_QT)]
    if A == 'qwen3moe': T += [(p+'attn_q_norm.weight', (hd,), None), (p+'attn_k_norm.weight', (hd,), None)]

def mk(shape, qt):
    if qt is None:
        return (np.ones(shape, np.float32) if len(shape) == 1 else rng.standard_normal(shape, dtype=np.float32) * 0.02)
    bs, ts = GGML_QUANT_SIZES[qt]; assert shape[-1] % bs == 0, (shape, qt)
    nb = int(np.prod(shape)) // bs
    return blocks(qt, nb).reshape(*shape[:-1], (shape[-1] // bs) * ts)

tot = 0
for n, s, qt in T:
    if qt is None: w.add_tensor_info(n, s, np.dtype(np.float32), int(np.prod(s)) * 4)
    else:
        bs, ts = GGML_QUANT_SIZES[qt]; bshape = (*s[:-1], s[-1] // bs * ts)
        w.add_tensor_info(n, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=qt)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
for n, s, qt in T:
    t = mk(s, qt); tot += t.nbytes; w.write_tensor_data(t)
w.close(); print(f'wrote {a.out}: {len(T)} tensors, {tot/1e9:.2f} GB, arch={A} L={L} H={H} E={NE} top{K} FF={FF} V={V}')
