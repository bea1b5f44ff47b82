"""Application code for the recipes and benchmarks, kept apart from the adapter library.

- `instruct_eval`: the lm-evaluation-harness driver behind `recipes/evaluate_instruct.py` (the paper's InstructEval);
- `glue_metric`: the GLUE metric as a local `evaluate` module (no Hub), for `recipes/glue.py` and run_glue-style scripts;
- `mn_heatmap`: the M x N grid-search heatmap (the paper's Fig. 6) and the best-(M, N) rule.

Nothing in `lor2c_hf` outside this folder imports it (tests/test_layout.py checks), so the core needs
none of lm-eval, scikit-learn or Optuna.
"""
