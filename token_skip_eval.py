"""lm_eval with token-level cosine skipping (token_skip_generation_functions.py, docs/concepts/).

    accelerate launch token_skip_eval.py --model fast_dllm_v2 \\
        --model_args pretrained=Efficient-Large-Model/Fast_dLLM_v2_7B,cosine_threshold=0.95 \\
        --tasks gsm8k_boxed --apply_chat_template --batch_size 32 --output_path results

Same command line as v2/eval.py; with no `policy=` in --model_args the token policy applies, with
its options (cosine_threshold, min_layer, reuse_ratio, refresh_every) as model_args.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from v2.eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_policy="token"))
