"""The paper's experiments as `pmoe` subcommands (see docs/RESULTS.md for what they measured).

    sample_complexity  pmoe sample-complexity: accuracy vs training-set size, CNN vs pMoE
    show_routing       pmoe show-routing: the patches each expert of a trained model picks
    spurious           pmoe spurious: a label-correlated marker in training only
    equal_compute      pmoe equal-compute: flagship pMoE vs its dense twin, accuracy and FLOPs
    text_segments      pmoe text-segments: dense vs segment pMoE vs hierarchical pMoE on text
    routing_metrics    discriminative routing (capture, irrelevant patches routed)
    flops              counted FLOPs of a model's steps (shared with bench/compute_savings.py)
    common             argument types, the paper's three models, output helpers

Each subcommand module has add_arguments(parser) and run(args); pmoe/cli.py registers them.
"""
