"""lm_eval with layer-level cosine skipping or scheduled layer reuse
(layer_skip_generation_functions.py, docs/concepts/).

    accelerate launch layer_skip_eval.py --model fast_dllm_v2 \\
        --model_args pretrained=Efficient-Large-Model/Fast_dLLM_v2_7B,cosine_threshold=0.99 \\
        --tasks gsm8k_boxed --apply_chat_template --batch_size 32 --output_path results
    accelerate launch layer_skip_eval.py ... \\
        --model_args pretrained=...,reuse_k=2,layer_subset=middle

Same command line as v2/eval.py; with no `policy=` the layer policy applies (cosine_threshold,
max_consecutive_skips, protect_first, protect_last), or scheduled reuse when reuse_k /
layer_subset / subset_size are given.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from v2.eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_policy="layer"))
