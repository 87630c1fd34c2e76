#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

safetensors: a few valid files and the known attacks (huge length prefix, huge header,
overlapping / out-of-range offsets, shape/size mismatch, duplicate keys, ...).
peft_config: adapter_config.json variants. gguf: valid LoRA adapters and broken ones.
peft_structured (and peft_fourier: FourierFT / C3A): u32 little-endian n, n bytes of adapter_config.json, then
adapter_model.safetensors: the committed LoKr / MiSS / VeRA / RandLoRA / LoHa / IA3 / OFT / HRA fixtures
(tests/fixtures/peft_*/adapter) packed so, and edits of them that must be refused (config r
against tensor shapes, missing / extra / duplicate-role tensors, huge r, zero-size bases,
bf16 and unaligned tensors).
Standard library only, so the corpus can be rebuilt anywhere."""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def st(header, data=b"", pad=True, raw_header=None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    if pad and raw_header is None:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(n, start=0.0):
    return struct.pack("<%df" % n, *[start + i for i in range(n)])


def safetensors_seeds():
    ok = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
          "b": {"dtype": "BF16", "shape": [3], "data_offsets": [24, 30]},
          "__metadata__": {"format": "pt"}}
    s = {}
    s["valid"] = st(ok, f32(6) + b"\x80\x3f\x00\x40\x40\x40")
    s["empty"] = st({})
    s["zero_size"] = st({"z": {"dtype": "F16", "shape": [0, 4], "data_offsets": [0, 0]}})
    dtypes = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
              "F8_E4M3", "F8_E5M2"]
    sizes = [1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8, 1, 1]
    hdr, off = {}, 0
    for d, z in zip(dtypes, sizes):
        hdr["t_" + d] = {"dtype": d, "shape": [2], "data_offsets": [off, off + 2 * z]}
        off += 2 * z
    s["all_dtypes"] = st(hdr, bytes(range(off)))
    s["ws_leading_trailing"] = st(None, f32(1), raw_header=b'  \n{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\t  ')
    # attacks
    s["huge_length_prefix"] = struct.pack("<Q", 2**64 - 1) + b"{}"
    s["huge_header"] = struct.pack("<Q", 100_000_001) + b"{" + b" " * 64
    s["length_past_eof"] = struct.pack("<Q", 4096) + b"{}"
    s["too_small"] = b"\x02\x00\x00"
    s["overlap"] = st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, f32(3))
    s["gap"] = st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                   "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, f32(3))
    s["out_of_range"] = st({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32(2))
    s["offsets_reversed"] = st({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, f32(2))
    s["shape_size_mismatch"] = st({"a": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 8]}}, f32(2))
    s["shape_overflow"] = st({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 0]}})
    s["size_overflow"] = st({"a": {"dtype": "F64", "shape": [2**61 + 1], "data_offsets": [0, 8]}}, f32(2))
    s["duplicate_keys"] = st(None, f32(2), raw_header=b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                                       b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    s["duplicate_inner_keys"] = st(None, f32(1), raw_header=b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}')
    s["trailing_bytes"] = st(ok, f32(6) + b"\x80\x3f\x00\x40\x40\x40" + b"junk")
    s["bad_dtype"] = st({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, f32(1))
    s["negative_shape"] = st({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, f32(1))
    s["float_shape"] = st({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, f32(1))
    s["bad_metadata"] = st({"__metadata__": {"k": 1}})
    s["invalid_utf8"] = st(None, raw_header=b'{"\xff\xfe": 1}')
    s["not_object"] = st(None, raw_header=b"[1, 2, 3]")
    s["deep_nesting"] = st(None, raw_header=b"[" * 5000 + b"]" * 5000)
    s["three_offsets"] = st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, f32(1))
    return s


def peft_seeds():
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
            "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
            "rank_pattern": {"layers\\.0\\.q_proj": 2}, "alpha_pattern": {"v_proj": 16}}
    s = {"lora": json.dumps(base).encode()}
    s["rslora_dora"] = json.dumps(dict(base, use_rslora=True, use_dora=True)).encode()
    s["lokr"] = json.dumps({"peft_type": "LOKR", "r": 4}).encode()
    s["bad_regex"] = json.dumps(dict(base, rank_pattern={"(unclosed": 3})).encode()
    s["dup"] = b'{"peft_type": "LORA", "r": 4, "r": 8}'
    s["wrong_types"] = json.dumps(dict(base, r="four", lora_alpha=[1])).encode()
    s["target_regex"] = json.dumps(dict(base, target_modules=".*\\.(q|v)_proj")).encode()
    return s


GGUF_TYPES = {"u8": 0, "i8": 1, "u16": 2, "i16": 3, "u32": 4, "i32": 5, "f32": 6, "bool": 7, "str": 8, "arr": 9,
              "u64": 10, "i64": 11, "f64": 12}


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(kvs, tensors, align=32, version=3, tensor_count=None, kv_count=None):
    out = b"GGUF" + struct.pack("<I", version)
    out += struct.pack("<QQ", len(tensors) if tensor_count is None else tensor_count,
                       len(kvs) if kv_count is None else kv_count)
    for k, t, v in kvs:
        out += gstr(k) + struct.pack("<I", GGUF_TYPES[t])
        if t == "str":
            out += gstr(v)
        elif t == "f32":
            out += struct.pack("<f", v)
        elif t == "u32":
            out += struct.pack("<I", v)
        else:
            out += v
    data, off = b"", 0
    for name, ne, ttype, payload in tensors:
        out += gstr(name) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne)
        out += struct.pack("<IQ", ttype, off)
        pad = (align - len(payload) % align) % align
        data += payload + b"\x00" * pad
        off += len(payload) + pad
    out += b"\x00" * ((align - len(out) % align) % align)
    return out + data


def gguf_seeds():
    kv = [("general.architecture", "str", "llama"), ("general.type", "str", "adapter"),
          ("adapter.type", "str", "lora"), ("adapter.lora.alpha", "f32", 8.0)]
    # A [r=2, in=3] -> ne [3, 2]; B [out=4, r=2] -> ne [2, 4]
    t = [("blk.0.attn_q.weight.lora_a", [3, 2], 0, f32(6)), ("blk.0.attn_q.weight.lora_b", [2, 4], 0, f32(8))]
    s = {"lora": gguf(kv, t)}
    s["lora_f16"] = gguf(kv, [("x.lora_a", [4, 1], 1, b"\x00\x3c" * 4), ("x.lora_b", [1, 2], 1, b"\x00\x3c" * 2)])
    s["align64"] = gguf(kv + [("general.alignment", "u32", 64)], t, align=64)
    s["bad_magic"] = b"GGUX" + s["lora"][4:]
    s["v1"] = gguf(kv, t, version=1)
    s["huge_counts"] = gguf(kv, t, tensor_count=2**63, kv_count=2**62)
    s["huge_string"] = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**64 - 2) + b"ab"
    s["bad_alignment"] = gguf(kv + [("general.alignment", "u32", 3)], t)
    s["offset_out_of_range"] = s["lora"][:-16]
    s["array_kv"] = gguf(kv + [("arr", "arr", struct.pack("<IQ", 6, 3) + f32(3))], t)
    s["dim_overflow"] = gguf(kv, [("x.lora_a", [2**40, 2**40], 0, b"")])
    s["dup_key"] = gguf(kv + [kv[0]], t)
    s["many_dims"] = gguf(kv, [("x", [1, 1, 1, 1, 1], 0, f32(1))])
    return s


FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
STRUCTURED = ["peft_lokr", "peft_lokr_both", "peft_lokr_dense", "peft_miss", "peft_miss_mini", "peft_miss_bat",
              "peft_vera", "peft_randlora", "peft_randlora_sparse", "peft_loha", "peft_ia3", "peft_oft",
              "peft_oft_cayley", "peft_oft_share", "peft_hra", "peft_hra_gs", "peft_boft", "peft_boft_butterfly",
              "peft_adalora", "peft_adalora_plain", "peft_shira", "peft_road", "peft_road_1", "peft_road_4",
              "peft_hira", "peft_delora", "peft_vblora", "peft_vblora_topk", "peft_vblora_topk1", "peft_pvera"]


def st_read(blob):
    """{name: [dtype, shape, bytes]} in file order (metadata dropped)."""
    n = struct.unpack("<Q", blob[:8])[0]
    h = json.loads(blob[8:8 + n])
    out = {}
    for k, v in h.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        out[k] = [v["dtype"], list(v["shape"]), blob[8 + n + b:8 + n + e]]
    return out


def st_write(tensors, pad=True):
    hdr, data = {}, b""
    for k, (dt, shape, raw) in tensors.items():
        hdr[k] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return st(hdr, data, pad=pad)


def pack(cfg, st_blob):
    c = cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode()
    return struct.pack("<I", len(c)) + c + st_blob


def to_bf16(raw):
    return b"".join(raw[i + 2:i + 4] for i in range(0, len(raw), 4))


def fixture_seeds(names):
    """The fixture adapters `names` (tests/fixtures/<name>/adapter), packed as seeds, and edit(name, ...):
    a fixture with config keys changed, tensors whose names end in one of `drop` removed, and change(t)
    applied to its tensors {name: [dtype, shape, bytes]}, packed again."""
    s, fx = {}, {}
    for name in names:
        d = os.path.join(FIXTURES, name, "adapter")
        with open(os.path.join(d, "adapter_config.json"), "rb") as f:
            cfg = f.read()
        with open(os.path.join(d, "adapter_model.safetensors"), "rb") as f:
            blob = f.read()
        s[name] = pack(cfg, blob)
        fx[name] = (json.loads(cfg), st_read(blob))

    def edit(name, cfg_changes=None, drop=(), change=None, pad=True):
        cfg, t = fx[name]
        cfg = dict(cfg, **(cfg_changes or {}))
        t = {k: list(v) for k, v in t.items() if not any(k.endswith(d) for d in drop)}
        if change:
            change(t)
        return pack(cfg, st_write(t, pad=pad))

    edit.config = lambda name: fx[name][0]  # the fixture's parsed adapter_config.json
    return s, edit


def peft_structured_seeds():
    s, edit = fixture_seeds(STRUCTURED)

    q = "base_model.model.blocks.0.q."
    s["lokr_r_mismatch"] = edit("peft_lokr", {"r": 3})
    s["lokr_huge_r"] = edit("peft_lokr", {"r": 2**31, "rank_pattern": {}})
    s["lokr_missing_w2_b"] = edit("peft_lokr", drop=["q.lokr_w2_b"])
    s["lokr_dense_and_low_rank"] = edit("peft_lokr", change=lambda t: t.update(
        {q + "lokr_w2": ["F32", [6, 4], f32(24)]}))
    s["lokr_w2_inner_mismatch"] = edit("peft_lokr", change=lambda t: t.update(
        {q + "lokr_w2_b": ["F32", [3, 4], f32(12)]}))
    s["lokr_conv"] = edit("peft_lokr_dense", change=lambda t: t.update(
        {q + "lokr_w2": ["F32", [12, 8, 1, 1], t[q + "lokr_w2"][2]]}))
    s["lokr_bf16_unaligned"] = edit("peft_lokr_both", pad=False, change=lambda t: t.update(
        {k: ["BF16", v[1], to_bf16(v[2])] for k, v in t.items()}))
    s["lokr_zero_rows"] = edit("peft_lokr_dense", change=lambda t: t.update(
        {q + "lokr_w1": ["F32", [0, 2], b""]}))
    s["miss_r_mismatch"] = edit("peft_miss", {"r": 4})
    s["miss_huge_r"] = edit("peft_miss", {"r": 2**31}, change=lambda t: t.update(
        {q + "miss_block": ["F32", [2**31, 0], b""]}))
    s["miss_mini_r_mismatch"] = edit("peft_miss_mini", {"mini_r": 5})
    s["miss_zero_cols"] = edit("peft_miss", change=lambda t: t.update({q + "miss_block": ["F32", [3, 0], b""]}))
    s["miss_bat_bad_block"] = edit("peft_miss_bat", change=lambda t: t.update(
        {q + "miss_block": ["F32", [8, 4, 3], f32(96)]}))
    s["miss_bat_zero"] = edit("peft_miss_bat", change=lambda t: t.update({q + "miss_block": ["F32", [0, 4, 4], b""]}))
    s["miss_bat_as_2d"] = edit("peft_miss_bat", change=lambda t: t.update({q + "miss_block": ["F32", [24, 4], f32(96)]}))
    s["bone"] = edit("peft_miss", {"peft_type": "BONE"}, change=lambda t: t.update(
        {k.replace("miss_block", "bone_block"): t.pop(k) for k in list(t)}))
    s["miss_empty"] = edit("peft_miss", drop=["miss_block"])
    s["vera_missing_B"] = edit("peft_vera", drop=["base_model.vera_B"])
    s["vera_missing_lambda_d"] = edit("peft_vera", drop=["q.vera_lambda_d"])
    s["vera_r_mismatch"] = edit("peft_vera", {"r": 5})
    s["vera_lambda_d_short"] = edit("peft_vera", change=lambda t: t.update({q + "vera_lambda_d": ["F32", [3], f32(3)]}))
    s["vera_lambda_b_long"] = edit("peft_vera", change=lambda t: t.update({q + "vera_lambda_b": ["F32", [30], f32(30)]}))
    s["vera_bases_disagree"] = edit("peft_vera", change=lambda t: t.update(
        {"base_model.vera_B": ["F32", [24, 3], f32(72)]}))
    s["vera_zero_in"] = edit("peft_vera", change=lambda t: t.update({"base_model.vera_A": ["F32", [4, 0], b""]}))
    s["vera_no_projection"] = edit("peft_vera", {"save_projection": False})
    s["randlora_r_mismatch"] = edit("peft_randlora", {"r": 5})
    s["randlora_missing_gamma"] = edit("peft_randlora", drop=["q.randlora_gamma"])
    s["randlora_gamma_wide"] = edit("peft_randlora", change=lambda t: t.update(
        {q + "randlora_gamma": ["F32", [4, 30], f32(120)]}))
    s["randlora_copy_differs"] = edit("peft_randlora", change=lambda t: t.update(
        {q + "randlora_A": ["F32", [4, 1, 24], f32(96, 1.0)]}))
    s["randlora_zero_B"] = edit("peft_randlora", drop=[".randlora_A", ".randlora_B"], change=lambda t: t.update(
        {"base_model.randlora_A": ["F32", [4, 1, 24], f32(96)],
         "base_model.randlora_B": ["F32", [0, 2**40, 4], b""]}))
    # N·r of randlora_B wraps around 2^64 (no data: max_dim is 0)
    s["randlora_B_wraps"] = edit("peft_randlora", drop=[".randlora_A", ".randlora_B"], change=lambda t: t.update(
        {"base_model.randlora_A": ["F32", [4, 1, 24], f32(96)],
         "base_model.randlora_B": ["F32", [0, 2**62, 4], b""]}))
    s["randlora_A_2d"] = edit("peft_randlora", change=lambda t: t.update(
        {"base_model.randlora_A": ["F32", [4, 24], f32(96)]}))
    s["randlora_bf16"] = edit("peft_randlora_sparse", change=lambda t: t.update(
        {k: ["BF16", v[1], to_bf16(v[2])] for k, v in t.items()}))
    # LoHa / IA3 / OFT (issue 16)
    s["loha_r_mismatch"] = edit("peft_loha", {"r": 4, "rank_pattern": {}})
    s["loha_missing_w2_b"] = edit("peft_loha", drop=["q.hada_w2_b"])
    s["loha_tucker"] = edit("peft_loha", change=lambda t: t.update({q + "hada_t1": ["F32", [3, 3, 1, 1], f32(9)]}))
    s["loha_conv_factor"] = edit("peft_loha", change=lambda t: t.update({q + "hada_w1_b": ["F32", [3, 16, 1, 1], f32(48)]}))
    s["ia3_wrong_side"] = edit("peft_ia3", {"feedforward_modules": []})
    s["ia3_matrix"] = edit("peft_ia3", change=lambda t: t.update({q + "ia3_l": ["F32", [2, 12], f32(24)]}))
    s["ia3_regex_ff"] = edit("peft_ia3", {"feedforward_modules": ".*v"})
    s["oft_not_triangular"] = edit("peft_oft", change=lambda t: t.update({q + "oft_R.weight": ["F32", [4, 5], f32(20)]}))
    s["oft_both_r_and_size"] = edit("peft_oft", {"r": 4})
    s["oft_zero_blocks"] = edit("peft_oft", change=lambda t: t.update({q + "oft_R.weight": ["F32", [0, 6], b""]}))
    s["oft_huge_block"] = edit("peft_oft", change=lambda t: t.update(
        {q + "oft_R.weight": ["F32", [0, 2**40 * (2**40 - 1) // 2], b""]}))
    s["oft_share_rows"] = edit("peft_oft_share", change=lambda t: t.update({q + "oft_R.weight": ["F32", [2, 6], f32(12)]}))
    # HRA (issue 16)
    s["hra_r_mismatch"] = edit("peft_hra", {"r": 4})
    s["hra_zero_column"] = edit("peft_hra", change=lambda t: t.update({q + "hra_u": ["F32", [16, 3], b"\0" * 192]}))
    s["hra_gs_dependent"] = edit("peft_hra_gs", change=lambda t: t.update(
        {q + "hra_u": ["F32", [16, 4], struct.pack("<64f", *([1.0] * 64))]}))
    s["hra_vector"] = edit("peft_hra", change=lambda t: t.update({q + "hra_u": ["F32", [48], f32(48)]}))
    s["hra_empty"] = edit("peft_hra", {"r": 0}, change=lambda t: t.update({q + "hra_u": ["F32", [0, 0], b""]}))
    s["hra_wide"] = edit("peft_hra", {"r": 300}, change=lambda t: t.update(
        {k: ["F32", [1, 300], f32(300, 1.0)] for k in list(t)}))
    # BOFT and AdaLoRA (issue 16)
    s["boft_3d"] = edit("peft_boft", change=lambda t: t.update({q + "boft_R": ["F32", [4, 4, 4], f32(64)]}))
    s["boft_not_square"] = edit("peft_boft", change=lambda t: t.update({q + "boft_R": ["F32", [1, 4, 4, 2], f32(32)]}))
    s["boft_factors_mismatch"] = edit("peft_boft_butterfly", {"boft_n_butterfly_factor": 2})
    s["boft_odd_butterfly"] = edit("peft_boft_butterfly", {"boft_block_size": 0, "boft_block_num": 3},
                                   change=lambda t: t.update({q + "boft_R": ["F32", [3, 3, 2, 2], f32(36)]}))
    s["boft_huge"] = edit("peft_boft", change=lambda t: t.update({q + "boft_R": ["F32", [1, 2**40, 2**40, 2**40], b""]}))
    s["boft_many_factors"] = edit("peft_boft_butterfly", {"boft_n_butterfly_factor": 70},
                                  change=lambda t: t.update({q + "boft_R": ["F32", [70, 8, 2, 2], f32(70 * 32)]}))
    s["boft_missing_s"] = edit("peft_boft", drop=["q.boft_s"])
    s["boft_s_row"] = edit("peft_boft", change=lambda t: t.update({q + "boft_s": ["F32", [1, 24], f32(24)]}))
    s["adalora_mask_count"] = edit("peft_adalora", {"rank_pattern": {"blocks.0.q.lora_E": [True, True, True, True]}})
    s["adalora_mask_length"] = edit("peft_adalora", {"rank_pattern": {"blocks.0.q.lora_E": [True]}})
    s["adalora_mask_not_bool"] = edit("peft_adalora", {"rank_pattern": {"blocks.0.q.lora_E": 3}})
    s["adalora_E_wide"] = edit("peft_adalora", change=lambda t: t.update({q + "lora_E": ["F32", [1, 3], f32(3)]}))
    s["adalora_missing_B"] = edit("peft_adalora_plain", drop=["q.lora_B"])
    s["adalora_zero_r"] = edit("peft_adalora_plain", {"init_r": 0})
    # SHiRA, RoAd, HiRA, DeLoRA (issue 16, peftb)
    s["shira_repeated_index"] = edit("peft_shira", change=lambda t: t.update(
        {q + "shira_indices": ["I32", [2, 2], struct.pack("<4i", 0, 0, 1, 1)], q + "shira_weight": ["F32", [2], f32(2)]}))
    s["shira_negative_index"] = edit("peft_shira", change=lambda t: t.update(
        {q + "shira_indices": ["I32", [2, 1], struct.pack("<2i", -1, 0)], q + "shira_weight": ["F32", [1], f32(1)]}))
    s["shira_huge_index"] = edit("peft_shira", change=lambda t: t.update(
        {q + "shira_indices": ["I32", [2, 1], struct.pack("<2i", 2**31 - 1, 2**31 - 1)], q + "shira_weight": ["F32", [1], f32(1)]}))
    s["shira_count_mismatch"] = edit("peft_shira", change=lambda t: t.update({q + "shira_weight": ["F32", [3], f32(3)]}))
    s["shira_float_indices"] = edit("peft_shira", change=lambda t: t.update(
        {q + "shira_indices": ["F32", [2, 2], struct.pack("<4f", 0.5, 1, 2, 3)], q + "shira_weight": ["F32", [2], f32(2)]}))
    s["road_variant_mismatch"] = edit("peft_road", {"variant": "road_4"})
    s["road_odd_group"] = edit("peft_road", {"group_size": 3})
    s["road_group_too_big"] = edit("peft_road", {"group_size": 48})
    s["road_missing_alpha"] = edit("peft_road_1", drop=["q.road_alpha"])
    s["hira_r_mismatch"] = edit("peft_hira", {"r": 4})
    s["hira_missing_B"] = edit("peft_hira", drop=["q.hira_B"])
    s["delora_w_norm_short"] = edit("peft_delora", change=lambda t: t.update({q + "delora_w_norm": ["F32", [3], f32(3)]}))
    s["delora_lambda_wide"] = edit("peft_delora", change=lambda t: t.update({q + "delora_lambda": ["F32", [2], f32(2)]}))
    s["delora_rank_pattern"] = edit("peft_delora", {"rank_pattern": {}})
    s["vblora_bank_mismatch"] = edit("peft_vblora", {"num_vectors": 12})
    s["vblora_topk_above_n"] = edit("peft_vblora", {"topk": 20})
    s["vblora_logits_2d"] = edit("peft_vblora", change=lambda t: t.update({q + "vblora_logits_A": ["F32", [15, 11], f32(165)]}))
    s["vblora_topk_index_range"] = edit("peft_vblora_topk1", change=lambda t: t.update(
        {q + "vblora_logits_A_topk_indices": ["U8", [2, 5, 1], bytes([7] * 10)]}))
    s["vblora_topk_missing_weights"] = edit("peft_vblora_topk", drop=["q.vblora_logits_B_topk_weights"])
    s["vblora_topk_float_indices"] = edit("peft_vblora_topk1", change=lambda t: t.update(
        {q + "vblora_logits_A_topk_indices": ["F32", [2, 5, 1], f32(10)]}))
    s["pvera_lambda_d_short"] = edit("peft_pvera", change=lambda t: t.update({q + "pvera_lambda_d": ["F32", [5], f32(5)]}))
    s["pvera_no_projection"] = edit("peft_pvera", {"save_projection": False})
    s["pvera_r_mismatch"] = edit("peft_pvera", {"r": 3})
    s["unknown_key"] = edit("peft_miss", change=lambda t: t.update({"base_model.model.x.lora_A.weight": ["F32", [1], f32(1)]}))
    s["length_past_end"] = struct.pack("<I", 2**32 - 1) + json.dumps(edit.config("peft_miss")).encode()
    s["config_only"] = pack(edit.config("peft_vera"), b"")
    return s


def peft_fourier_seeds():
    """FourierFT, C3A and WaveFT directories (tests/fixtures/peft_fourierft*, peft_c3a, peft_waveft*), packed as for
    peft_structured, and edits that must be refused or read without a crash."""
    s, edit = fixture_seeds(["peft_fourierft", "peft_fourierft_seed", "peft_c3a", "peft_waveft", "peft_waveft_direct", "peft_waveft_odd"])

    q = "base_model.model.blocks.0.q."
    s["fourierft_2d"] = edit("peft_fourierft", change=lambda t: t.update({q + "fourierft_spectrum": ["F32", [2, 3], f32(6)]}))
    s["fourierft_empty"] = edit("peft_fourierft", change=lambda t: t.update({q + "fourierft_spectrum": ["F32", [0], b""]}))
    s["fourierft_long"] = edit("peft_fourierft", change=lambda t: t.update({q + "fourierft_spectrum": ["F32", [500], f32(500)]}))
    s["fourierft_seed_negative"] = edit("peft_fourierft", {"random_loc_seed": -1})
    s["fourierft_fan_in_fan_out"] = edit("peft_fourierft", {"fan_in_fan_out": True})
    s["c3a_2d"] = edit("peft_c3a", change=lambda t: t.update({q + "c3a_kernel": ["F32", [6, 4], f32(24)]}))
    s["c3a_zero_block"] = edit("peft_c3a", change=lambda t: t.update({q + "c3a_kernel": ["F32", [6, 4, 0], b""]}))
    s["c3a_huge"] = edit("peft_c3a", change=lambda t: t.update({q + "c3a_kernel": ["F32", [2**40, 2**30, 0], b""]}))
    s["c3a_bf16"] = edit("peft_c3a", change=lambda t: t.update({k: ["BF16", v[1], to_bf16(v[2])] for k, v in t.items()}))
    s["waveft_db4"] = edit("peft_waveft", {"wavelet_family": "db4"})
    s["waveft_idwt_string"] = edit("peft_waveft", {"use_idwt": "yes"})
    s["waveft_long"] = edit("peft_waveft", change=lambda t: t.update({q + "waveft_spectrum": ["F32", [400], f32(400)]}))
    s["c3a_wrong_key"] = edit("peft_c3a", change=lambda t: t.update({q + "fourierft_spectrum": ["F32", [3], f32(3)]}))
    return s


def peft_gralora_unilora_seeds():
    """GraLoRA and UniLoRA directories (tests/fixtures/peft_gralora*, peft_unilora*), packed as for
    peft_structured, and edits that must be refused or read without a crash."""
    s, edit = fixture_seeds(["peft_gralora", "peft_gralora_k2", "peft_unilora", "peft_unilora_noidx"])

    q = "base_model.model.blocks.0.q."
    s["gralora_k_mismatch"] = edit("peft_gralora", {"gralora_k": 2})
    s["gralora_r_not_multiple"] = edit("peft_gralora", {"r": 5})
    s["gralora_hybrid_zero"] = edit("peft_gralora", {"hybrid_r": 0})
    s["gralora_hybrid_more"] = edit("peft_gralora_k2", {"hybrid_r": 3})
    s["gralora_A_2d"] = edit("peft_gralora", change=lambda t: t.update({q + "gralora_A": ["F32", [15, 6], f32(90)]}))
    s["gralora_B_short"] = edit("peft_gralora", change=lambda t: t.update({q + "gralora_B": ["F32", [3, 6, 1], f32(18)]}))
    s["gralora_general_wide"] = edit("peft_gralora", change=lambda t: t.update(
        {q + "gralora_A_general.weight": ["F32", [2, 16], f32(32)]}))
    s["gralora_bf16"] = edit("peft_gralora", change=lambda t: t.update({k: ["BF16", v[1], to_bf16(v[2])] for k, v in t.items()}))
    s["unilora_index_out_of_range"] = edit("peft_unilora", change=lambda t: t.update(
        {q + "unilora_indices_A": ["I64", [3, 13], struct.pack("<39q", *([50] * 39))]}))
    s["unilora_negative_index"] = edit("peft_unilora", change=lambda t: t.update(
        {q + "unilora_indices_B": ["I64", [17, 3], struct.pack("<51q", *([-1] * 51))]}))
    s["unilora_theta_short"] = edit("peft_unilora", change=lambda t: t.update(
        {"base_model.unilora_theta_d": ["F32", [20], f32(20)]}))
    s["unilora_r_mismatch"] = edit("peft_unilora", {"r": 2})
    s["unilora_scales_shape"] = edit("peft_unilora", change=lambda t: t.update({q + "unilora_scales_A": ["F32", [13, 3], f32(39)]}))
    s["unilora_float_indices"] = edit("peft_unilora", change=lambda t: t.update(
        {q + "unilora_indices_A": ["F32", [3, 13], struct.pack("<39f", *([0.5] * 39))]}))
    return s


def peft_kasa_bdlora_tinylora_seeds():
    """KaSA, BD-LoRA and TinyLoRA directories (tools/fixtures_kasa_bdlora_tinylora.py), packed as
    for peft_structured, and edits that must be refused or read without a crash."""
    s, edit = fixture_seeds(["peft_kasa", "peft_kasa_rslora", "peft_bdlora", "peft_bdlora_mixed", "peft_tinylora",
                 "peft_tinylora_tied"])

    q = "base_model.model.q."
    s["kasa_diag_long"] = edit("peft_kasa", change=lambda t: t.update({q + "lora_diag": ["F32", [7], f32(7)]}))
    s["kasa_diag_2d"] = edit("peft_kasa", change=lambda t: t.update({q + "lora_diag": ["F32", [2, 2], f32(4)]}))
    s["kasa_r_mismatch"] = edit("peft_kasa", {"r": 3})
    s["kasa_with_bdlora"] = edit("peft_kasa", {"use_bdlora": {"nblocks": 2}})
    s["kasa_bf16"] = edit("peft_kasa", change=lambda t: t.update({k: ["BF16", v[1], to_bf16(v[2])] for k, v in t.items()}))
    s["bdlora_nblocks_2"] = edit("peft_bdlora", {"use_bdlora": {"target_modules_bd_a": ["q", "head"],
                                                                "target_modules_bd_b": ["v"], "nblocks": 2}})
    s["bdlora_nblocks_0"] = edit("peft_bdlora", {"use_bdlora": {"target_modules_bd_a": ["q"], "nblocks": 0}})
    s["bdlora_both_sides"] = edit("peft_bdlora", {"use_bdlora": {"target_modules_bd_a": ["q"],
                                                                 "target_modules_bd_b": ["q"], "nblocks": 3}})
    s["bdlora_strict_unmatched"] = edit("peft_bdlora_mixed", {"use_bdlora": {"target_modules_bd_b": ["q"], "nblocks": 3,
                                                                              "match_strict": True}})
    s["bdlora_A_short"] = edit("peft_bdlora", change=lambda t: t.update({q + "lora_A.weight": ["F32", [6, 4], f32(24)]}))
    s["tinylora_groups_mismatch"] = edit("peft_tinylora", {"weight_tying": 0.0})
    s["tinylora_no_P"] = edit("peft_tinylora", change=lambda t: t.pop(q + "tinylora_P"))
    s["tinylora_P_wrong"] = edit("peft_tinylora", change=lambda t: t.update({q + "tinylora_P": ["F32", [5, 2, 3], f32(30)]}))
    s["tinylora_v_name"] = edit("peft_tinylora_tied", change=lambda t: t.update({"base_model.tinylora_v.x": ["F32", [4], f32(4)]}))
    s["tinylora_v_gap"] = edit("peft_tinylora", change=lambda t: t.update({"base_model.tinylora_v.5": t.pop("base_model.tinylora_v.1")}))
    return s


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus")
    for target, seeds in (("safetensors", safetensors_seeds()), ("peft_config", peft_seeds()),
                          ("gguf", gguf_seeds()), ("peft_structured", peft_structured_seeds()),
                          ("peft_fourier", peft_fourier_seeds()),
                          ("peft_gralora_unilora", peft_gralora_unilora_seeds()),
                          ("peft_kasa_bdlora_tinylora", peft_kasa_bdlora_tinylora_seeds())):
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for name, blob in seeds.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(blob)
        print(target, len(seeds), "seeds")


if __name__ == "__main__":
    main()
