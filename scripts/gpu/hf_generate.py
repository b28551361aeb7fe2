"""The reference for the GPU check: Hugging Face transformers' `generate` on the same model
directory, greedy, a fixed number of new tokens, for each batch size; prints output tokens/s
as JSON lines. A static batch (all sequences start and end together), so it is an upper
bound for what transformers serves at that concurrency."""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "Write a story about a lighthouse keeper who finds a message in a bottle."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=getattr(torch, args.dtype)).to(dev).eval()
    for b in [int(x) for x in args.batches.split(",")]:
        enc = tok([PROMPT] * b, return_tensors="pt", padding=True).to(dev)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.time()
            out = model.generate(**enc, **kw)
            if dev == "cuda":
                torch.cuda.synchronize()
            secs = time.time() - t
        new = (out.shape[1] - enc["input_ids"].shape[1]) * b
        print(json.dumps({"engine": "transformers", "batch": b, "output_tokens": int(new),
                          "seconds": round(secs, 3), "output_tokens_per_s": round(new / secs, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
