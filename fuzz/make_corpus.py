#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

safetensors: a few valid files and the known attacks (huge length prefix, huge header,
overlapping / out-of-range offsets, shape/size mismatch, duplicate keys, ...).
peft_config: adapter_config.json variants. gguf: valid LoRA adapters and broken ones.
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


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus")
    for target, seeds in (("safetensors", safetensors_seeds()), ("peft_config", peft_seeds()),
                          ("gguf", gguf_seeds())):
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for name, blob in seeds.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(blob)
        print(target, len(seeds), "seeds")


if __name__ == "__main__":
    main()
