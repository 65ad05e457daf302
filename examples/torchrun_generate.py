"""Generate with one fleetllm engine per torchrun process (the external_launcher backend).

    torchrun --nproc-per-node=2 examples/torchrun_generate.py --model DIR \
        --tensor-parallel-size 2 [--pipeline-parallel-size 1] [--output-json out.json]

Every rank runs the same deterministic schedule and gets the same outputs; the workers of
all ranks together hold the model (tensor and/or pipeline parallel).
"""

from __future__ import annotations

import argparse
import json
import os

from fleetllm import LLM, SamplingParams

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-token-ids", default=None,
                        help="a JSON list of token-id lists to use instead of the text prompts")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--output-json", default=None,
                        help="rank r writes its outputs to this path with .rank{r} appended")
    args = parser.parse_args()
    llm = LLM(args.model, distributed_executor_backend="external_launcher",
              tensor_parallel_size=args.tensor_parallel_size,
              pipeline_parallel_size=args.pipeline_parallel_size,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    prompts = ([{"prompt_token_ids": p} for p in json.loads(args.prompt_token_ids)]
               if args.prompt_token_ids else PROMPTS)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    rank = int(os.environ.get("RANK", 0))
    if args.output_json:
        with open(f"{args.output_json}.rank{rank}", "w") as f:
            json.dump([o.outputs[0].token_ids for o in outputs], f)
    if rank == 0:
        for o in outputs:
            print(repr((o.prompt or "") + o.outputs[0].text))
    llm.shutdown()


if __name__ == "__main__":
    main()
