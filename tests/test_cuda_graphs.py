"""The engine's CUDA-graph path gives exactly the eager path's tokens and statistics (GPU only;
skipped elsewhere). Run on the GPU machine: python -m pytest -q tests/test_cuda_graphs.py"""

import pytest
import torch

from layer_skip_generation_functions import LayerReusePolicy, LayerSkipPolicy
from tests.conftest import IDS, prompt, random_network
from token_skip_generation_functions import TokenSkipPolicy
from v2.generate import GenerationConfig, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POLICIES = {
    "none": lambda: None,
    "token_ct0.9": lambda: TokenSkipPolicy(cosine_threshold=0.9),
    "token_rr0.5": lambda: TokenSkipPolicy(reuse_ratio=0.5),
    "layer_ct0.5": lambda: LayerSkipPolicy(cosine_threshold=0.5),
    "reuse_k2_middle": lambda: LayerReusePolicy(reuse_k=2, layer_subset="middle", subset_size=2),
}


@pytest.mark.parametrize("block_cache", [False, True])
@pytest.mark.parametrize("threshold", [1.0, 0.5])
@pytest.mark.parametrize("name", list(POLICIES))
def test_graphs_equal_eager(name, threshold, block_cache):
    model = random_network(seed=3, num_hidden_layers=6).cuda()
    prompts = [prompt(n, offset=n) for n in (5, 31, 33, 64, 70)]
    outs = []
    for graphs in (False, True):
        cfg = GenerationConfig(
            max_new_tokens=70,
            threshold=threshold,
            block_size=32,
            use_block_cache=block_cache,
            cuda_graphs=graphs,
        )
        outs.append(generate(model, prompts, IDS, cfg, POLICIES[name]()))
    eager, graphed = outs
    assert [o.token_ids for o in graphed.outputs] == [o.token_ids for o in eager.outputs]
    e, g = eager.stats, graphed.stats
    assert (g.forwards, g.row_forwards, g.executed_flops) == (
        e.forwards,
        e.row_forwards,
        e.executed_flops,
    )
    assert g.executed_units_per_layer == e.executed_units_per_layer
