"""Greedy continuations from a fresh vLLM engine started on a Hugging Face directory, as a user
loads an export: `python vllm_greedy.py DIR PROMPTS.json NEW` prints one JSON list of token-id lists."""
import json
import os
import sys

if __name__ == "__main__":  # vLLM spawns its engine processes
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams
    model_dir, prompts_file, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = LLM(model=model_dir, dtype="float32", max_model_len=1024, enforce_eager=True,
              kv_cache_memory_bytes=1 << 28)
    prompts = json.loads(open(prompts_file).read())
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new), use_tqdm=False)
    print("GREEDY " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
