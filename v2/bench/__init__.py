"""Wall-clock measurements of the engine's forwards, end-to-end generation, compute skipping at
forced rates and a compiled autoregressive baseline, next to bounds measured on the same device:

    python -m v2.bench --out OUT --name h200     # 7B + 1.5B shapes (random bf16 weights) + tiny
    python -m v2.bench --models tiny --quick     # a reduced grid
    python -m v2.bench --models test --quick --device cpu --out /tmp/b   # what the tests run
    python -m v2.bench --readme docs/benchmarks/h200.json   # rewrite README.md's speed table

Modules: models (shapes, random weights), forced (fixed-rate skipping on the real policies),
timing, roofline (measured bounds), sections (what is measured), hf (the compiled AR baseline),
profiling (--profile), report (targets, markdown, plot, README table), cli.
"""
