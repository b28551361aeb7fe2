"""Writes a random-weight Llama in the Hugging Face layout (config.json, model.safetensors in
float16, tokenizer files copied from --tokenizer), of a realistic size, for the GPU check:
the machine that runs it has no network and only 64 MiB travel with a call, so the model is
made there. Needs only numpy and safetensors (present wherever torch is).

Sizes: 1b (Llama-3.2-1B's shape with SmolLM2's 49,152-token vocabulary, about 1.0 B
parameters), 360m (SmolLM2-360M's shape), tiny (a smoke test on a CPU).
"""
import argparse
import json
import pathlib
import shutil
import time

import numpy as np
from safetensors.numpy import save_file

SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                 num_attention_heads=15, num_key_value_heads=5),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="dir with tokenizer.json, tokenizer_config.json")
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = pathlib.Path(args.tokenizer)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out / f)
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = len(tok["model"]["vocab"]) + sum(
        1 for t in tok.get("added_tokens", []) if t["content"] not in tok["model"]["vocab"])
    tcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    eos = ids.get(tcfg.get("eos_token"), 0)
    bos = ids.get(tcfg.get("bos_token"), eos)
    shape = SIZES[args.size]
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        hidden_act="silu", tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
        torch_dtype="float16", attention_bias=False, mlp_bias=False, **shape)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))

    rng = np.random.default_rng(args.seed)
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    hd = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd

    def mat(rows, cols):
        # Small, like a trained model's: keeps activations and logits in a sane range.
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (0.5 / np.sqrt(cols))).astype(np.float16)

    started = time.time()
    w = {"model.embed_tokens.weight": mat(vocab, h) * np.float16(8.0),
         "model.norm.weight": np.ones(h, np.float16)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = np.ones(h, np.float16)
        w[f"{p}.post_attention_layernorm.weight"] = np.ones(h, np.float16)
        w[f"{p}.self_attn.q_proj.weight"] = mat(h, h)
        w[f"{p}.self_attn.k_proj.weight"] = mat(kv, h)
        w[f"{p}.self_attn.v_proj.weight"] = mat(kv, h)
        w[f"{p}.self_attn.o_proj.weight"] = mat(h, h)
        w[f"{p}.mlp.gate_proj.weight"] = mat(inter, h)
        w[f"{p}.mlp.up_proj.weight"] = mat(inter, h)
        w[f"{p}.mlp.down_proj.weight"] = mat(h, inter)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    params = sum(v.size for v in w.values())
    print(json.dumps({"model": str(out), "size": args.size, "parameters": int(params),
                      "vocab_size": vocab, "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
